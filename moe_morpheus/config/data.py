"""Data configuration: sources and their blend, tokenizer, cache, objective and split settings.

Validated when built: a config that cannot work fails with a message naming the field and
the fix. Relative paths are resolved against the repository root, so a run started from any
working directory (Hydra output folders included) finds the demo corpus.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from moe_morpheus.config.errors import check

REPO_ROOT = Path(__file__).resolve().parents[2]
KINDS = ("text", "parallel")
FORMATS = ("auto", "jsonl", "parquet", "text")
# Compression is told by the last suffix and undone while streaming (moe_morpheus/data/readers.py).
COMPRESSIONS = (".gz", ".zst")


def resolve_path(path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p


def format_of(fmt: str, path: str | Path) -> str:
    """The reading format of one shard: ``fmt`` unless it is ``auto``, which tells by the name
    (.jsonl/.json, compressed or not: JSONL; .parquet: Parquet; anything else: plain text)."""
    if fmt != "auto":
        return fmt
    suffixes = [s for s in Path(path).suffixes if s not in COMPRESSIONS]
    last = suffixes[-1] if suffixes else ""
    return {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}.get(last, "text")


@dataclass
class SourceConfig:
    """One corpus: a file, a glob or a list of files and globs (its shards, read as one corpus in
    sorted path order). ``kind=text``: JSONL records or Parquet rows with ``text_field``, or plain
    text files (one document per file). ``kind=parallel``: en-zh pairs (JSONL or Parquet); feeds
    MIP, and the blank-infilling blend too when ``weight`` > 0 (each pair as the document "en\\nzh").
    JSONL and text may be compressed (.gz, .zst)."""

    # str or list[str] (OmegaConf's structured configs have no unions of primitives).
    path: Any = ""
    kind: str = "text"
    lang: str = "en"
    # Share of the self-supervised (blank infilling) rows, normalised over all sources.
    weight: float = 1.0
    # auto: by each shard's name (format_of); or one of FORMATS for every shard.
    format: str = "auto"
    text_field: str = "text"
    en_field: str = "en"
    zh_field: str = "zh"

    def validate(self, name: str) -> None:
        where = f"data.sources.{name}"
        if not isinstance(self.path, str):
            self.path = list(self.path) if isinstance(self.path, Sequence) else self.path
            check(isinstance(self.path, list) and all(isinstance(p, str) and p for p in self.path),
                  f"{where}.path={self.path!r} must be a path, a glob or a list of them")
        check(bool(self.path), f"{where}.path is empty: point it at a .jsonl(.gz/.zst), .parquet or .txt "
                               f"file, a glob (shards/*.jsonl.zst) or a list of them")
        check(self.kind in KINDS, f"{where}.kind={self.kind!r}: choose one of {KINDS}")
        check(self.format in FORMATS, f"{where}.format={self.format!r}: choose one of {FORMATS}")
        check(self.weight >= 0 and math.isfinite(self.weight),
              f"{where}.weight={self.weight} must be a finite number >= 0 (0: not in the infilling blend)")
        if self.kind == "parallel":
            for pattern in self.patterns:
                check(format_of(self.format, pattern) != "text",
                      f"{where}: parallel pairs must be JSONL records or Parquet rows with {self.en_field!r} "
                      f"and {self.zh_field!r} fields (got the text file(s) {pattern}; set {where}.format)")

    @property
    def patterns(self) -> list[str]:
        """The configured paths and globs, as written."""
        return [self.path] if isinstance(self.path, str) else list(self.path)


def sources_left_to_configs(schema: DictConfig, key: str = "data") -> DictConfig:
    """``schema`` (a structured config holding a DataConfig at ``key``) with no sources. Hydra
    merges a data config's ``sources`` into the schema's mapping key by key, so with the demo
    sources there a corpus named in conf/data/NAME.yaml or on the command line would be trained
    together with the demo's; DataConfig turns "none configured" back into the demo sources."""
    OmegaConf.update(schema, f"{key}.sources", {}, merge=False)
    return schema


def demo_sources() -> dict[str, SourceConfig]:
    # Weights: Chinese gets 35% of infilling rows from 15% of the text (0.6 M of 4.6 M book
    # characters), about 6 passes over Sanguo per pass over Austen; epochs are logged per source.
    return {
        "en": SourceConfig(path="data/demo_corpus/en_austen.jsonl.gz", kind="text", lang="en", weight=0.5),
        "zh": SourceConfig(path="data/demo_corpus/zh_sanguo.jsonl.gz", kind="text", lang="zh", weight=0.35),
        "parallel": SourceConfig(path="data/demo_corpus/parallel_en_zh_libreoffice_help.jsonl.gz",
                                 kind="parallel", lang="en-zh", weight=0.15),
    }


@dataclass
class DataConfig:
    """Sources, blend and objective of the training data (GLM, Du et al. 2022; GLM-130B;
    docs/design.md#blank-infilling)."""

    # Corpora by name (the name labels validation sets and cache files); default, and what an
    # empty mapping means: the bilingual demo corpus. The Hydra schemas start from an empty
    # mapping (sources_left_to_configs), so that conf/data/NAME.yaml replaces the demo sources
    # instead of being merged into them.
    sources: dict[str, SourceConfig] = field(default_factory=demo_sources)
    tokenizer: str = "data/tokenizer/demo_8k.model"
    # Tokenised shards (.bin/.idx) keyed by input and tokenizer; /cache/ is git-ignored.
    cache_dir: str = "cache/data"
    # Training tokenises shards missing from the cache itself while they total at most this many
    # MB of input (one process, about 1-2 MB/s: the demo's 2.6 MB take 2 s); more fails naming
    # them and `python -m moe_morpheus.data.prepare`, which tokenises with a pool of workers and
    # across machines. 0: never tokenise at start.
    tokenize_on_start_mb: float = 256.0
    # Seed of the training stream (blend, data order, objectives and spans). None: the run's
    # trainer.seed, resolved by ExperimentConfig.seeds, so seeds of one configuration also
    # differ in their data; set it to pin the data across seeds. build_data needs it resolved.
    seed: int | None = None
    # GLM-130B: 30% of sequences [MASK] (short spans), the rest [gMASK] (one long suffix).
    mask_prob: float = 0.3
    mask_ratio: float = 0.15
    span_lambda: float = 3.0
    max_span_length: int = 39
    # [gMASK] suffix length ~ U[ratio * len, len]; GLM-130B 0.2, GLM-10B 0.5.
    gmask_min_ratio: float = 0.2
    # Fraction of training rows that are MIP (instruction) rows: seed 10%, GLM-130B 5%.
    mip_ratio: float = 0.1
    # Text tokens per window; None: seq_length - 1 (the longest text a [gMASK] sample fits).
    window_tokens: int | None = None
    # Train/validation split unit: documents are cut into chunks of this many tokens and each
    # chunk goes to validation when its content hash falls below valid_fraction. Independent of
    # seq_length and seed, so every run validates on the same tokens. 10% held out: on the demo
    # corpus (seq 128, all held-out rows) 285k targets, a standard error of valid/loss of
    # 0.0048 nats if targets were independent (sd 2.6 / sqrt(285k)) and 0.0083 nats clustered by
    # the 256-token chunks they come from, the estimate runs log (moe_morpheus/data/validation.py);
    # a 226-step demo run reads 0.19 (en) to 0.31 (zh) epochs of the other 90%.
    split_chunk_tokens: int = 256
    valid_fraction: float = 0.1
    # Validation rows are built with this fixed seed (not `seed`): same masks for every run.
    valid_seed: int = 0
    # Rows per validation set (a random sample of its held-out windows); None: all of them.
    # Finite by default because the held-out share grows with the corpus and every rank packs
    # and evaluates every row: 1024 rows of 7 sets at seq 2048 are 15M positions, the forward
    # pass of 7 global batches of conf/trainer/cluster.yaml (~2.4 training steps of compute).
    # conf/data/demo.yaml takes all.
    valid_rows: int | None = 1024

    def __post_init__(self) -> None:
        check(isinstance(self.sources, Mapping), "data.sources must map names to corpora (path, kind, lang, weight)")
        if not self.sources:
            self.sources = demo_sources()
        self.sources = {name: src if isinstance(src, SourceConfig) else SourceConfig(**dict(src))
                        for name, src in self.sources.items()}
        for name, src in self.sources.items():
            check(name.isidentifier(), f"data.sources: name {name!r} must be an identifier (it names "
                                        f"validation sets and cache files)")
            src.validate(name)
        check(sum(s.weight for s in self.sources.values()) > 0,
              "data.sources: every weight is 0; give at least one source a positive weight")
        check(bool(self.tokenizer), "data.tokenizer is empty: set the path of a .model file")
        check(bool(self.cache_dir), "data.cache_dir is empty: set a folder for tokenised corpora")
        check(self.tokenize_on_start_mb >= 0,
              f"data.tokenize_on_start_mb={self.tokenize_on_start_mb} must be >= 0 (0: never tokenise at start)")
        check(0.0 <= self.mask_prob <= 1.0, f"data.mask_prob={self.mask_prob} must be in [0, 1]")
        check(0.0 < self.mask_ratio < 0.5,
              f"data.mask_ratio={self.mask_ratio} must be in (0, 0.5): spans need unmasked gaps between them")
        check(self.span_lambda > 0, f"data.span_lambda={self.span_lambda} must be positive")
        check(self.max_span_length >= 1, f"data.max_span_length={self.max_span_length} must be >= 1")
        check(0.0 < self.gmask_min_ratio <= 1.0,
              f"data.gmask_min_ratio={self.gmask_min_ratio} must be in (0, 1]")
        check(0.0 <= self.mip_ratio < 1.0, f"data.mip_ratio={self.mip_ratio} must be in [0, 1)")
        check(self.mip_ratio == 0.0 or any(s.kind == "parallel" for s in self.sources.values()),
              f"data.mip_ratio={self.mip_ratio} needs a source with kind=parallel (or set mip_ratio=0)")
        check(self.window_tokens is None or self.window_tokens >= 8,
              f"data.window_tokens={self.window_tokens} must be >= 8 or null (seq_length - 1)")
        check(self.split_chunk_tokens >= 16,
              f"data.split_chunk_tokens={self.split_chunk_tokens} must be >= 16")
        check(0.0 < self.valid_fraction < 0.5,
              f"data.valid_fraction={self.valid_fraction} must be in (0, 0.5)")
        check(self.valid_rows is None or self.valid_rows >= 1,
              f"data.valid_rows={self.valid_rows} must be >= 1 or null (every held-out window)")

    @classmethod
    def from_dict(cls, values: Mapping) -> DataConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        check(not unknown, f"data: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**dict(values))

    def window_for(self, seq_length: int) -> int:
        window = self.window_tokens if self.window_tokens is not None else seq_length - 1
        check(window <= seq_length - 1,
              f"data.window_tokens={window} does not fit seq_length={seq_length}: a [gMASK] sample "
              f"adds one token, so use at most {seq_length - 1} (or null)")
        return window

    def row_shares(self) -> dict[str, float]:
        """Fraction of training rows per stream: each infilling source by weight, plus "mip"."""
        total = sum(s.weight for s in self.sources.values())
        shares = {name: (1.0 - self.mip_ratio) * s.weight / total
                  for name, s in self.sources.items() if s.weight > 0}
        if self.mip_ratio > 0:
            shares["mip"] = self.mip_ratio
        return shares

    def tokenizer_shares(self) -> dict[str, float]:
        """Fraction of tokenizer training characters per source (MIP counts for parallel sources)."""
        shares = {name: 0.0 for name in self.sources}
        parallel = [name for name, s in self.sources.items() if s.kind == "parallel"]
        for name, share in self.row_shares().items():
            if name == "mip":
                for p in parallel:
                    shares[p] += share / len(parallel)
            else:
                shares[name] += share
        return shares


@dataclass
class PrepareConfig:
    """``python -m moe_morpheus.data.prepare`` (conf/prepare.yaml): tokenise a data config's
    shards ahead of training, with a pool of workers, on one machine or spread over many."""

    data: DataConfig = field(default_factory=DataConfig)
    # Which shards, a Python slice "A:B" over the numbered list of every source's shards in
    # config order (the command prints it): "0:500" on one machine, "500:1000" on another, or a
    # Hydra multirun over ranges. ":" takes all.
    shards: str = ":"
    # Worker processes; None: one per core (each tokenises whole shards, one SentencePiece thread).
    workers: int | None = None
    # Hash every byte of the shards already tokenised and re-tokenise those whose content changed
    # (the cache key samples 192 KiB of each; moe_morpheus/data/shards.py).
    verify: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        self.shard_slice(0)
        check(self.workers is None or self.workers >= 1, f"workers={self.workers} must be >= 1 or null (one per core)")

    def shard_slice(self, count: int) -> range:
        """The shard numbers ``shards`` selects out of ``count``."""
        parts = str(self.shards).split(":")
        ok = len(parts) == 2 and all(p.strip().lstrip("-").isdigit() or not p.strip() for p in parts)
        check(ok, f"shards={self.shards!r} must be a range A:B (e.g. 0:500, 500:, :)")
        a, b = (int(p) if p.strip() else None for p in parts)
        return range(count)[slice(a, b)]
