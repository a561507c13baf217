"""Evaluation: validation loss and perplexity per set, zero-shot translation on held-out MIP
templates, and a last-word cloze task in English and Chinese. Always with dropless routing.

Used by the trainer at every evaluation interval and by
``python -m moe_morpheus.evaluate --checkpoint DIR`` (see ``main``).

- Loss / perplexity: mean cross entropy per target token of each fixed validation set
  (DESIGN.md, "Validation loss and perplexity"); perplexity = exp(loss).
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

import torch

from moe_morpheus.data import batch_iterator
from moe_morpheus.data.tokenizer import GMASK_ID
from moe_morpheus.generate import Generator, Sampling
from moe_morpheus.train.step import forward_backward

_LAST_WORD = {"en": re.compile(r"([A-Za-z']+)[^A-Za-z']*$"), "zh": re.compile(r"([\u4e00-\u9fff])[^\u4e00-\u9fff]*$")}
_FIRST_WORD = {"en": re.compile(r"\s*([A-Za-z']+)"), "zh": re.compile(r"[^\u4e00-\u9fff]*([\u4e00-\u9fff])")}


@contextlib.contextmanager
def dropless_routing(model: list[torch.nn.Module]):
    """Route every assignment (DESIGN.md: validation loss with dropless routing), train mode off."""
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


@torch.no_grad()
def validation_losses(model: list[torch.nn.Module], valid: dict, *, micro_batch_size: int, dp_rank: int = 0,
                      dp_size: int = 1) -> dict[str, float]:
    """Mean cross entropy per target token of each validation set, and their mean (``mean``)."""
    losses = {}
    with dropless_routing(model):
        for name, dataset in valid.items():
            batches = list(batch_iterator(dataset, global_batch_size=micro_batch_size * dp_size,
                                          micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size))
            if batches:
                losses[name] = forward_backward(model, batches, forward_only=True)
    if losses:
        losses["mean"] = sum(losses.values()) / len(losses)
    return losses


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
    """chrF and exact match of greedy continuations on held-out instruction rows."""
    import sacrebleu

    hypotheses, references = [], []
    for prompt, answer in segments(rows)[:max_items]:
        _, spans = generator.generate(prompt, Sampling(max_new_tokens=min(len(answer) + 8, 64)))
        hypotheses.append(tokenizer.decode(spans[0]).strip())
        references.append(tokenizer.decode(answer).strip())
    if not hypotheses:
        return {}
    chrf = sacrebleu.corpus_chrf(hypotheses, [references]).score
    exact = sum(h == r for h, r in zip(hypotheses, references)) / len(hypotheses)
    return {"chrf": chrf, "exact_match": exact}


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


def task_metrics(model_chunk, data, seq_length: int, max_items: int = 16) -> dict[str, float]:
    """Zero-shot translation and cloze metrics (keys ``eval/...``) for a one-chunk model."""
    generator = Generator(model_chunk, data.tokenizer.vocab_size, seq_length)
    metrics: dict[str, float] = {}
    with dropless_routing([model_chunk]):
        if "mip_heldout" in data.valid:
            scores = translation_scores(generator, data.tokenizer, data.valid["mip_heldout"].rows, max_items)
            metrics.update({f"eval/mip_heldout/{k}": v for k, v in scores.items()})
        for lang in ("en", "zh"):
            name = f"{lang}_gmask"
            if name in data.valid:
                accuracy = cloze_accuracy(generator, data.tokenizer, data.valid[name].rows, lang, max_items)
                if accuracy is not None:
                    metrics[f"eval/cloze_{lang}/accuracy"] = accuracy
    return metrics


def main(argv: list[str] | None = None) -> None:
    """``python -m moe_morpheus.evaluate --checkpoint DIR [--items N] [--mlflow]``: loss and
    perplexity per validation set, translation chrF / exact match, cloze accuracy; with
    ``--mlflow`` the numbers are also logged to the checkpoint's MLflow run at its step."""
    import argparse
    import json

    from moe_morpheus.data import build_data
    from moe_morpheus.train.checkpoint import load_for_inference

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--items", type=int, default=32, help="items per generation task")
    parser.add_argument("--mlflow", action="store_true")
    args = parser.parse_args(argv)
    model, tokenizer, exp, info = load_for_inference(args.checkpoint, with_info=True)
    data = build_data(exp.data_config(), exp.model.seq_length, progress=False)
    losses = validation_losses([model], data.valid, micro_batch_size=exp.trainer.micro_batch_size)
    results = {f"valid/{k}/loss": v for k, v in losses.items() if k != "mean"}
    results.update({f"valid/{k}/perplexity": math.exp(v) for k, v in losses.items() if k != "mean"})
    results["valid/loss"] = losses["mean"]
    results.update(task_metrics(model, data, exp.model.seq_length, args.items))
    width = max(map(len, results))
    for key, value in results.items():
        print(f"{key:<{width}}  {value:10.4f}")
    print(json.dumps({"checkpoint": str(info["path"]), "step": info["step"], **results}))
    if args.mlflow and info.get("run_id"):
        from mlflow.tracking import MlflowClient

        from moe_morpheus.tracking import resolve_uri

        client = MlflowClient(tracking_uri=resolve_uri(exp.tracking.uri))
        for key, value in results.items():
            client.log_metric(info["run_id"], key, value, step=info["step"])


if __name__ == "__main__":
    main()
