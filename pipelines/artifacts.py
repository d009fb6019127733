"""Content-addressed stage outputs.

An artifact is a directory `workspace/artifacts/<stage>/<key>/` plus `manifest.json`: every file's
relative path, size and sha256; the producing stage and its version; the cache key; the digests of
the artifacts and data files it was made from. Its digest is the sha256 of the manifest's file
list, so two runs that produce the same bytes produce the same digest, whatever their keys.

key = sha256(stage, stage version, resolved stage config, input digests). Prefect's own cache
keys on path strings, not contents (a changed file behind the same path would be a stale hit),
which is why this module exists.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipelines import locks

MANIFEST = "manifest.json"
CHUNK = 8 << 20
TMP_PREFIX = ".tmp-"
LOCKS = ".locks"


def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=str).encode()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def files_digest(files: list[dict], exclude=()) -> str:
    """An artifact's digest: sha256 of its file list (path, size, sha256 of each). Files named in
    `exclude`, by-products such as a training log with timings in it, count by name only, so a
    stage that makes the same content again gets the same digest (and downstream keys hit)."""
    listed = [{"path": f["path"]} if f["path"] in exclude else f for f in files]
    return hashlib.sha256(canonical(listed)).hexdigest()


def cache_key(stage: str, version: str, config: dict, inputs: dict) -> str:
    return hashlib.sha256(canonical(
        {"stage": stage, "version": version, "config": config, "inputs": inputs})).hexdigest()


@dataclass(frozen=True)
class Artifact:
    """A finished stage output: where it is and what it is (its content digest)."""
    stage: str
    path: Path
    key: str
    digest: str

    @classmethod
    def load(cls, path: Path) -> "Artifact":
        m = json.loads((Path(path) / MANIFEST).read_text())
        return cls(stage=m["stage"], path=Path(path), key=m["key"], digest=m["digest"])

    @property
    def manifest(self) -> dict:
        return json.loads((self.path / MANIFEST).read_text())


class HashCache:
    """sha256 of user data files, remembered by (path, size, mtime) so a multi-GB corpus is hashed
    once per change, not once per run.

    A file's mtime only moves in the file system's clock ticks (milliseconds on older kernels,
    seconds on some file systems), so a write in the same tick as the hash leaves the stamp as it
    was. Each entry therefore also records when the file was hashed, and a stamp is trusted only
    for a file whose mtime is more than RACY_NS before that: a file changed within the last tick
    before it was hashed (or after) is hashed again, until its mtime is old enough to be sure."""

    RACY_NS = 2_000_000_000  # more than any file system's tick, and than its clock's lag

    def __init__(self, path: Path):
        self.path = Path(path)
        self._data = self._read()

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text()) if self.path.is_file() else {}
        except ValueError:  # a cache only: unreadable means everything is hashed again
            return {}

    @staticmethod
    def _stamp(p: Path) -> list[int]:
        st = p.stat()
        return [st.st_size, st.st_mtime_ns]

    def _trusted(self, entry: dict | None, stamp: list[int]) -> bool:
        # An entry without a hash time (an older cache) cannot tell: hashed again, once.
        return bool(entry) and entry["stamp"] == stamp and \
            stamp[1] < entry.get("hashed", 0) - self.RACY_NS

    def file(self, p: Path) -> str:
        p = Path(p).resolve()
        hashed = time.time_ns()  # before the stat: a write after it is after the hash began
        stamp = self._stamp(p)
        entry = self._data.get(str(p))
        if self._trusted(entry, stamp):
            return entry["sha256"]
        digest = sha256_file(p)
        self._data[str(p)] = {"stamp": stamp, "sha256": digest, "hashed": hashed}
        self._save()
        return digest

    def remember(self, digests: dict[Path, str], hashed: int) -> None:
        """Record digests just computed (an artifact's files at commit), one write for all;
        `hashed` is time.time_ns() from before they were read."""
        for p, digest in digests.items():
            p = Path(p).resolve()
            self._data[str(p)] = {"stamp": self._stamp(p), "sha256": digest, "hashed": hashed}
        self._save()

    def any(self, p: Path) -> str:
        """Digest of a file, or of a directory (sorted relative paths + file digests)."""
        p = Path(p).expanduser().resolve()
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist (named in the stage config)")
        if p.is_file():
            return self.file(p)
        files = sorted(f for f in p.rglob("*") if f.is_file())
        return hashlib.sha256(canonical(
            [[str(f.relative_to(p)), self.file(f)] for f in files])).hexdigest()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Another run may have saved entries since this one read the file: keep them.
        self._data = {**self._read(), **self._data}
        tmp = self.path.with_suffix(f".{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps(self._data))
        os.replace(tmp, self.path)


class Store:
    """The artifact store under `<workspace>/artifacts`.

    `hashes` (the workspace's HashCache) makes the check on every cache hit a full sha256
    comparison that costs a stat per file: a file is re-hashed only when its size or mtime
    differs from when it was last hashed (at commit, or at the last hit that re-hashed it), or
    when it was hashed within a clock tick of its last change (see HashCache), so a flipped byte,
    which changes the mtime, is found, and an untouched 13 GB model is not read.
    Without `hashes` a hit checks sizes only; `verify` always re-reads every byte."""

    def __init__(self, root: Path, hashes: HashCache | None = None):
        self.root = Path(root)
        self.hashes = hashes

    def final_dir(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def lock_path(self, stage: str, key: str) -> Path:
        return self.root / stage / LOCKS / f"{key}.lock"

    def key_lock(self, stage: str, key: str, *, what: str = "",
                 on_wait: Callable[[dict | None], None] | None = None):
        """The lock that makes one run at a time the owner of (stage, key): its lookup, temp
        dir, scratch checkpoints and commit."""
        return locks.hold(self.lock_path(stage, key), what=what, on_wait=on_wait)

    def damage(self, stage: str, key: str) -> list[str] | None:
        """None when there is no finished artifact; else the files that are missing or differ
        from the manifest (empty: intact). See the class doc for what is re-hashed."""
        d = self.final_dir(stage, key)
        if not (d / MANIFEST).is_file():
            return None
        m = json.loads((d / MANIFEST).read_text())
        bad = []
        for f in m["files"]:
            fp = d / f["path"]
            if not fp.is_file():
                bad.append(f"{f['path']} (missing)")
            elif fp.stat().st_size != f["size"]:
                bad.append(f"{f['path']} (size {fp.stat().st_size}, manifest {f['size']})")
            elif self.hashes is not None and self.hashes.file(fp) != f["sha256"]:
                bad.append(f"{f['path']} (sha256 differs from the manifest)")
        return bad

    def lookup(self, stage: str, key: str,
               warn: Callable[[str], None] | None = None) -> Artifact | None:
        """The cached artifact, if present and intact. A damaged one (a file deleted, truncated
        or changed by hand) is moved aside to `<key>.damaged-*` and is a miss, never handed on;
        `warn` is told which files and where it went."""
        bad = self.damage(stage, key)
        if bad is None:
            return None
        d = self.final_dir(stage, key)
        if bad:
            aside = d.with_name(f"{key}.damaged-{time.strftime('%Y%m%d-%H%M%S')}-"
                                f"{uuid.uuid4().hex[:6]}")
            d.rename(aside)
            if warn is not None:
                warn(f"{stage}: the cached artifact {d} is damaged: {', '.join(bad)}; moved it "
                     f"to {aside.name} and computing it again")
            return None
        return Artifact.load(d)

    def new_tmp(self, stage: str, key: str) -> Path:
        # The whole key in the name: a temp dir whose key lock is free belongs to no live run
        d = self.root / stage / f"{TMP_PREFIX}{key}-{uuid.uuid4().hex[:8]}"
        d.mkdir(parents=True)
        return d

    def stale_tmps(self, stage: str | None = None) -> list[Path]:
        """Temp dirs left by runs that ended before committing (killed, crashed): those whose
        key lock no process holds. Names of older versions carry 16 characters of the key, so
        the match is on the prefix."""
        out = []
        stages = [self.root / stage] if stage else \
            sorted(p for p in self.root.iterdir() if p.is_dir()) if self.root.is_dir() else []
        for sdir in stages:
            if not sdir.is_dir():
                continue
            for tmp in sorted(sdir.glob(f"{TMP_PREFIX}*")):
                prefix = tmp.name[len(TMP_PREFIX):].split("-", 1)[0]  # keys are hex
                if not prefix or not any(locks.is_held(lk)
                                         for lk in (sdir / LOCKS).glob(f"{prefix}*.lock")):
                    out.append(tmp)
        return out

    def commit(self, tmp: Path, stage: str, key: str, *, version: str, config: dict,
               inputs: dict, metrics: dict, extra: dict | None = None,
               digest_exclude=(), replace: bool = False) -> Artifact:
        """Hash every file, write the manifest, and rename the temp dir into place (atomic: an
        interrupted stage leaves only a `.tmp-*` dir, never something that looks finished).
        `replace` (a forced recomputation) puts the new dir in place of an existing one: the old
        one is renamed aside first and deleted after, so the key never names a mix of both."""
        files, digests = [], {}
        hashed = time.time_ns()
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            rel = str(f.relative_to(tmp))
            if rel == MANIFEST:
                raise RuntimeError(f"stage {stage} wrote its own {MANIFEST}; only pipelines may")
            digests[f] = sha256_file(f)
            files.append({"path": rel, "size": f.stat().st_size, "sha256": digests[f]})
        digest = files_digest(files, digest_exclude)
        manifest = {"stage": stage, "version": version, "key": key, "digest": digest,
                    **({"digest_exclude": sorted(digest_exclude)} if digest_exclude else {}),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "inputs": inputs,
                    "config": config, "metrics": metrics, "files": files, **(extra or {})}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False, default=str))
        final = self.final_dir(stage, key)
        old = None
        if replace and final.exists():
            old = final.with_name(f"{TMP_PREFIX}{key}-replaced-{uuid.uuid4().hex[:8]}")
            os.rename(final, old)
        try:
            os.rename(tmp, final)
        except OSError:
            if old is not None:  # put the old one back rather than leave the key empty
                os.rename(old, final)
                raise
            if (final / MANIFEST).is_file():  # a run without the key lock finished first
                shutil.rmtree(tmp, ignore_errors=True)
                return Artifact.load(final)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        if self.hashes is not None:  # the next hit then re-hashes only files changed since
            with contextlib.suppress(OSError):
                self.hashes.remember({final / f.relative_to(tmp): d for f, d in digests.items()},
                                     hashed)
        return Artifact(stage=stage, path=final, key=key, digest=digest)

    def artifacts(self, stage: str | None = None) -> list[Artifact]:
        """Every finished artifact (of one stage, or all), in path order."""
        if not self.root.is_dir():
            return []
        dirs = [self.root / stage] if stage else sorted(self.root.iterdir())
        return [Artifact.load(d) for sdir in dirs if sdir.is_dir()
                for d in sorted(sdir.iterdir())
                if not d.name.startswith(".") and ".damaged-" not in d.name
                and (d / MANIFEST).is_file()]

    def verify(self, artifact: Artifact) -> list[str]:
        """Re-hash every file; returns the paths whose content no longer matches."""
        bad = []
        for f in artifact.manifest["files"]:
            fp = artifact.path / f["path"]
            if not fp.is_file() or sha256_file(fp) != f["sha256"]:
                bad.append(f["path"])
        return bad
