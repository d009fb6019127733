"""The store under concurrent and damaged conditions: forced commits replace, hits are checked
against the manifest's sha256 (re-hashing only changed files), key locks held by real processes,
temp dirs of dead runs found, the hash cache shared by two writers."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from pipelines import artifacts, locks
from pipelines.artifacts import HashCache, Store

REPO = Path(__file__).resolve().parents[1]


HOUR_NS = 3600 * 10**9


def _commit(store: Store, key: str, files: dict, *, written_ns: int | None = None, **kw):
    """`written_ns`: the files' mtime, e.g. an hour back, so that the commit hashes them well
    after their last change (not within a clock tick of it)."""
    tmp = store.new_tmp("merge", key)
    for rel, data in files.items():
        (tmp / rel).write_bytes(data)
        if written_ns is not None:
            os.utime(tmp / rel, ns=(written_ns, written_ns))
    return store.commit(tmp, "merge", key, version="1", config={}, inputs={}, metrics={}, **kw)


def _flip_byte(path: Path, keep_mtime: bool = False) -> None:
    """Same size, one byte differs. The mtime is set, not left to the clock: a later one (a change
    the stat sees, whatever the file system's tick), or with `keep_mtime` the old one (a change
    within one tick, or one made behind the stat's back)."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    mtime = st.st_mtime_ns if keep_mtime else st.st_mtime_ns + 10**9
    os.utime(path, ns=(st.st_atime_ns, mtime))


def test_a_forced_commit_replaces_the_artifact_and_leaves_nothing_aside(tmp_path):
    store = Store(tmp_path / "artifacts")
    first = _commit(store, "k", {"model.safetensors": b"good" * 100})
    _flip_byte(first.path / "model.safetensors")
    again = _commit(store, "k", {"model.safetensors": b"good" * 100}, replace=True)
    assert (again.path / "model.safetensors").read_bytes() == b"good" * 100
    assert store.verify(again) == [] and again.digest == first.digest
    assert sorted(p.name for p in (tmp_path / "artifacts" / "merge").iterdir()) == ["k"]


def test_an_unforced_commit_onto_an_existing_artifact_keeps_the_first(tmp_path):
    """A run without the key lock (an older version) that finishes second does not overwrite."""
    store = Store(tmp_path / "artifacts")
    first = _commit(store, "k", {"a.bin": b"1"})
    second = _commit(store, "k", {"a.bin": b"2"})
    assert second.digest == first.digest and (first.path / "a.bin").read_bytes() == b"1"


@pytest.mark.parametrize("when", ["long after hashing", "in the tick it was hashed in"])
def test_a_hit_with_a_changed_byte_is_a_miss_naming_the_file(tmp_path, when):
    """Long after: the mtime moved. In the same tick (a coarse clock): the stamp is as it was,
    but the file was hashed within a tick of its change, so it is hashed again."""
    store = Store(tmp_path / "artifacts", HashCache(tmp_path / "hashcache.json"))
    old = time.time_ns() - HOUR_NS if when == "long after hashing" else None
    art = _commit(store, "k", {"model.safetensors": b"w" * 1000, "config.json": b"{}"},
                  written_ns=old)
    assert store.lookup("merge", "k") == art
    # same size: a size check misses it
    _flip_byte(art.path / "model.safetensors", keep_mtime=when != "long after hashing")
    warnings = []
    assert store.lookup("merge", "k", warn=warnings.append) is None
    assert len(warnings) == 1 and "model.safetensors (sha256 differs" in warnings[0]
    assert "config.json" not in warnings[0]
    assert not art.path.exists()
    aside = [p for p in art.path.parent.iterdir() if p.name.startswith("k.damaged-")]
    assert len(aside) == 1 and aside[0].name in warnings[0]


def test_a_hit_rehashes_only_files_whose_stat_changed(tmp_path, monkeypatch):
    """The check on every hit costs a stat per file: an untouched multi-GB file is not read."""
    store = Store(tmp_path / "artifacts", HashCache(tmp_path / "hashcache.json"))
    art = _commit(store, "k", {"big.bin": b"b" * 4096, "small.json": b"{}"},
                  written_ns=time.time_ns() - HOUR_NS)
    read = []
    real = artifacts.sha256_file
    monkeypatch.setattr(artifacts, "sha256_file", lambda p: read.append(Path(p).name) or real(p))
    assert store.lookup("merge", "k") == art and read == []
    os.utime(art.path / "small.json", ns=(1, 1))         # touched, same bytes: re-hashed, a hit
    assert store.lookup("merge", "k") == art and read == ["small.json"]
    assert store.lookup("merge", "k") == art and read == ["small.json"]  # remembered


def test_a_file_hashed_within_a_tick_of_its_change_is_hashed_again_until_it_is_old(
        tmp_path, monkeypatch):
    f = tmp_path / "corpus.txt"
    f.write_bytes(b"one")
    now = time.time_ns()
    os.utime(f, ns=(now, now))
    hc = HashCache(tmp_path / "hc.json")
    read = []
    real = artifacts.sha256_file
    monkeypatch.setattr(artifacts, "sha256_file", lambda p: read.append(Path(p).name) or real(p))
    clock = iter([now, now + 10**9, now + 3 * 10**9, now + 4 * 10**9])
    monkeypatch.setattr(artifacts, "time", types.SimpleNamespace(time_ns=lambda: next(clock)))
    digest = hc.file(f)
    assert hc.file(f) == digest and read == ["corpus.txt"] * 2     # 1 s after its mtime: again
    assert hc.file(f) == digest and read == ["corpus.txt"] * 3     # hashed 3 s after it
    assert hc.file(f) == digest and read == ["corpus.txt"] * 3     # now a stat is enough


def test_verify_finds_a_change_the_stat_cannot_see(tmp_path):
    store = Store(tmp_path / "artifacts", HashCache(tmp_path / "hashcache.json"))
    art = _commit(store, "k", {"model.safetensors": b"w" * 1000},
                  written_ns=time.time_ns() - HOUR_NS)
    _flip_byte(art.path / "model.safetensors", keep_mtime=True)
    assert store.lookup("merge", "k") == art             # the stat: as it was at commit
    assert store.verify(art) == ["model.safetensors"]


def test_artifacts_lists_finished_ones_only(tmp_path):
    store = Store(tmp_path / "artifacts", HashCache(tmp_path / "hashcache.json"))
    a = _commit(store, "k1", {"x": b"1"})
    b = _commit(store, "k2", {"x": b"2"})
    store.new_tmp("merge", "k3")
    _flip_byte(b.path / "x")
    store.lookup("merge", "k2")                          # moved aside as damaged
    assert store.artifacts() == [a] and store.artifacts("merge") == [a]
    assert store.artifacts("convert") == []


HOLDER = """
import sys, time
from pipelines import locks
with locks.hold(sys.argv[1], what="holding for a test"):
    print("held", flush=True)
    time.sleep(600)
"""


def _holder(lock: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], cwd=REPO,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_lock_held_by_another_process_waits_and_names_it_and_dies_with_it(tmp_path):
    lock = tmp_path / "artifacts" / "merge" / ".locks" / "k.lock"
    holder = _holder(lock)
    try:
        assert locks.is_held(lock)
        seen = []

        def on_wait(owner):
            seen.append(owner)
            holder.send_signal(signal.SIGKILL)           # the OS releases a dead holder's lock

        with locks.hold(lock, what="second", on_wait=on_wait):
            assert locks.is_held(lock)
        assert len(seen) == 1 and seen[0]["pid"] == holder.pid
        assert seen[0]["what"] == "holding for a test" and seen[0]["host"] == locks.host()
        assert "pid %d on" % holder.pid in locks.describe(seen[0])
        assert not locks.is_held(lock)
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_busy_only_for_a_moment_is_taken_without_reporting_a_wait(tmp_path):
    """`is_held` (the stale temp-dir check of another run) takes the lock for a moment: a run
    that meets it then must not log that it waits for another process."""
    import fcntl
    import threading

    lock = tmp_path / "k.lock"
    lock.touch()
    probe = os.open(lock, os.O_RDWR)       # an open file of its own: flock conflicts as between
    try:                                   # two processes
        fcntl.flock(probe, fcntl.LOCK_EX)
        release = threading.Timer(0.05, fcntl.flock, (probe, fcntl.LOCK_UN))
        release.start()
        seen = []
        with locks.hold(lock, on_wait=seen.append):
            assert locks.read_owner(lock)["pid"] == os.getpid()
        release.join()
        assert seen == []
    finally:
        os.close(probe)


def test_a_temp_dir_is_stale_when_no_process_holds_its_key(tmp_path):
    store = Store(tmp_path / "artifacts")
    live = store.new_tmp("sft", "a" * 64)
    dead = store.new_tmp("sft", "b" * 64)
    legacy = tmp_path / "artifacts" / "sft" / f".tmp-{'c' * 16}-0123abcd"   # older naming
    legacy.mkdir()
    holder = _holder(store.lock_path("sft", "a" * 64))
    try:
        dead_holder = _holder(store.lock_path("sft", "b" * 64))
        dead_holder.kill()
        dead_holder.wait()
        assert store.stale_tmps() == sorted([dead, legacy])
        assert store.stale_tmps("sft") == sorted([dead, legacy]) and store.stale_tmps("merge") == []
    finally:
        holder.kill()
        holder.wait()
    assert live in store.stale_tmps()


def test_owner_alive_tells_a_dead_or_reused_pid(tmp_path):
    assert locks.owner_alive(locks.me()) is True
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert locks.owner_alive({"pid": p.pid, "host": locks.host(), "started": time.time()}) is False
    mine = {**locks.me(), "started": locks.me()["started"] - 3600}  # this pid, an hour earlier
    assert locks.owner_alive(mine) is False
    assert locks.owner_alive({**locks.me(), "host": "elsewhere"}) is None


def test_two_hash_caches_saving_keep_each_others_entries(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("a")
    b.write_text("b")
    one, two = HashCache(tmp_path / "hc.json"), HashCache(tmp_path / "hc.json")
    one.file(a)
    two.file(b)          # read the file before `one` saved: must not drop `one`'s entry
    saved = json.loads((tmp_path / "hc.json").read_text())
    assert set(saved) == {str(a.resolve()), str(b.resolve())}

