"""benchmarks/train_step.py: its phase timer splits time exclusively, and a real case runs and
accounts for the whole step."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import train_step  # noqa: E402


def test_phase_timer_counts_nested_regions_once(monkeypatch):
    # A clock that moves only when told: the split is checked exactly, whatever else the machine runs.
    now = [0.0]
    monkeypatch.setattr(train_step, "time", SimpleNamespace(perf_counter=lambda: now[0]))

    def spend(seconds: float) -> None:
        now[0] += seconds

    timer = train_step.PhaseTimer()
    with timer.region("backward"):
        spend(0.05)
        with timer.region("forward"):
            spend(0.1)
            with timer.region("comm"):
                spend(0.05)
    assert timer.seconds["comm"] == pytest.approx(0.05)
    assert timer.seconds["forward"] == pytest.approx(0.1)
    assert timer.seconds["backward"] == pytest.approx(0.05)
    assert not timer.inside("forward")


@pytest.mark.slow
def test_a_case_runs_and_its_phases_cover_the_step(tmp_path):
    out = tmp_path / "result.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_step.py"), "--cases", "tiny/dense",
                           "--rounds", "1", "--steps", "2", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| tiny/dense | 1 x 2 |" in done.stdout
    result = json.loads(out.read_text())
    case = result["cases"]["tiny/dense"]
    assert result["matmul_peak_flops"] > 1e9
    assert case["tokens_per_s"] > 0 and case["tokens_per_step"] == 16 * 128
    # Exclusive phases of the timed steps add up to the wall time around them (the loop has
    # nothing else in it but the barrier before the first step).
    assert 0.9 < sum(case["phase_fraction"].values()) < 1.01
    assert case["phase_fraction"]["forward"] > 0.1 and case["phase_fraction"]["backward"] > 0.1
    assert math.isfinite(case["loss_first"]) and math.isfinite(case["loss_last"])
