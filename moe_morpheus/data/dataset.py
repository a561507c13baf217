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

Steps 2 and 4 are the streams of ``streams.py``; the validation sets (``validation.py``) are
planned from the same streams.
"""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from moe_morpheus.config.data import DataConfig, resolve_path
from moe_morpheus.data.corpus import Corpus, build_corpus
from moe_morpheus.data.infilling import ROW_KEYS
from moe_morpheus.data.mip import MipTemplates
from moe_morpheus.data.readers import DataError
from moe_morpheus.data.streams import MipStream, Stream, TextStream, name_key, seeded_rng
from moe_morpheus.data.tokenizer import Tokenizer
from moe_morpheus.data.validation import RowsDataset, build_valid_sets

SCHEDULE_CYCLE = 1000


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
        owner = seeded_rng(self.seed, name_key("schedule"), c).permutation(self.base)
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
        report = build_corpus(name, src, tokenizer, cache_dir, progress=progress,
                              tokenize_limit_mb=data_cfg.tokenize_on_start_mb)
        corpora[name] = corpus = Corpus(report.index, tokenizer)
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
    (validation sets are evaluated by moe_morpheus.inference.evaluate.validation_losses, whole)."""
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
