"""The roles of the staged upcycling sweep (``moe_morpheus.upcycle.sweep``) and how their arms
are compared: shared by the sweep driver, which tags and summarises its runs, and by the report,
which reads the tags back.

Per seed the sweep trains a dense stage, then, per extra budget x, four arms from it or beside
it. At equal *extra* compute (the dense stage's compute sunk) the rivals are dense continued,
upcycled and scratch trained for x; at equal *total* compute (the dense stage charged) scratch
trains x + the dense stage instead.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from moe_morpheus.report.stats import PairedResult, rank_and_compare

# Role of each stage (MLflow tag ROLE_TAG) -> how tables and legends name it.
ROLES = {"dense": "dense stage", "dense_continued": "dense continued", "upcycled": "upcycled",
         "scratch_extra": "scratch (equal extra)", "scratch_total": "scratch (equal total)"}
ROLE_TAG, EXTRA_TAG = "sweep_role", "sweep_extra"
# The arms compared at each extra budget: the dense stage's compute sunk (equal extra), or
# charged (equal total: continued and upcycled runs count it, scratch_total trains it).
EQUAL_EXTRA = ("dense_continued", "upcycled", "scratch_extra")
EQUAL_TOTAL = ("dense_continued", "upcycled", "scratch_total")


def stage_tags(key: str) -> dict[str, str]:
    """The role tags of a stage key: ``s1/x0.006/upcycled`` -> {sweep_role: upcycled,
    sweep_extra: 0.006}, ``s1/dense`` -> {sweep_role: dense}; {} for anything else."""
    match = re.fullmatch(r"s[^/]+/(?:x([^/]+)/)?([a-z_]+)", key)
    if match is None or match.group(2) not in ROLES or (match.group(1) is None) != (match.group(2) == "dense"):
        return {}
    return {ROLE_TAG: match.group(2), **({EXTRA_TAG: match.group(1)} if match.group(1) else {})}


def compare_per_extra(arms: Iterable[tuple[str, str, str, Mapping]], roles: tuple[str, ...]
                      ) -> dict[str, tuple[list[str], list[tuple[str, str, PairedResult]]]]:
    """Per extra budget (in increasing order), the arms whose role is in ``roles``
    (``EQUAL_EXTRA`` or ``EQUAL_TOTAL``) ranked and the best paired against each other
    (``rank_and_compare``). ``arms``: (extra budget, role, arm name, seed -> final loss), in
    the order ties are ranked."""
    by_extra: dict[str, dict[str, Mapping]] = {}
    for extra, role, name, losses in arms:
        if role in roles:
            by_extra.setdefault(extra, {})[name] = losses
    return {extra: rank_and_compare(by_extra[extra]) for extra in sorted(by_extra, key=float)}
