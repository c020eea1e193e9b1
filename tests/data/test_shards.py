"""entrypoint/data/shards.py, entrypoint/data/tokendataset.py
and the cache around them (pipeline.prepare_shard, pre-key,
waiting processes): sharded builds, 64-bit offsets, processes that never read the corpus, and a signal in the middle
of a long preparation.

Real files and the real tiny tokenizer (conftest); the signal test runs the real CLI in a subprocess.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from entrypoint.config.schema import TrainConfig
from entrypoint.data import pipeline, shards, tokendataset
from entrypoint.data.options import DataOptions
from tests.support.helpers import REPO, clean_env, finetune

BLOCK = 32


def config(data_dir: Path, cache: Path, **options) -> DataOptions:
    return DataOptions.of(TrainConfig(data_dir=data_dir, output_dir=cache.parent / "out", cache_dir=cache,
                                      preprocessing_workers=1, **options))


def rows(dataset) -> list[list[int]]:
    return [row["input_ids"].tolist() for row in dataset]


@pytest.fixture
def one_file(tmp_path, corpus_dir) -> Path:
    """Only train.txt: validation documents are held out of it."""
    directory = tmp_path / "data"
    directory.mkdir()
    (directory / "train.txt").write_text((corpus_dir / "train.txt").read_text())
    return directory


@pytest.mark.parametrize("packing", [True, False])
def test_shards_written_in_any_order_give_the_single_process_rows(tokenizer, one_file, tmp_path, packing):
    single = config(one_file, tmp_path / "single", packing=packing)
    train, valid, stats = pipeline.prepare(single, tokenizer, BLOCK)
    sharded = config(one_file, tmp_path / "sharded", packing=packing)
    assert pipeline.prepare_shard(sharded, tokenizer, BLOCK, 2, 3) is None  # not complete yet: nothing to train on
    assert pipeline.prepare_shard(sharded, tokenizer, BLOCK, 0, 3) is None
    assert not list((tmp_path / "sharded").glob(f"*/{pipeline.COMPLETE}"))
    last = pipeline.prepare_shard(sharded, tokenizer, BLOCK, 1, 3)
    assert last is not None and last.fingerprint == stats.fingerprint
    train3, valid3, stats3 = pipeline.prepare(sharded, tokenizer, BLOCK)
    assert stats3.cache_hit and (stats3.train_rows, stats3.valid_rows) == (stats.train_rows, stats.valid_rows)
    assert (stats3.dropped_tokens, stats3.valid_documents) == (stats.dropped_tokens, stats.valid_documents)
    assert rows(train3) == rows(train) and rows(valid3) == rows(valid)
    if packing:  # blocks straddle shard ends: the stream is the shards' concatenation
        target = tmp_path / "sharded" / f"blocks-{stats.fingerprint}"
        sizes = [os.path.getsize(target / pipeline.shard_name(i, 3) / "train.tokens") // 2 for i in range(3)]
        assert sizes[0] % BLOCK and stats.train_rows == sum(sizes) // BLOCK


def test_tokens_are_uint16_when_the_vocabulary_fits_and_uint32_when_not():
    assert shards.token_dtype(50257) == np.uint16 and shards.token_dtype(65536) == np.uint16
    assert shards.token_dtype(65537) == np.uint32 and shards.token_dtype(151_646) == np.uint32


def test_offsets_past_two_to_the_31_tokens_are_exact(tmp_path):
    # A sparse file: 2**31 + 100 tokens (4 GiB of uint16) that takes a few kilobytes of disk.
    shard = tmp_path / "shard"
    shard.mkdir()
    total = 2**31 + 100
    tail = np.arange(1, 101, dtype=np.uint16)
    with (shard / "train.tokens").open("wb") as f:
        f.seek(2 * (total - 100))
        f.write(tail.tobytes())
    np.array([total - 60, 60], dtype=np.int64).tofile(shard / "train.docs")
    packed = tokendataset.TokenDataset(tokendataset.Layout((shard,), 64, True, "uint16"), "train")
    assert len(packed) == total // 64 == 33_554_433
    assert packed[-1]["input_ids"].tolist() == tail[:64].tolist()  # tokens 2**31 .. 2**31 + 63
    assert packed[-2]["input_ids"].tolist() == [0] * 64 and packed[-1]["input_ids"].dtype == np.int64
    unpacked = tokendataset.TokenDataset(tokendataset.Layout((shard,), 2**30, False, "uint16"), "train")
    assert unpacked.row_lengths().tolist() == [2**30, 2**30, 40, 60]  # the first document continues in rows 2, 3
    assert unpacked[-1]["input_ids"].tolist() == tail[40:].tolist()
    assert unpacked.offsets.dtype == np.int64 and int(unpacked.offsets[-1]) == total
    lengths = np.array([2**31 - 1, 2**31 - 1, 5], dtype=np.int64)
    assert tokendataset.row_offsets(lengths, 2**30)[-1] == 2**32 + 3  # an int32 cumulative sum would have wrapped


def test_a_waiting_process_never_reads_the_corpus(tokenizer, one_file, tmp_path):
    cfg = config(one_file, tmp_path / "cache")
    opened: list[str] = []
    watching = threading.Event()

    def audit(event, args):
        if watching.is_set() and event == "open" and str(args[0]).startswith(str(one_file)):
            opened.append(str(args[0]))

    sys.addaudithook(audit)
    result = {}
    watching.set()
    waiter = threading.Thread(target=lambda: result.update(out=pipeline.prepare(cfg, tokenizer, BLOCK, builds=False)))
    waiter.start()
    time.sleep(1.5)
    assert waiter.is_alive(), "a non-builder must wait for the builder, not build"
    watching.clear()
    train, valid, built = pipeline.prepare(cfg, tokenizer, BLOCK)  # the builder: this one reads the corpus
    watching.set()
    waiter.join(timeout=30)
    watching.clear()
    assert opened == [], f"the waiting process opened {opened}"
    waited_train, waited_valid, waited = result["out"]
    assert waited.cache_hit and waited.fingerprint == built.fingerprint
    assert rows(waited_train) == rows(train) and rows(waited_valid) == rows(valid)


def test_a_file_rewritten_under_its_old_size_and_mtime_changes_the_pre_key(tokenizer, one_file, tmp_path):
    cfg = config(one_file, tmp_path / "cache")
    first = pipeline.pre_key(cfg, tokenizer, *pipeline.discover(cfg), BLOCK)
    path = one_file / "train.txt"
    before = path.stat()
    time.sleep(0.01)
    path.write_text(path.read_text().replace("the", "THE"))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns
    assert pipeline.pre_key(cfg, tokenizer, *pipeline.discover(cfg), BLOCK) != first  # the ctime moved


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def _tokenizing(tiny_model, corpus_dir, tmp_path) -> tuple[subprocess.Popen, list[str], list[int], Path]:
    """A `prepare` of about 24 MB (tens of seconds) two seconds into tokenizing: (process, its stderr lines so
    far, its two workers' pids, the cache dir)."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    text = (corpus_dir / "train.txt").read_text()
    (data_dir / "train.txt").write_text(text * max(1, (24 << 20) // len(text)))
    (data_dir / "valid.txt").write_text((corpus_dir / "valid.txt").read_text())
    cache = tmp_path / "cache"
    proc = subprocess.Popen(
        [sys.executable, "-m", "entrypoint", "prepare", "--model", str(tiny_model), "--data-dir", str(data_dir),
         "--output-dir", str(tmp_path / "out"), "--cache-dir", str(cache), "--block-size", "64",
         "--preprocessing-workers", "2"], cwd=REPO, env=clean_env(), stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "data: tokenizing" in line:
            break
    assert proc.poll() is None, "".join(seen)
    deadline = time.monotonic() + 60  # the workers fork as tokenizing starts: at once here, later on a busy machine
    while len(workers := _children(proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(workers) == 2, f"expected two tokenizing workers, found {workers}"
    return proc, seen, workers, cache


def _no_leftovers(workers: list[int], cache: Path) -> None:
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text(), pid
    leftovers = sorted(str(p.relative_to(cache)) for p in cache.rglob("*"))
    assert not leftovers, leftovers  # not even an empty cache folder


@pytest.mark.parametrize("attempt", range(3))  # it once hung 1 time in 7 (multiprocessing.Pool, see forkpool.py)
def test_sigterm_mid_preparation_exits_preempted_within_seconds_and_leaves_no_cache(tiny_model, corpus_dir,
                                                                                    tmp_path, attempt):
    proc, seen, workers, cache = _tokenizing(tiny_model, corpus_dir, tmp_path)
    time.sleep(attempt * 0.37)  # at different points of the pieces' work
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    rest = proc.communicate(timeout=60)[1]
    assert proc.returncode == 7, "".join(seen) + rest
    # The stop itself takes under a second on a quiet machine; at a load average of 8 on 2 cores the workers' last
    # pieces and the interpreter unloading torch took 19-24 s. A hang would wait for ever.
    assert time.monotonic() - sent < 45
    assert "stopped by SIGTERM while preparing data" in rest
    _no_leftovers(workers, cache)


def test_a_tokenizing_worker_killed_for_memory_fails_the_preparation_at_once_with_exit_6(tiny_model, corpus_dir,
                                                                                         tmp_path):
    proc, seen, workers, cache = _tokenizing(tiny_model, corpus_dir, tmp_path)
    os.kill(workers[1], signal.SIGKILL)  # what the kernel's OOM killer does at the pod's memory limit
    rest = proc.communicate(timeout=60)[1]
    assert proc.returncode == 6, "".join(seen) + rest
    assert f"tokenizing process (pid {workers[1]}) was killed by SIGKILL" in rest
    assert "--preprocessing-workers" in rest and "Traceback" not in rest
    _no_leftovers(workers, cache)


@pytest.mark.slow  # three CLI processes, ~8 s each on a quiet machine
def test_prepare_command_takes_its_shard_from_the_indexed_jobs_completion_index(tiny_model, corpus_dir, tmp_path):
    args = ("prepare", "--model", str(tiny_model), "--data-dir", str(corpus_dir), "--output-dir", str(tmp_path / "out"),
            "--block-size", "32", "--num-shards", "2")
    second = finetune(*args, env=clean_env(JOB_COMPLETION_INDEX="1"))
    assert second.returncode == 0, second.stderr
    assert "shard 1 of 2" in second.stdout and "complete once every shard is written" in second.stdout
    first = finetune(*args, env=clean_env(JOB_COMPLETION_INDEX="0"))
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("prepared: ") and "training and" in first.stdout  # it completed the cache
    beyond = finetune(*args, env=clean_env(JOB_COMPLETION_INDEX="2"))
    assert beyond.returncode == 2 and "--shard 2 must be below --num-shards 2" in beyond.stderr


def test_preparation_logs_bytes_tokens_rate_and_eta_as_it_goes(tokenizer, one_file, tmp_path, monkeypatch, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="finetune")
    monkeypatch.setattr(pipeline, "PROGRESS_SECONDS", 0.0)  # a line per piece instead of every ten seconds
    stats = pipeline.prepare(config(one_file, tmp_path / "cache"), tokenizer, BLOCK)[2]
    lines = [r.getMessage() for r in caplog.records if " of " in r.getMessage() and "eta " in r.getMessage()]
    assert len(lines) >= 2, caplog.text
    assert all(line.startswith("data: ") and "tokens/s" in line and "eta " in line for line in lines)
    last = [r for r in caplog.records if " of " in r.getMessage() and "eta " in r.getMessage()][-1]
    kept = stats.train_tokens + stats.dropped_tokens + stats.valid_tokens  # all but the held-out remainder
    assert kept <= last.fields["tokens"] < kept + BLOCK
    # .txt is read straight from the file (textfiles.py): every byte of it
    assert last.fields["bytes_done"] == last.fields["bytes_total"] == (one_file / "train.txt").stat().st_size
