"""Training and validation rows: split, windows, objective sampling, packing, blend, batches.

How row i of the training stream is made (it depends only on the config, the corpora and
``(seed, i)``: no state, so any process, DP rank or resumed run computes the same row):

1. **Blend.** Rows come in cycles of 1,000; in each cycle every stream (an infilling source,
   or "mip") owns exactly ``round(share * 1000)`` rows, at positions permuted by
   ``(seed, cycle)``. Row i is row j of one stream, with j known in O(1).
2. **Epochs.** A stream's units (text windows, or MIP examples) are shuffled per epoch by
   ``(seed, stream, epoch)``; each unit gets its objective ([MASK] with ``mask_prob``, else
   [gMASK]) and its spans from the same generator, and the samples are packed first-fit into
   rows (32 rows open at a time), so short pairs and MIP examples share rows instead of
   padding them. Stream row j is row r of epoch e; every token of an epoch is in exactly one
   row, so epochs per source are exact (``TrainDataset.epochs``).
3. **Windows and split.** Each document (ending in <eos>) is cut into chunks of
   ``split_chunk_tokens``; a chunk is validation when a hash of its tokens falls below
   ``valid_fraction`` (seed-independent). Runs of same-side chunks are cut into windows of
   ``window_tokens`` and a remainder. An en-zh pair is one unit as a whole.
4. A [MASK] sample of L text tokens with n spans takes L + 2n tokens; when that exceeds the
   row, the text is cut where it fits and the rest becomes the next unit (nothing is dropped).
   A [gMASK] sample takes L + 1 <= seq_length. MIP examples longer than a row are skipped and
   counted.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import warnings
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import torch

from moe_morpheus.data.config import DataConfig, resolve_path
from moe_morpheus.data.corpus import Corpus, DataError, build_corpus
from moe_morpheus.data.infilling import (
    ROW_KEYS,
    Sample,
    build_gmask_sample,
    build_sample,
    pack,
    sample_gmask_start,
    sample_mask_spans,
    span_length_probs,
)
from moe_morpheus.data.mip import DIRECTIONS, MipTemplates
from moe_morpheus.data.tokenizer import EOP_ID, GMASK_ID, MASK_ID, PAD_ID, SOP_ID, Tokenizer

if TYPE_CHECKING:
    from moe_morpheus.data.validation import RowsDataset

SCHEDULE_CYCLE = 1000
OPEN_ROWS = 32
MASK, GMASK, MIP = 0, 1, 2


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in key])))


def _key(name: str) -> int:
    # Streams are seeded by name, not position: adding a source leaves the others' rows alone.
    return zlib.crc32(name.encode())


def target_unigram(train, vocab_size: int, rows: int = 1000) -> np.ndarray:
    """Unigram distribution of the training targets, from the stream's first ``rows`` rows
    (about 100k targets at sequence 128): the blend, the [MASK] / [gMASK] / MIP mix and the
    <eop> targets as the objective produces them. Add-1/2 smoothed, so a token never seen there
    still has a finite loss."""
    counts = np.zeros(vocab_size, dtype=np.float64)
    for i in range(rows):
        row = train[i]
        counts += np.bincount(row["targets"][row["loss_mask"] > 0], minlength=vocab_size)[:vocab_size]
    return (counts + 0.5) / (counts.sum() + 0.5 * vocab_size)


def unigram_cross_entropy(unigram: np.ndarray, targets) -> float:
    """Loss in nats/token on ``targets`` of the training targets' unigram model: the best
    context-free predictor of the training data. A run learned when its validation loss is clearly below.
    (Not the empirical entropy of the few thousand validation targets, which a vocabulary of
    8192 biases far low: most tokens appear once there.)"""
    return float(-np.log(unigram[np.asarray(targets, dtype=np.int64)]).mean())


def is_valid_chunk(tokens: np.ndarray, valid_fraction: float) -> bool:
    """Content hash of a chunk: the same tokens land on the same side in every run."""
    digest = hashlib.blake2b(np.asarray(tokens, dtype="<i4").tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < valid_fraction * 2.0 ** 64


def split_windows(corpus: Corpus, chunk_tokens: int, valid_fraction: float, window: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(train, valid) windows as [n, 3] arrays of (document, start, end)."""
    out: dict[bool, list] = {False: [], True: []}
    for d in range(corpus.num_docs):
        n = int(corpus.doc_lengths[d])
        step = n if corpus.kind == "parallel" else chunk_tokens
        bounds = list(range(0, n, step)) + [n]
        flags = [is_valid_chunk(corpus.tokens(d, a, b), valid_fraction) for a, b in zip(bounds, bounds[1:])]
        k = 0
        while k < len(flags):
            run_end = k
            while run_end + 1 < len(flags) and flags[run_end + 1] == flags[k]:
                run_end += 1
            a, b = bounds[k], bounds[run_end + 1]
            # Full windows then the remainder: the short remainders pack into the gaps of other
            # rows (near-equal cuts would leave two ~128-token windows that cannot share a row).
            cuts = list(range(a, b, window)) + [b]
            out[flags[k]] += [(d, s, e) for s, e in zip(cuts, cuts[1:])]
            k = run_end + 1
    return tuple(np.array(out[v], dtype=np.int64).reshape(-1, 3) for v in (False, True))


def first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices grouped into rows of at most ``capacity``: each item goes to the first of the
    ``OPEN_ROWS`` most recent rows with room (a new row otherwise); full rows leave the list.
    Demo streams at seq 256: 32 open rows fill 98.0% (MIP) to 99.2% (en, zh) of each row,
    8 open rows only 94% (the short remainders of cut windows find no gap)."""
    rows: list[list[int]] = []
    room: list[int] = []
    open_rows: list[int] = []
    for i, length in enumerate(lengths):
        for k, r in enumerate(open_rows):
            if room[r] >= length:
                rows[r].append(i)
                room[r] -= length
                if room[r] == 0:
                    open_rows.pop(k)
                break
        else:
            rows.append([i])
            room.append(capacity - length)
            if room[-1] > 0:
                open_rows.append(len(rows) - 1)
                if len(open_rows) > OPEN_ROWS:
                    open_rows.pop(0)
    return rows


class Stream(ABC):
    """Rows of one source (or of MIP), epoch after epoch; plans are made lazily and kept."""

    def __init__(self, name: str, seed: int, seq_length: int):
        self.name, self.seed, self.seq_length = name, seed, seq_length
        self._plans: list[list[list[tuple]]] = []
        self._starts = [0]

    @abstractmethod
    def plan(self, rng: np.random.Generator) -> list[list[tuple]]:
        """One epoch: rows of pieces, each piece enough to build its sample without randomness."""

    @abstractmethod
    def build(self, piece: tuple) -> Sample:
        """The sample of one piece of a plan."""

    def _locate(self, j: int) -> tuple[int, int]:
        while self._starts[-1] <= j:
            rows = self.plan(_rng(self.seed, _key(self.name), len(self._plans)))
            self._plans.append(rows)
            self._starts.append(self._starts[-1] + len(rows))
        e = bisect.bisect_right(self._starts, j) - 1
        return e, j - self._starts[e]

    def pieces(self, j: int) -> list[tuple]:
        """What row j is made of: (kind, document, start, end, spans or suffix start) per
        sample for text, (MIP, corpus, pair, template, None) for MIP."""
        e, r = self._locate(j)
        return self._plans[e][r]

    def row(self, j: int) -> dict[str, np.ndarray]:
        return self.pack(self.pieces(j))

    def pack(self, pieces: list[tuple]) -> dict[str, np.ndarray]:
        return pack([self.build(p) for p in pieces], self.seq_length, PAD_ID)

    def epoch_rows(self, epoch: int) -> int:
        """Rows in one epoch of this stream (epochs differ slightly: objectives are redrawn)."""
        while len(self._plans) <= epoch:
            self._locate(self._starts[-1])
        return len(self._plans[epoch])

    def epochs(self, rows_consumed: int) -> float:
        """Passes over the stream's training data after ``rows_consumed`` of its rows."""
        e, r = self._locate(rows_consumed)
        return e + r / len(self._plans[e])


class TextStream(Stream):
    """Blank infilling over the windows of one corpus."""

    def __init__(self, name: str, corpus: Corpus, units: np.ndarray, cfg: DataConfig, seq_length: int):
        super().__init__(name, cfg.seed, seq_length)
        if len(units) == 0:
            raise DataError(f"data.sources.{name}: no training windows (corpus of {corpus.doc_lengths.sum()} "
                            f"tokens); add text or lower data.valid_fraction")
        self.corpus, self.units, self.cfg = corpus, units, cfg
        self.probs = span_length_probs(cfg.span_lambda, cfg.max_span_length)

    def _mask_spans(self, length: int, rng: np.random.Generator) -> list[tuple[int, int]]:
        return sample_mask_spans(length, rng, ratio=self.cfg.mask_ratio, probs=self.probs)

    def cut(self, d: int, a: int, b: int, rng: np.random.Generator, force: int | None
            ) -> list[tuple[tuple, int]]:
        """(piece, packed length) for the window [a, b) of document d."""
        out = []
        while a < b:
            length = b - a
            kind = force if force is not None else (MASK if rng.random() < self.cfg.mask_prob else GMASK)
            if kind == MASK:
                spans = self._mask_spans(length, rng)
                while length + 2 * len(spans) > self.seq_length:
                    length = min(length - 1, self.seq_length - 2 * len(spans))
                    spans = self._mask_spans(length, rng)
                order = tuple(int(k) for k in rng.permutation(len(spans)))
                out.append(((MASK, d, a, a + length, (tuple(spans), order)), length + 2 * len(spans)))
            else:
                start = sample_gmask_start(length, rng, min_ratio=self.cfg.gmask_min_ratio)
                out.append(((GMASK, d, a, b, start), length + 1))
            a += length
        return out

    def plan(self, rng, force=None, valid=False, units=None):
        units = self.units if units is None else units
        pieces = [p for u in rng.permutation(len(units)) for p in self.cut(*units[u], rng, force)]
        return [[pieces[i][0] for i in row] for row in first_fit([n for _, n in pieces], self.seq_length)]

    def build(self, piece):
        kind, d, a, b, extra = piece
        text = self.corpus.tokens(d, a, b)
        if kind == MASK:
            spans, order = extra
            return build_sample(text, spans, mask_id=MASK_ID, sop_id=SOP_ID, eop_id=EOP_ID, span_order=order)
        return build_gmask_sample(text, extra, gmask_id=GMASK_ID, sop_id=SOP_ID)


class MipStream(Stream):
    """Translation instructions from en-zh pairs (moe_morpheus.data.mip)."""

    def __init__(self, corpora: list[Corpus], pairs: list[np.ndarray], heldout: list[np.ndarray],
                 templates: MipTemplates, seed: int, seq_length: int):
        super().__init__("mip", seed, seq_length)
        self.corpora, self.templates = corpora, templates
        # examples: (corpus, pair) rows; each appears once per direction per epoch.
        self.train = np.array([(c, d) for c, ds in enumerate(pairs) for d in ds], dtype=np.int64).reshape(-1, 2)
        self.heldout = np.array([(c, d) for c, ds in enumerate(heldout) for d in ds],
                                dtype=np.int64).reshape(-1, 2)
        if len(self.train) == 0:
            raise DataError("MIP: no training pair in the parallel sources; add pairs or set data.mip_ratio=0")
        self.skipped_too_long = 0

    def plan(self, rng, force=None, valid=False):
        examples = self.heldout if valid else self.train
        order = rng.permutation(2 * len(examples))
        pair, direction = examples[order // 2], order % 2
        template = np.empty(len(order), dtype=np.int64)
        for k, name in enumerate(DIRECTIONS):
            ids = self.templates.ids[(name, valid)]
            template[direction == k] = ids[rng.integers(len(ids), size=int((direction == k).sum()))]
        lengths = np.empty(len(order), dtype=np.int64)
        for c, corpus in enumerate(self.corpora):
            sel = pair[:, 0] == c
            en_zh = corpus.pair_lengths[pair[sel, 1]]
            lengths[sel] = self.templates.overhead[template[sel]] + en_zh.sum(1) + 2
        fits = lengths <= self.seq_length
        if not valid:
            self.skipped_too_long = int((~fits).sum())
        pieces = [(MIP, int(c), int(d), int(t), None) for (c, d), t in zip(pair[fits], template[fits])]
        return [[pieces[i] for i in row] for row in first_fit(lengths[fits].tolist(), self.seq_length)]

    def build(self, piece):
        _, c, d, t, _ = piece
        return self.templates.build(t, *self.corpora[c].pair(d))


class Schedule:
    """Which stream owns global row i: exact shares per 1,000-row cycle, shuffled per cycle."""

    def __init__(self, shares: dict[str, float], seed: int):
        self.names = list(shares)
        raw = np.array([shares[n] for n in self.names]) * SCHEDULE_CYCLE
        counts = np.floor(raw).astype(np.int64)
        # Largest remainder rounding keeps the cycle at exactly 1,000 rows.
        counts[np.argsort(raw - counts)[::-1][: SCHEDULE_CYCLE - counts.sum()]] += 1
        zero = [n for n, c in zip(self.names, counts) if c == 0]
        if zero:
            raise DataError(f"data: streams {zero} get no row in {SCHEDULE_CYCLE} (share < 0.0005): "
                            f"raise their weight or set it to 0")
        self.counts = counts
        self.base = np.repeat(np.arange(len(self.names)), counts)
        self.seed = seed

    @lru_cache(maxsize=8)  # noqa: B019 - one Schedule per Data object, lives as long as it
    def _cycle(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        owner = _rng(self.seed, _key("schedule"), c).permutation(self.base)
        ordinal = np.empty_like(owner)
        for s in range(len(self.names)):
            where = np.flatnonzero(owner == s)
            ordinal[where] = np.arange(len(where))
        return owner, ordinal

    def locate(self, i: int) -> tuple[str, int]:
        c, p = divmod(int(i), SCHEDULE_CYCLE)
        owner, ordinal = self._cycle(c)
        s = int(owner[p])
        return self.names[s], int(c * self.counts[s] + ordinal[p])

    def consumed(self, n: int) -> dict[str, int]:
        """Rows of each stream among global rows 0..n-1."""
        c, p = divmod(int(n), SCHEDULE_CYCLE)
        before = np.bincount(self._cycle(c)[0][:p], minlength=len(self.names))
        return {name: int(c * self.counts[s] + before[s]) for s, name in enumerate(self.names)}


class TrainDataset:
    """The infinite training stream: ``dataset[i]`` is packed row i (a dict of numpy arrays,
    the batch contract in infilling.py). It has no length; ``epochs`` says how far each
    source has been read."""

    def __init__(self, streams: dict[str, Stream], schedule: Schedule):
        self.streams, self.schedule = streams, schedule

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if i < 0:
            raise IndexError(f"row {i}: the training stream starts at 0")
        name, j = self.schedule.locate(i)
        return self.streams[name].row(j)

    def stream_of(self, i: int) -> str:
        return self.schedule.locate(i)[0]

    def epochs(self, consumed_samples: int) -> dict[str, float]:
        """Passes over each source's training data (and "mip" over the training pairs)
        after the first ``consumed_samples`` rows; 1.5 = every token once, half of them twice."""
        return {name: self.streams[name].epochs(n) for name, n in self.schedule.consumed(consumed_samples).items()}


@dataclass
class Data:
    train: TrainDataset
    # moe_morpheus.data.validation
    valid: dict[str, RowsDataset]
    tokenizer: Tokenizer
    # per validation set: loss of the training targets' unigram model on its targets (nats/token).
    unigram_entropy: dict[str, float]
    # per source: tokens, documents, skipped lines, train/valid tokens; "mip": pairs, skipped.
    stats: dict[str, dict] = field(default_factory=dict)

    def epochs(self, consumed_samples: int) -> dict[str, float]:
        return self.train.epochs(consumed_samples)


def build_data(data_cfg: DataConfig, seq_length: int, *, progress: bool = True) -> Data:
    """Tokenise (or find in the cache) every source and set up the training stream and the
    validation sets ``<source>_mask``, ``<source>_gmask`` (sources with weight > 0) and
    ``mip_heldout`` (when mip_ratio > 0)."""
    from moe_morpheus.data.validation import build_valid_sets  # it builds on this module's streams

    if seq_length < 16:
        raise DataError(f"seq_length={seq_length}: the data pipeline needs at least 16 tokens per row")
    if data_cfg.seed is None:
        raise DataError("data.seed is None (it follows trainer.seed): pass ExperimentConfig.data_config(), which "
                        "resolves it, or set data.seed")
    window = data_cfg.window_for(seq_length)
    tokenizer = Tokenizer(resolve_path(data_cfg.tokenizer))
    cache_dir = resolve_path(data_cfg.cache_dir)
    stats: dict[str, dict] = {}
    corpora: dict[str, Corpus] = {}
    windows: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, src in data_cfg.sources.items():
        report = build_corpus(name, src, tokenizer, cache_dir, progress=progress)
        corpora[name] = corpus = Corpus(report.prefix, tokenizer)
        windows[name] = train, valid = split_windows(corpus, data_cfg.split_chunk_tokens,
                                                    data_cfg.valid_fraction, window)
        stats[name] = {**report.stats, "train_tokens": int((train[:, 2] - train[:, 1]).sum()),
                       "valid_tokens": int((valid[:, 2] - valid[:, 1]).sum())}

    parallel = [name for name, src in data_cfg.sources.items() if src.kind == "parallel"]

    def make_streams(cfg: DataConfig) -> dict[str, Stream]:
        streams: dict[str, Stream] = {name: TextStream(name, corpora[name], windows[name][0], cfg, seq_length)
                                      for name, src in cfg.sources.items() if src.weight > 0}
        if cfg.mip_ratio > 0:
            streams["mip"] = MipStream(
                [corpora[n] for n in parallel], [np.unique(windows[n][0][:, 0]) for n in parallel],
                [np.unique(windows[n][1][:, 0]) for n in parallel], MipTemplates(tokenizer), cfg.seed, seq_length)
        return streams

    streams = make_streams(data_cfg)
    for name in streams:
        if name != "mip" and len(windows[name][1]) == 0:
            warnings.warn(f"data.sources.{name}: no validation chunk ({stats[name]['tokens']} tokens, "
                          f"valid_fraction {data_cfg.valid_fraction}); it has no validation set", stacklevel=2)
    valid_sets = build_valid_sets(streams, {name: w[1] for name, w in windows.items()}, data_cfg, parallel)
    if "mip" in streams:
        mip = streams["mip"]
        mip.epochs(0)  # plans epoch 0, which counts the examples too long for a row
        stats["mip"] = {"train_pairs": len(mip.train), "heldout_pairs": len(mip.heldout),
                        "skipped_too_long": mip.skipped_too_long}

    train = TrainDataset(streams, Schedule(data_cfg.row_shares(), data_cfg.seed))
    # The baseline is estimated on the stream of the fixed validation seed, so that every run
    # (whatever its seed) is compared against the same number.
    baseline_cfg = dataclasses.replace(data_cfg, seed=data_cfg.valid_seed)
    baseline = TrainDataset(make_streams(baseline_cfg), Schedule(data_cfg.row_shares(), data_cfg.valid_seed))
    unigram = target_unigram(baseline, tokenizer.vocab_size)
    entropy = {name: unigram_cross_entropy(unigram, np.concatenate([r["targets"][r["loss_mask"] > 0] for r in ds.rows]))
               for name, ds in valid_sets.items()}
    return Data(train, valid_sets, tokenizer, entropy, stats)


def batch_iterator(dataset, *, global_batch_size: int, micro_batch_size: int, dp_rank: int = 0,
                   dp_size: int = 1, start_sample: int = 0):
    """Micro-batches for one data-parallel rank: dicts of torch tensors [micro_batch_size,
    seq_length] (int64; ``loss_mask`` float32). Global batch g is rows [start + g * GBS,
    start + (g + 1) * GBS); rank r reads its contiguous 1/dp_size of it, micro-batch by
    micro-batch, so the global stream does not depend on dp_size and ranks never overlap.
    ``start_sample`` = samples consumed so far (resume). Endless, as the training stream
    (validation sets are evaluated by moe_morpheus.evaluate.validation_losses, whole)."""
    if global_batch_size % (micro_batch_size * dp_size) != 0:
        raise ValueError(f"global_batch_size={global_batch_size} must be a multiple of "
                         f"micro_batch_size x dp_size = {micro_batch_size} x {dp_size}")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
    if start_sample < 0:
        raise ValueError(f"start_sample={start_sample} must be >= 0")
    per_rank = global_batch_size // dp_size
    first = start_sample
    while True:
        base = first + dp_rank * per_rank
        for m in range(0, per_rank, micro_batch_size):
            rows = [dataset[base + m + k] for k in range(micro_batch_size)]
            yield {key: torch.from_numpy(np.stack([r[key] for r in rows])) for key in ROW_KEYS}
        first += global_batch_size
