"""Data configuration: sources and their blend, tokenizer, cache, objective and split settings.

Validated when built: a config that cannot work fails with a message naming the field and
the fix. Relative paths are resolved against the repository root, so a run started from any
working directory (Hydra output folders included) finds the demo corpus.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from moe_morpheus.config.errors import check

REPO_ROOT = Path(__file__).resolve().parents[2]
KINDS = ("text", "parallel")
FORMATS = ("auto", "jsonl", "text")


def resolve_path(path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p


@dataclass
class SourceConfig:
    """One corpus. ``kind=text``: JSONL records with ``text_field``, or a plain text file (one
    document per file). ``kind=parallel``: JSONL en-zh pairs; feeds MIP, and the blank-infilling
    blend too when ``weight`` > 0 (each pair as the document "en\\nzh")."""

    path: str = ""
    kind: str = "text"
    lang: str = "en"
    # Share of the self-supervised (blank infilling) rows, normalised over all sources.
    weight: float = 1.0
    # auto: .jsonl/.json(.gz) are JSONL, anything else is plain text.
    format: str = "auto"
    text_field: str = "text"
    en_field: str = "en"
    zh_field: str = "zh"

    def validate(self, name: str) -> None:
        where = f"data.sources.{name}"
        check(bool(self.path), f"{where}.path is empty: point it at a .jsonl(.gz) or .txt(.gz) file")
        check(self.kind in KINDS, f"{where}.kind={self.kind!r}: choose one of {KINDS}")
        check(self.format in FORMATS, f"{where}.format={self.format!r}: choose one of {FORMATS}")
        check(self.weight >= 0 and math.isfinite(self.weight),
              f"{where}.weight={self.weight} must be a finite number >= 0 (0: not in the infilling blend)")
        if self.kind == "parallel":
            check(self.resolved_format == "jsonl",
                  f"{where}: parallel pairs must be JSONL records with {self.en_field!r} and "
                  f"{self.zh_field!r} fields (got a {self.resolved_format} file {self.path})")

    @property
    def resolved_path(self) -> Path:
        return resolve_path(self.path)

    @property
    def resolved_format(self) -> str:
        if self.format != "auto":
            return self.format
        suffixes = [s for s in Path(self.path).suffixes if s != ".gz"]
        return "jsonl" if suffixes and suffixes[-1] in (".jsonl", ".json") else "text"


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

    # Corpora by name (the name labels validation sets and cache files); default: the bilingual
    # demo corpus.
    sources: dict[str, SourceConfig] = field(default_factory=demo_sources)
    tokenizer: str = "data/tokenizer/demo_8k.model"
    # Tokenised corpora (.bin/.idx) keyed by input bytes and tokenizer; /cache/ is git-ignored.
    cache_dir: str = "cache/data"
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
        check(isinstance(self.sources, Mapping) and len(self.sources) > 0,
              "data.sources is empty: configure at least one corpus (path, kind, lang, weight)")
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
