"""The training stages' tokenized data: the train/eval split and the data cache (their input
files: steps/files.py).

The parent process tokenizes once into `<data_cache_dir>/<key>/{train,eval}/` (datasets'
save_to_disk) and every rank loads that, so ranks never tokenize. The key names everything the
tokenized rows depend on (data files and tokenizer by content, lengths, split), so a rerun or
another stage config on the same data does not re-tokenize.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def split(ds, fraction: float, seed: int):
    """(train, eval or None): ceil(fraction * rows) rows held out at random, when that leaves
    at least one row on each side; else everything trains."""
    n_eval = math.ceil(fraction * len(ds))
    if fraction > 0 and 1 <= n_eval < len(ds):
        s = ds.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
        return s["train"], s["test"]
    return ds, None


def load_splits(dataset_dir: Path):
    """(train, eval or None) as save_splits wrote them."""
    from datasets import load_from_disk

    dataset_dir = Path(dataset_dir)
    train = load_from_disk(str(dataset_dir / "train"))
    return train, (load_from_disk(str(dataset_dir / "eval"))
                   if (dataset_dir / "eval").is_dir() else None)


@contextlib.contextmanager
def dataset_dir(data_cache_dir: Path | None, key: str):
    """(path, hit): `data_cache_dir/key` when caching, else a temp dir removed afterwards.
    The caller builds into path when not hit; writes are atomic (tmp dir + rename)."""
    import tempfile
    if data_cache_dir is None:
        with tempfile.TemporaryDirectory(prefix="llamaflow-data-") as tmp:
            yield Path(tmp) / key, False
        return
    final = Path(data_cache_dir) / key
    yield final, (final / "COMPLETE").is_file()


@contextlib.contextmanager
def prepared(data_cache_dir: Path | None, key: str, build: Callable[[Path], dict]):
    """(path, meta, hit) of the tokenized data `key`: the cached copy, or build(path), which
    writes it with save_splits and returns its meta."""
    with dataset_dir(Path(data_cache_dir) if data_cache_dir else None, key) as (ddir, hit):
        if hit:
            meta = json.loads((ddir / "meta.json").read_text())
            log.info("tokenized data: cache hit %s", ddir)
        else:
            meta = build(ddir)
        yield ddir, meta, hit


def save_splits(splits: dict, dest: Path, meta: dict) -> None:
    """save_to_disk each split into dest/<name>/ atomically (a killed prep leaves no half cache).

    Two runs training on the same data (say pretrain with r 8 and r 16) share this cache key and
    may prepare it at once: the first complete copy stays, since the other run may be reading it
    already, and a later copy (the same data by construction of the key) is dropped. Temp dirs
    of processes that no longer exist are removed."""
    for old in dest.parent.glob(dest.name + ".tmp-*"):
        pid = old.name.rpartition("-")[2]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, ds in splits.items():
        if ds is not None and len(ds):
            ds.save_to_disk(str(tmp / name))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    (tmp / "COMPLETE").write_text("ok")
    if (dest / "COMPLETE").is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        return
    shutil.rmtree(dest, ignore_errors=True)  # an incomplete leftover of a killed prep
    try:
        tmp.rename(dest)
    except OSError:  # another run renamed its copy in between
        if not (dest / "COMPLETE").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def split_sizes(dataset_dir: Path) -> tuple[int, int]:
    """(train rows, eval rows) of a saved dataset dir."""
    train, held_out = load_splits(dataset_dir)
    return len(train), len(held_out) if held_out is not None else 0
