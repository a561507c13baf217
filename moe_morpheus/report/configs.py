"""What a configuration is: the params that make two runs comparable as seeds of one another,
the labels that name configurations, and the roles of the staged upcycling sweep.

A report averages and pairs the seeds of one configuration, so the signature must hold every
param that changes the model, the data or the schedule (``trainer.steps`` included) and
nothing else: not the seeds, and not how a run is executed or logged.
"""

from __future__ import annotations

from moe_morpheus.report.roles import EXTRA_TAG, ROLE_TAG, stage_tags

# A configuration is every param (model, data, schedule, budget, starting checkpoint) except:
# * seeds: every param whose last key component is ``seed`` (trainer.seed, data.seed,
#   upcycle.seed); runs that differ in nothing else are seeds of one configuration;
# * how a run is executed or logged, not what it trains (entries ending in "." or "_" are
#   prefixes, the others whole keys);
# * values the trainer computes from the config (parameter counts, planned tokens, FLOPs per
#   token, the starting checkpoint's FLOPs, steps and target tokens next to its tokens: its
#   target count follows the data seed, so it differs between seeds of one configuration).
SEED_COMPONENT = "seed"
INFRA_PARAMS = ("name", "sweep", "variant", "tracking.", "launch.", "checkpoint.", "parallel.", "world_size", "dp",
                "trainer.progress", "trainer.log_interval", "trainer.eval_interval", "trainer.eval_task_items",
                "trainer.eval_subset", "trainer.threads", "trainer.micro_batch_size", "trainer.recompute", "trainer.zero1",
                "data.cache_dir", "moe.faster.")
DERIVED_PARAMS = ("count.", "budget.chinchilla_tokens", "budget.planned_", "flops_per_token", "sunk.flops",
                  "sunk.steps", "sunk.target_tokens")


def _listed(key: str, entries: tuple[str, ...]) -> bool:
    return any(key == e or (e.endswith((".", "_")) and key.startswith(e)) for e in entries)


def config_signature(params: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """The params that make a configuration (see ``INFRA_PARAMS``): equal signatures are seeds
    of one configuration. A run started from a dense checkpoint (``init.from_dense``: dense
    continued, or upcycled) is another configuration than the same model from random init (the
    staged upcycling sweep has both); the checkpoint's path differs per seed, so only whether
    there is one counts (``sunk.tokens`` tells how long the dense stage trained)."""
    signature = {k: v for k, v in params.items()
                 if k.split(".")[-1] != SEED_COMPONENT and not _listed(k, INFRA_PARAMS + DERIVED_PARAMS)}
    if params.get("init.from_dense", "None") != "None":
        signature["init.from_dense"] = "checkpoint"
    return tuple(sorted(signature.items()))


def differing_keys(signatures: list[tuple]) -> list[str]:
    """Param keys whose value (or presence) differs between the given signatures, sorted."""
    values = [dict(s) for s in set(signatures)]
    return sorted({k for d in values for k in d if len({d2.get(k) for d2 in values}) > 1})


def _short_names(keys: list[str]) -> dict[str, str]:
    """key -> its last component, or the whole key where two keys share a last component."""
    last = [k.split(".")[-1] for k in keys]
    return {k: (n if last.count(n) == 1 else k) for k, n in zip(keys, last)}


def group_labels(bases: list[str], signatures: list[tuple]) -> list[str]:
    """A label per run naming its configuration: the base (variant, or the role in a staged
    sweep) alone when that base has one configuration here, else the base plus the params in
    which its configurations differ (e.g. ``moe num_experts=8``)."""
    labels = []
    for base, sig in zip(bases, signatures):
        sigs = [s for b, s in zip(bases, signatures) if b == base]
        keys = differing_keys(sigs)
        if not keys:
            labels.append(base)
            continue
        own, short = dict(sig), _short_names(keys)
        labels.append(base + " " + " ".join(f"{short[k]}={own.get(k, '-')}" for k in keys))
    return labels


def sweep_role(tags: dict[str, str]) -> tuple[str | None, str | None]:
    """(role, extra budget) of a run of the staged upcycling sweep: the driver's tags, or for
    runs it did not tag (older ones), the role read from the run name ``<sweep>/<stage key>``."""
    if ROLE_TAG in tags:
        return tags[ROLE_TAG], tags.get(EXTRA_TAG)
    sweep, name = tags.get("sweep"), tags.get("mlflow.runName", "")
    if sweep and name.startswith(sweep + "/"):
        parsed = stage_tags(name[len(sweep) + 1:])
        return parsed.get(ROLE_TAG), parsed.get(EXTRA_TAG)
    return None, None
