"""The content-addressed store: keys, digests, atomic commits, damage detection, hash cache."""
import hashlib
import json
import os

import pytest

from pipelines.artifacts import MANIFEST, HashCache, Store, cache_key, canonical


def _write(d, files):
    for rel, data in files.items():
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def test_digest_is_sha256_of_the_file_list_and_independent_of_the_key(tmp_path):
    store = Store(tmp_path / "artifacts")
    files = {"a.bin": b"abc", "sub/b.txt": b"hello"}
    arts = []
    for key in ("k1", "k2"):
        tmp = store.new_tmp("convert", key)
        _write(tmp, files)
        arts.append(store.commit(tmp, "convert", key, version="1", config={}, inputs={}, metrics={}))
    expected_list = [
        {"path": "a.bin", "size": 3, "sha256": hashlib.sha256(b"abc").hexdigest()},
        {"path": "sub/b.txt", "size": 5, "sha256": hashlib.sha256(b"hello").hexdigest()}]
    assert arts[0].digest == arts[1].digest == hashlib.sha256(canonical(expected_list)).hexdigest()
    m = json.loads((arts[0].path / MANIFEST).read_text())
    assert m["files"] == expected_list and m["key"] == "k1" and m["stage"] == "convert"
    assert not [p for p in (tmp_path / "artifacts" / "convert").iterdir() if p.name.startswith(".tmp")]


def test_digest_exclude_counts_a_by_product_by_name_only(tmp_path):
    """A training log with timings in it must not make a retrained, identical adapter a new
    digest; the adapter's own bytes and the log's presence still count; verify checks it all."""
    store = Store(tmp_path / "artifacts")

    def commit(key, files):
        tmp = store.new_tmp("pretrain", key)
        _write(tmp, files)
        return store.commit(tmp, "pretrain", key, version="1", config={}, inputs={}, metrics={},
                            digest_exclude=("trainer_log.jsonl",))

    a = commit("k1", {"adapter.bin": b"w", "trainer_log.jsonl": b'{"tokens_per_s": 10}'})
    b = commit("k2", {"adapter.bin": b"w", "trainer_log.jsonl": b'{"tokens_per_s": 11}'})
    c = commit("k3", {"adapter.bin": b"W", "trainer_log.jsonl": b'{"tokens_per_s": 10}'})
    d = commit("k4", {"adapter.bin": b"w"})
    assert a.digest == b.digest and len({a.digest, c.digest, d.digest}) == 3
    assert json.loads((a.path / MANIFEST).read_text())["digest_exclude"] == ["trainer_log.jsonl"]
    (a.path / "trainer_log.jsonl").write_bytes(b"tampered")
    assert store.verify(a) == ["trainer_log.jsonl"]


def test_cache_key_changes_with_each_part():
    base = dict(stage="sft", version="1", config={"lr": 1e-4}, inputs={"model": "d1"})
    k = cache_key(**base)
    assert k == cache_key(**base)
    for change in ({"stage": "pretrain"}, {"version": "2"}, {"config": {"lr": 2e-4}},
                   {"inputs": {"model": "d2"}}):
        assert cache_key(**{**base, **change}) != k
    # key order in the config does not matter
    assert cache_key("s", "1", {"a": 1, "b": 2}, {}) == cache_key("s", "1", {"b": 2, "a": 1}, {})


def test_lookup_finds_only_finished_and_intact_artifacts(tmp_path):
    store = Store(tmp_path)
    assert store.lookup("merge", "k") is None
    tmp = store.new_tmp("merge", "k")
    _write(tmp, {"w.safetensors": b"x" * 100})
    assert store.lookup("merge", "k") is None          # an unfinished temp dir is never a hit
    art = store.commit(tmp, "merge", "k", version="1", config={}, inputs={}, metrics={"s": 1})
    assert store.lookup("merge", "k") == art
    assert store.verify(art) == []
    (art.path / "w.safetensors").write_bytes(b"y" * 100)  # same size, other bytes
    assert store.verify(art) == ["w.safetensors"]
    (art.path / "w.safetensors").write_bytes(b"y" * 10)   # truncated: lookup moves it aside
    assert store.lookup("merge", "k") is None
    assert not (tmp_path / "merge" / "k").exists()
    assert [p.name for p in (tmp_path / "merge").iterdir() if p.name.startswith("k.damaged")]


def test_a_stage_may_not_write_its_own_manifest(tmp_path):
    store = Store(tmp_path)
    tmp = store.new_tmp("vocab", "k")
    _write(tmp, {MANIFEST: b"{}"})
    with pytest.raises(RuntimeError, match="only pipelines"):
        store.commit(tmp, "vocab", "k", version="1", config={}, inputs={}, metrics={})


def test_hash_cache_rehashes_only_changed_files(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_bytes(b"one")
    hc = HashCache(tmp_path / "hc.json")
    assert hc.any(f) == hashlib.sha256(b"one").hexdigest()
    f.write_bytes(b"two")
    os.utime(f, ns=(1, 1))
    assert hc.any(f) == hashlib.sha256(b"two").hexdigest()
    d = tmp_path / "dir"
    _write(d, {"x.txt": b"1", "y/z.txt": b"2"})
    digest = hc.any(d)
    (d / "y" / "z.txt").write_bytes(b"3")
    assert HashCache(tmp_path / "hc.json").any(d) != digest
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hc.any(tmp_path / "missing.txt")
