"""download: fetch a LLaMA checkpoint into one flat Meta layout and prove every byte of it.

Sources (`Config.source`, discriminated by `kind`):
  local    a folder in Meta's layout (what download.sh filled), copied or hard-linked
  url      an HTTP(S) base in Meta's download layout: the presigned URL with its `*` placeholder,
           or a plain base URL the relative paths are joined onto
  hf       a Hugging Face Hub repo at a pinned revision (huggingface_hub, token from HF_TOKEN)
  llama2c  a llama2.c legacy .bin checkpoint + its tokenizer.model, imported by steps/llama2c.py
  hf_model a Hugging Face Hub repo in HF format (config.json, safetensors shards, tokenizer
           files) at a pinned revision, each file checked against the hub's sha256 / blob id
  local_hf a folder in HF format, checked (steps/hf_import.inspect) before anything is copied

Output (`dest`), whatever the source:
    consolidated.00.pth .. consolidated.NN.pth, params.json, checklist.chk,
    tokenizer.model, tokenizer_checklist.chk     (+ SHA256SUMS when the hub gives sha256s)
or, for the HF-format sources, the HF folder as it is (config.json, *.safetensors + index,
tokenizer files; + SHA256SUMS from the hub), which the convert stage imports.

Meta's download.sh trusted `md5sum -c` (and on macOS ran `md5 checklist.chk`, which verifies
nothing); the most reported failure is an expired presigned URL whose HTML/XML error page got
saved as a .pth or .chk. So here every file is checked against
checklist.chk / tokenizer_checklist.chk (md5sum -c semantics) and against the hub's sha256 where
it gives one, markup saved under a weight's name is recognised as such, and a file that fails is
moved aside as `<name>.corrupt`, fetched once more, and then reported with its expected and actual
digest. Signed URL query strings and tokens never reach logs, errors, progress bars or metrics:
everything that prints a URL prints `redact(url)`.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_serializer, model_validator
from tqdm import tqdm

from steps import MetricsCallback, Stage
from steps.meta import MetaFormatError, looks_like_markup, read_checklist

VERSION = "1"
# Files are fetched into scratch and checked there, so a retried or rerun stage fetches only
# what is missing; Config takes the top-level `source` section (a conf/source/ option).
STAGE = Stage(resumable=True, global_sections=("source",))
log = logging.getLogger(__name__)

CHECKLIST = "checklist.chk"                      # md5 of consolidated.*.pth and params.json
TOKENIZER_CHECKLIST = "tokenizer_checklist.chk"  # md5 of tokenizer.model
SHA256_MANIFEST = "SHA256SUMS"                   # sha256sum format, written for hub sha256s
CHECKSUM_FILES = (CHECKLIST, TOKENIZER_CHECKLIST, SHA256_MANIFEST)
TOKENIZER_FILES = ("tokenizer.model", TOKENIZER_CHECKLIST)  # at the download root in Meta's layout
PARAMS_KEYS = ("dim", "n_layers", "n_heads")     # present in every Meta params.json
SHARD_RE = re.compile(r"^consolidated\.(\d{2})\.pth$")
HF_DEFAULT_PATTERNS = ("consolidated.*.pth", "params.json", CHECKLIST, "tokenizer.model",
                       TOKENIZER_CHECKLIST)
# An HF-format checkpoint: config, weights (pickled .bin only where a repo has no safetensors:
# _hf_model_files), tokenizer. Top-level files only: Llama 3 repos keep Meta's in original/.
HF_MODEL_PATTERNS = ("config.json", "generation_config.json", "*.safetensors",
                     "model.safetensors.index.json", "*.bin", "pytorch_model.bin.index.json",
                     "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")

CHUNK = 1 << 20
TIMEOUT_S = 60.0       # per socket operation, not per file
BACKOFF_S = 0.5        # first retry waits this long, doubling up to BACKOFF_MAX_S
BACKOFF_MAX_S = 30.0


# ----------------------------------------------------------------------------- errors, redaction

class DownloadError(RuntimeError):
    """A transfer failed (HTTP status, connection, retries exhausted). Messages carry redacted URLs."""


class VerificationError(ValueError):
    """A file is missing, malformed, or not what its name says. The message names the file."""


class ChecksumError(VerificationError):
    """A file's digest differs from the one its checksum list (or the hub) gives."""

    def __init__(self, path: Path, algo: str, expected: str, actual: str, listed_in: str):
        self.path, self.algo, self.expected, self.actual = Path(path), algo, expected, actual
        super().__init__(f"{path}: {algo} mismatch: expected {expected} ({listed_in}), "
                         f"actual {actual}")


def redact(url: str) -> str:
    """`url` without its query string, fragment and user:password@: what logs, errors, progress
    bars, MLflow params and cache keys may show. Presigned URLs carry their signature in the query.
    """
    try:
        parts = urllib.parse.urlsplit(url)
        netloc = parts.hostname or ""
        if ":" in netloc:
            netloc = f"[{netloc}]"
        if parts.port is not None:
            netloc += f":{parts.port}"
    except ValueError:
        return "<unparseable url>"
    if not parts.scheme:
        return url.split("?", 1)[0].split("#", 1)[0]
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


# ----------------------------------------------------------------------------- config

class _Source(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _no_missing(cls, data):
        # Hydra's mandatory marker reaches us as a literal string when nobody set the value
        unset = [k for k, v in (data or {}).items() if v == "???"] if isinstance(data, dict) else []
        if unset:
            raise ValueError(", ".join(f"source.{k} is not set (pass source.{k}=...)" for k in unset))
        return data


class LocalSource(_Source):
    """A folder Meta's download.sh filled: tokenizer.model + tokenizer_checklist.chk at the top,
    <model_dir>/consolidated.NN.pth, params.json, checklist.chk below (a flat folder also works)."""
    kind: Literal["local"]
    path: str = Field(description="the download root, e.g. /data/llama (the folder holding "
                                  "tokenizer.model and 7B/)")
    model_dir: str = Field("", description=(
        "subfolder with consolidated.*.pth, params.json, checklist.chk: \"7B\", \"llama-2-7b\", "
        "...; \"\" when path is the model folder itself"),
        json_schema_extra={"conf": "${model.meta_dir}"})
    hardlink: bool = Field(False, description="link instead of copying (same filesystem only; "
                                              "falls back to a copy)")


class UrlSource(_Source):
    """Meta's download layout over HTTP(S): the presigned URL from Meta's email (with its `*`,
    which is replaced by each relative path, as download.sh does) or a plain base URL.
    Keep the signed URL out of configs: `export LLAMA_PRESIGNED_URL='https://...*?Policy=...'`.
    Logs, errors, progress bars and metrics only ever show it without its query string."""
    kind: Literal["url"]
    url_env: str | None = Field(None, description=(
        "NAME of the environment variable holding the URL (preferred: it keeps the signature out "
        "of configs)"), json_schema_extra={"conf": "LLAMA_PRESIGNED_URL"})
    url: SecretStr | None = Field(None, description=(
        "or the URL itself, wins over url_env: the presigned URL with `*`, or a base URL (e.g. a "
        "loopback demo server)"))
    n_shards: int = Field(ge=1, description="consolidated.00.pth .. consolidated.{n_shards-1}.pth",
                          json_schema_extra={"conf": "${model.n_shards}"})
    model_dir: str = Field("", description=(
        "the model's folder under the base (\"7B\", \"llama-2-7b\"); the tokenizer files sit at "
        "the base"), json_schema_extra={"conf": "${model.meta_dir}"})

    @model_validator(mode="after")
    def _some_url(self):
        if self.url is None and not self.url_env:
            raise ValueError("url source: set `url_env` (the NAME of an environment variable "
                             "holding the presigned URL, which keeps the signature out of configs) "
                             "or `url`")
        return self

    @field_serializer("url", when_used="json")
    def _redacted(self, url: SecretStr | None) -> str | None:
        # JSON dumps feed MLflow params and cache keys: the URL's identity without its signature
        return redact(url.get_secret_value()) if url is not None else None

    def resolve_url(self) -> str:
        if self.url is not None:
            return self.url.get_secret_value()
        value = os.environ.get(self.url_env or "")
        if not value:
            raise DownloadError(f"url source: environment variable {self.url_env} is not set; export "
                                "the presigned URL from Meta's email into it")
        return value


# A hub source's revision: _hub_plan resolves it once and fetches every file from that commit.
PinnedRevision = Annotated[str, Field(description="pin a 40-hex commit sha; a branch or tag "
                                                  "works, resolved and logged as unpinned")]


class HfSource(_Source):
    """A Hugging Face Hub repo holding Meta's original files (e.g. meta-llama/Llama-2-7b; repos
    that keep them in a folder, such as Llama 3's "original/", need `subfolder`). The token comes
    from the HF_TOKEN environment variable only; hub sha256s (LFS) and blob ids are verified."""
    kind: Literal["hf"]
    repo_id: str = Field(description="e.g. meta-llama/Llama-2-7b")
    revision: PinnedRevision
    subfolder: str = Field("", description="e.g. \"original\" for repos keeping Meta's files "
                                           "in a folder")
    allow_patterns: list[str] = Field(list(HF_DEFAULT_PATTERNS),
                                      description="matched against paths under subfolder")


class HfModelSource(_Source):
    """A Hugging Face Hub repo in HF format (config.json, safetensors shards + index, tokenizer
    files; e.g. meta-llama/Llama-2-7b-hf), which the convert stage imports after checking it
    (steps/hf_import.py). The token comes from the HF_TOKEN environment variable only; every file
    is checked against the hub's sha256 (LFS) or blob id before use."""
    kind: Literal["hf_model"]
    repo_id: str = Field(description="e.g. meta-llama/Llama-2-7b-hf")
    revision: PinnedRevision
    subfolder: str = Field("", description="the folder holding config.json, \"\" for the repo's "
                                           "top level")
    allow_patterns: list[str] = Field(list(HF_MODEL_PATTERNS), description=(
        "matched against the top-level files under subfolder; pickled *.bin are taken only "
        "where the repo has no *.safetensors"))


class LocalHfSource(_Source):
    """A folder in HF format: config.json, *.safetensors (+ model.safetensors.index.json) and
    the tokenizer files (tokenizer.model and/or tokenizer.json, tokenizer_config.json), as
    save_pretrained writes it. Checked before anything is copied (steps/hf_import.py), and keyed
    by the content of the files it takes."""
    kind: Literal["local_hf"]
    path: str = Field(description="the folder holding config.json, e.g. /data/Llama-2-7b-hf")
    hardlink: bool = Field(False, description="link instead of copying (same filesystem only; "
                                              "falls back to a copy)")


class Llama2cSource(_Source):
    """A llama2.c legacy .bin checkpoint and the SentencePiece tokenizer.model it was trained
    with, imported into Meta's layout by steps/llama2c.py."""
    kind: Literal["llama2c"]
    bin_path: str = Field(description="llama2.c legacy (version 0) float32 export")
    tokenizer_model: str = Field(description="the SentencePiece model it was trained with")
    norm_eps: float = Field(1e-5, description="llama2.c's default; not stored in the .bin")


Source = Annotated[Union[LocalSource, UrlSource, HfSource, Llama2cSource, HfModelSource,
                         LocalHfSource], Field(discriminator="kind")]


class Config(BaseModel):
    """download stage: fetch the source checkpoint (the top-level `source` section, a conf/source/
    option) into a flat Meta layout and verify it (md5 against checklist.chk /
    tokenizer_checklist.chk, sha256 where the hub gives one)."""
    model_config = ConfigDict(extra="forbid")
    source: Source
    workers: int = Field(4, ge=1, description="files fetched in parallel")
    retries: int = Field(3, ge=0, description="per file, on connection errors / 5xx / 429, "
                                              "backoff 0.5 s doubling; progress resets it")
    verify: bool = Field(True, description="false skips only the hashing; the layout, "
                                           "params.json and HTML-page checks stay")


# Dotted paths into Config naming user files (hashed into the cache key); a path the active source
# lacks is skipped.
DATA_FIELDS = ("source.bin_path", "source.tokenizer_model")
# A local source is keyed by what it holds (public_config), not by hashing its whole folder: a
# Meta download root holds every model size, hundreds of GB.
# How fast, not what; and where a local source lies: it is keyed by what it holds (its
# `content` digest), so the same checkpoint in two folders or workspaces gives one key.
CACHE_EXCLUDE = ("workers", "retries", "source.path", "source.hardlink")


def public_config(config: Config) -> dict:
    """The config as plain data with the URL (also one taken from `url_env`) redacted: for MLflow
    params and cache keys. (`model_dump(mode="json")` redacts `url` too, but cannot see url_env.)"""
    data = config.model_dump(mode="json")
    src = config.source
    if isinstance(src, UrlSource) and src.url is None:
        raw = os.environ.get(src.url_env or "", "")
        data["source"]["url"] = redact(raw) if raw else None
    if isinstance(src, LocalSource):
        data["source"]["content"] = _local_content_digest(src)
    if isinstance(src, LocalHfSource):
        data["source"]["content"] = _local_hf_content_digest(src)
    return data


def _local_hf_content_digest(src: "LocalHfSource") -> str:
    """What a local HF folder holds: the sha256 of every file the source takes. An HF folder has
    no checksum list to stand for its weights, so they are read (once per run that keys it)."""
    h = hashlib.sha256()
    _, paths = _local_hf_plan(src, check=False)
    for name, p in sorted(paths.items()):
        h.update(name.encode() + b"\0" + file_digests(p, ["sha256"])["sha256"].encode())
    return h.hexdigest()


def _local_content_digest(src: "LocalSource") -> str:
    """What a local source holds: the sha256 of its checklists (md5 of every shard, params.json
    and tokenizer.model), or of the model folder's files when it has none."""
    root = Path(src.path).expanduser()
    model = root / src.model_dir
    h = hashlib.sha256()
    lists = [p for p in (model / "checklist.chk", root / "tokenizer_checklist.chk",
                         model / "tokenizer_checklist.chk") if p.is_file()]
    if lists:
        files = lists
    else:
        files = sorted(p for p in model.iterdir() if p.is_file()) if model.is_dir() else []
    for p in files:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(8 << 20):
                h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- verification

def parse_checksums(path: Path) -> dict[str, tuple[str, str]]:
    """steps.meta.read_checklist, failing with VerificationError (a list that does not parse is
    fetched again, like any file that fails verification)."""
    try:
        return read_checklist(path)
    except MetaFormatError as e:
        raise VerificationError(str(e)) from None


def file_digests(path: Path, algos) -> dict[str, str]:
    """Hex digests of `path` for each algorithm in `algos`, in one pass over the file."""
    hashers = {a: (_GitBlob(path.stat().st_size) if a == "git-sha1" else hashlib.new(a))
               for a in set(algos)}
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            for h in hashers.values():
                h.update(chunk)
    return {a: h.hexdigest() for a, h in hashers.items()}


class _GitBlob:
    """sha1 of `blob <size>\\0<content>`: the git object id the hub reports for non-LFS files."""

    def __init__(self, size: int):
        self._h = hashlib.sha1(b"blob %d\0" % size)

    def update(self, chunk: bytes) -> None:
        self._h.update(chunk)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def check_sums(chk: Path, root: Path | None = None) -> list[str]:
    """`md5sum -c chk` / `sha256sum -c chk` in Python: every listed file, relative to `root`
    (default: the list's folder), must exist and match. Returns the verified names."""
    chk = Path(chk)
    root = Path(root) if root is not None else chk.parent
    entries = parse_checksums(chk)
    missing = [n for n in entries if not (root / n).is_file()]
    if missing:
        raise VerificationError(f"{root}: missing {', '.join(missing)} (listed in {chk.name})")
    for name, (algo, digest) in entries.items():
        actual = file_digests(root / name, [algo])[algo]
        if actual != digest:
            raise ChecksumError(root / name, algo, digest, actual, chk.name)
    return list(entries)


def _check_params(path: Path) -> None:
    try:
        params = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VerificationError(f"{path}: not valid JSON ({e}); Meta's params.json looks like "
                                '{"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, '
                                '"norm_eps": 1e-06, "vocab_size": -1}') from None
    if not isinstance(params, dict):
        raise VerificationError(f"{path}: a JSON {type(params).__name__}, expected an object")
    bad = [k for k in PARAMS_KEYS if not (isinstance(params.get(k), int) and params[k] > 0)]
    if bad:
        raise VerificationError(f"{path}: missing or non-positive Meta keys {bad}; "
                                f"has {sorted(params)}")


def sniff(path: Path) -> None:
    """Reject content that cannot be what the file's name says, before (and besides) hashing it:
    an error page saved under a weight's name, an empty file, a params.json without Meta's keys."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise VerificationError(f"{path}: empty file")
    with open(path, "rb") as f:
        head = f.read(512)
    if looks_like_markup(head):
        raise VerificationError(
            f"{path}: an HTML/XML page ({size} bytes) saved under this name, not the real file; "
            "the download URL has probably expired or was copied incompletely: request a new one")
    if path.suffix == ".pth" and not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise VerificationError(f"{path}: not a PyTorch checkpoint (zip or pickle); first bytes "
                                f"{head[:8]!r}")
    if path.name == "params.json":
        _check_params(path)


# name -> [(algo, expected hex, where it is listed)]
Expected = dict[str, list[tuple[str, str, str]]]


def _expected_from(dir: Path, lists=CHECKSUM_FILES) -> Expected:
    expected: Expected = {}
    for chk in lists:
        if (dir / chk).is_file():
            for name, (algo, digest) in parse_checksums(dir / chk).items():
                expected.setdefault(name, []).append((algo, digest, chk))
    return expected


def check_file(path: Path, expected: list[tuple[str, str, str]], *, digests: bool = True) -> None:
    """sniff `path`, then compare every expected digest (one pass for all algorithms)."""
    sniff(path)
    if not digests or not expected:
        return
    actual = file_digests(path, [algo for algo, _, _ in expected])
    for algo, digest, listed_in in expected:
        if actual[algo] != digest:
            raise ChecksumError(path, algo, digest, actual[algo], listed_in)


def _check_layout(dir: Path, expected: Expected) -> None:
    """The flat Meta layout is complete and every file that matters is covered by a digest."""
    if not any((dir / c).is_file() for c in (CHECKLIST, SHA256_MANIFEST)):
        raise VerificationError(f"{dir}: no {CHECKLIST} (or {SHA256_MANIFEST}); without it nothing "
                                "can be verified")
    missing = [n for n in expected if not (dir / n).is_file()]
    if missing:
        listed = {n: expected[n][0][2] for n in missing}
        raise VerificationError(f"{dir}: missing " + ", ".join(f"{n} (listed in {c})"
                                                               for n, c in listed.items()))
    shards = sorted(int(m[1]) for p in dir.iterdir() if (m := SHARD_RE.match(p.name)))
    if not shards:
        raise VerificationError(f"{dir}: no consolidated.NN.pth shard")
    gaps = sorted(set(range(max(shards) + 1)) - set(shards))
    if gaps:
        raise VerificationError(f"{dir}: missing shard(s) "
                                + ", ".join(f"consolidated.{i:02d}.pth" for i in gaps))
    for name in ("params.json", "tokenizer.model"):
        if not (dir / name).is_file():
            raise VerificationError(f"{dir}: no {name}")
    needed = [f"consolidated.{i:02d}.pth" for i in shards] + ["params.json", "tokenizer.model"]
    uncovered = [n for n in needed if n not in expected]
    if uncovered:
        raise VerificationError(f"{dir}: {', '.join(uncovered)} not listed in any of "
                                f"{', '.join(CHECKSUM_FILES)}; cannot verify")


def verify(dir: Path) -> None:
    """Check a flat Meta-layout folder: the checksum lists parse, every listed file exists and
    matches (md5sum -c semantics, plus SHA256SUMS), shards run 00..N-1 without gaps, params.json
    has Meta's keys, and no file is an HTML/XML error page. Raises VerificationError (ChecksumError
    for a digest mismatch, naming file, expected and actual digest)."""
    dir = Path(dir)
    expected = _expected_from(dir)
    _check_layout(dir, expected)
    for name, sums in expected.items():
        check_file(dir / name, sums)


# ----------------------------------------------------------------------------- transfer engine

@dataclass
class _Stats:
    fetched: int = 0          # files transferred this run
    fetched_bytes: int = 0    # bytes transferred this run
    resumed_bytes: int = 0    # bytes already on disk when a Range request resumed a file
    refetched: int = 0        # files fetched again after a failed check
    skipped: int = 0          # files already present and verified
    revision_sha: str = ""

    def __post_init__(self):
        self._lock = threading.Lock()

    def add(self, **deltas: int) -> None:
        with self._lock:
            for k, v in deltas.items():
                setattr(self, k, getattr(self, k) + v)


class _Progress:
    """One aggregate bytes bar for all files (file names only; never URLs)."""

    def __init__(self, desc: str, enabled: bool):
        self.bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                        disable=not enabled, dynamic_ncols=True)
        self._lock = threading.Lock()

    def grow(self, n: int) -> None:
        with self._lock:
            self.bar.total = (self.bar.total or 0) + n
            self.bar.refresh()

    def update(self, n: int) -> None:
        with self._lock:
            self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


class _Stopped(Exception):
    """Another file failed; abandon this one quietly."""


# fetch(name, target, fresh): write the complete file `name` to `target`; `fresh` drops partial data
Fetch = Callable[[str, Path, bool], None]


def _materialize(names: list[str], fetch: Fetch, dest: Path, *, workers: int, digests: bool,
                 extra: Expected | None = None, expect_listed: list[str] | None = None,
                 stats: _Stats, stop: threading.Event,
                 on_file: Callable[[str], None] | None = None,
                 check_layout: Callable[[Path, Expected], None] | None = None) -> None:
    """Checksum lists first (small; parsed and cross-checked before any weight moves), then the
    rest in parallel; each file is checked, and a failure is moved aside, fetched once more, and
    then reported. `extra` adds digests not in the lists (the hub's); `expect_listed` are names
    the checklists must cover (the shards the source will fetch). `stop` is set when one file
    fails, so that transfers in flight give up. `check_layout` checks the complete folder
    (default: the Meta layout)."""
    lists = [n for n in names if n in (CHECKLIST, TOKENIZER_CHECKLIST)]
    for chk in lists:
        _fetch_checksum_list(dest / chk, fetch, extra or {}, stats)
    expected = _expected_for(names, dest, lists, extra or {}, expect_listed or [])

    def one(name: str) -> None:
        if stop.is_set():
            raise _Stopped
        fetched = _fetch_checked(name, dest / name, fetch, expected.get(name, []), digests, stats)
        if fetched and on_file is not None:   # progress counts transfers, not files kept
            on_file(name)

    _in_parallel(one, [n for n in names if n not in lists], workers, stop)
    (check_layout or _check_layout)(dest, expected)


def _check_checksum_list(path: Path, extra: Expected) -> None:
    """A checksum list matches the digest the hub gives for it (if any) and parses."""
    for algo, digest, where in extra.get(path.name, []):
        actual = file_digests(path, [algo])[algo]
        if actual != digest:
            raise ChecksumError(path, algo, digest, actual, where)
    parse_checksums(path)


def _fetch_checksum_list(target: Path, fetch: Fetch, extra: Expected, stats: _Stats) -> None:
    """Keep a checksum list already at `target` if it checks out, else fetch it afresh; one that
    fails after the fetch is moved aside and reported (every weight's check depends on it)."""
    if target.is_file():
        try:
            _check_checksum_list(target, extra)
            return
        except VerificationError as e:
            log.warning("%s; fetching it again", e)
            os.replace(target, _corrupt(target))
    fetch(target.name, target, True)
    stats.add(fetched=1, fetched_bytes=target.stat().st_size)
    try:
        _check_checksum_list(target, extra)
    except VerificationError:
        os.replace(target, _corrupt(target))
        raise


def _expected_for(names: list[str], dest: Path, lists: list[str], extra: Expected,
                  expect_listed: list[str]) -> Expected:
    """The digests of the lists in dest plus `extra`, after checking that the lists name only
    files this source fetches and cover every name in `expect_listed`."""
    expected = _expected_from(dest, lists)
    for name, sums in extra.items():
        expected.setdefault(name, []).extend(sums)
    unfetched = [f"{n} (listed in {expected[n][0][2]})" for n in expected
                 if n not in names and n not in CHECKSUM_FILES]
    if unfetched:
        raise VerificationError(f"{dest}: the checksum lists name {', '.join(unfetched)}, which "
                                "this source does not fetch (is n_shards / model_dir right?)")
    unlisted = [n for n in expect_listed if n not in expected]
    if unlisted:
        raise VerificationError(f"{dest}: {', '.join(unlisted)} not listed in {', '.join(lists)}, "
                                "so cannot be verified (url source: is n_shards right?)")
    return expected


def _fetch_checked(name: str, target: Path, fetch: Fetch, sums: list[tuple[str, str, str]],
                   digests: bool, stats: _Stats) -> bool:
    """Keep a file already at `target` if it checks out (False), else fetch it, resuming
    partial data (True); one that fails its check is moved aside and fetched afresh once, and a
    second failure is final."""
    if target.is_file():
        try:
            check_file(target, sums, digests=digests)
            stats.add(skipped=1)
            return False
        except VerificationError as e:
            log.warning("%s; fetching it again", e)
            os.replace(target, _corrupt(target))
    fetch(name, target, False)
    stats.add(fetched=1, fetched_bytes=target.stat().st_size)
    try:
        check_file(target, sums, digests=digests)
    except VerificationError as e:
        corrupt = _corrupt(target)
        os.replace(target, corrupt)
        log.warning("%s; moved to %s, fetching once more", e, corrupt.name)
        fetch(name, target, True)
        stats.add(fetched=1, fetched_bytes=target.stat().st_size, refetched=1)
        check_file(target, sums, digests=digests)
    return True


def _in_parallel(fn: Callable[[str], None], names: list[str], workers: int,
                 stop: threading.Event) -> None:
    """fn(name) for every name on `workers` threads; at the first error `stop` is set and the
    files not started are cancelled, and the first real error (not a _Stopped) is raised."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="download") as pool:
        futures = [pool.submit(fn, n) for n in names]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        errors = [f.exception() for f in done if f.exception() is not None]
        if errors:
            stop.set()
            for f in futures:
                f.cancel()
    if errors:
        raise next((e for e in errors if not isinstance(e, _Stopped)), errors[0])


def _corrupt(path: Path) -> Path:
    return path.with_name(path.name + ".corrupt")


# ----------------------------------------------------------------------------- url source

def _join(base: str, rel: str) -> str:
    """Meta's presigned URL: replace the (first) `*` by the relative path, as download.sh does;
    otherwise join the path onto the base URL's path, keeping its query string."""
    if "*" in base:
        return base.replace("*", rel, 1)
    p = urllib.parse.urlsplit(base)
    path = p.path.rstrip("/") + "/" + urllib.parse.quote(rel)
    return urllib.parse.urlunsplit((p.scheme, p.netloc, path, p.query, p.fragment))


_HTTP_HINTS = {
    401: "the server wants credentials",
    403: "the presigned URL has probably expired (Meta's links last 24 h) or was copied "
         "incompletely: request a new one",
    404: "not on the server: check model_dir and n_shards",
}


def _http_fetch(url: str, label: str, target: Path, fresh: bool, *, retries: int,
                progress: _Progress, stats: _Stats, stop: threading.Event | None = None) -> None:
    """GET `url` into `target` through `target.part`, resuming a partial file with an HTTP Range
    request; transient errors are retried with exponential backoff (a retry that made progress
    does not count against `retries`)."""
    part = target.with_name(target.name + ".part")
    if fresh:
        part.unlink(missing_ok=True)
    safe_url = redact(url)
    failures, sized = 0, False
    if part.is_file():  # left by an earlier attempt: those bytes count as done
        progress.update(part.stat().st_size)
    while True:
        have = part.stat().st_size if part.is_file() else 0
        headers = {"Range": f"bytes={have}-", "Accept-Encoding": "identity"} if have else \
            {"Accept-Encoding": "identity"}
        got, reason = 0, ""
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                        timeout=TIMEOUT_S) as resp:
                if have and resp.status == 206:
                    start, total = _content_range(resp.headers.get("Content-Range"))
                    if start != have:
                        raise DownloadError(f"{label}: server resumed at byte {start}, asked for "
                                            f"{have} ({safe_url})")
                    mode = "ab"
                    stats.add(resumed_bytes=have)
                else:  # 200: the whole file (a server may ignore Range)
                    if have:
                        progress.update(-have)
                    have, mode = 0, "wb"
                    length = resp.headers.get("Content-Length")
                    total = int(length) if length is not None else None
                if not sized and total is not None:
                    progress.grow(total)
                    sized = True
                with open(part, mode) as f:
                    while chunk := resp.read(CHUNK):
                        if stop is not None and stop.is_set():
                            raise _Stopped
                        f.write(chunk)
                        got += len(chunk)
                        progress.update(len(chunk))
            if total is not None and have + got != total:
                raise _Incomplete(f"connection closed at byte {have + got} of {total}")
            os.replace(part, target)
            return
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # the .part is not a prefix of this file: start over
                part.unlink(missing_ok=True)
                reason = "HTTP 416 for a stale partial file"
            elif e.code in (408, 429) or e.code >= 500:
                reason = f"HTTP {e.code} {e.reason}"
            else:
                hint = _HTTP_HINTS.get(e.code, "")
                raise DownloadError(f"{label}: HTTP {e.code} {e.reason} from {safe_url}"
                                    + (f"; {hint}" if hint else "")) from None
        except (_Incomplete, urllib.error.URLError, http.client.HTTPException, OSError) as e:
            # urllib/http.client messages carry no URL, but keep only the class and reason anyway
            reason = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        failures = 1 if got else failures + 1
        if failures > retries:
            raise DownloadError(f"{label}: failed after {retries} retries ({reason}) from "
                                f"{safe_url}") from None
        wait_s = min(BACKOFF_S * 2 ** (failures - 1), BACKOFF_MAX_S)
        log.info("%s: %s; retrying in %.1f s (resuming at byte %d)", label, reason, wait_s,
                 part.stat().st_size if part.is_file() else 0)
        time.sleep(wait_s)


class _Incomplete(Exception):
    pass


def _content_range(value: str | None) -> tuple[int, int | None]:
    m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", value or "")
    if not m:
        raise _Incomplete(f"206 without a valid Content-Range ({value!r})")
    return int(m[1]), (None if m[2] == "*" else int(m[2]))


def _url_plan(src: UrlSource) -> tuple[list[str], dict[str, str]]:
    shards = [f"consolidated.{i:02d}.pth" for i in range(src.n_shards)]
    model_files = [*shards, "params.json", CHECKLIST]
    sub = src.model_dir.strip("/")
    rel = {n: (f"{sub}/{n}" if sub else n) for n in model_files}
    rel.update({n: n for n in TOKENIZER_FILES})
    return [CHECKLIST, TOKENIZER_CHECKLIST, *shards, "params.json", "tokenizer.model"], rel


# ----------------------------------------------------------------------------- local source

def _local_plan(src: LocalSource) -> tuple[list[str], dict[str, Path], list[str]]:
    root = Path(src.path).expanduser().resolve()
    model = root / src.model_dir if src.model_dir else root
    if not model.is_dir():
        raise VerificationError(f"local source: {model} is not a folder (source.path={src.path!r}, "
                                f"model_dir={src.model_dir!r})")
    if not (model / CHECKLIST).is_file():
        raise VerificationError(f"local source: no {CHECKLIST} in {model}; a Meta download has one "
                                "next to params.json (without it nothing can be verified)")
    paths: dict[str, Path] = {}
    for name in TOKENIZER_FILES:  # Meta keeps them at the root; a flat copy keeps them beside
        paths[name] = root / name if (root / name).is_file() else model / name
    listed = parse_checksums(model / CHECKLIST)
    shards = {p.name for p in model.glob("consolidated.*.pth")}
    for name in sorted(set(listed) | shards | {"params.json", CHECKLIST}):
        paths[name] = model / name
    names = sorted(paths, key=lambda n: (n not in (CHECKLIST, TOKENIZER_CHECKLIST), n))
    if not paths[TOKENIZER_CHECKLIST].is_file():
        names.remove(TOKENIZER_CHECKLIST)  # then tokenizer.model is only covered if a list names it
    return names, paths, sorted(shards)


def _naming_the_source(e: VerificationError, dest: Path,
                       paths: dict[str, Path]) -> VerificationError:
    """A local source is checked on its copy in `dest` (a scratch dir the user never named): the
    message, and a ChecksumError's `path`, name the user's own files and folder instead."""
    text = str(e)
    for name, src in paths.items():
        text = text.replace(str(dest / name), str(src))
        if isinstance(e, ChecksumError) and e.path == dest / name:
            e.path = src
    if CHECKLIST in paths:
        text = text.replace(str(dest), str(paths[CHECKLIST].parent))
    e.args = (text,)
    return e


def _local_fetch(paths: dict[str, Path], hardlink: bool, progress: _Progress) -> Fetch:
    def fetch(name: str, target: Path, fresh: bool) -> None:
        src = paths[name]
        if not src.is_file():
            raise VerificationError(f"local source: missing {src} (named by the checksum list "
                                    "or the Meta layout)")
        part = target.with_name(target.name + ".part")
        part.unlink(missing_ok=True)
        size = src.stat().st_size
        progress.grow(size)
        linked = False
        if hardlink:
            try:
                os.link(src, part)
                linked = True
            except OSError:  # another filesystem, or links not allowed: copy
                pass
        if not linked:
            shutil.copyfile(src, part)
        os.replace(part, target)
        progress.update(size)
    return fetch


# ----------------------------------------------------------------------------- hub source

class _HubForward:
    """tqdm stand-in handed to huggingface_hub: its per-file bars feed our aggregate bar."""
    progress: _Progress

    def __init__(self, *args, total=None, initial=0, **kwargs):
        if total:
            self.progress.grow(total)
        if initial:
            self.progress.update(initial)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        self.progress.update(n or 0)

    def close(self):
        pass

    def set_postfix_str(self, *args, **kwargs):
        pass


def _scrub(text: str, *secrets: str | None) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return re.sub(r"(https?://[^\s'\"?]+)\?[^\s'\"]*", r"\1", text)  # any query string


def _hub_plan(src: "HfSource | HfModelSource", dest: Path, retries: int, progress: _Progress,
              stats: _Stats):
    """Resolve the revision and list files with their hub digests (one API call), then a fetch
    that downloads through hf_hub_download into a staging folder inside `dest`."""
    from huggingface_hub import HfApi, constants, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    # read at call time: huggingface_hub reads HF_ENDPOINT once at import
    endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    token = os.environ.get("HF_TOKEN") or None
    where = f"hf {src.repo_id}@{src.revision} ({redact(endpoint)})"
    if constants.is_offline_mode():
        raise DownloadError(f"{where}: HF_HUB_OFFLINE is set; the hub source needs the network "
                            "(unset HF_HUB_OFFLINE, or download elsewhere and use source=local)")
    try:
        info = HfApi(endpoint=endpoint, token=token or False).model_info(
            src.repo_id, revision=src.revision, files_metadata=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the secret-free message only
        raise DownloadError(f"{where}: {type(e).__name__}: {_scrub(str(e), token)}") from None
    sha = info.sha or ""
    if not re.fullmatch(r"[0-9a-f]{40}", src.revision):
        log.warning("%s: revision %r is not a commit sha; resolved to %s (pin it for "
                    "reproducible downloads)", src.repo_id, src.revision, sha)
    stats.revision_sha = sha
    prefix = src.subfolder.strip("/") + "/" if src.subfolder.strip("/") else ""
    under = {s.rfilename[len(prefix):]: s for s in info.siblings or []
             if s.rfilename.startswith(prefix)}
    chosen = _hub_choose(src, list(under), where, prefix)
    extra: Expected = {}
    sha256_lines = []
    for name in chosen:
        s = under[name]
        if s.lfs is not None:
            extra[name] = [("sha256", s.lfs.sha256.lower(), f"hub LFS sha256 @ {sha[:12]}")]
            sha256_lines.append(f"{s.lfs.sha256.lower()}  {name}\n")
        elif s.blob_id:
            extra[name] = [("git-sha1", s.blob_id.lower(), f"hub blob id @ {sha[:12]}")]
    if sha256_lines:
        (dest / SHA256_MANIFEST).write_text("".join(sha256_lines))
    staging = dest / ".hf-staging"
    forward = type("_Forward", (_HubForward,), {"progress": progress})

    def fetch(name: str, target: Path, fresh: bool) -> None:
        failures = 0
        while True:
            try:
                path = hf_hub_download(src.repo_id, prefix + name, revision=sha, local_dir=staging,
                                       endpoint=endpoint, token=token or False,
                                       force_download=fresh, tqdm_class=forward)
                os.replace(path, target)
                return
            except Exception as e:  # noqa: BLE001
                status = getattr(getattr(e, "response", None), "status_code", None)
                final = isinstance(e, HfHubHTTPError) and status is not None and status < 500 \
                    and status not in (408, 429)
                failures += 1
                reason = f"{type(e).__name__}: {_scrub(str(e), token)}"
                if final or failures > retries:
                    raise DownloadError(f"{where}: {name}: {reason}") from None
                log.info("%s: %s; retrying", name, reason)
                time.sleep(min(BACKOFF_S * 2 ** (failures - 1), BACKOFF_MAX_S))

    names = sorted(chosen, key=lambda n: (n not in (CHECKLIST, TOKENIZER_CHECKLIST), n))
    return names, fetch, extra, staging


def _hub_choose(src: "HfSource | HfModelSource", names: list[str], where: str,
                prefix: str) -> list[str]:
    """The repo files (relative to subfolder) the source takes. Meta files must sit at the top
    level; an HF-format repo's subfolders (Llama 3's original/) are not part of its checkpoint,
    and its pickled weights are taken only where it has no safetensors."""
    from huggingface_hub.utils import filter_repo_objects

    if isinstance(src, HfModelSource):
        names = [n for n in names if "/" not in n]
    chosen = list(filter_repo_objects(names, allow_patterns=src.allow_patterns))
    if not chosen:
        raise DownloadError(f"{where}: no file under {prefix or '/'} matches {src.allow_patterns}; "
                            f"the repo has {sorted(names)[:20]}")
    if isinstance(src, HfModelSource):
        if any(n.endswith(".safetensors") for n in chosen):
            chosen = [n for n in chosen if not n.endswith(".bin") and n != "pytorch_model.bin.index.json"]
        if "config.json" not in chosen:
            raise DownloadError(f"{where}: no config.json under {prefix or '/'}: not an HF-format "
                                "checkpoint (Meta's files: source=hf)")
        return chosen
    nested = [n for n in chosen if "/" in n]
    if nested:
        raise DownloadError(f"{where}: {nested} are in subfolders; set source.subfolder so the "
                            "Meta files sit at its top level")
    return chosen


# ----------------------------------------------------------------------------- local HF source

def _local_hf_plan(src: LocalHfSource, check: bool = True) -> tuple[list[str], dict[str, Path]]:
    """The files of an HF folder the source takes (config, the weights inspect chose, tokenizer,
    generation config), after checking the folder (before anything is copied)."""
    from steps.hf_import import INDEX, BIN_INDEX, TOKENIZER_FILES, inspect, weight_files

    root = Path(src.path).expanduser().resolve()
    if not (root / "config.json").is_file():
        raise VerificationError(f"local_hf source: no config.json in {root} (source.path="
                                f"{src.path!r}): an HF-format folder as save_pretrained writes it")
    if check:
        inspect(root, allow_pickle=None)  # pickles are listed here; convert decides on loading
    files, _, pickled = weight_files(root, allow_pickle=None)
    names = ["config.json", *(p.name for p in files), BIN_INDEX if pickled else INDEX,
             "generation_config.json", *TOKENIZER_FILES]
    names = [n for n in dict.fromkeys(names) if (root / n).is_file()]
    return names, {n: root / n for n in names}


def _check_hf_layout(dir: Path, expected: Expected) -> None:
    """The HF folder is complete (steps/hf_import.inspect) and every hub digest was checked."""
    from steps.hf_import import inspect

    missing = [n for n in expected if not (dir / n).is_file()]
    if missing:
        raise VerificationError(f"{dir}: missing {', '.join(missing)} (listed by the hub)")
    inspect(dir, allow_pickle=None)


# ----------------------------------------------------------------------------- llama2c source

def _import_llama2c(src: Llama2cSource, dest: Path, digests: bool) -> None:
    bin_path = Path(src.bin_path).expanduser().resolve()
    tok = Path(src.tokenizer_model).expanduser().resolve()
    for p, field in ((bin_path, "bin_path"), (tok, "tokenizer_model")):
        if not p.is_file():
            raise VerificationError(f"llama2c source: {field} {p} does not exist")
    try:
        from steps.llama2c import import_llama2c  # lazily: only this source needs it
    except ModuleNotFoundError as e:
        if e.name != "steps.llama2c":
            raise
        raise DownloadError("llama2c source: steps/llama2c.py (import_llama2c) is not in this "
                            "checkout") from None

    tok_md5 = file_digests(tok, ["md5"])["md5"]  # of the source file, so the copy is checked
    import_llama2c(bin_path, tok, dest, norm_eps=src.norm_eps)
    if not (dest / TOKENIZER_CHECKLIST).is_file():
        (dest / TOKENIZER_CHECKLIST).write_text(f"{tok_md5}  tokenizer.model\n")
    if digests:
        verify(dest)
    else:
        _check_layout(dest, _expected_from(dest))


# ----------------------------------------------------------------------------- entry points

def _as_source(source) -> "Source":
    """A Source model from a model, its dict, or a plain local folder (str or Path). A URL string
    is refused with the dict to pass: its shard count cannot be guessed from the URL."""
    if isinstance(source, (LocalSource, UrlSource, HfSource, Llama2cSource, HfModelSource,
                           LocalHfSource)):
        return source
    if isinstance(source, dict):
        return Config(source=source).source
    if isinstance(source, (str, os.PathLike)):
        text = str(source)
        if re.match(r"^[a-z][a-z0-9+.-]*://", text):
            raise TypeError(
                f"download() got the URL string {redact(text)!r}; pass a source dict such as "
                "{'kind': 'url', 'url_env': 'LLAMA_PRESIGNED_URL', 'n_shards': 1, "
                "'model_dir': '7B'} (url_env names the variable holding the presigned URL)")
        return LocalSource(kind="local", path=text)
    raise TypeError(f"download() takes a source dict (e.g. {{'kind': 'local', 'path': "
                    f"'/data/llama'}}), a local folder path or a Source model, not "
                    f"{type(source).__name__}")


def _download(source, dest: Path, *, workers: int, retries: int, progress: bool, verify: bool,
              on_metrics: MetricsCallback | None = None) -> tuple[Path, dict]:
    source = _as_source(source)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    stats, t0 = _Stats(), time.perf_counter()
    bar = _Progress(f"download ({source.kind})", progress)
    stop = threading.Event()  # set when one file fails: transfers in flight give up
    done, done_lock = 0, threading.Lock()

    def on_file(name: str) -> None:
        nonlocal done
        with done_lock:
            done += 1
            if on_metrics is not None:
                on_metrics({"files_done": done, "bytes_fetched": stats.fetched_bytes}, done)

    try:
        if isinstance(source, UrlSource):
            base = source.resolve_url()
            names, rel = _url_plan(source)

            def fetch(name, target, fresh):
                _http_fetch(_join(base, rel[name]), name, target, fresh, retries=retries,
                            progress=bar, stats=stats, stop=stop)
            shards = [n for n in names if SHARD_RE.match(n)]
            _materialize(names, fetch, dest, workers=workers, digests=verify, stats=stats,
                         stop=stop, expect_listed=[*shards, "params.json"], on_file=on_file)
        elif isinstance(source, LocalSource):
            names, paths, shards = _local_plan(source)
            try:
                _materialize(names, _local_fetch(paths, source.hardlink, bar), dest,
                             workers=workers, digests=verify, stats=stats, stop=stop,
                             expect_listed=[*shards, "params.json"], on_file=on_file)
            except VerificationError as e:
                raise _naming_the_source(e, dest, paths) from None
        elif isinstance(source, (HfSource, HfModelSource)):
            names, fetch, extra, staging = _hub_plan(source, dest, retries, bar, stats)
            layout = _check_hf_layout if isinstance(source, HfModelSource) else None
            _materialize(names, fetch, dest, workers=workers, digests=verify, extra=extra,
                         stats=stats, stop=stop, on_file=on_file, check_layout=layout)
            shutil.rmtree(staging, ignore_errors=True)  # only after success: it holds resumable parts
        elif isinstance(source, LocalHfSource):
            names, paths = _local_hf_plan(source)
            _materialize(names, _local_fetch(paths, source.hardlink, bar), dest, workers=workers,
                         digests=verify, stats=stats, stop=stop, on_file=on_file,
                         check_layout=_check_hf_layout)
        else:
            _import_llama2c(source, dest, verify)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    files = [p for p in dest.iterdir() if p.is_file() and not p.name.endswith((".corrupt", ".part"))]
    metrics = {
        "source_kind": source.kind,
        "files": len(files),
        "bytes": sum(p.stat().st_size for p in files),
        "seconds": round(seconds, 3),
        "MBps": round(stats.fetched_bytes / seconds / 1e6, 3) if seconds > 0 else 0.0,
        "fetched": stats.fetched,
        "fetched_bytes": stats.fetched_bytes,
        "resumed_bytes": stats.resumed_bytes,
        "refetched": stats.refetched,
        "skipped": stats.skipped,
        "n_shards": sum(1 for p in files if SHARD_RE.match(p.name)),
    }
    if stats.revision_sha:
        metrics["revision_sha"] = stats.revision_sha
    log.info("download: %d files, %.1f MB in %.1f s (%d fetched, %d resumed bytes, %d refetched)",
             metrics["files"], metrics["bytes"] / 1e6, seconds, stats.fetched,
             stats.resumed_bytes, stats.refetched)
    return dest, metrics


def download(source: "Source | dict | str | os.PathLike", dest: Path, *, workers: int = 4, retries: int = 3,
             progress: bool = True, verify: bool = True) -> Path:
    """Fetch `source` into `dest` as a flat, verified Meta layout and return `dest`. Files already
    in `dest` that verify are not fetched again; `<name>.part` files are resumed."""
    return _download(source, dest, workers=workers, retries=retries, progress=progress,
                     verify=verify)[0]


def run(config: Config, out_dir: Path, *, on_metrics: MetricsCallback | None = None,
        resume_dir: Path | None = None) -> dict:
    """Download and verify into `resume_dir` (kept across attempts, so a retried or rerun stage
    resumes its .part files instead of starting over), then move the verified files into
    `out_dir`; without resume_dir, straight into out_dir."""
    out_dir = Path(out_dir)
    work = Path(resume_dir) if resume_dir is not None else out_dir
    work.mkdir(parents=True, exist_ok=True)
    _, metrics = _download(config.source, work, workers=config.workers, retries=config.retries,
                           progress=True, verify=config.verify, on_metrics=on_metrics)
    for leftover in work.glob("*.corrupt"):  # the artifact holds only verified files
        leftover.unlink()
    if work != out_dir:
        for f in sorted(p for p in work.rglob("*") if p.is_file()):
            dest = out_dir / f.relative_to(work)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(f, dest)
    return metrics
