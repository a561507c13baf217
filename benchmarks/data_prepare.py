"""Sharded preprocessing (python -m moe_morpheus.data.prepare) on this machine: pool scaling,
memory as the corpus grows, and SIGKILL-then-rerun identity.

    python benchmarks/data_prepare.py [--mb 20] [--shards 100] [--out benchmarks/results/data_prepare.json]

The corpus is real text cut into synthetic shards: the demo corpus's Austen and Sanguo records,
cut into ~4 KB documents, dealt round-robin into ``--shards`` .jsonl.gz (en) and .jsonl.zst (zh)
shards of ``--mb`` MB of text in all (and 10x that for the memory case).

1. Throughput: a plain single-process loop (corpus.tokenise_shard over every shard, one
   SentencePiece thread: the per-worker rate) against the prepare pool with one worker per core,
   in the same run. Goal on 2 cores: >= 1.8x.
2. Peak memory: the command run as a subprocess on the corpus and on 10x the corpus; peak of the
   summed RSS of the process tree, sampled every 50 ms. Goal: within 10%.
3. Resumption: the command killed with SIGKILL once a third of the shards are done, then rerun;
   the rerun skips what was done and the cache is byte-identical to an uninterrupted run's.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from moe_morpheus.config.data import DataConfig, PrepareConfig, SourceConfig  # noqa: E402
from moe_morpheus.data.corpus import tokenise_shard  # noqa: E402
from moe_morpheus.data.prepare import prepare  # noqa: E402
from moe_morpheus.data.shards import source_shards  # noqa: E402
from moe_morpheus.data.tokenizer import Tokenizer  # noqa: E402
from tests.helpers.data import write_jsonl  # noqa: E402

DOC_CHARS = {"en": 4000, "zh": 1500}  # ~4 KB of UTF-8 either way (a Chinese character is 3 bytes)


def demo_documents(lang: str) -> list[str]:
    name = {"en": "en_austen.jsonl.gz", "zh": "zh_sanguo.jsonl.gz"}[lang]
    with gzip.open(REPO / "data" / "demo_corpus" / name, "rt", encoding="utf-8") as f:
        text = "".join(json.loads(line)["text"] for line in f)
    step = DOC_CHARS[lang]
    return [text[i:i + step] for i in range(0, len(text), step)]


def make_corpus(root: Path, megabytes: float, shards: int) -> dict[str, SourceConfig]:
    """``shards`` shards per language, ``megabytes`` MB of UTF-8 text in all, half en, half zh."""
    for lang, suffix in (("en", "jsonl.gz"), ("zh", "jsonl.zst")):
        docs, budget, buckets = demo_documents(lang), megabytes * 1e6 / 2, [[] for _ in range(shards)]
        taken, i = 0, 0
        while taken < budget:
            doc = docs[i % len(docs)]
            buckets[i % shards].append({"text": doc, "id": i})
            taken += len(doc.encode())
            i += 1
        for k, records in enumerate(buckets):
            write_jsonl(root / lang / f"{lang}-{k:05d}.{suffix}", records)
    return {"en": SourceConfig(path=str(root / "en" / "*.jsonl.gz"), lang="en"),
            "zh": SourceConfig(path=str(root / "zh" / "*.jsonl.zst"), lang="zh")}


def data_yaml(folder: Path, sources: dict[str, SourceConfig], cache: Path) -> Path:
    (folder / "data").mkdir(parents=True, exist_ok=True)
    text = f"cache_dir: {cache}\nmip_ratio: 0\nsources:\n" + "".join(
        f"  {n}:\n    path: {s.path}\n    lang: {s.lang}\n" for n, s in sources.items())
    (folder / "data" / "bench.yaml").write_text(text)
    return folder


def command(conf: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "moe_morpheus.data.prepare", "--config-dir", str(conf), "data=bench",
            "progress=false", f"hydra.run.dir={run_dir}", *extra]


def run_measured(args: list[str]) -> tuple[float, float, str]:
    """(seconds, peak summed RSS of the process tree in MB, stderr)."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, cwd=REPO)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree))
        except psutil.Error:
            pass
        time.sleep(0.05)
    stderr = proc.stderr.read()
    if proc.returncode:
        raise SystemExit(f"prepare failed ({proc.returncode}): {stderr[-2000:]}")
    return time.perf_counter() - start, peak / 2**20, stderr


def single_process(sources: dict[str, SourceConfig], cache: Path) -> tuple[float, int]:
    """A plain loop in this process: list the shards, tokenise each with one thread."""
    tokenizer = Tokenizer(REPO / DataConfig().tokenizer)
    start, tokens = time.perf_counter(), 0
    for name, src in sources.items():
        for shard in source_shards(name, src, tokenizer.fingerprint, cache):
            tokens += tokenise_shard(name, src, shard, tokenizer, threads=1)["stats"]["tokens"]
    return time.perf_counter() - start, tokens


def pool(sources: dict[str, SourceConfig], cache: Path, workers: int) -> float:
    """prepare() in this process (no start-up): list the shards, tokenise them with the pool."""
    start = time.perf_counter()
    result = prepare(PrepareConfig(data=DataConfig(sources=sources, cache_dir=str(cache), mip_ratio=0.0),
                                   workers=workers, progress=False))
    assert not result.failed and len(result.complete) == len(sources)
    return time.perf_counter() - start


def finished_shards(cache: Path) -> int:
    """Shards whose .json is in place: not a source index, not a temporary (".<name>.tmp-...")."""
    return sum(not p.name.endswith(".index.json") and not p.name.startswith(".") for p in cache.rglob("*.json"))


def cache_digest(cache: Path) -> dict[str, bytes]:
    return {str(p.relative_to(cache)): p.read_bytes() for p in sorted(cache.rglob("*")) if p.is_file()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=20.0, help="MB of text in the base corpus")
    parser.add_argument("--shards", type=int, default=100, help="shards per language (x2 in all)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "data_prepare.json"))
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    result: dict = {"commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                             text=True, cwd=REPO).stdout.strip(), "cores": cores}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        import megatron.core.datasets.indexed_dataset  # noqa: F401  (not in the single-process time)

        sources = make_corpus(tmp / "corpus", args.mb, args.shards)
        seconds, tokens = single_process(sources, tmp / "single")
        pool_s = pool(sources, tmp / "pool", cores)
        result["throughput"] = {
            "corpus_mb": args.mb, "shards": 2 * args.shards, "tokens": tokens,
            "single_process_tokens_per_s": tokens / seconds, "single_process_mb_per_s": args.mb / seconds,
            "pool_tokens_per_s": tokens / pool_s, "pool_workers": cores, "speedup": seconds / pool_s}
        print(f"single process (1 thread): {tokens / seconds:,.0f} tokens/s ({args.mb / seconds:.1f} MB/s); "
              f"pool of {cores}: {tokens / pool_s:,.0f} tokens/s -> {seconds / pool_s:.2f}x (goal >= 1.8x on 2 cores)")

        base_s, base_rss, _ = run_measured(command(data_yaml(tmp / "conf", sources, tmp / "base"), tmp / "run"))
        big = make_corpus(tmp / "big", 10 * args.mb, args.shards * 10)
        big_conf = data_yaml(tmp / "big_conf", big, tmp / "big_cache")
        big_s, big_rss, _ = run_measured(command(big_conf, tmp / "run"))
        result["memory"] = {"peak_rss_mb_1x": base_rss, "peak_rss_mb_10x": big_rss, "ratio": big_rss / base_rss,
                            "seconds_1x": base_s, "seconds_10x": big_s}
        print(f"peak RSS (process tree): {base_rss:.0f} MB at {args.mb:g} MB ({base_s:.0f} s), {big_rss:.0f} MB at "
              f"{10 * args.mb:g} MB ({big_s:.0f} s) -> {big_rss / base_rss:.3f}x (goal within 10%)")

        killed = data_yaml(tmp / "kill_conf", sources, tmp / "killed")
        proc = subprocess.Popen(command(killed, tmp / "run", "workers=1"), start_new_session=True, cwd=REPO,
                                stderr=subprocess.DEVNULL)
        target = 2 * args.shards // 3
        while proc.poll() is None and finished_shards(tmp / "killed") < target:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        done = finished_shards(tmp / "killed")
        _, _, stderr = run_measured(command(killed, tmp / "run"))
        identical = cache_digest(tmp / "killed") == cache_digest(tmp / "pool")
        result["resume"] = {"shards": 2 * args.shards, "done_when_killed": done, "rerun_report": stderr.strip()
                            .splitlines()[-2:], "identical_to_uninterrupted": identical}
        print(f"SIGKILL after {done} of {2 * args.shards} shards; rerun: {stderr.strip().splitlines()[0]}; "
              f"cache identical to the uninterrupted run: {identical}")
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
