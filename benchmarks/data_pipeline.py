"""Data pipeline cost on the CPU demo: cold start, and batches vs. a training step.

    python benchmarks/data_pipeline.py [--seq-length 256] [--micro-batch 8] [--batches 200]

1. Cold start, as a fresh clone's `make train` meets it: train the demo tokenizer (the committed
   one makes this unnecessary; measured to show it could be remade inside the budget), tokenise
   the three demo sources into an empty cache, build the streams and validation sets; then the
   same build with a warm cache.
2. Batch production: ms per micro-batch [micro_batch, seq_length] from the training stream,
   starting at sample 0 so the epoch plans made on the way are included.
3. A stand-in training step (hidden 256, 4 layers, 4 heads, FFN 704, vocab 8192, tied output,
   AdamW) on the same micro-batch: forward + backward + optimizer step. Goal: batches cost
   under 5% of a step. Exit status 1 when they do not.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from moe_morpheus.config.data import DataConfig
from moe_morpheus.data.dataset import batch_iterator, build_data
from moe_morpheus.data.train_tokenizer import blend_texts, train_tokenizer


def stand_in_step_ms(batch: dict[str, torch.Tensor], vocab: int = 8192, hidden: int = 256, layers: int = 4,
                     repeats: int = 5) -> float:
    torch.manual_seed(0)
    embed = torch.nn.Embedding(vocab, hidden)
    layer = torch.nn.TransformerEncoderLayer(hidden, 4, dim_feedforward=704, batch_first=True, dropout=0.0)
    body = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
    params = list(embed.parameters()) + list(body.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    seq = batch["tokens"].shape[1]
    mask = torch.triu(torch.full((seq, seq), float("-inf")), diagonal=1)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        logits = body(embed(batch["tokens"]), mask=mask) @ embed.weight.T
        loss = torch.nn.functional.cross_entropy(logits.view(-1, vocab), batch["targets"].view(-1), reduction="none")
        loss = (loss * batch["loss_mask"].view(-1)).sum() / batch["loss_mask"].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=200)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        cfg = replace(DataConfig(), cache_dir=str(Path(tmp) / "cache"), seed=1234)
        start = time.perf_counter()
        train_tokenizer(blend_texts(cfg, 3_000_000), Path(tmp) / "tok.model", vocab_size=8192)
        t_tok = time.perf_counter() - start
        start = time.perf_counter()
        data = build_data(cfg, args.seq_length, progress=False)
        t_cold = time.perf_counter() - start
        start = time.perf_counter()
        data = build_data(cfg, args.seq_length, progress=False)
        t_warm = time.perf_counter() - start

        it = batch_iterator(data.train, global_batch_size=args.micro_batch, micro_batch_size=args.micro_batch)
        start = time.perf_counter()
        batches = [next(it) for _ in range(args.batches)]
        batch_ms = 1000 * (time.perf_counter() - start) / args.batches
        step_ms = stand_in_step_ms(batches[-1])

    ratio = batch_ms / step_ms
    print(f"tokenizer training (3 M characters, vocab 8192): {t_tok:6.1f} s")
    print(f"build_data, empty cache (tokenise 3 sources):    {t_cold:6.1f} s  (includes importing Megatron-Core)")
    print(f"build_data, warm cache:                          {t_warm:6.1f} s")
    print(f"micro-batch [{args.micro_batch}, {args.seq_length}] production:  {batch_ms:8.2f} ms "
          f"(mean of {args.batches}, epoch plans included)")
    print(f"stand-in training step (h256, 4 layers, v8192):  {step_ms:8.1f} ms")
    print(f"data / step: {100 * ratio:.2f}% (goal < 5%): {'PASS' if ratio < 0.05 else 'FAIL'}")
    epochs = data.epochs(args.batches * args.micro_batch)
    print("epochs after the benchmark's rows: " + ", ".join(f"{k} {v:.4f}" for k, v in epochs.items()))
    raise SystemExit(0 if ratio < 0.05 else 1)


if __name__ == "__main__":
    main()
