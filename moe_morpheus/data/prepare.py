"""``python -m moe_morpheus.data.prepare``: tokenise a data config's shards ahead of training.

    python -m moe_morpheus.data.prepare data=NAME                  # every shard, one worker per core
    python -m moe_morpheus.data.prepare data=NAME shards=0:500     # a range (this machine's part)
    python -m moe_morpheus.data.prepare -m data=NAME shards=0:500,500:1000 hydra/launcher=slurm
    python -m moe_morpheus.data.prepare data=NAME verify=true      # hash done shards, redo changed ones

A pool of worker processes tokenises whole shards, each streaming its records into its own
indexed file (moe_morpheus/data/corpus.py), so memory does not grow with the corpus. Shards
already in the cache are skipped, so a rerun after a crash, a SIGKILL or a preempted job does
only what is left, and gives the same files as an uninterrupted run (a shard is written under a
temporary name and renamed when whole; stale temporaries of dead processes on this host are
removed at start). A source's index is written by whichever run completes its last shard;
training refuses a source with missing shards, naming them.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import queue
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import psutil
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from moe_morpheus.config.data import (
    DataConfig,
    PrepareConfig,
    SourceConfig,
    resolve_path,
    sources_left_to_configs,
)
from moe_morpheus.config.errors import ConfigError
from moe_morpheus.config.keys import check_keys, check_overrides
from moe_morpheus.data.corpus import temporary_owner, tokenise_shard, write_index
from moe_morpheus.data.readers import DataError
from moe_morpheus.data.shards import Shard, file_sha256, index_path, source_shards
from moe_morpheus.data.tokenizer import Tokenizer

# Failed shards listed on the terminal (all of them are in the return value).
_LISTED = 10


@dataclass
class PrepareResult:
    selected: int = 0
    skipped: int = 0
    tokenised: int = 0
    changed: int = 0  # done shards whose content no longer matched (verify=true), re-tokenised
    tokens: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (shard path, message)
    complete: list[str] = field(default_factory=list)  # sources whose index is written
    incomplete: dict[str, int] = field(default_factory=dict)  # source -> shards still missing


def all_shards(data: DataConfig, tokenizer: Tokenizer) -> list[tuple[str, Shard]]:
    """(source, shard) for every shard of every source, in config order: what ``shards=A:B`` numbers."""
    cache_dir = resolve_path(data.cache_dir)
    return [(name, shard) for name, src in data.sources.items()
            for shard in source_shards(name, src, tokenizer.fingerprint, cache_dir)]


def remove_stale_temporaries(cache_dir: Path) -> int:
    """Delete temporaries (corpus.tokenise_shard) left by dead processes of this host; a live
    process, or one of another host sharing the folder, keeps its own."""
    host, removed = socket.gethostname(), 0
    for path in cache_dir.glob("shards/*/.*.tmp-*"):
        owner = temporary_owner(path)
        if owner is None or owner[0] != host or _alive(owner[1]):
            continue
        path.unlink(missing_ok=True)
        removed += 1
    return removed


def _alive(pid: int) -> bool:
    # A worker killed with its parent is a zombie until init reaps it: it is not writing.
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _forget(shard: Shard, name: str, shards_of_source: list[Shard], cache_dir: Path) -> None:
    # The .json marks a shard done: it goes first, so a crash here leaves a shard that is redone.
    for ext in (".json", ".bin", ".idx"):
        Path(shard.prefix + ext).unlink(missing_ok=True)
    index_path(name, shards_of_source, cache_dir).unlink(missing_ok=True)


# Worker state, set once per process by the pool's initializer.
_WORKER: dict = {}


def _init_worker(tokenizer_path: str, progress: mp.Queue) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the pool,
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # which it does with SIGTERM (forked: main's handler)
    _WORKER.update(tokenizer=Tokenizer(tokenizer_path), progress=progress)


def _tokenise(job: tuple[str, SourceConfig, Shard]) -> tuple[Shard, dict | None, str | None]:
    name, src, shard = job
    try:
        meta = tokenise_shard(name, src, shard, _WORKER["tokenizer"], threads=1, on_bytes=_WORKER["progress"].put)
    except DataError as error:
        return shard, None, str(error)
    return shard, meta["stats"], None


def _run_pool(jobs: list[tuple[str, SourceConfig, Shard]], tokenizer: Tokenizer, workers: int, bar: tqdm,
              result: PrepareResult) -> None:
    # Forked workers inherit the imported modules: Megatron-Core (the indexed-file writer) is
    # imported once here instead of once per worker (about 4 s each on this machine).
    import megatron.core.datasets.indexed_dataset  # noqa: F401

    ctx = mp.get_context("fork")
    progress = ctx.Queue()
    with ctx.Pool(workers, initializer=_init_worker, initargs=(str(tokenizer.path), progress)) as pool:
        pending = [pool.apply_async(_tokenise, (job,)) for job in jobs]
        while pending:
            try:
                bar.update(progress.get(timeout=0.2))
            except queue.Empty:
                pass
            for task in [t for t in pending if t.ready()]:
                pending.remove(task)
                shard, stats, error = task.get()
                if error:
                    result.failed.append((str(shard.path), error))
                else:
                    result.tokenised += 1
                    result.tokens += stats["tokens"]
                bar.set_postfix(shards=f"{result.tokenised}/{len(jobs)}", failed=len(result.failed), refresh=False)
        while not progress.empty():
            bar.update(progress.get())


def prepare(cfg: PrepareConfig) -> PrepareResult:
    data = cfg.data
    tokenizer = Tokenizer(resolve_path(data.tokenizer))
    cache_dir = resolve_path(data.cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(cache_dir)
    every = all_shards(data, tokenizer)
    by_source = {name: [s for n, s in every if n == name] for name in data.sources}
    chosen = [every[i] for i in cfg.shard_slice(len(every))]
    result = PrepareResult(selected=len(chosen))
    if cfg.verify:
        done = [(name, shard) for name, shard in chosen if shard.done]
        for name, shard in tqdm(done, desc="verifying", unit="shard", disable=not cfg.progress):
            recorded = json.loads(Path(shard.prefix + ".json").read_text())["sha256"]
            if file_sha256(shard.path) != recorded:
                _forget(shard, name, by_source[name], cache_dir)
                result.changed += 1
    todo = [(name, data.sources[name], shard) for name, shard in chosen if not shard.done]
    result.skipped = len(chosen) - len(todo)
    workers = min(cfg.workers or os.cpu_count() or 1, max(len(todo), 1))
    print(f"prepare: {len(chosen)} of {len(every)} shards selected ({cfg.shards}), {result.skipped} already "
          f"tokenised, {len(todo)} to do ({sum(s.size for *_, s in todo) / 1e6:,.1f} MB) with {workers} "
          f"worker(s) -> {cache_dir}", file=sys.stderr)
    # Longest first: the pool's last minutes are not one big shard on one core.
    todo.sort(key=lambda job: -job[2].size)
    with tqdm(total=sum(s.size for *_, s in todo), unit="B", unit_scale=True, desc="tokenising",
              disable=not cfg.progress or not todo, smoothing=0.05) as bar:
        if todo:
            _run_pool(todo, tokenizer, workers, bar, result)
    for name, shards in by_source.items():
        missing = sum(not s.done for s in shards)
        if missing:
            result.incomplete[name] = missing
            continue
        if not index_path(name, shards, cache_dir).is_file():
            write_index(name, data.sources[name], shards, tokenizer, cache_dir)
        result.complete.append(name)
    return result


def report(result: PrepareResult) -> int:
    print(f"prepare: tokenised {result.tokenised} shard(s) ({result.tokens:,} tokens), skipped {result.skipped} "
          f"already done" + (f", re-tokenised {result.changed} changed" if result.changed else ""), file=sys.stderr)
    if result.complete:
        print(f"complete (indexed, ready to train): {', '.join(result.complete)}", file=sys.stderr)
    if result.incomplete:
        print("not complete yet: " + ", ".join(f"{n} ({k} shard(s) missing)" for n, k in result.incomplete.items())
              + "; run the other shard ranges, or this command without shards=", file=sys.stderr)
    for _, error in result.failed[:_LISTED]:
        print(f"error: {error}", file=sys.stderr)
    if result.failed:
        more = f" ({len(result.failed) - _LISTED} more not shown)" if len(result.failed) > _LISTED else ""
        print(f"error: {len(result.failed)} shard(s) could not be read{more}; fix or remove them and rerun "
              f"(the other shards are kept)", file=sys.stderr)
        return 1
    return 0


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


ConfigStore.instance().store(name="prepare_schema", node=sources_left_to_configs(OmegaConf.structured(PrepareConfig)))


@hydra.main(version_base="1.3", config_path="../../conf", config_name="prepare")
def main(cfg: DictConfig) -> int:
    signal.signal(signal.SIGTERM, _raise_interrupt)  # scancel, timeout: stop the pool, keep done shards
    # Importing Megatron-Core's indexed dataset announces its FSDP set-up at INFO, which Hydra's
    # job logging prints: three lines per worker that say nothing about the data.
    logging.getLogger("megatron").setLevel(logging.WARNING)
    try:
        check_keys(OmegaConf.to_container(cfg), PrepareConfig)
        options = OmegaConf.to_object(cfg)
        result = prepare(options)
    except (ValueError, OSError) as error:  # ConfigError, DataError and TokenizerError are ValueErrors
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("prepare: interrupted; finished shards are kept, rerun the same command to do the rest",
              file=sys.stderr)
        raise SystemExit(130) from None
    status = report(result)
    if status:
        raise SystemExit(status)
    return status


def _check_argv(argv: list[str]) -> None:
    try:
        check_overrides([a for a in argv if not a.startswith("-") and "=" in a], PrepareConfig, groups=["data"])
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    _check_argv(sys.argv[1:])
    main()
