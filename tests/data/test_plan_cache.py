"""The plan cache (moe_morpheus/data/plan_cache.py): a rebuilt dataset reads every epoch plan from
disk and gets the same rows; any input of a plan changes its key; an unreadable or hostile file
is planned again, never trusted."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle

import numpy as np

from moe_morpheus.data.dataset import build_data
from moe_morpheus.data.plan_cache import PlanCache, plan_key
from moe_morpheus.data.streams import TextStream
from tests.helpers.data import DATA_SEQ_LENGTH, train_rows_digest


def test_a_rebuilt_dataset_reads_its_plans_and_gets_the_same_rows(demo_data, demo_data_cfg, monkeypatch):
    rows = range(0, 3000, 7)  # reaches every stream's first epoch
    expected = train_rows_digest(demo_data, rows)

    def no_planning(*args, **kwargs):
        raise AssertionError("planned again: the cache was not used")

    monkeypatch.setattr(TextStream, "plan", no_planning)
    again = build_data(demo_data_cfg, DATA_SEQ_LENGTH, progress=False)
    assert train_rows_digest(again, rows) == expected
    for name, valid in demo_data.valid.items():
        assert all(np.array_equal(valid[i]["tokens"], again.valid[name][i]["tokens"]) for i in range(len(valid)))


def test_every_input_of_a_plan_is_in_its_key():
    units = np.arange(12, dtype=np.int64).reshape(4, 3)
    base = ("en", 64, (1, 2, 0), None, False, 0.3, 0.15, 3.0, 39, 0.2, units)
    keys = {plan_key(*base)}
    for i, changed in enumerate(["zh", 128, (1, 2, 1), 0, True, 0.31, 0.16, 3.5, 40, 0.25, units[:3]]):
        keys.add(plan_key(*base[:i], changed, *base[i + 1:]))
    keys.add(plan_key(*base[:-1], units.astype(np.int32)))  # same values, other dtype
    keys.add(plan_key(*base[:-1], units + (units == 11)))  # one index differs
    assert len(keys) == 14


def test_an_unreadable_or_hostile_file_is_planned_again(tmp_path, caplog):
    cache = PlanCache(tmp_path)
    plan = [[(0, 1, 2, 5, ((0, 1),), (0,))], [(1, 3, 0, 9, 4)]]
    calls = []

    def compute():
        calls.append(1)
        return plan

    assert cache.get("k", compute) == plan and cache.get("k", compute) == plan and len(calls) == 1
    good = (tmp_path / "k.pkl").read_bytes()
    (tmp_path / "k.pkl").write_bytes(b"not a pickle")
    with caplog.at_level(logging.WARNING):
        assert cache.get("k", compute) == plan
    assert "unreadable" in caplog.text and len(calls) == 2
    # One flipped byte anywhere: the checksum catches it (an intact pickle of other ints would load).
    for at in (0, 40, len(good) - 2):
        (tmp_path / "k.pkl").write_bytes(good[:at] + bytes([good[at] ^ 1]) + good[at + 1:])
        assert cache.get("k", compute) == plan
    assert len(calls) == 5
    # A pickle that would build an object (here: call os.system) is refused, not loaded.
    payload = pickle.dumps([os.system])
    (tmp_path / "k.pkl").write_bytes(hashlib.sha256(payload).digest() + payload)
    assert cache.get("k", compute) == plan and len(calls) == 6
    assert cache.get("k", compute) == plan and len(calls) == 6  # rewritten: read again


def test_a_numpy_scalar_is_refused(tmp_path):
    # It would need a class to unpickle: plans hold Python ints only (the first test reads real
    # plans through the same loader, so a numpy scalar in a plan fails there).
    payload = pickle.dumps([(np.int64(3),)])
    (tmp_path / "k.pkl").write_bytes(hashlib.sha256(payload).digest() + payload)
    assert PlanCache(tmp_path).get("k", lambda: [[(1,)]]) == [[(1,)]]


def test_a_cache_folder_that_cannot_be_written_costs_speed_not_the_run(tmp_path, caplog):
    blocker = tmp_path / "plans"
    blocker.write_text("a file where the folder should be")
    with caplog.at_level(logging.WARNING):
        assert PlanCache(blocker).get("k", lambda: [[(1,)]]) == [[(1,)]]
    assert "cannot write" in caplog.text


def test_every_setting_a_text_stream_plans_with_reaches_its_key(tmp_path, monkeypatch):
    from dataclasses import replace

    from moe_morpheus.config.data import DataConfig

    keys = []
    monkeypatch.setattr(PlanCache, "get", lambda self, key, compute: keys.append(key) or [])
    units = np.array([[0, 0, 50], [1, 0, 60]], dtype=np.int64)
    cfg = DataConfig(cache_dir=str(tmp_path), seed=1)
    changes = [{}, {"mask_prob": 0.4}, {"mask_ratio": 0.2}, {"span_lambda": 4.0}, {"max_span_length": 20},
               {"gmask_min_ratio": 0.5}]
    for change in changes:
        TextStream("en", None, units, replace(cfg, **change), 64).planned((1, 2, 0))
    stream = TextStream("en", None, units, cfg, 64)
    stream.planned((1, 2, 1))
    stream.planned((1, 2, 0), force=0)
    stream.planned((1, 2, 0), units=units[:1])
    TextStream("en", None, units, cfg, 128).planned((1, 2, 0))
    TextStream("en", None, units + 1, cfg, 64).planned((1, 2, 0))
    assert len(keys) == len(changes) + 5 and len(set(keys)) == len(keys)
