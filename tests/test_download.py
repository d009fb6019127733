"""download stage: real HTTP transfers on 127.0.0.1 (resume, retries, corruption, HTML pages,
missing shards, presigned-URL secrecy), a loopback Hugging Face Hub stub, local copies, and Meta's
real checksum list against the real tokenizer."""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import traceback
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from steps import download as dl
from tests.http_fixtures import Faults, FileServer, HubStub

REPO = Path(__file__).resolve().parents[1]
SIG = "Policy=eyJTdGF0ZW1lbnQiOlt7&Signature=SECRETSIG0123abcd&Key-Pair-Id=K2JKFHW5AB"
PTH_FILES = ("consolidated.00.pth", "consolidated.01.pth")


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@pytest.fixture(scope="module")
def meta_root(tmp_path_factory, tiny_sp_model) -> Path:
    """Meta's download layout: tokenizer files at the root, 7B/{2 shards, params.json,
    checklist.chk} below. Shards are real torch.save zips (~256 KiB each)."""
    root = tmp_path_factory.mktemp("meta_src")
    model = root / "7B"
    model.mkdir()
    g = torch.Generator().manual_seed(0)
    for i, name in enumerate(PTH_FILES):
        torch.save({"layers.0.attention.wq.weight": torch.randn(128, 512, generator=g),
                    "shard": torch.tensor([i])}, model / name)
    (model / "params.json").write_text(json.dumps(
        {"dim": 512, "multiple_of": 256, "n_heads": 8, "n_layers": 1, "norm_eps": 1e-06,
         "vocab_size": -1}))
    (model / "checklist.chk").write_text("".join(
        f"{md5((model / n).read_bytes())}  {n}\n" for n in (*PTH_FILES, "params.json")))
    shutil.copyfile(tiny_sp_model, root / "tokenizer.model")
    (root / "tokenizer_checklist.chk").write_text(
        f"{md5((root / 'tokenizer.model').read_bytes())}  tokenizer.model\n")
    return root


def url_source(base: str, n_shards: int = 2, **kw) -> dict:
    return {"kind": "url", "url": base, "n_shards": n_shards, "model_dir": "7B", **kw}


def assert_same_files(meta_root: Path, dest: Path) -> None:
    for name in (*PTH_FILES, "params.json", "checklist.chk"):
        assert (dest / name).read_bytes() == (meta_root / "7B" / name).read_bytes(), name
    for name in ("tokenizer.model", "tokenizer_checklist.chk"):
        assert (dest / name).read_bytes() == (meta_root / name).read_bytes(), name


def chain_text(e: BaseException) -> str:
    """The messages of an exception and of everything chained to it, suppressed context included."""
    seen, out = set(), []
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        out.append("".join(traceback.format_exception_only(e)))
        e = e.__cause__ or e.__context__
    return "".join(out)


def test_redact():
    assert dl.redact("https://user:pw@dl.example.net:8443/7B/x.pth?Signature=abc&K=1#frag") == \
        "https://dl.example.net:8443/7B/x.pth"
    assert dl.redact("https://d.llamameta.net/*?Policy=p&Signature=s") == "https://d.llamameta.net/*"
    assert dl.redact("/data/llama/7B") == "/data/llama/7B"


# ----------------------------------------------------------------------------- HTTP source

def test_presigned_url_downloads_and_never_leaks_the_signature(meta_root, tmp_path, caplog, capfd,
                                                              monkeypatch):
    caplog.set_level(logging.DEBUG)
    with FileServer(meta_root, Faults(require_query=SIG, status={"/7B/params.json": [503]})) as srv:
        monkeypatch.setenv("LLAMA_TEST_URL", f"{srv.url}/*?{SIG}")
        cfg = dl.Config(source={"kind": "url", "url_env": "LLAMA_TEST_URL", "n_shards": 2,
                                "model_dir": "7B"})
        steps = []
        metrics = dl.run(cfg, tmp_path / "out", on_metrics=lambda m, step: steps.append((step, m)))
        # every request carried the signature (the server refuses any without it) ...
        assert srv.requests and all(r.query == SIG for r in srv.requests)
        assert [r.status for r in srv.gets("/7B/params.json")] == [503, 200]  # one retry
        # ... and a failure with the same URL names the file but not the signature
        srv.faults.missing.add("/7B/consolidated.01.pth")
        with pytest.raises(dl.DownloadError) as exc:
            dl.download(cfg.source, tmp_path / "again", progress=True)
    assert_same_files(meta_root, tmp_path / "out")
    dl.verify(tmp_path / "out")
    assert metrics["files"] == 6 and metrics["fetched"] == 6 and metrics["n_shards"] == 2
    assert metrics["bytes"] == sum(p.stat().st_size for p in (tmp_path / "out").iterdir())
    assert all(isinstance(v, (int, float, str)) for v in metrics.values())
    assert [s for s, _ in steps] == [1, 2, 3, 4]  # once per file after the checklists
    msg = chain_text(exc.value)
    assert "consolidated.01.pth" in msg and "404" in msg and srv.url in msg
    public = json.dumps(dl.public_config(cfg))
    assert f"{srv.url}/*" in public
    for text in (caplog.text, capfd.readouterr().err, json.dumps(metrics), msg, public, repr(cfg),
                 json.dumps(cfg.model_dump(mode="json"))):
        assert "SECRETSIG" not in text and "Signature" not in text


def test_resume_after_dropped_connection(meta_root, tmp_path):
    path = "/7B/consolidated.01.pth"
    size = (meta_root / path.lstrip("/")).stat().st_size
    half = size // 2
    with FileServer(meta_root, Faults(drop_after={path: half})) as srv:
        metrics = dl.run(dl.Config(source=url_source(srv.url), workers=2), tmp_path / "out")
    first, second = srv.gets(path)
    assert (first.status, first.sent, first.range) == (200, half, None)
    assert second.range == f"bytes={half}-" and second.status == 206
    assert second.sent == size - half < size  # only the missing tail went over the wire again
    assert metrics["resumed_bytes"] == half
    assert_same_files(meta_root, tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.part"))


def test_partial_file_is_resumed_and_verified_files_are_not_fetched_again(meta_root, tmp_path):
    dest = tmp_path / "out"
    with FileServer(meta_root) as srv:
        dl.download(url_source(srv.url), dest, progress=False)
        n_before = len(srv.requests)
        # a later run: verified files are skipped, a leftover .part is continued with Range
        data = (dest / "consolidated.00.pth").read_bytes()
        (dest / "consolidated.00.pth").unlink()
        (dest / "consolidated.00.pth.part").write_bytes(data[:1000])
        _, metrics = dl._download(url_source(srv.url), dest, workers=2, retries=1, progress=False,
                                  verify=True)
        later = srv.requests[n_before:]
    assert [(r.path, r.range) for r in later if r.path.endswith(".pth")] == \
        [("/7B/consolidated.00.pth", "bytes=1000-")]
    assert later[-1].sent == len(data) - 1000
    assert metrics["skipped"] == 3 and metrics["fetched"] == 1 and metrics["resumed_bytes"] == 1000
    assert (dest / "consolidated.00.pth").read_bytes() == data


def test_stale_partial_files_are_restarted(meta_root, tmp_path):
    """A .part longer than the file (416) or a server ignoring Range (200) restarts the file."""
    dest = tmp_path / "out"
    dest.mkdir()
    shard0 = (meta_root / "7B" / "consolidated.00.pth").read_bytes()
    (dest / "consolidated.00.pth.part").write_bytes(b"x" * (len(shard0) + 10))
    (dest / "consolidated.01.pth.part").write_bytes(b"garbage")
    with FileServer(meta_root, Faults(ignore_range={"/7B/consolidated.01.pth"})) as srv:
        dl.download(url_source(srv.url), dest, progress=False)
    assert [r.status for r in srv.gets("/7B/consolidated.00.pth")] == [416, 200]
    assert [(r.status, r.range) for r in srv.gets("/7B/consolidated.01.pth")] == [(200, "bytes=7-")]
    assert_same_files(meta_root, dest)


def test_retries_exhausted_is_an_error(meta_root, tmp_path):
    with FileServer(meta_root, Faults(status={"/7B/params.json": [500, 500, 500]})) as srv:
        with pytest.raises(dl.DownloadError, match=r"params.json: failed after 1 retries \(HTTP 500"):
            dl.download(url_source(srv.url), tmp_path / "out", retries=1, progress=False)
    assert len(srv.gets("/7B/params.json")) == 2


def test_corrupted_byte_is_detected_moved_aside_and_refetched_once(meta_root, tmp_path):
    path = "/7B/consolidated.00.pth"
    good = (meta_root / path.lstrip("/")).read_bytes()
    with FileServer(meta_root, Faults(corrupt={path: 1})) as srv:
        dest = dl.download(url_source(srv.url), tmp_path / "out", progress=False)
        assert len(srv.gets(path)) == 2
    corrupt = (dest / "consolidated.00.pth.corrupt").read_bytes()
    assert len(corrupt) == len(good) and sum(a != b for a, b in zip(corrupt, good)) == 1
    assert_same_files(meta_root, dest)

    # run() leaves only verified files in the artifact
    with FileServer(meta_root, Faults(corrupt={path: 1})) as srv:
        metrics = dl.run(dl.Config(source=url_source(srv.url)), tmp_path / "run")
    assert metrics["refetched"] == 1 and not list((tmp_path / "run").glob("*.corrupt"))


def test_persistent_corruption_fails_naming_file_and_digests(meta_root, tmp_path):
    path = "/7B/consolidated.01.pth"
    good = (meta_root / path.lstrip("/")).read_bytes()
    i = len(good) // 3
    bad = good[:i] + bytes([good[i] ^ 0xFF]) + good[i + 1:]
    with FileServer(meta_root, Faults(corrupt={path: 99})) as srv:
        with pytest.raises(dl.ChecksumError) as exc:
            dl.download(url_source(srv.url), tmp_path / "out", progress=False)
        assert len(srv.gets(path)) == 2  # exactly one refetch
    e = exc.value
    assert e.path.name == "consolidated.01.pth" and e.algo == "md5"
    assert (e.expected, e.actual) == (md5(good), md5(bad))
    assert md5(good) in str(e) and md5(bad) in str(e) and "checklist.chk" in str(e)
    assert (tmp_path / "out" / "consolidated.01.pth.corrupt").read_bytes() == bad


def test_html_page_instead_of_checklist_fails_before_any_weight_is_fetched(meta_root, tmp_path):
    page = b"<!DOCTYPE html>\n<html><head><title>Access Denied</title></head></html>\n"
    with FileServer(meta_root, Faults(replace={"/7B/checklist.chk": page})) as srv:
        with pytest.raises(dl.VerificationError, match=r"checklist\.chk: an HTML/XML page .*expired"):
            dl.download(url_source(srv.url), tmp_path / "out", progress=False)
        assert not [r for r in srv.requests if r.path.endswith(".pth")]


def test_html_page_saved_under_a_weights_name(meta_root, tmp_path):
    page = b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>AccessDenied</Code></Error>"
    with FileServer(meta_root, Faults(replace={"/7B/consolidated.00.pth": page})) as srv:
        with pytest.raises(dl.VerificationError,
                           match=r"consolidated\.00\.pth: an HTML/XML page \(\d+ bytes\)"):
            dl.download(url_source(srv.url), tmp_path / "out", progress=False)
        assert len(srv.gets("/7B/consolidated.00.pth")) == 2
    assert (tmp_path / "out" / "consolidated.00.pth.corrupt").read_bytes() == page


def test_checklist_that_does_not_parse(tmp_path):
    chk = tmp_path / "checklist.chk"
    chk.write_text("6efc8dab194ab59e49cd24be5574d85e  consolidated.00.pth\nno digest here\n")
    with pytest.raises(dl.VerificationError, match=r"checklist\.chk:2: not a checksum line"):
        dl.parse_checksums(chk)
    chk.write_text("\n")
    with pytest.raises(dl.VerificationError, match="no checksum lines"):
        dl.parse_checksums(chk)


def test_params_json_that_is_not_metas(meta_root, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(meta_root, src)
    for bad, err in ((b'{"dim": 512, "n_heads": 8', "not valid JSON"),
                     (b'{"hidden_size": 512}', r"missing or non-positive Meta keys \['dim'")):
        (src / "7B" / "params.json").write_bytes(bad)
        (src / "7B" / "checklist.chk").write_text("".join(
            f"{md5((src / '7B' / n).read_bytes())}  {n}\n" for n in (*PTH_FILES, "params.json")))
        with FileServer(src) as srv, pytest.raises(dl.VerificationError, match=err):
            dl.download(url_source(srv.url), tmp_path / f"out{len(bad)}", progress=False)


def test_missing_shard_is_named(meta_root, tmp_path):
    with FileServer(meta_root, Faults(missing={"/7B/consolidated.01.pth"})) as srv:
        with pytest.raises(dl.DownloadError, match=r"consolidated\.01\.pth: HTTP 404 .*model_dir"):
            dl.download(url_source(srv.url), tmp_path / "a", progress=False)
        n_before = len(srv.requests)
        # n_shards disagreeing with checklist.chk is caught before any weight moves
        with pytest.raises(dl.VerificationError, match=r"consolidated\.01\.pth \(listed in checklist"):
            dl.download(url_source(srv.url, n_shards=1), tmp_path / "b", progress=False)
        with pytest.raises(dl.VerificationError, match=r"consolidated\.02\.pth not listed"):
            dl.download(url_source(srv.url, n_shards=3), tmp_path / "c", progress=False)
        assert not [r for r in srv.requests[n_before:] if r.path.endswith(".pth")]


def test_expired_url_403_says_so(meta_root, tmp_path):
    with FileServer(meta_root, Faults(require_query=SIG)) as srv:
        with pytest.raises(dl.DownloadError, match=r"HTTP 403 .*expired") as exc:
            dl.download(url_source(f"{srv.url}/*?Policy=old&Signature=EXPIREDSIG"), tmp_path / "o",
                        progress=False)
    assert "EXPIREDSIG" not in chain_text(exc.value)


# ----------------------------------------------------------------------------- local source

def test_local_source_copies_and_verifies(meta_root, tmp_path):
    metrics = dl.run(dl.Config(source={"kind": "local", "path": str(meta_root), "model_dir": "7B"}),
                     tmp_path / "copy")
    assert_same_files(meta_root, tmp_path / "copy")
    assert metrics["files"] == 6 and metrics["fetched"] == 6
    linked = dl.download({"kind": "local", "path": str(meta_root), "model_dir": "7B",
                          "hardlink": True}, tmp_path / "link", progress=False)
    assert (linked / "consolidated.00.pth").stat().st_ino == \
        (meta_root / "7B" / "consolidated.00.pth").stat().st_ino


def test_plain_path_or_url_string(meta_root, tmp_path):
    """download() with a str: a local folder is a local source; a URL string (its shard count
    unknown) is a TypeError that shows the dict to pass, with the signature redacted."""
    flat = tmp_path / "flat"
    shutil.copytree(meta_root / "7B", flat)
    for name in ("tokenizer.model", "tokenizer_checklist.chk"):
        shutil.copyfile(meta_root / name, flat / name)
    out = dl.download(str(flat), tmp_path / "from_str", progress=False)
    assert_same_files(meta_root, out)
    assert dl.download(flat, tmp_path / "from_path", progress=False) == tmp_path / "from_path"
    with pytest.raises(TypeError, match=r"'kind': 'url'.*'n_shards'") as e:
        dl.download(f"https://example.com/llama/*?{SIG}", tmp_path / "x", progress=False)
    assert "SECRETSIG" not in str(e.value)
    with pytest.raises(TypeError, match="source dict"):
        dl.download(42, tmp_path / "y", progress=False)


def test_local_source_with_a_corrupted_file(meta_root, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(meta_root, src)
    shard = src / "7B" / "consolidated.01.pth"
    good = shard.read_bytes()
    bad = good[:-1] + bytes([good[-1] ^ 1])
    shard.write_bytes(bad)
    with pytest.raises(dl.ChecksumError) as exc:
        dl.download({"kind": "local", "path": str(src), "model_dir": "7B"}, tmp_path / "out",
                    progress=False)
    assert (exc.value.path.name, exc.value.expected, exc.value.actual) == \
        ("consolidated.01.pth", md5(good), md5(bad))
    assert (tmp_path / "out" / "consolidated.01.pth.corrupt").is_file()
    with pytest.raises(dl.ChecksumError, match="consolidated.01.pth: md5 mismatch"):
        dl.verify(_flat(src, tmp_path / "flat"))

    shard.unlink()
    with pytest.raises(dl.VerificationError, match=r"missing .*consolidated\.01\.pth"):
        dl.download({"kind": "local", "path": str(src), "model_dir": "7B"}, tmp_path / "out2",
                    progress=False)


def _flat(root: Path, dest: Path) -> Path:
    """Meta's download layout flattened by hand (no download code involved)."""
    dest.mkdir()
    for p in [*root.glob("*.*"), *(root / "7B").iterdir()]:
        shutil.copyfile(p, dest / p.name)
    return dest


# ----------------------------------------------------------------------------- real files

@pytest.mark.shared_data
def test_metas_real_checklists_verify_the_real_files(shared_data, llama_tokenizer, tmp_path):
    sums = shared_data / "models" / "meta-llama-checksums"
    shutil.copyfile(sums / "tokenizer_checklist.chk", tmp_path / "tokenizer_checklist.chk")
    shutil.copyfile(llama_tokenizer, tmp_path / "tokenizer.model")
    (tmp_path / "7B").mkdir()
    shutil.copyfile(shared_data / "models" / "llama-7b_params.json", tmp_path / "7B" / "params.json")
    assert dl.parse_checksums(tmp_path / "tokenizer_checklist.chk") == \
        {"tokenizer.model": ("md5", "eeec4125e9c7560836b4873b6f8e3025")}
    assert dl.check_sums(tmp_path / "tokenizer_checklist.chk") == ["tokenizer.model"]
    # the published sha256 lists (`<hex>  ./<path>`), relative to Meta's download root
    sha = tmp_path / "SHA256SUMS"
    sha.write_text((sums / "hashes" / "tokenizer.model.sha256").read_text()
                   + (sums / "hashes" / "7B" / "params.json.sha256").read_text())
    assert dl.check_sums(sha, tmp_path) == ["tokenizer.model", "7B/params.json"]
    dl.sniff(tmp_path / "7B" / "params.json")  # Meta's own params.json passes the key check

    data = bytearray((tmp_path / "tokenizer.model").read_bytes())
    data[1000] ^= 0x01
    (tmp_path / "tokenizer.model").write_bytes(bytes(data))
    with pytest.raises(dl.ChecksumError, match="expected eeec4125e9c7560836b4873b6f8e3025"):
        dl.check_sums(tmp_path / "tokenizer_checklist.chk")


# ----------------------------------------------------------------------------- hub source

REPO_ID = "meta-llama/Tiny-Meta"
SHA = "0123456789abcdef0123456789abcdef01234567"
TOKEN = "hf_SECRETTOKENxyz0123456789"


@pytest.fixture
def hub_files(meta_root) -> dict[str, bytes]:
    files = {f"original/{n}": (meta_root / "7B" / n).read_bytes()
             for n in (*PTH_FILES, "params.json", "checklist.chk")}
    files.update({f"original/{n}": (meta_root / n).read_bytes()
                  for n in ("tokenizer.model", "tokenizer_checklist.chk")})
    files["config.json"] = b'{"model_type": "llama"}'  # outside subfolder: never requested
    files["original/README.md"] = b"# not in allow_patterns\n"
    return files


@pytest.fixture
def hub_env(monkeypatch):
    import huggingface_hub.constants

    # conftest sets HF_HUB_OFFLINE=1 for the whole suite; huggingface_hub reads it at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)

    def point(url: str) -> None:
        monkeypatch.setenv("HF_ENDPOINT", url)
    return point


LFS = {"original/consolidated.00.pth", "original/consolidated.01.pth", "original/tokenizer.model"}


def hf_source(revision: str = "v1.0") -> dict:
    return {"kind": "hf", "repo_id": REPO_ID, "revision": revision, "subfolder": "original"}


def test_hub_source_pinned_revision_token_and_sha256(meta_root, hub_files, hub_env, tmp_path,
                                                     caplog, capfd):
    caplog.set_level(logging.DEBUG)
    with HubStub(REPO_ID, hub_files, revisions={"v1.0": SHA, SHA: SHA}, lfs=LFS,
                 token=TOKEN) as hub:
        hub_env(hub.url)
        metrics = dl.run(dl.Config(source=hf_source()), tmp_path / "out")
        paths = [r.path for r in hub.requests]
        with pytest.raises(dl.DownloadError, match=r"Tiny-Meta@v9.*RevisionNotFound") as exc:
            dl.download(hf_source("v9"), tmp_path / "bad", progress=False)
    out = tmp_path / "out"
    assert_same_files(meta_root, out)
    # the revision was resolved once, every file came from that commit, with the token
    assert paths[0] == f"/api/models/{REPO_ID}/revision/v1.0"
    resolves = [p for p in paths[1:]]
    assert resolves and all(p.startswith(f"/{REPO_ID}/resolve/{SHA}/original/") for p in resolves)
    assert not any(p.endswith(("README.md", "config.json")) for p in paths)
    assert all(r.authorization == f"Bearer {TOKEN}" for r in hub.requests[:len(paths)])
    assert metrics["revision_sha"] == SHA and metrics["files"] == 7  # + SHA256SUMS
    assert dl.parse_checksums(out / "SHA256SUMS") == {
        n.removeprefix("original/"): ("sha256", hashlib.sha256(hub_files[n]).hexdigest())
        for n in sorted(LFS)}
    assert not (out / ".hf-staging").exists()
    dl.verify(out)
    msg = chain_text(exc.value)
    for text in (caplog.text, capfd.readouterr().err, json.dumps(metrics), msg):
        assert TOKEN not in text


def test_hub_sha256_mismatch_fails_after_one_refetch(meta_root, hub_files, hub_env, tmp_path):
    true = hashlib.sha256(hub_files["original/consolidated.00.pth"]).hexdigest()
    wrong = "f" * 64
    with HubStub(REPO_ID, hub_files, revisions={"v1.0": SHA}, lfs=LFS, token=TOKEN,
                 bad_sha256={"original/consolidated.00.pth": wrong}) as hub:
        hub_env(hub.url)
        with pytest.raises(dl.ChecksumError) as exc:
            dl.download(hf_source(), tmp_path / "out", progress=False)
        gets = hub.gets(f"/{REPO_ID}/resolve/{SHA}/original/consolidated.00.pth")
    e = exc.value
    assert (e.path.name, e.algo, e.expected, e.actual) == ("consolidated.00.pth", "sha256", wrong, true)
    assert wrong in str(e) and true in str(e) and "hub LFS sha256" in str(e)
    assert len(gets) == 2
    assert (tmp_path / "out" / "consolidated.00.pth.corrupt").read_bytes() == \
        hub_files["original/consolidated.00.pth"]


def test_hub_non_lfs_file_is_checked_against_its_blob_id(meta_root, hub_files, hub_env, tmp_path):
    """params.json is a plain git file: the hub's blob id must match what arrived."""
    stub = HubStub(REPO_ID, hub_files, revisions={"v1.0": SHA}, lfs=LFS, token=TOKEN)
    stub.git_blob_id = lambda data: hashlib.sha1(b"other" + data).hexdigest()  # a lying hub
    with stub as hub:
        hub_env(hub.url)
        with pytest.raises(dl.ChecksumError, match=r"checklist\.chk: git-sha1 mismatch"):
            dl.download(hf_source(), tmp_path / "out", progress=False)


def test_hub_offline_mode_and_unset_url_env_are_clear_errors(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(dl.DownloadError, match="HF_HUB_OFFLINE is set"):
        dl.download(hf_source(), tmp_path / "hf", progress=False)
    monkeypatch.delenv("LLAMA_UNSET_URL", raising=False)
    with pytest.raises(dl.DownloadError, match="environment variable LLAMA_UNSET_URL is not set"):
        dl.download({"kind": "url", "url_env": "LLAMA_UNSET_URL", "n_shards": 1}, tmp_path / "u",
                    progress=False)


# ----------------------------------------------------------------------------- configs

@pytest.mark.parametrize("option", ["local", "url", "hf", "stories260k"])
def test_conf_source_options_validate(option, monkeypatch):
    from pipelines.config import _register_resolvers

    _register_resolvers()  # ${shared_data:...} / ${repo:...} in conf/
    monkeypatch.chdir(REPO)
    cfg = OmegaConf.create({
        "model": {"n_shards": 2, "meta_dir": "7B"},
        "source": OmegaConf.load(REPO / "conf" / "source" / f"{option}.yaml"),
        "download": OmegaConf.load(REPO / "conf" / "download" / "default.yaml")})
    if option == "local":
        cfg.source.path = "/data/llama"
    if option == "hf":
        cfg.source.repo_id, cfg.source.revision = "meta-llama/Llama-2-7b", SHA
    plain = OmegaConf.to_container(cfg, resolve=True)
    config = dl.Config(source=plain["source"], **plain["download"])
    assert config.source.kind == ("llama2c" if option == "stories260k" else option)
    assert (config.workers, config.retries, config.verify) == (4, 3, True)
    if option == "url":
        assert (config.source.n_shards, config.source.model_dir) == (2, "7B")
        assert config.source.url_env == "LLAMA_PRESIGNED_URL"
    if option == "stories260k":
        assert config.source.bin_path.endswith("models/stories260K/stories260K.bin")


def test_unset_mandatory_value_is_a_clear_error():
    with pytest.raises(ValueError, match=r"source.path is not set \(pass source.path=\.\.\.\)"):
        dl.Config(source={"kind": "local", "path": "???"})
    with pytest.raises(ValueError, match="url_env"):
        dl.Config(source={"kind": "url", "n_shards": 1})


def test_a_local_source_is_keyed_by_what_it_holds(meta_root, tmp_path):
    """The same checkpoint in two folders (two workspaces' demo sources) gives one download key,
    so everything downstream is shared; other content gives another key."""
    from types import SimpleNamespace

    from pipelines.artifacts import HashCache, cache_key
    from pipelines.runner import _step_config

    def key(root: Path) -> str:
        cfg = {"download": {"workers": 4, "retries": 3, "verify": True},
               "source": {"kind": "local", "path": str(root), "model_dir": "7B", "hardlink": False}}
        run = SimpleNamespace(cfg=cfg, hashes=HashCache(tmp_path / "hashes.json"))
        module, _, key_cfg, data = _step_config(run, "download", {})
        assert str(root) not in json.dumps(key_cfg)
        return cache_key("download", module.VERSION, key_cfg, {"artifacts": {}, "data": data})

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(meta_root, a)
    shutil.copytree(meta_root, b)
    assert key(a) == key(b)
    (b / "7B" / "params.json").write_text('{"dim": 1}')
    chk = b / "7B" / "checklist.chk"
    chk.write_text(chk.read_text().replace(md5((meta_root / "7B" / "params.json").read_bytes()),
                                           md5(b'{"dim": 1}')))
    assert key(a) != key(b)
