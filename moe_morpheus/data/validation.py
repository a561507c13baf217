"""Validation sets: fixed packed rows of held-out text, the same for every run, seed and layout.

Sets (built by ``build_data``): ``<source>_mask`` and ``<source>_gmask`` for every source in
the infilling blend, each over the source's held-out windows (the content-hash split of
``split_windows``), and ``mip_heldout`` (every held-out en-zh pair in both directions, with the
held-out templates). Spans, suffixes and templates are drawn with generators seeded by
``(data.valid_seed, set)``, never the run's seed. ``data.valid_rows`` caps the rows of each set
(default 1024, so a large corpus does not make every rank evaluate all of its held-out text;
None: all, as the demo does). Rows are in the order of a random permutation of the windows, so
the first rows of a set are a random sample of its windows (``RowsDataset.head``: the
intermediate-evaluation subset).

Size: the validation loss is a mean over target tokens whose losses spread widely (standard
deviation 2.6 nats per target for glm_tiny after 224 demo steps), so its standard error is
about 2.6 / sqrt(targets) if targets were independent: 0.025 nats for the 11k targets of 32 rows
per set, 0.0048 for the 285k targets of every window at ``valid_fraction`` 0.1 (seq 128).
Several span draws over the same windows were measured to help little (two [MASK] draws: +37%
evaluation cost, -4% standard error), because the targets of one text are correlated.

**Units.** The [MASK] and [gMASK] sets of one source, and ``mip_heldout`` and the parallel
source's sets, share text, and neighbouring tokens of one text are correlated. Each packed
segment records its *unit*: the split chunk (``split_chunk_tokens`` of one document; a whole
pair for parallel sources) its text starts in. moe_morpheus.inference.evaluate computes standard errors
with units, not tokens, as the independent draws (0.0083 nats for the sets above: about 1.7x
the per-token figure).
"""

from __future__ import annotations

import numpy as np

from moe_morpheus.config.data import DataConfig
from moe_morpheus.data.streams import GMASK, MASK, MIP, MipStream, Stream, TextStream, name_key


class RowsDataset:
    """A fixed list of packed rows and, for each row, the unit of each segment:
    ``units[r][s]`` is the unit id of segment ``s`` of row ``r`` (index 0, padding: -1)."""

    def __init__(self, rows: list[dict[str, np.ndarray]], units: list[np.ndarray]):
        if len(rows) != len(units):
            raise ValueError(f"{len(rows)} rows but {len(units)} unit arrays")
        self.rows, self.units = rows, units

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return self.rows[i]

    def head(self, n: int) -> RowsDataset:
        """The first ``n`` rows: the same subset every time."""
        return RowsDataset(self.rows[:n], self.units[:n])

    def position_units(self, i: int) -> np.ndarray:
        """Unit id of every position of row ``i`` (-1 at padding)."""
        return self.units[i][self.rows[i]["segment_ids"]]


STRATUM_SHIFT = 32


def unit_stratum(unit_ids: np.ndarray) -> np.ndarray:
    """The source (stratum) a unit id belongs to: units of one source share it."""
    return np.asarray(unit_ids) >> STRATUM_SHIFT


class Units:
    """Ids for unit keys ``(source, document, chunk)``, shared by all sets of one build:
    ``source index << STRATUM_SHIFT | number within the source``."""

    def __init__(self, chunk_tokens: int):
        self.chunk_tokens = chunk_tokens
        self.sources: dict[str, dict[tuple, int]] = {}

    def of(self, source: str, doc: int, start: int) -> int:
        stratum = list(self.sources).index(source) if source in self.sources else len(self.sources)
        ids = self.sources.setdefault(source, {})
        local = ids.setdefault((int(doc), int(start) // self.chunk_tokens), len(ids))
        return stratum << STRATUM_SHIFT | local

    def of_piece(self, stream: Stream, piece: tuple, parallel: list[str]) -> int:
        if piece[0] == MIP:  # (MIP, corpus, pair, template, None): the pair is a document of a parallel source
            return self.of(parallel[piece[1]], piece[2], 0)
        # A pair is split as a whole (split_windows): one unit, even when cut into several pieces.
        return self.of(stream.name, piece[1], 0 if stream.name in parallel else piece[2])


def _rows(stream: Stream, plans: list[list[tuple]], units: Units, parallel: list[str], cap: int | None
          ) -> RowsDataset:
    plans = plans[:cap]
    return RowsDataset([stream.pack(p) for p in plans],
                       [np.array([-1] + [units.of_piece(stream, piece, parallel) for piece in p], dtype=np.int64)
                        for p in plans])


def build_valid_sets(streams: dict[str, Stream], held_out: dict[str, np.ndarray], cfg: DataConfig,
                     parallel: list[str]) -> dict[str, RowsDataset]:
    """The validation sets (module docstring). ``held_out[name]``: the source's validation
    windows as (document, start, end) rows; ``parallel``: the parallel sources in the order of
    the MIP stream's corpora."""
    units = Units(cfg.split_chunk_tokens)
    sets: dict[str, RowsDataset] = {}
    for name, stream in streams.items():
        if not isinstance(stream, TextStream) or len(held_out[name]) == 0:
            continue
        for suffix, kind in (("mask", MASK), ("gmask", GMASK)):
            plans = stream.planned((cfg.valid_seed, name_key(f"{name}_{suffix}")), force=kind, units=held_out[name])
            sets[f"{name}_{suffix}"] = _rows(stream, plans, units, parallel, cfg.valid_rows)
    mip = streams.get("mip")
    if isinstance(mip, MipStream):
        plans = mip.planned((cfg.valid_seed, name_key("mip_heldout")), valid=True)
        if plans:
            sets["mip_heldout"] = _rows(mip, plans, units, parallel, cfg.valid_rows)
    return sets
