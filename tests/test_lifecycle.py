"""The whole flow on the demo model: cache hits and misses, reruns, MLflow runs, latest.json,
atomic failure, secrets. One real Prefect server (session harness), SQLite MLflow in tmp."""
import json

import pytest
from mlflow import MlflowClient

from pipelines.demo import run_demo
from pipelines.runner import StageNotCached

pytestmark = pytest.mark.slow

UPSTREAM_OF_SFT = {"download", "convert", "vocab", "pretrain", "evaluate[base]",
                   "evaluate[base-zh]", "evaluate[base-zh+pt]"}


@pytest.fixture(scope="module")
def workdir(demo_first_run):
    return demo_first_run[0]


@pytest.fixture(scope="module")
def first(demo_first_run):
    return demo_first_run[1]


def _cache(result):
    return {label: r["cache"] for label, r in result["stages"].items()}


def _client(workdir):
    return MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")


def test_first_run_computes_every_stage_into_content_addressed_dirs(first, workdir):
    labels = list(first["stages"])
    assert labels[:6] == ["download", "convert", "vocab", "pretrain", "sft", "merge"]
    assert {"quantize[f16]", "quantize[q8_0]", "quantize[q4_0]", "quantize[q4_k_m]",
            "evaluate[merged]", "evaluate[gguf-q4_k_m]", "report"} <= set(labels)
    assert set(_cache(first).values()) == {"miss"}
    for label, r in first["stages"].items():
        manifest = json.loads((workdir / r["artifact"] / "manifest.json").read_text())
        assert manifest["key"] == r["key"] and manifest["digest"] == r["digest"]
        assert r["artifact"].endswith(f"{manifest['stage']}/{r['key']}")
    latest = json.loads((workdir / "latest.json").read_text())
    assert latest["stages"] == first["stages"]
    assert not list((workdir / "artifacts").glob("*/.tmp-*"))
    # the lineage: sft was made from the vocab-extended model and the pretrain adapter
    sft = json.loads((workdir / first["stages"]["sft"]["artifact"] / "manifest.json").read_text())
    assert sft["inputs"]["artifacts"] == {"model": first["stages"]["vocab"]["digest"],
                                          "adapters": [first["stages"]["pretrain"]["digest"]]}


# The demo recipe's first 8 pretrain losses (CPU, fp32), pinned: a silent drift in a default
# (data, tokenizer, init, schedule, loss) moves them. Step 1 runs at lr 0 (linear warm-up from 0).
DEMO_PRETRAIN_LOSSES = [6.873016357421875, 6.924763202667236, 6.842403411865234,
                        6.725796699523926, 6.643552303314209, 6.476600646972656,
                        6.256866455078125, 6.298048496246338]


def test_demo_pretrain_losses_are_golden(first, workdir):
    log = workdir / first["stages"]["pretrain"]["artifact"] / "trainer_log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r][:8]
    assert losses == pytest.approx(DEMO_PRETRAIN_LOSSES, rel=1e-5)


def test_the_report_has_accuracy_and_a_real_local_judges_scores(first, workdir):
    md = (workdir / first["stages"]["report"]["artifact"] / "report.md").read_text(encoding="utf-8")
    assert "## Multiple-choice accuracy" in md
    for model in ("base", "merged", "gguf-f16", "gguf-q4_0"):
        for shots in (0, 5):
            assert f"| {model} | ceval | {shots} |" in md and f"| {model} | cmmlu | {shots} |" in md
    judge = json.loads((workdir / first["stages"]["judge"]["artifact"] / "judge.json").read_text())
    # 2 pairs x 4 prompts x both orders, then 9 models x 4 prompts alone, on llama_cpp.server
    # serving the demo's own f16 GGUF: every reply parsed (the grammar), none dropped
    assert judge["status"] == "ok" and judge["judge"]["local"] and judge["n_requests"] == 52
    assert judge["n_failures"] == 0 and len(judge["judge"]["gguf_sha256"]) == 64
    assert [(p["a"], p["b"], p["n_judged"]) for p in judge["pairs"]] == \
        [("merged", "base-zh+pt", 4), ("merged", "gguf-q4_0", 4)]
    assert set(judge["groups"]) == {"知识问答", "文本翻译", "写信写文章"}
    assert "## Judge" in md and "| merged vs gguf-q4_0 | 4/4 |" in md


def test_mlflow_has_a_parent_run_with_one_nested_run_per_stage(first, workdir):
    client = _client(workdir)
    parent = client.get_run(first["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["prefect.flow_run_id"]
    assert "config.yaml" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_label = {c.data.tags["llamaflow.label"]: c for c in children}
    assert set(by_label) == set(first["stages"])
    conv = by_label["convert"]
    assert conv.data.tags["llamaflow.cache"] == "miss"
    assert conv.data.tags["llamaflow.cache_key"] == first["stages"]["convert"]["key"]
    assert conv.data.params["dtype"] == "float32"
    assert conv.data.metrics["artifact_bytes"] > 0 and conv.data.metrics["stage_seconds"] > 0
    losses = client.get_metric_history(by_label["pretrain"].info.run_id, "loss")
    assert len(losses) >= 3 and losses[-1].value < losses[0].value  # the curve, step by step
    report_files = [a.path for a in client.list_artifacts(by_label["report"].info.run_id)]
    assert {"table.md", "ppl_per_stage.png", "gates.json"} <= set(report_files)
    assert by_label["evaluate[merged]"].data.metrics["en.ppl"] > 1


def _registered(workdir) -> tuple[list, dict]:
    client = _client(workdir)
    versions = client.search_model_versions("name = 'llamaflow-demo'")
    aliases = {a: client.get_model_version_by_alias("llamaflow-demo", a).version
               for a in ("candidate", "champion")
               if a in client.get_registered_model("llamaflow-demo").aliases}
    return versions, aliases


def test_the_merged_model_is_a_registered_model_version(first, workdir):
    versions, aliases = _registered(workdir)
    merge = first["stages"]["merge"]
    assert len(versions) == 1
    v = versions[0]
    assert v.tags["llamaflow.digest"] == merge["digest"] and v.run_id == merge["mlflow_run_id"]
    assert v.source == str((workdir / merge["artifact"]).resolve())
    assert aliases["candidate"] == v.version
    gates = json.loads((workdir / first["stages"]["report"]["artifact"] / "gates.json").read_text())
    assert ("champion" in aliases) == (gates["passed"] is True)
    parent = _client(workdir).get_run(first["mlflow_parent_run_id"])
    assert parent.data.tags["llamaflow.registered_model"] == f"llamaflow-demo/{v.version}"


def test_second_run_is_all_cache_hits(first, workdir):
    second = run_demo(workdir)
    assert set(_cache(second).values()) == {"hit"}
    assert len(_registered(workdir)[0]) == 1     # the same merged bytes: the same version
    assert {k: r["artifact"] for k, r in second["stages"].items()} == \
        {k: r["artifact"] for k, r in first["stages"].items()}


def test_changing_one_stage_reruns_it_and_what_follows_only(first, workdir):
    changed = run_demo(workdir, ["sft.max_steps=8"])
    cache = _cache(changed)
    assert {k for k, v in cache.items() if v == "hit"} == UPSTREAM_OF_SFT
    assert changed["stages"]["sft"]["digest"] != first["stages"]["sft"]["digest"]
    versions, aliases = _registered(workdir)     # a new merged model: a new version, now candidate
    newest = [v for v in versions if v.tags["llamaflow.digest"] == changed["stages"]["merge"]["digest"]]
    assert len(versions) == 2 and aliases["candidate"] == newest[0].version


def test_from_stage_recomputes_that_stage_and_after_with_identical_bytes(first, workdir):
    rerun = run_demo(workdir, from_stage="quantize")
    cache = _cache(rerun)
    assert all(cache[s] == "hit" for s in ("download", "convert", "vocab", "pretrain", "sft", "merge"))
    # --from recomputes even what the cache has, and says so
    assert all(v == "forced" for k, v in cache.items() if k.startswith(("quantize", "evaluate", "report")))
    for q in ("f16", "q8_0", "q4_0", "q4_k_m"):  # quantization is deterministic: same digest
        assert rerun["stages"][f"quantize[{q}]"]["digest"] == first["stages"][f"quantize[{q}]"]["digest"]


def test_selected_stages_need_their_upstream_in_the_cache(tmp_path, prefect_harness):
    with pytest.raises(StageNotCached, match="download.*not selected"):
        run_demo(tmp_path, ["stages=[quantize]"])
    assert not (tmp_path / "artifacts" / "quantize").exists()


def test_a_failed_stage_leaves_nothing_that_looks_finished(tmp_path, prefect_harness):
    from pipelines.lifecycle import lifecycle

    with pytest.raises(Exception, match="127.0.0.1:9"):
        lifecycle(overrides=["recipe=demo", f"workdir={tmp_path}", "source=url",
                             "source.url=http://127.0.0.1:9/",
                             "stages=[download]", "download.retries=0", "retries.download=0"])
    # no artifact and no temp dir; only the (free) key lock
    assert [p.name for p in (tmp_path / "artifacts" / "download").iterdir()] == [".locks"]
    client = _client(tmp_path)
    runs = client.search_runs([client.get_experiment_by_name("llamaflow").experiment_id])
    status = {r.data.tags.get("llamaflow.label", "parent"): r.info.status for r in runs}
    assert status == {"download": "FAILED", "parent": "FAILED"}


def test_a_presigned_url_reaches_neither_mlflow_nor_prefect(tmp_path, prefect_harness):
    from prefect.client.orchestration import get_client

    from pipelines.cli import _hide_secrets
    from pipelines.demo import make_demo_source, serve_directory
    from pipelines.config import load_config

    make_demo_source(tmp_path / "src", load_config(["recipe=demo"])["model"])
    with serve_directory(tmp_path / "src") as url:
        overrides = _hide_secrets(["recipe=demo", f"workdir={tmp_path / 'ws'}", "stages=[download]",
                                   "source=url", f"source.url={url}?X-Amz-Signature=TOPSECRET42"])
        from pipelines.lifecycle import lifecycle
        result = lifecycle(overrides=overrides)
    assert result["stages"]["download"]["cache"] == "miss"
    db = (tmp_path / "ws" / "mlflow.db").read_bytes()
    assert b"TOPSECRET42" not in db and b"127.0.0.1" in db
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(limit=200)
    assert runs and not any("TOPSECRET42" in json.dumps(r.parameters) for r in runs)
    for f in (tmp_path / "ws").rglob("*"):
        if f.is_file() and f.suffix in {".json", ".yaml", ".txt", ".jsonl"}:
            assert "TOPSECRET42" not in f.read_text(errors="ignore"), f


def test_multirun_gives_one_parent_run_per_combination_sharing_upstream(first, workdir, capsys):
    from pipelines.cli import main

    # recipe=demo reads the checkpoint the demo left in the workspace (conf/source/demo.yaml)
    assert main(["run", "-m", "recipe=demo", f"workdir={workdir}",
                 "stages=[download,convert]", "convert.dtype=float32,bfloat16"]) == 0
    out = capsys.readouterr().out
    # each member is announced as it starts and labels its own summary at the end
    assert out.count("== multirun 1/2") == 2 and out.count("== multirun 2/2") == 2
    assert out.count("  convert                ") == 2
    client = _client(workdir)
    exp = client.get_experiment_by_name("llamaflow").experiment_id
    parents = client.search_runs([exp], "tags.`llamaflow.overrides` LIKE '%convert.dtype=%'")
    assert sorted(p.data.tags["llamaflow.overrides"].split()[-1] for p in parents) == \
        ["convert.dtype=bfloat16", "convert.dtype=float32"]
    latest = json.loads((workdir / "latest.json").read_text())["stages"]
    assert latest["download"]["cache"] == "hit"            # shared upstream, not recomputed
    assert latest["convert"]["cache"] == "miss"            # bfloat16 is new
