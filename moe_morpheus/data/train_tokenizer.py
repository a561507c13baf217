"""Training the project's bilingual SentencePiece tokenizer on a sample of a data config's sources.

    python -m moe_morpheus.data.train_tokenizer output=PATH [data_config=YAML] [vocab_size=8192]
        [max_chars=3000000] [character_coverage=0.9995] [seed=0] [compare=OTHER.model]

writes PATH, and PATH.json with the settings, the sample per source, the git commit and the
compression (UTF-8 bytes and characters per token) on held-out text, per source and language.

Sampling streams (memory follows ``max_chars``, not the corpus; each rule is tested):
- a source's share of ``max_chars`` follows ``DataConfig.tokenizer_shares()`` (blend weights,
  MIP counted for parallel sources); a source smaller than its share gives all it has;
- within a source, the shards are visited in a seeded random order, each with a character
  quota: what the source still needs over the shards left, at least ``MIN_SHARD_QUOTA`` (64k),
  so a 3 M sample of 10,000 shards reads about 46 random shards rather than opening every one
  for 300 characters. What a short shard leaves goes to the shards after it; when the last
  ones are short too, a second pass takes more from the shards that had more;
- within a shard, only its first ``READ_WINDOW`` (8) x quota characters are read, and of their
  documents those with the smallest seeded hashes are taken up to the quota (a uniform random
  sample of the window, kept in a heap of at most the quota plus one document). Taking the
  first records instead, on the demo corpus (one file per source), made the parallel sample
  the first 20% of the help pages (Basic and Calc only): on the other pages that model
  compressed Chinese to 3.83 bytes/token, this one to 4.01. With 8, the demo sources are
  read whole; a 3 M sample of a 100 GB corpus reads 24 M characters;
- a document gives at most 1/16 of its shard's quota (its beginning);
- ``HELDOUT_SHARE`` (5%) of the sampled documents, chosen by a seeded hash of the document (a
  parallel pair is one document), are held out: never trained on, used for the compression
  report. They count towards ``max_chars``: training sees about 95% of it.

Settings and why (measured on the demo corpus, vocab 8192, 2 cores):
- BPE, not unigram: the same held-out compression (en 3.80 vs 3.69 chars/token, zh 1.10 vs
  1.11, en-zh help pages 3.08 vs 3.07) but trains in 2 s instead of 29 s.
- identity normalisation, ``remove_extra_whitespaces=False``, ``add_dummy_prefix=False``:
  decode(encode(text)) == text exactly (NFKC would rewrite full-width Chinese punctuation
  such as "，" and "（"), and tokenising two strings separately then concatenating decodes to
  the concatenated string (MIP prompts are assembled that way).
- ``character_coverage=0.9995`` with byte fallback (always on: ids 8..263 are the 256 bytes):
  Chinese has a long tail of characters (Sanguo alone uses 3,959 distinct ones, 534 of them
  once; a web corpus tens of thousands), and full coverage gives every character seen once a
  piece of its own. At 0.9995 the rarest 0.05% of character occurrences become 3 byte tokens
  instead. Held out (this sampler, seed 0): 0.9999 cuts Sanguo's byte tokens from 2.2% to 1.2%
  of its tokens but costs 1.7% of English and 1.0% of Chinese bytes/token; 1.0 costs 2.5% and
  1.5%. SentencePiece recommends 0.9995 for Chinese and Japanese, 1.0 for small alphabets.
- ``split_by_whitespace`` stays on: Chinese has no spaces, so a Chinese run is one "word" and
  BPE learns multi-character pieces inside it; ``split_by_unicode_script`` keeps Han and Latin
  apart.

The committed data/tokenizer/demo_8k.model came from the earlier whole-source sampler (see
data/tokenizer/README.md for the commit and how this command's model compares).
"""

from __future__ import annotations

import hashlib
import heapq
import io
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import sentencepiece as spm

from moe_morpheus.config import ConfigError
from moe_morpheus.config.cli import fail, option, parse_options
from moe_morpheus.config.data import REPO_ROOT, SourceConfig
from moe_morpheus.data.readers import ReadStats, read_shard
from moe_morpheus.data.shards import shard_paths
from moe_morpheus.data.tokenizer import (
    EOP_ID,
    EOS_ID,
    GMASK_ID,
    MASK_ID,
    MIN_VOCAB_SIZE,
    NUM_BYTE_PIECES,
    PAD_ID,
    SMASK_ID,
    SOP_ID,
    SPECIAL_PIECES,
    UNK_ID,
    Tokenizer,
    TokenizerError,
)

# The ceiling: Morpheus used 100k pieces (icetk), the largest open bilingual
# vocabularies are about 150k. Ids above 65,535 store tokenised corpora as int32, twice the disk.
MAX_VOCAB_SIZE = 150_000
# A shard visited gives at least this many characters (a few documents; opening a .jsonl.gz
# and decompressing 64k characters takes about a millisecond).
MIN_SHARD_QUOTA = 65_536
# Characters of a shard read per character taken from it (module docstring).
READ_WINDOW = 8
# No document gives more than 1/16 of its shard's quota: otherwise one long document with a small
# key fills it (the demo's last Austen record, 2.3 M characters, was the whole English sample).
MIN_DOCS_PER_SHARD = 16
# Training keeps 95% of the sample. On the demo blend at 3 M (seed 0) the other 5% are 149k
# characters in 288 documents (en 117k, zh 32k); Austen's and Sanguo's rows rest on 5 chapters
# each: the report gives the documents behind every row.
HELDOUT_SHARE = 0.05
HELDOUT_LIMIT = int(HELDOUT_SHARE * 2**64)
# Byte-fallback tokens that mark characters the vocabulary lacks: every byte piece except the
# newline <0x0A>, which is how every line break is written (6% of Austen's tokens).
_UNCOVERED = frozenset(range(len(SPECIAL_PIECES), len(SPECIAL_PIECES) + NUM_BYTE_PIECES)) - {len(SPECIAL_PIECES) + 10}


def check_vocab_size(vocab_size: int) -> None:
    if vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerError(
            f"vocab_size={vocab_size} is too small: the {len(SPECIAL_PIECES)} special tokens and "
            f"{NUM_BYTE_PIECES} byte-fallback pieces need {len(SPECIAL_PIECES) + NUM_BYTE_PIECES} ids; "
            f"use at least {MIN_VOCAB_SIZE}")
    if vocab_size > MAX_VOCAB_SIZE:
        raise TokenizerError(f"vocab_size={vocab_size} is too large: use at most {MAX_VOCAB_SIZE:,} "
                             f"(Morpheus used 100,000)")


def _sentences(texts: Iterable[str]) -> Iterator[str]:
    # SentencePiece trains on lines; newlines inside a document become the byte piece <0x0A>.
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line


def train_tokenizer(texts: Iterable[str], output: str | os.PathLike, *, vocab_size: int,
                    character_coverage: float = 0.9995, seed: int = 0) -> Tokenizer:
    """Train a BPE model on ``texts`` and write it atomically to ``output``."""
    check_vocab_size(vocab_size)
    sentences = list(_sentences(texts))
    if not sentences:
        raise TokenizerError("no text to train the tokenizer on: check the configured sources")
    # SentencePiece samples input_sentence_size lines itself; a fixed shuffle makes the model
    # depend only on the inputs and seed.
    random.Random(seed).shuffle(sentences)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
            model_type="bpe", character_coverage=character_coverage, byte_fallback=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            split_digits=True, allow_whitespace_only_pieces=True,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=-1, eos_id=EOS_ID, pad_piece="<pad>", eos_piece="<eos>",
            control_symbols=[SPECIAL_PIECES[i] for i in (MASK_ID, GMASK_ID, SMASK_ID, SOP_ID, EOP_ID)],
            # Sanguo paragraphs reach 2,442 characters (7 KB of UTF-8); the default 4,192-byte
            # limit would silently drop them.
            max_sentence_length=1 << 16, shuffle_input_sentence=False, num_threads=os.cpu_count() or 1,
            minloglevel=2)
    except RuntimeError as err:
        raise TokenizerError(f"SentencePiece could not train a vocabulary of {vocab_size}: {err}") from err
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp{os.getpid()}")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, output)
    return Tokenizer(output)


@dataclass
class SourceSample:
    """What one source gave: training texts, held-out (lang, text) pairs, and how it was read."""

    name: str
    budget: int
    train: list[str] = field(default_factory=list)
    heldout: list[tuple[str, str]] = field(default_factory=list)
    shards: int = 0
    shards_read: int = 0
    # Documents pulled from the readers, those taken (held out or not), and bad records skipped.
    documents_read: int = 0
    documents: int = 0
    heldout_documents: int = 0
    skipped: int = 0
    # "path: what was wrong" for every shard with bad records or damage.
    problems: list[str] = field(default_factory=list)
    # The training document held out when the hash holds out none: (draw, first text, its langs).
    spare: tuple[int, int, list[str]] | None = field(default=None, repr=False)

    @property
    def chars(self) -> int:
        return sum(map(len, self.train)) + sum(len(t) for _, t in self.heldout)

    def summary(self) -> dict:
        return {"budget_chars": self.budget, "train_chars": sum(map(len, self.train)),
                "heldout_chars": sum(len(t) for _, t in self.heldout), "documents": self.documents,
                "heldout_documents": self.heldout_documents, "documents_read": self.documents_read,
                "shards": self.shards, "shards_read": self.shards_read, "skipped_records": self.skipped,
                "problems": self.problems}


def doc_hashes(name: str, doc: str | tuple[str, str], seed: int) -> tuple[int, int]:
    """(sampling key, held-out draw), 64 bits each, from one seeded hash of the whole document:
    the same document gets the same answers wherever it is read. Held out: draw < HELDOUT_LIMIT."""
    text = "\0".join(doc) if isinstance(doc, tuple) else doc
    digest = hashlib.blake2b(f"{seed}\0{name}\0{text}".encode(), digest_size=16).digest()
    return int.from_bytes(digest[:8], "big"), int.from_bytes(digest[8:], "big")


def _sides(src: SourceConfig, doc: str | tuple[str, str]) -> list[tuple[str, str]]:
    return [("en", doc[0]), ("zh", doc[1])] if isinstance(doc, tuple) else [(src.lang, doc)]


def _take(sample: SourceSample, src: SourceConfig, path: Path, quota: int, window: int, seed: int,
          exclude: frozenset[int] = frozenset()) -> tuple[int, set[int], bool]:
    """Of the documents in the first ``window`` characters of ``path`` (less those keyed in
    ``exclude``), the smallest-keyed up to ``quota`` characters. Returns (characters taken,
    their keys, whether documents were left: unread or not chosen)."""
    stats = ReadStats()
    docs = read_shard(f"data.sources.{sample.name}", src, path, stats)
    heap: list[tuple[int, int, str | tuple[str, str], int, int]] = []  # (-key, n, doc, draw, chars)
    seen = total = 0
    cap = max(1, quota // MIN_DOCS_PER_SHARD)
    left = False
    while seen < window:  # checked before the next record is pulled: nothing is read past it
        doc = next(docs, None)
        if doc is None:
            break
        sample.documents_read += 1
        chars = sum(len(t) for _, t in _sides(src, doc))
        seen += chars
        key, draw = doc_hashes(sample.name, doc, seed)
        if key in exclude:
            continue
        doc = doc[:cap] if isinstance(doc, str) else (doc[0][:cap], doc[1][:max(0, cap - len(doc[0]))])
        heapq.heappush(heap, (-key, sample.documents_read, doc, draw, min(chars, cap)))
        total += min(chars, cap)
        # Drop the largest key while the others still fill the quota.
        while len(heap) > 1 and total - heap[0][4] >= quota:
            total -= heapq.heappop(heap)[4]
            left = True
    else:
        left = True
    docs.close()
    sample.skipped += stats.skipped
    if stats.skipped or stats.corrupt or not stats.documents:
        sample.problems.append(f"{path}: {stats.problems()}")
    taken, keys = 0, set()
    for neg_key, _, doc, draw, _ in sorted(heap, reverse=True):  # smallest key first
        if taken >= quota:
            left = True
            break
        keys.add(-neg_key)
        held = draw < HELDOUT_LIMIT
        sample.documents += 1
        sample.heldout_documents += held
        at, langs = len(sample.train), []
        for lang, text in _sides(src, doc):
            text = text[:quota - taken]
            if text:
                (sample.heldout.append((lang, text)) if held else sample.train.append(text))
                taken, langs = taken + len(text), langs + [lang]
        if not held and draw < (sample.spare or (1 << 64,))[0]:
            sample.spare = (draw, at, langs)
    return taken, keys, left


def sample_source(name: str, src: SourceConfig, budget: int, seed: int = 0,
                  min_shard_quota: int = MIN_SHARD_QUOTA) -> SourceSample:
    """``budget`` characters of ``src`` spread over its shards (module docstring)."""
    paths = shard_paths(name, src)
    random.Random(f"{seed}-{name}").shuffle(paths)
    sample = SourceSample(name, budget, shards=len(paths))
    left = budget
    more: list[tuple[Path, int, set[int]]] = []  # shards that had more: (path, quota given, keys taken)
    for i, path in enumerate(paths):
        if left <= 0:
            break
        quota = min(left, max(min_shard_quota, -(-left // (len(paths) - i))))
        taken, keys, had_more = _take(sample, src, path, quota, READ_WINDOW * quota, seed)
        sample.shards_read += 1
        left -= taken
        if had_more:
            more.append((path, quota, keys))
    for j, (path, first, keys) in enumerate(more):  # only when later shards fell short
        if left <= 0:
            break
        quota = min(left, max(min_shard_quota, -(-left // (len(more) - j))))
        left -= _take(sample, src, path, quota, READ_WINDOW * (first + quota), seed, frozenset(keys))[0]
    if not sample.heldout and sample.spare:
        # Few documents (77 Austen chapters give none at 5% one time in 50): hold out the one
        # with the smallest draw, so that every source is reported.
        _, at, langs = sample.spare
        texts = sample.train[at:at + len(langs)]
        del sample.train[at:at + len(langs)]
        sample.heldout = list(zip(langs, texts))
        sample.heldout_documents = 1
    return sample


def sample_blend(data_cfg, max_chars: int, seed: int = 0,
                 min_shard_quota: int = MIN_SHARD_QUOTA) -> list[SourceSample]:
    """A sample of every source with a share of ``max_chars`` (``DataConfig.tokenizer_shares``)."""
    shares = data_cfg.tokenizer_shares()
    return [sample_source(name, src, int(shares[name] * max_chars), seed, min_shard_quota)
            for name, src in data_cfg.sources.items() if shares[name] > 0]


def blend_texts(data_cfg, max_chars: int, seed: int = 0) -> list[str]:
    """The training texts of :func:`sample_blend` (held-out documents left out)."""
    return [text for s in sample_blend(data_cfg, max_chars, seed) for text in s.train]


def compression(tok: Tokenizer, samples: list[SourceSample]) -> list[dict]:
    """Held-out compression: one row per (source, language), then one per language (source "all");
    a parallel source has an en and a zh row. ``byte_token_share``: tokens that are byte pieces
    for characters outside the vocabulary (newlines, always <0x0A>, not counted)."""
    texts = [(s.name, lang, text) for s in samples for lang, text in s.heldout]
    ids = tok.encode_batch([text for _, _, text in texts])
    counts: dict[tuple[str, str], list[int]] = {}
    for (name, lang, text), piece_ids in zip(texts, ids):
        row = [1, len(text), len(text.encode("utf-8")), len(piece_ids),
               sum(i in _UNCOVERED for i in piece_ids)]
        for key in ((name, lang), ("all", lang)):
            counts[key] = [a + b for a, b in zip(counts.get(key, [0] * 5), row)]
    order = [s.name for s in samples] + ["all"]  # sources as configured, then the languages
    return [{"source": name, "lang": lang, "documents": docs, "chars": chars, "bytes": nbytes, "tokens": tokens,
             "bytes_per_token": round(nbytes / tokens, 4), "chars_per_token": round(chars / tokens, 4),
             "byte_token_share": round(byte_tokens / tokens, 5)}
            for (name, lang), (docs, chars, nbytes, tokens, byte_tokens)
            in sorted(counts.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1]))]


def format_table(rows: list[dict], title: str) -> str:
    lines = [title, f"{'source':<14}{'lang':<7}{'docs':>7}{'chars':>11}{'bytes':>11}{'tokens':>10}"
                    f"{'bytes/tok':>11}{'chars/tok':>11}{'byte tok':>10}"]
    for r in rows:
        lines.append(f"{r['source']:<14}{r['lang']:<7}{r['documents']:>7,}{r['chars']:>11,}{r['bytes']:>11,}"
                     f"{r['tokens']:>10,}{r['bytes_per_token']:>11.3f}{r['chars_per_token']:>11.3f}"
                     f"{100 * r['byte_token_share']:>9.2f}%")
    return "\n".join(lines)


def _git_commit() -> dict | None:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True,
                              check=True, timeout=30).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"),
                "uncommitted_changes": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None


def _write_json(path: Path, report: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


@dataclass
class TokenizerOptions:
    output: str = option(help="path of the .model file to write (and <output>.json: settings, sample, compression)")
    data_config: str = option("conf/data/demo.yaml", help="a data config YAML (DataConfig keys) whose sources are sampled")
    vocab_size: int = option(8192, help=f"vocabulary size, special tokens included ({MIN_VOCAB_SIZE}..{MAX_VOCAB_SIZE})")
    max_chars: int = option(3_000_000, help="characters sampled from the sources, 5% held out (3M: 2 s of BPE training)")
    character_coverage: float = option(0.9995, help="share of character occurrences given pieces, the rest byte tokens (0.9995: Chinese has a long tail)")
    seed: int = option(0, help="sampling, held-out and training seed")
    compare: str | None = option(None, help="another .model to report on the same held-out text (e.g. the demo one)")


def main(argv: list[str] | None = None) -> int:
    """``python -m moe_morpheus.data.train_tokenizer output=PATH [data_config=YAML] [key=value]``:
    train a tokenizer on a sample of a data config's sources and report its held-out compression."""
    from omegaconf import OmegaConf

    from moe_morpheus.config.data import DataConfig

    start = time.perf_counter()
    try:  # every failure here is a user input problem: the message, not a traceback
        args, _ = parse_options(TokenizerOptions, sys.argv[1:] if argv is None else argv,
                                prog="moe_morpheus.data.train_tokenizer", summary=main.__doc__)
        check_vocab_size(args.vocab_size)  # before minutes of sampling
        if args.max_chars <= 0:
            raise ConfigError(f"max_chars={args.max_chars} must be positive")
        if not Path(args.data_config).is_file():
            raise ConfigError(f"data config {args.data_config} not found: pass data_config=PATH (e.g. conf/data/demo.yaml)")
        other = Tokenizer(args.compare) if args.compare else None
        cfg = DataConfig.from_dict(OmegaConf.to_container(OmegaConf.load(args.data_config), resolve=True))
        samples = sample_blend(cfg, args.max_chars, args.seed)
        for problem in (p for s in samples for p in s.problems):
            print(f"warning: {problem}", file=sys.stderr)
        tok = train_tokenizer((t for s in samples for t in s.train), args.output, vocab_size=args.vocab_size,
                              character_coverage=args.character_coverage, seed=args.seed)
    except (ValueError, OSError) as error:  # ConfigError, DataError, TokenizerError are ValueErrors
        return fail(error)
    seconds = time.perf_counter() - start
    report = {
        "model": str(args.output), "vocab_size": tok.vocab_size, "seconds": round(seconds, 1),
        "settings": {**vars(args), "model_type": "bpe", "byte_fallback": True, "normalization": "identity",
                     "heldout_share": HELDOUT_SHARE, "min_shard_quota": MIN_SHARD_QUOTA,
                     "read_window": READ_WINDOW, "sentencepiece": spm.__version__},
        "git": _git_commit(), "sample": {s.name: s.summary() for s in samples},
        "compression": compression(tok, samples),
    }
    tables = [format_table(report["compression"], f"held-out compression of {args.output}")]
    if other is not None:
        report["compare"] = {"model": str(args.compare), "compression": compression(other, samples)}
        tables.append(format_table(report["compare"]["compression"], f"the same text with {args.compare}"))
    _write_json(Path(str(args.output) + ".json"), report)
    print("\n\n".join(tables))
    train_chars = sum(len(t) for s in samples for t in s.train)
    print(f"wrote {args.output} (+.json): vocab {tok.vocab_size}, {train_chars:,} training characters, "
          f"{seconds:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
