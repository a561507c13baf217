"""Evaluation: validation loss and perplexity per set, zero-shot translation on held-out MIP
templates, and a last-word cloze task in English and Chinese. Always with dropless routing.

Used by the trainer at every evaluation interval and by
``python -m moe_morpheus.inference.evaluate checkpoint=DIR`` (see ``main``).

- Loss / perplexity: mean cross entropy per target token of each fixed validation set
  (moe_morpheus/data/validation.py), and over all sets pooled (``valid/loss``, every target
  token weighing the same), with standard errors; perplexity = exp(loss).
- Translation: the ``mip_heldout`` rows are instructions whose templates and sentence pairs were
  never trained on (moe_morpheus.data.mip); the model continues each prompt after ``[gMASK]``
  greedily and is scored with sacrebleu's chrF (character n-grams: one metric for Chinese and
  English output) and exact match.
- Cloze: held-out passages (the ``<lang>_gmask`` validation text) minus their last word (English:
  the last run of letters; Chinese: the last Han character); the first word the model generates
  after ``[gMASK]`` must equal it (LAMBADA-style accuracy).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from moe_morpheus.config import ConfigError
from moe_morpheus.config.cli import fail, option, parse_options
from moe_morpheus.data.infilling import ROW_KEYS
from moe_morpheus.data.tokenizer import GMASK_ID
from moe_morpheus.data.validation import unit_stratum
from moe_morpheus.inference.generate import Generator, Sampling
from moe_morpheus.train.step import forward_per_token

_LAST_WORD = {"en": re.compile(r"([A-Za-z']+)[^A-Za-z']*$"), "zh": re.compile(r"([\u4e00-\u9fff])[^\u4e00-\u9fff]*$")}
_FIRST_WORD = {"en": re.compile(r"\s*([A-Za-z']+)"), "zh": re.compile(r"[^\u4e00-\u9fff]*([\u4e00-\u9fff])")}


@contextlib.contextmanager
def dropless_routing(model: list[torch.nn.Module]):
    """Route every assignment (validation losses are measured without capacity drops), train mode off."""
    gates = [m for chunk in model for m in chunk.modules() if hasattr(m, "capacity") and hasattr(m, "get_loss")]
    saved = [g.capacity for g in gates]
    modes = [chunk.training for chunk in model]
    for gate in gates:
        gate.capacity = None
    for chunk in model:
        chunk.eval()
    try:
        yield
    finally:
        for gate, capacity in zip(gates, saved):
            gate.capacity = capacity
        for chunk, mode in zip(model, modes):
            chunk.train(mode)


@dataclass
class Validation:
    """Validation loss in nats per target token: ``loss`` over all sets pooled (every target
    token weighs the same), its standard error ``se``, ``targets`` tokens; per set
    ``sets[name] = (loss, se, targets)``."""

    loss: float
    se: float
    targets: int
    sets: dict[str, tuple[float, float, int]]

    def losses(self) -> dict[str, float]:
        """Loss per set and the pooled one as ``mean``."""
        return {**{name: v[0] for name, v in self.sets.items()}, "mean": self.loss}

    def metrics(self, prefix: str = "valid") -> dict[str, float]:
        """What runs log: ``<prefix>/loss``, ``<prefix>/loss_se``, ``<prefix>/target_tokens`` and
        per set ``<prefix>/<set>/loss``, ``<prefix>/<set>/loss_se``. ``valid``: the full sets;
        the trainer logs evaluations of a subset (``trainer.eval_subset``) as ``valid_subset``, so
        a minimum over ``valid/*`` never picks a noisier subset point."""
        out = {f"{prefix}/loss": self.loss, f"{prefix}/loss_se": self.se, f"{prefix}/target_tokens": self.targets}
        for name, (loss, se, _) in self.sets.items():
            out.update({f"{prefix}/{name}/loss": loss, f"{prefix}/{name}/loss_se": se})
        return out


def pooled_unigram(entropy: dict[str, float], valid: dict) -> float:
    """The unigram baseline pooled as ``valid/loss`` is: the sets' unigram cross entropies
    (``Data.unigram_entropy``) weighted by their target tokens, i.e. the baseline's mean loss over
    every target of the full sets, each weighing the same (not the mean over sets, which weighs a
    small set's targets up)."""
    counts = {name: sum(int((row["loss_mask"] > 0).sum()) for row in valid[name].rows) for name in entropy}
    total = sum(counts.values())
    return sum(entropy[name] * counts[name] for name in entropy) / total if total else float("nan")


def cluster_se(loss: np.ndarray, units: np.ndarray) -> float:
    """Standard error of the mean of ``loss`` (one value per target token) when the independent
    draws are the held-out *units* (moe_morpheus.data.validation), stratified by source.

    Targets of one unit share text (the [MASK] draws and the [gMASK] sample of a window, a pair's
    MIP rows), so they are not independent draws: the per-token ``sd / sqrt(n)`` would be too
    small. The mean is the ratio R = sum(loss) / n; its linearised (Taylor) variance over units
    c in strata h (sources, whose sizes the split fixes) is
    ``sum_h C_h / (C_h - 1) * sum_c (e_c - mean_h e)^2 / n^2`` with ``e_c = sum_{t in c} (loss_t - R)``
    (Cochran, Sampling Techniques, 1977, ch. 6 ratio estimates, and 5 stratified sampling).
    A stratum of one unit adds ``e_c^2`` (its variance cannot be estimated; this bounds it)."""
    n = len(loss)
    if n == 0:
        return float("nan")
    ids, index = np.unique(units, return_inverse=True)
    residual = np.bincount(index, weights=loss - loss.mean())
    strata = unit_stratum(ids)
    variance = 0.0
    for h in np.unique(strata):
        e = residual[strata == h]
        variance += (e @ e) if len(e) == 1 else len(e) / (len(e) - 1) * float(((e - e.mean()) ** 2).sum())
    return float(np.sqrt(variance) / n)


@torch.no_grad()
def validation_losses(model: list[torch.nn.Module], valid: dict, *, micro_batch_size: int, dp_rank: int = 0,
                      dp_size: int = 1, fraction: float = 1.0) -> Validation:
    """Cross entropy per target token of the validation sets (the first ``fraction`` of each
    set's rows, rounded up; the same rows every time), pooled and per set, with standard errors (:func:`cluster_se`). Collective over
    the data-parallel (and pipeline) group; every rank returns the same.

    Every layout evaluates exactly the same rows and targets: the rows of all sets are split
    into ``dp_size`` contiguous shards, each rank runs the same number of micro-batches (the
    last ones padded with rows whose loss mask is 0, so expert all-to-alls and pipeline stages
    stay in step), and the per-token losses are summed over ranks (each position is written by
    exactly one rank), then reduced in a fixed order: sums of losses and counts, never means of means."""
    sets = {name: ds.head(math.ceil(fraction * len(ds))) for name, ds in valid.items() if len(ds)}
    index = [(name, i) for name, ds in sets.items() for i in range(len(ds))]
    if not index:
        raise ValueError("no validation rows to evaluate")
    per_rank = math.ceil(len(index) / dp_size)
    steps = math.ceil(per_rank / micro_batch_size)
    mine = index[dp_rank * per_rank: (dp_rank + 1) * per_rank]
    first = sets[index[0][0]][index[0][1]]
    padding = {**first, "loss_mask": np.zeros_like(first["loss_mask"])}
    rows_in = [sets[name][i] for name, i in mine] + [padding] * (steps * micro_batch_size - len(mine))
    batches = [{key: torch.from_numpy(np.stack([r[key] for r in rows_in[k: k + micro_batch_size]]))
                for key in ROW_KEYS} for k in range(0, len(rows_in), micro_batch_size)]
    with dropless_routing(model):
        per_token = forward_per_token(model, batches)
    seq = first["tokens"].shape[0]
    total = torch.zeros(len(index), seq, dtype=torch.float32)
    if per_token:  # the last pipeline stage
        start = dp_rank * per_rank
        total[start: start + len(mine)] = torch.cat(per_token).float().cpu()[: len(mine)]
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
    losses = total.double().numpy()
    pooled_loss, pooled_units, out = [], [], {}
    at = 0
    for name, ds in sets.items():
        mask = np.stack([r["loss_mask"] for r in ds.rows]) > 0
        loss = losses[at: at + len(ds)][mask]
        units = np.stack([ds.position_units(i) for i in range(len(ds))])[mask]
        at += len(ds)
        out[name] = (float(loss.mean()) if len(loss) else float("nan"), cluster_se(loss, units), len(loss))
        pooled_loss.append(loss)
        pooled_units.append(units)
    loss, units = np.concatenate(pooled_loss), np.concatenate(pooled_units)
    return Validation(float(loss.mean()), cluster_se(loss, units), len(loss), out)


def segments(rows) -> list[tuple[list[int], list[int]]]:
    """(Part A, loss-masked targets) of every packed segment of validation rows."""
    out = []
    for row in rows:
        for seg in sorted(set(row["segment_ids"].tolist()) - {0}):
            where = row["segment_ids"] == seg
            part_a = row["tokens"][where & (row["prefix_mask"] == 1)].tolist()
            targets = row["targets"][where & (row["loss_mask"] > 0)].tolist()
            out.append((part_a, targets))
    return out


def translation_scores(generator: Generator, tokenizer, rows, max_items: int = 16) -> dict[str, float]:
    """chrF and exact match of greedy continuations on held-out instruction rows. An answer gets
    its length + 8 new tokens (at most 64) or what the model's sequence leaves after the prompt,
    if less: with a small vocabulary a row's prompt and answer fill the sequence (demo, 2k pieces:
    a 71-token prompt left 56 of 128 positions for a 59-token allowance)."""
    import sacrebleu

    hypotheses, references, cut = [], [], 0
    for prompt, answer in segments(rows)[:max_items]:
        allowance = min(len(answer) + 8, 64, generator.room(prompt))
        if allowance < 1:
            continue
        cut += allowance < len(answer)
        _, spans = generator.generate(prompt, Sampling(max_new_tokens=allowance))
        hypotheses.append(tokenizer.decode(spans[0]).strip())
        references.append(tokenizer.decode(answer).strip())
    if not hypotheses:
        return {}
    chrf = sacrebleu.corpus_chrf(hypotheses, [references]).score
    exact = sum(h == r for h, r in zip(hypotheses, references)) / len(hypotheses)
    # How many items were scored, and how many of them got fewer new tokens than their answer has
    # (they cannot match exactly): scores of models with different sequence lengths or tokenizers
    # are only comparable with these beside them.
    return {"chrf": chrf, "exact_match": exact, "items": float(len(hypotheses)), "items_cut": float(cut)}


def cloze_items(tokenizer, rows, lang: str, max_items: int) -> list[tuple[str, str]]:
    """(context, last word) from validation passages: the text of each segment, Part A and its
    continuation, cut before its last word."""
    items = []
    for part_a, targets in segments(rows):
        text = tokenizer.decode([t for t in part_a if t != GMASK_ID] + targets)
        match = _LAST_WORD[lang].search(text)
        if match and match.start(1) > 20:
            items.append((text[: match.start(1)], match.group(1)))
        if len(items) == max_items:
            break
    return items


def cloze_accuracy(generator: Generator, tokenizer, rows, lang: str, max_items: int = 16) -> float | None:
    items = cloze_items(tokenizer, rows, lang, max_items)
    if not items:
        return None
    hits = 0
    for context, word in items:
        ids = tokenizer.encode(context)[-(generator.seq_length - 16):] + [GMASK_ID]
        _, spans = generator.generate(ids, Sampling(max_new_tokens=6))
        match = _FIRST_WORD[lang].match(tokenizer.decode(spans[0]))
        hits += bool(match) and match.group(1) == word
    return hits / len(items)


def task_metrics(model_chunk, data, seq_length: int, max_items: int = 16, *,
                 on_task: Callable[[str], None] | None = None) -> dict[str, float]:
    """Zero-shot translation and cloze metrics (keys ``eval/...``) for a one-chunk model;
    ``on_task(name)`` is called as each task starts (a progress bar)."""
    generator = Generator(model_chunk, data.tokenizer.vocab_size, seq_length)
    metrics: dict[str, float] = {}
    on_task = on_task or (lambda name: None)
    with dropless_routing([model_chunk]):
        if "mip_heldout" in data.valid:
            on_task("translation")
            scores = translation_scores(generator, data.tokenizer, data.valid["mip_heldout"].rows, max_items)
            metrics.update({f"eval/mip_heldout/{k}": v for k, v in scores.items()})
        for lang in ("en", "zh"):
            name = f"{lang}_gmask"
            if name in data.valid:
                on_task(f"cloze {lang}")
                accuracy = cloze_accuracy(generator, data.tokenizer, data.valid[name].rows, lang, max_items)
                if accuracy is not None:
                    metrics[f"eval/cloze_{lang}/accuracy"] = accuracy
    return metrics


@dataclass
class EvaluateOptions:
    checkpoint: str = option(help="a run folder, its checkpoints folder (the newest valid checkpoint) or one "
                                  "step_* folder")
    items: int = option(32, help="items per generation task (translation, cloze)")
    mlflow: bool = option(False, help="also log the numbers to the checkpoint's MLflow run at its step")


def main(argv: list[str] | None = None) -> int:
    """``python -m moe_morpheus.inference.evaluate checkpoint=DIR [items=N] [mlflow=true]``: loss and
    perplexity per validation set, translation chrF / exact match, cloze accuracy; with
    ``mlflow=true`` the numbers are also logged to the checkpoint's MLflow run at its step.
    ``DIR`` is a run folder, its ``checkpoints`` folder (the newest valid checkpoint) or one
    ``step_*`` folder. A progress bar on stderr names the stage."""
    import json
    import sys

    from tqdm.auto import tqdm

    from moe_morpheus.data import build_data
    from moe_morpheus.inference.load import load_for_inference
    from moe_morpheus.train.checkpoint import CheckpointError

    try:
        args, _ = parse_options(EvaluateOptions, sys.argv[1:] if argv is None else argv,
                                prog="moe_morpheus.inference.evaluate", summary=main.__doc__)
        model, tokenizer, exp, info = load_for_inference(args.checkpoint, with_info=True)
    except (ConfigError, CheckpointError) as error:
        return fail(error)
    # Stages, not items: data, validation losses, then each generation task (the slow part).
    progress = tqdm(total=5, desc="evaluate: data", unit="stage", dynamic_ncols=True)

    def stage(name: str) -> None:
        progress.update(1)
        progress.set_description(f"evaluate: {name}")

    data = build_data(exp.data_config(), exp.model.seq_length, progress=False)
    stage("validation losses")
    valid = validation_losses([model], data.valid, micro_batch_size=exp.trainer.micro_batch_size)
    results = valid.metrics()
    results.update({f"valid/{k}/perplexity": math.exp(v[0]) for k, v in valid.sets.items()})
    results.update(task_metrics(model, data, exp.model.seq_length, args.items, on_task=stage))
    progress.close()
    width = max(map(len, results))
    for key, value in results.items():
        print(f"{key:<{width}}  {value:10.4f}")
    print(json.dumps({"checkpoint": str(info["path"]), "step": info["step"], **results}))
    if args.mlflow:
        if not info.get("run_id"):
            print(f"mlflow=true: {info['path']} records no MLflow run; nothing was logged", file=sys.stderr)
            return 0
        from mlflow.tracking import MlflowClient

        from moe_morpheus.tracking.names import resolve_uri

        uri = resolve_uri(exp.tracking.uri)
        client = MlflowClient(tracking_uri=uri)
        for key, value in results.items():
            client.log_metric(info["run_id"], key, value, step=info["step"])
        print(f"logged {len(results)} metrics to MLflow run {info['run_id']} at {uri} (step {info['step']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
