"""A damaged artifact is never handed on, `force=[...]` replaces it, `llamaflow verify` names it,
and a run whose error cannot be recorded (a full disk) still ends FAILED. The stories260k
download and convert stages (seconds) in one real Prefect server (the session harness)."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.test_store import _flip_byte

pytestmark = pytest.mark.slow


def _runs(ws: Path) -> dict:
    client = MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name("llamaflow").experiment_id
    return {r.info.run_id: r for r in client.search_runs([exp])}


def test_a_damaged_hit_is_recomputed_and_force_replaces_what_the_stat_cannot_see(
        tmp_path, prefect_harness, shared_data, capsys):
    from pipelines.cli import main
    from pipelines.lifecycle import lifecycle

    ws = tmp_path / "ws"
    overrides = ["recipe=stories260k", f"workdir={ws}", "stages=[download,convert]"]
    first = lifecycle(overrides=overrides)
    convert_dir = Path(first["stages"]["convert"]["artifact"])
    weights = convert_dir / "model.safetensors"
    good = weights.read_bytes()

    _flip_byte(weights)
    capsys.readouterr()
    assert main(["verify", "--workdir", str(ws)]) == 1
    out = capsys.readouterr().out
    assert f"DAMAGED convert {convert_dir}: model.safetensors (sha256 differs)" in out
    assert "2 artifact(s)" in out and "1 damaged" in out and "force=[convert]" in out
    assert main(["verify", "--workdir", str(ws), "download"]) == 0

    second = lifecycle(overrides=overrides)              # the damaged hit is a miss
    assert {k: r["cache"] for k, r in second["stages"].items()} == \
        {"download": "hit", "convert": "miss"}
    assert weights.read_bytes() == good
    assert second["stages"]["convert"]["digest"] == first["stages"]["convert"]["digest"]
    run = _runs(ws)[second["stages"]["convert"]["mlflow_run_id"]]
    assert "model.safetensors (sha256 differs" in run.data.tags["llamaflow.damaged"]
    assert [p for p in convert_dir.parent.iterdir() if ".damaged-" in p.name]

    _flip_byte(weights, keep_mtime=True)                 # only a full re-hash can see this one
    third = lifecycle(overrides=[*overrides, "force=[convert]"])
    assert third["stages"]["convert"]["cache"] == "forced"
    assert weights.read_bytes() == good
    latest = json.loads((ws / "latest.json").read_text())["stages"]
    assert latest["convert"]["cache"] == "forced" and latest["download"]["cache"] == "hit"
    assert _runs(ws)[third["stages"]["convert"]["mlflow_run_id"]].data.tags["llamaflow.cache"] \
        == "forced"
    assert main(["verify", "--workdir", str(ws)]) == 0
    assert not [p for p in convert_dir.parent.iterdir() if p.name.startswith(".tmp-")]


def test_a_fetched_copy_that_fails_the_local_check_is_a_miss_and_is_pushed(
        tmp_path, prefect_harness, shared_data, monkeypatch):
    """The bucket hands over a copy, the lookup then finds it damaged: the stage is computed
    here, so it is a miss (not hit-remote) and its artifact goes to the bucket."""
    import shutil

    from pipelines import runner
    from pipelines.lifecycle import lifecycle

    ws = tmp_path / "ws"
    overrides = ["recipe=stories260k", f"workdir={ws}", "stages=[download,convert]"]
    first = lifecycle(overrides=overrides)
    convert_dir = Path(first["stages"]["convert"]["artifact"])
    in_bucket = tmp_path / "bucket-copy"
    shutil.move(convert_dir, in_bucket)                  # a local miss for convert
    pushed, fetched = [], []

    class Bucket:
        url = "s3://fake/shared"

        def __init__(self, url):
            pass

        def fetch(self, stage, key, local_final_dir):
            fetched.append(stage)
            shutil.copytree(in_bucket, local_final_dir)
            with open(local_final_dir / "model.safetensors", "r+b") as f:
                f.truncate(10)                           # what the local check must catch
            return True

        def push(self, artifact):
            pushed.append(artifact.stage)
            return True

    monkeypatch.setattr(runner, "RemoteStore", Bucket)
    second = lifecycle(overrides=[*overrides, f"storage.remote={Bucket.url}"])
    assert fetched == ["convert"]
    assert {k: r["cache"] for k, r in second["stages"].items()} == \
        {"download": "hit", "convert": "miss"}
    assert "convert" in pushed
    assert second["stages"]["convert"]["digest"] == first["stages"]["convert"]["digest"]
    run = _runs(ws)[second["stages"]["convert"]["mlflow_run_id"]]
    assert run.data.tags["llamaflow.cache"] == "miss"


def test_a_full_disk_still_ends_the_runs_failed(tmp_path, prefect_harness, shared_data,
                                                monkeypatch):
    """The disk fills during convert: the step fails, and then so does every write that would
    record it (the error tag, latest.json, the summary). The runs must not stay RUNNING."""
    from pipelines import runner, tracking
    from pipelines.lifecycle import lifecycle
    from steps import convert

    full = []

    def no_space(*args, **kwargs):
        full.append(True)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def failing_once_full(real):
        def method(*args, **kwargs):
            if full:
                no_space()
            return real(*args, **kwargs)
        return method

    monkeypatch.setattr(convert, "run", no_space)
    monkeypatch.setattr(tracking.Tracker, "set_tags", failing_once_full(tracking.Tracker.set_tags))
    monkeypatch.setattr(tracking.Tracker, "log_table",
                        failing_once_full(tracking.Tracker.log_table))
    monkeypatch.setattr(runner.LifecycleRun, "write_latest",
                        failing_once_full(runner.LifecycleRun.write_latest))
    ws = tmp_path / "ws"
    with pytest.raises(OSError, match="No space left"):
        lifecycle(overrides=["recipe=stories260k", f"workdir={ws}", "stages=[download,convert]"])
    status = {r.data.tags.get("llamaflow.label", "parent"): r.info.status
              for r in _runs(ws).values()}
    assert status == {"download": "FINISHED", "convert": "FAILED", "parent": "FAILED"}
    assert not list((ws / "artifacts" / "convert").glob(".tmp-*"))


def test_a_corrupted_local_source_file_is_named_not_its_scratch_copy(tmp_path, tiny_sp_model):
    """The download stage checks a local source on its copy in scratch/; the error names the
    user's file (and a ChecksumError's path is it)."""
    import hashlib
    import shutil

    from steps import download

    src = tmp_path / "llama"
    (src / "7B").mkdir(parents=True)
    shard = src / "7B" / "consolidated.00.pth"
    shard.write_bytes(b"\x80\x02" + b"w" * 4096)      # a pickle's first bytes
    (src / "7B" / "params.json").write_text(json.dumps(
        {"dim": 64, "multiple_of": 32, "n_heads": 4, "n_layers": 1, "norm_eps": 1e-6,
         "vocab_size": -1}))
    md5 = lambda p: hashlib.md5(p.read_bytes()).hexdigest()  # noqa: E731
    (src / "7B" / "checklist.chk").write_text(
        f"{md5(shard)}  consolidated.00.pth\n{md5(src / '7B' / 'params.json')}  params.json\n")
    shutil.copyfile(tiny_sp_model, src / "tokenizer.model")
    _flip_byte(shard)
    scratch = tmp_path / "ws" / "scratch" / "download" / "k"
    cfg = download.Config(source={"kind": "local", "path": str(src), "model_dir": "7B"})
    with pytest.raises(download.ChecksumError) as e:
        download.run(cfg, tmp_path / "out", resume_dir=scratch)
    assert str(e.value).startswith(f"{shard}: md5 mismatch")
    assert str(scratch) not in str(e.value) and e.value.path == shard
