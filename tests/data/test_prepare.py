"""python -m moe_morpheus.data.prepare: a pool of workers, shard ranges, reruns that skip what is
done (after SIGKILL too) with files identical to one uninterrupted run, verify, bad shards."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moe_morpheus.config.data import DataConfig, PrepareConfig, SourceConfig
from moe_morpheus.data.corpus import build_corpus, temporary_prefix
from moe_morpheus.data.prepare import prepare, remove_stale_temporaries
from moe_morpheus.data.readers import DataError
from tests.helpers.data import write_jsonl

EN = "The {i}th record of the English shard {k}, with some words to tokenise. "
ZH = "第{k}个分片的第{i}条记录，有一些要切分的中文。"


def make_corpus(root, shards=6, records=40, repeat=3):
    """A bilingual corpus of ``shards`` en and zh shards (.jsonl.gz and .jsonl.zst)."""
    for k in range(shards):
        write_jsonl(root / "en" / f"en-{k:03d}.jsonl.gz", [{"text": EN.format(i=i, k=k) * repeat} for i in range(records)])
        write_jsonl(root / "zh" / f"zh-{k:03d}.jsonl.zst", [{"text": ZH.format(i=i, k=k) * repeat} for i in range(records)])
    return {"en": SourceConfig(path=str(root / "en" / "*.jsonl.gz"), lang="en"),
            "zh": SourceConfig(path=str(root / "zh" / "*.jsonl.zst"), lang="zh")}


def _cfg(sources, cache, **kw):
    return PrepareConfig(data=DataConfig(sources=sources, cache_dir=str(cache), mip_ratio=0.0), progress=False, **kw)


def cache_files(cache):
    """Relative path -> bytes of every file in a cache folder."""
    return {str(p.relative_to(cache)): p.read_bytes() for p in sorted(cache.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return root, make_corpus(root)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """The cache one uninterrupted single-worker run makes."""
    _, sources = corpus
    cache = tmp_path_factory.mktemp("reference")
    result = prepare(_cfg(sources, cache, workers=1))
    assert result.tokenised == 12 and result.complete == ["en", "zh"] and not result.failed
    return cache_files(cache)


def test_pool_and_ranges_make_the_same_files(corpus, reference, tmp_path):
    _, sources = corpus
    assert cache_files(_run(sources, tmp_path / "pool", workers=2)) == reference
    # Two "machines": the first range leaves both sources incomplete, the second completes them.
    first = prepare(_cfg(sources, tmp_path / "ranges", shards="0:7", workers=2))
    assert (first.tokenised, first.complete, first.incomplete) == (7, ["en"], {"zh": 5})
    second = prepare(_cfg(sources, tmp_path / "ranges", shards="7:", workers=2))
    assert (second.tokenised, second.complete) == (5, ["en", "zh"])
    assert cache_files(tmp_path / "ranges") == reference
    again = prepare(_cfg(sources, tmp_path / "ranges"))
    assert (again.tokenised, again.skipped) == (0, 12)


def _run(sources, cache, **kw):
    prepare(_cfg(sources, cache, **kw))
    return cache


def test_training_refuses_an_incomplete_set(corpus, demo_tokenizer, tmp_path):
    _, sources = corpus
    prepare(_cfg(sources, tmp_path, shards="0:4"))
    with pytest.raises(DataError, match=r"data.sources.en: 2 of 6 shard\(s\) .* not tokenised yet \(.*en-004.jsonl.gz, "
                                        r".*en-005.jsonl.gz\); run `python -m moe_morpheus.data.prepare`"):
        build_corpus("en", sources["en"], demo_tokenizer, tmp_path, progress=False, tokenize_limit_mb=0)


def test_verify_finds_content_the_key_does_not_see(tmp_path, demo_tokenizer):
    path = write_jsonl(tmp_path / "c" / "big.jsonl", [{"text": f"record {i} " * 20} for i in range(2000)])
    sources = {"en": SourceConfig(path=str(path))}
    prepare(_cfg(sources, tmp_path / "cache"))
    before = build_corpus("en", sources["en"], demo_tokenizer, tmp_path / "cache", progress=False)
    # Same size, same mtime, bytes changed away from the 3 sampled blocks: the key cannot tell.
    stat, data = path.stat(), bytearray(path.read_bytes())
    assert len(data) > 4 * 65536
    middle = len(data) // 4
    data[middle: middle + 16] = b'"' * 16  # ends a string early: that record is no longer JSON
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert prepare(_cfg(sources, tmp_path / "cache")).tokenised == 0
    checked = prepare(_cfg(sources, tmp_path / "cache", verify=True))
    assert (checked.changed, checked.tokenised) == (1, 1)
    after = build_corpus("en", sources["en"], demo_tokenizer, tmp_path / "cache", progress=False)
    assert (before.stats["bad_json"], after.stats["bad_json"]) == (0, 1)  # the edited record


def test_an_unreadable_shard_fails_with_its_path_and_the_rest_is_kept(corpus, tmp_path):
    _, sources = corpus
    bad = tmp_path / "bad"
    make_corpus(bad, shards=3, records=5)
    (bad / "en" / "en-001.jsonl.gz").write_bytes(b"not gzip at all")
    result = prepare(_cfg({"en": SourceConfig(path=str(bad / "en" / "*.gz"))}, tmp_path / "cache", workers=2))
    assert result.tokenised == 2 and result.incomplete == {"en": 1}
    assert len(result.failed) == 1 and result.failed[0][0].endswith("en-001.jsonl.gz")
    assert "cannot read shard" in result.failed[0][1] and "en-001.jsonl.gz" in result.failed[0][1]


@pytest.mark.parametrize("host", [None, "node01.cluster.example"])  # None: this machine's name
def test_stale_temporaries_of_dead_processes_only(tmp_path, monkeypatch, host):
    import socket

    if host:  # cluster nodes are often named with dots
        monkeypatch.setattr(socket, "gethostname", lambda: host)
    (tmp_path / "shards" / "en").mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    # Named as the writer names them (corpus.temporary_prefix: this host, this process).
    live = Path(temporary_prefix(tmp_path / "shards" / "en" / "y-abc") + ".bin")
    stale = live.with_name(live.name.replace("y-abc", "x-abc").replace(f"-{os.getpid()}.", f"-{dead.pid}."))
    other_host = tmp_path / "shards" / "en" / f".z-abc.tmp-elsewhere-{dead.pid}.bin"
    for p in (stale, live, other_host):
        p.write_bytes(b"partial")
    assert remove_stale_temporaries(tmp_path) == 1
    assert not stale.exists() and live.exists() and other_host.exists()


@pytest.mark.slow
def test_sigkill_then_rerun_gives_the_uninterrupted_files(tmp_path):
    """The command line, killed with SIGKILL part-way, then rerun as a Hydra multirun over two ranges."""
    sources = make_corpus(tmp_path / "c", shards=8, records=300, repeat=4)
    reference = tmp_path / "reference"
    prepare(_cfg(sources, reference, workers=2))
    cache = tmp_path / "cache"
    # A data config of one's own, as a researcher writes it (conf/data/NAME.yaml; here in a
    # config folder added to Hydra's search path).
    (tmp_path / "conf" / "data").mkdir(parents=True)
    (tmp_path / "conf" / "data" / "synthetic.yaml").write_text(
        f"cache_dir: {cache}\nmip_ratio: 0\nsources:\n"
        + "".join(f"  {name}:\n    path: {src.path}\n    lang: {src.lang}\n" for name, src in sources.items()))
    command = [sys.executable, "-m", "moe_morpheus.data.prepare"]
    args = ["--config-dir", str(tmp_path / "conf"), "data=synthetic", "progress=false", "workers=1", f"hydra.run.dir={tmp_path / 'run'}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([*command, *args], start_new_session=True, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(cache.rglob("*.json"))) < 3 and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # Finished shards: their .json, not a source index nor a temporary the kill left (".<name>.tmp-...").
    done = len([p for p in cache.rglob("*.json") if not p.name.endswith(".index.json") and not p.name.startswith(".")])
    assert 0 < done < 16, proc.stderr.read()
    rerun = subprocess.run([*command, "-m", *args, "shards=0:8,8:"], capture_output=True, text=True, env=env)
    assert rerun.returncode == 0, rerun.stderr
    # The two jobs of the multirun tokenise exactly what the killed run had not finished.
    assert sum(int(n) for n in re.findall(r"tokenised (\d+) shard", rerun.stderr)) == 16 - done
    assert cache_files(cache) == cache_files(reference)
