"""The artifact cache on S3-compatible storage: two workspaces ("workers") sharing one bucket on a
real S3 server (moto's, on 127.0.0.1)."""
import hashlib
import json
import uuid

import boto3
import pytest
from moto.server import ThreadedMotoServer

from pipelines.artifacts import MANIFEST, Store, canonical, sha256_file
from pipelines.remote import RemoteIntegrityError, RemoteStore

WEIGHTS = bytes(range(256)) * 4096 + b"tail"   # 1 MiB + 4 bytes


@pytest.fixture(scope="module")
def s3_server():
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path):
    """Credentials and endpoint as a worker would have them; no user AWS config leaks in."""
    for var in ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "worker-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "worker-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    return s3_server


@pytest.fixture
def bucket(s3_env):
    name = f"llamaflow-{uuid.uuid4().hex[:12]}"
    s3 = boto3.client("s3", endpoint_url=s3_env)
    s3.create_bucket(Bucket=name)
    return name, s3


def _commit(workspace, stage="convert", key=None):
    """Worker A's stage output: a couple of files, one in a subdirectory, committed via Store."""
    store = Store(workspace / "artifacts")
    key = key or hashlib.sha256(uuid.uuid4().bytes).hexdigest()
    tmp = store.new_tmp(stage, key)
    (tmp / "model.safetensors").write_bytes(WEIGHTS)
    (tmp / "tokenizer").mkdir()
    (tmp / "tokenizer" / "tokenizer.json").write_text('{"vocab": {"<s>": 1}}')
    return store.commit(tmp, stage, key, version="1", config={"dtype": "float32"},
                        inputs={"artifacts": {}, "data": {}}, metrics={"tensors": 2})


def _objects(s3, bucket_name):
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket_name).get("Contents", []))


def test_a_pushed_artifact_is_fetched_by_another_worker_byte_for_byte(bucket, tmp_path):
    name, s3 = bucket
    art = _commit(tmp_path / "worker-a")
    assert RemoteStore(f"s3://{name}/team").push(art) is True
    prefix = f"team/artifacts/convert/{art.key}/"
    assert _objects(s3, name) == [prefix + p for p in
                                  ("manifest.json", "model.safetensors", "tokenizer/tokenizer.json")]

    store_b = Store(tmp_path / "worker-b" / "artifacts")
    assert store_b.lookup("convert", art.key) is None
    assert RemoteStore(f"s3://{name}/team").fetch("convert", art.key,
                                                    store_b.final_dir("convert", art.key)) is True
    got = store_b.lookup("convert", art.key)
    assert got is not None and got.digest == art.digest
    assert (got.path / MANIFEST).read_bytes() == (art.path / MANIFEST).read_bytes()
    assert (got.path / "model.safetensors").read_bytes() == WEIGHTS
    assert sha256_file(got.path / "tokenizer" / "tokenizer.json") == \
        sha256_file(art.path / "tokenizer" / "tokenizer.json")
    assert store_b.verify(got) == []
    assert [p.name for p in got.path.parent.iterdir()] == [art.key]   # no temp dir left


def test_a_corrupted_remote_object_is_an_error_naming_it_and_nothing_finished_is_left(bucket, tmp_path):
    name, s3 = bucket
    art = _commit(tmp_path / "worker-a")
    RemoteStore(f"s3://{name}").push(art)
    obj = f"artifacts/convert/{art.key}/model.safetensors"
    s3.put_object(Bucket=name, Key=obj, Body=b"X" + WEIGHTS[1:])   # same size, other bytes

    store_b = Store(tmp_path / "worker-b" / "artifacts")
    with pytest.raises(RemoteIntegrityError, match=f"s3://{name}/{obj} has sha256 "):
        RemoteStore(f"s3://{name}").fetch("convert", art.key, store_b.final_dir("convert", art.key))
    assert list((store_b.root / "convert").iterdir()) == []   # neither the final dir nor a .tmp-*
    assert store_b.lookup("convert", art.key) is None

    s3.put_object(Bucket=name, Key=obj, Body=WEIGHTS[:-1])      # truncated
    with pytest.raises(RemoteIntegrityError, match=f"{obj} has size {len(WEIGHTS) - 1}, but .* "
                                                   f"says size {len(WEIGHTS)}"):
        RemoteStore(f"s3://{name}").fetch("convert", art.key, store_b.final_dir("convert", art.key))
    assert list((store_b.root / "convert").iterdir()) == []


def test_an_interrupted_push_without_manifest_is_a_miss(bucket, tmp_path):
    name, s3 = bucket
    art = _commit(tmp_path / "worker-a")
    remote = RemoteStore(f"s3://{name}")
    real_upload, uploaded = remote.s3.upload_file, []

    def dies_after_one_file(path, bucket_name, key):   # the worker is killed mid-push
        if uploaded:
            raise ConnectionError("worker killed")
        uploaded.append(key)
        real_upload(path, bucket_name, key)

    remote.s3.upload_file = dies_after_one_file
    with pytest.raises(ConnectionError):
        remote.push(art)
    assert _objects(s3, name) == [f"artifacts/convert/{art.key}/model.safetensors"]  # no manifest

    final_b = tmp_path / "worker-b" / "artifacts" / "convert" / art.key
    assert RemoteStore(f"s3://{name}").fetch("convert", art.key, final_b) is False
    assert not final_b.exists()
    # the next push completes it: the manifest, uploaded last, is what makes it visible
    assert RemoteStore(f"s3://{name}").push(art) is True
    assert RemoteStore(f"s3://{name}").fetch("convert", art.key, final_b) is True
    assert Store(tmp_path / "worker-b" / "artifacts").lookup("convert", art.key).digest == art.digest


def test_push_skips_an_artifact_the_bucket_already_has(bucket, tmp_path):
    name, s3 = bucket
    remote = RemoteStore(f"s3://{name}/p")
    art = _commit(tmp_path / "worker-a")
    assert remote.push(art) is True
    before = {o["Key"]: o["LastModified"] for o in s3.list_objects_v2(Bucket=name)["Contents"]}
    # worker C made the same key: its push must not touch the published objects
    same_key = _commit(tmp_path / "worker-c", key=art.key)
    assert remote.push(same_key) is False
    after = {o["Key"]: o["LastModified"] for o in s3.list_objects_v2(Bucket=name)["Contents"]}
    assert after == before


def test_push_refuses_a_locally_damaged_artifact(bucket, tmp_path):
    name, s3 = bucket
    art = _commit(tmp_path / "worker-a")
    (art.path / "model.safetensors").write_bytes(b"Y" + WEIGHTS[1:])  # bit rot: same size
    with pytest.raises(RemoteIntegrityError, match="model.safetensors no longer matches"):
        RemoteStore(f"s3://{name}").push(art)
    assert not any(k.endswith(MANIFEST) for k in _objects(s3, name))


def test_a_manifest_listing_an_unsafe_path_is_rejected(bucket, tmp_path):
    name, s3 = bucket
    files = [{"path": "../escape.txt", "size": 1, "sha256": hashlib.sha256(b"x").hexdigest()}]
    manifest = {"stage": "convert", "key": "k" * 64, "files": files,
                "digest": hashlib.sha256(canonical(files)).hexdigest()}
    s3.put_object(Bucket=name, Key=f"artifacts/convert/{'k' * 64}/manifest.json",
                  Body=json.dumps(manifest).encode())
    s3.put_object(Bucket=name, Key="artifacts/convert/escape.txt", Body=b"x")
    final = tmp_path / "w" / "artifacts" / "convert" / ("k" * 64)
    with pytest.raises(RemoteIntegrityError, match="unsafe path '../escape.txt'"):
        RemoteStore(f"s3://{name}").fetch("convert", "k" * 64, final)
    assert not (tmp_path / "w" / "artifacts" / "escape.txt").exists() and not final.exists()


def test_a_wrong_bucket_or_credentials_fail_at_start_naming_the_fix(s3_env, monkeypatch):
    with pytest.raises(RuntimeError, match="bucket 'no-such-bucket' does not exist"):
        RemoteStore("s3://no-such-bucket/x")
    with pytest.raises(ValueError, match="expected s3://bucket"):
        RemoteStore("https://example.com/bucket")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    with pytest.raises(RuntimeError, match=r"127\.0\.0\.1:9") as e:
        RemoteStore("s3://some-bucket")
    assert "worker-secret" not in str(e.value)


@pytest.mark.slow
def test_two_workers_share_the_lifecycle_cache_through_the_bucket(bucket, tmp_path, prefect_harness):
    from pipelines.demo import run_demo

    name, s3 = bucket
    overrides = ["stages=[download,convert]", f"storage.remote=s3://{name}/shared"]
    # over loopback HTTP: a url source has one cache key in every workspace (a local source's
    # key names its folder, which is each worker's own)
    a = run_demo(tmp_path / "worker-a", overrides, http=True)
    assert {k: r["cache"] for k, r in a["stages"].items()} == {"download": "miss", "convert": "miss"}
    keys = _objects(s3, name)
    for r in a["stages"].values():
        assert f"shared/artifacts/{r['artifact'].split('/artifacts/')[1]}/manifest.json" in keys

    b = run_demo(tmp_path / "worker-b", overrides, http=True)
    assert {k: r["cache"] for k, r in b["stages"].items()} == \
        {"download": "hit-remote", "convert": "hit-remote"}
    for stage in ("download", "convert"):
        assert b["stages"][stage]["key"] == a["stages"][stage]["key"]
        assert b["stages"][stage]["digest"] == a["stages"][stage]["digest"]
        assert b["stages"][stage]["artifact"].startswith(str(tmp_path / "worker-b"))
    conv_b = Store(tmp_path / "worker-b" / "artifacts").lookup("convert", b["stages"]["convert"]["key"])
    assert Store(conv_b.path.parents[1]).verify(conv_b) == []
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'worker-b' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("llamaflow").experiment_id])
    tags = {r.data.tags["llamaflow.label"]: r.data.tags["llamaflow.cache"]
            for r in runs if "llamaflow.label" in r.data.tags}
    assert tags == {"download": "hit-remote", "convert": "hit-remote"}
