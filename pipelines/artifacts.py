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

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "manifest.json"
CHUNK = 8 << 20


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
    once per change, not once per run."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._data = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def file(self, p: Path) -> str:
        p = Path(p).resolve()
        st = p.stat()
        stamp = [st.st_size, st.st_mtime_ns]
        hit = self._data.get(str(p))
        if hit and hit["stamp"] == stamp:
            return hit["sha256"]
        digest = sha256_file(p)
        self._data[str(p)] = {"stamp": stamp, "sha256": digest}
        self._save()
        return digest

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
        tmp = self.path.with_suffix(f".{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps(self._data))
        os.replace(tmp, self.path)


class Store:
    """The artifact store under `<workspace>/artifacts`."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def final_dir(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def lookup(self, stage: str, key: str) -> Artifact | None:
        """The cached artifact, if present and intact (every file there with its recorded size;
        full re-hashing is `verify`)."""
        d = self.final_dir(stage, key)
        if not (d / MANIFEST).is_file():
            return None
        m = json.loads((d / MANIFEST).read_text())
        for f in m["files"]:
            fp = d / f["path"]
            if not fp.is_file() or fp.stat().st_size != f["size"]:
                # Damaged (a file deleted or truncated by hand): move aside, recompute.
                d.rename(d.with_name(f"{key}.damaged-{int(time.time())}"))
                return None
        return Artifact(stage=stage, path=d, key=key, digest=m["digest"])

    def new_tmp(self, stage: str, key: str) -> Path:
        d = self.root / stage / f".tmp-{key[:16]}-{uuid.uuid4().hex[:8]}"
        d.mkdir(parents=True)
        return d

    def commit(self, tmp: Path, stage: str, key: str, *, version: str, config: dict,
               inputs: dict, metrics: dict, extra: dict | None = None,
               digest_exclude=()) -> Artifact:
        """Hash every file, write the manifest, and rename the temp dir into place (atomic: an
        interrupted stage leaves only a `.tmp-*` dir, never something that looks finished)."""
        files = []
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            rel = str(f.relative_to(tmp))
            if rel == MANIFEST:
                raise RuntimeError(f"stage {stage} wrote its own {MANIFEST}; only pipelines may")
            files.append({"path": rel, "size": f.stat().st_size, "sha256": sha256_file(f)})
        digest = files_digest(files, digest_exclude)
        manifest = {"stage": stage, "version": version, "key": key, "digest": digest,
                    **({"digest_exclude": sorted(digest_exclude)} if digest_exclude else {}),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "inputs": inputs,
                    "config": config, "metrics": metrics, "files": files, **(extra or {})}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False, default=str))
        final = self.final_dir(stage, key)
        try:
            os.rename(tmp, final)
        except OSError:
            if (final / MANIFEST).is_file():  # a concurrent run of the same key finished first
                shutil.rmtree(tmp, ignore_errors=True)
                return Artifact.load(final)
            raise
        return Artifact(stage=stage, path=final, key=key, digest=digest)

    def verify(self, artifact: Artifact) -> list[str]:
        """Re-hash every file; returns the paths whose content no longer matches."""
        bad = []
        for f in artifact.manifest["files"]:
            fp = artifact.path / f["path"]
            if not fp.is_file() or sha256_file(fp) != f["sha256"]:
                bad.append(f["path"])
        return bad
