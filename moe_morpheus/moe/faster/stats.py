"""FasterMoE statistics of one layer, merged into ``FMoE.pop_stats()`` (and so into
``collect_moe_stats`` and MLflow): which experts were shadowed, bytes moved, seconds spent
waiting for the exchange vs computing experts, and the policy's predicted latencies.

Times on a GPU come from CUDA events on the current stream (the host only enqueues work, so a
host clock would measure launches); they are read, with one synchronisation, when the stats
are popped. On a CPU they are wall-clock seconds.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

TIMED = ("exchange", "compute", "shadow_comm")
BYTES = ("exchange", "shadow")


class FasterStats:
    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.reset()

    def reset(self) -> None:
        self.forwards = 0
        self.shadowed_G = [0] * self.num_experts
        self.seconds = dict.fromkeys(TIMED, 0.0)
        self.events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self.bytes = dict.fromkeys(BYTES, 0)
        self.predicted = [0.0, 0.0]  # policy: latency without shadowing, with its choice
        self.scheduled = None  # forwards whose exchange ran the smart schedule (None: not allowed)
        self.predicted_schedule = [0.0, 0.0]  # exchange + experts: plain all-to-all, smart schedule

    @contextmanager
    def timed(self, kind: str, like: torch.Tensor):
        if like.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events.append((kind, start, end))
        else:
            start = time.perf_counter()
            yield
            self.seconds[kind] += time.perf_counter() - start

    def add_bytes(self, kind: str, count: int) -> None:
        self.bytes[kind] += count

    def record_forward(self, shadow: list[int], predicted: tuple[float, float] | None,
                       scheduled: bool | None = None, predicted_schedule: tuple[float, float] | None = None) -> None:
        self.forwards += 1
        for g in shadow:
            self.shadowed_G[g] += 1
        if predicted is not None:
            self.predicted = [a + b for a, b in zip(self.predicted, predicted)]
        if scheduled is not None:
            self.scheduled = (self.scheduled or 0) + int(scheduled)
            self.predicted_schedule = [a + b for a, b in zip(self.predicted_schedule, predicted_schedule)]

    def pop(self) -> dict:
        """Means per forward (micro-batch) since the last pop, then reset; all floats (the
        trainer logs every value but the load list as a scalar metric). Keys:
        ``faster/shadowed/e{g}``, fraction of forwards expert g was shadowed, only for the experts
        that were (an absent key is 0: a few metrics per step, not one per expert and layer),
        ``faster/shadowed_experts``, ``faster/{exchange,compute,shadow_comm}_s`` (forward and
        backward; exchange = time spent waiting for transfers, i.e. not hidden behind compute),
        ``faster/{exchange,shadow}_bytes`` (sent by this rank: token rows both ways, forward and
        backward; shadowed parameters broadcast and gradients reduced), and with shadowing on,
        ``faster/predicted_s_no_shadow`` / ``faster/predicted_s`` (the policy's model); with the
        smart schedule allowed (and more than one expert-parallel rank), ``faster/scheduled`` (fraction of forwards the policy ran it) and
        ``faster/predicted_s_all_to_all`` / ``faster/predicted_s_schedule`` (the model's two
        options for the exchange and experts, shadowed experts excluded)."""
        n = self.forwards
        if n == 0:
            return {}
        if self.events:
            torch.cuda.synchronize()
            for kind, start, end in self.events:
                self.seconds[kind] += start.elapsed_time(end) / 1e3
        out = {f"faster/shadowed/e{g}": c / n for g, c in enumerate(self.shadowed_G) if c}
        out["faster/shadowed_experts"] = sum(self.shadowed_G) / n
        out.update({f"faster/{k}_s": v / n for k, v in self.seconds.items()})
        out.update({f"faster/{k}_bytes": v / n for k, v in self.bytes.items()})
        if any(self.predicted):
            out["faster/predicted_s_no_shadow"], out["faster/predicted_s"] = (v / n for v in self.predicted)
        if self.scheduled is not None:
            out["faster/scheduled"] = self.scheduled / n
            out["faster/predicted_s_all_to_all"], out["faster/predicted_s_schedule"] = (
                v / n for v in self.predicted_schedule)
        self.reset()
        return out
