"""The same work gets the same fingerprint: a stage's output bytes (its artifact digest) depend on
its inputs and config only, not on the workspace directory, a temp dir, the process (Python's
per-process string hashing, PYTHONHASHSEED) or the machine's core count. Otherwise any upstream
recompute retrains everything after it, and two workspaces (or a shared bucket) never share a key.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_DATA = REPO / "pipelines" / "demo_data"


def test_trained_tokenizer_records_no_path_and_not_the_core_count(tmp_path, monkeypatch):
    """vocab.train_tokenizer: SentencePiece writes its model_prefix (a temp dir inside the stage)
    into the model, and its pieces depend on the thread count, which was the core count."""
    from steps import vocab
    from steps.tokenizer import load_sp_proto

    made = []
    for cores, where in ((1, tmp_path / "a"), (8, tmp_path / "deeper" / ".tmp-x" / "extra")):
        monkeypatch.setattr(os, "cpu_count", lambda n=cores: n)
        made.append(vocab.train_tokenizer(DEMO_DATA / "corpus_zh.txt", where, 450))
    a, b = (m.read_bytes() for m in made)
    assert a == b
    spec = load_sp_proto(made[1]).trainer_spec
    assert str(tmp_path) not in spec.model_prefix and spec.num_threads == vocab.TRAIN_THREADS
    assert vocab.Config().num_threads == vocab.TRAIN_THREADS


_SAVE_ADAPTER = textwrap.dedent("""
    import json, shutil, sys
    from pathlib import Path
    import torch
    from steps.digests import base_digest
    from steps.train.config import LoraSettings
    from steps.train.model import add_lora, load_base, save_adapter
    src, base, out = map(Path, sys.argv[1:4])
    shutil.copytree(src, base)
    model, tok = load_base(base)
    torch.manual_seed(0)
    model = add_lora(model, LoraSettings(r=2, alpha=4))
    save_adapter(model, tok, out, {"base_digest": base_digest(base)}, base)
""")


def test_adapter_files_are_the_same_in_any_process_and_directory(tmp_path, tiny_hf_model):
    """steps.train.model.save_adapter in two processes (other PYTHONHASHSEED) on copies of one base
    in two directories: peft wrote target_modules in set order and the base's absolute path
    (adapter_config.json, README.md)."""
    outs = []
    for seed in ("1", "2"):
        out = tmp_path / f"adapter-{seed}"
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(REPO))
        subprocess.run([sys.executable, "-c", _SAVE_ADAPTER, str(tiny_hf_model),
                        str(tmp_path / f"base-{seed}"), str(out)], check=True, env=env, cwd=REPO,
                       timeout=300)
        outs.append(out)
    a, b = ({p.relative_to(o).as_posix(): p.read_bytes() for p in sorted(o.rglob("*"))
             if p.is_file()} for o in outs)
    assert sorted(a) == sorted(b) and "README.md" not in a
    assert [f for f in a if a[f] != b[f]] == []
    cfg = json.loads(a["adapter_config.json"])
    assert cfg["target_modules"] == sorted(cfg["target_modules"])
    assert cfg["base_model_name_or_path"] is None
    for data in a.values():
        assert str(tmp_path).encode() not in data

    # the readers pass the base explicitly, so they do not need the path peft recorded
    from peft import PeftModel

    from steps.merge import merge_adapters
    from steps.train.model import load_base

    model, _ = load_base(tiny_hf_model, [outs[0]])      # what SFT does with a pt adapter
    assert model is not None
    base, _ = load_base(tiny_hf_model)
    assert isinstance(PeftModel.from_pretrained(base, outs[0]), PeftModel)   # evaluate's way
    merge_adapters(tiny_hf_model, [outs[0]], tmp_path / "merged")
    assert (tmp_path / "merged" / "merge_info.json").is_file()


# Runs one demo lifecycle in its own process, with the PYTHONHASHSEED the test gives it.
_RUN_DEMO = "import sys; from pipelines.demo import run_demo; run_demo(sys.argv[1])"


def _differences(a: dict, b: dict) -> dict:
    """label -> the files (not DIGEST_EXCLUDE) whose sha256 differs between two workspaces."""
    out = {}
    for label, ra in a.items():
        rb = b.get(label)
        if rb is None or ra["digest"] != rb["digest"]:
            if rb is None:
                out[label] = "missing"
                continue
            ma, mb = (json.loads((Path(r["artifact"]) / "manifest.json").read_text())
                      for r in (ra, rb))
            fa, fb = ({f["path"]: f.get("sha256") for f in m["files"]} for m in (ma, mb))
            skip = set(ma.get("digest_exclude", ()))
            out[label] = sorted(p for p in set(fa) | set(fb) if p not in skip and fa.get(p) != fb.get(p))
    return out


@pytest.mark.slow
def test_demo_in_two_workspaces_and_processes_gives_the_same_digests(tmp_path, prefect_harness):
    """The demo lifecycle in two workspace directories, in two processes with other
    PYTHONHASHSEED values, one after the other: every stage's artifact digest is the same.

    Both workspaces get one copy of the synthetic source (pipelines/demo.py makes it, and the
    SentencePiece model it trains records where it was written, so two fresh sources differ in
    that one field). The stages are what is tested: the same source must give the same bytes."""
    from prefect.settings import PREFECT_API_URL

    from pipelines.config import load_config
    from pipelines.demo import make_demo_source

    src = make_demo_source(tmp_path / "source", load_config(["recipe=demo"])["model"])
    latest = []
    for ws, seed in ((tmp_path / "ws-one", "1"), (tmp_path / "second" / "workspace", "4242")):
        shutil.copytree(src, ws / "demo-source")
        env = dict(os.environ, PYTHONHASHSEED=seed, PREFECT_API_URL=PREFECT_API_URL.value(),
                   PYTHONPATH=str(REPO))
        subprocess.run([sys.executable, "-c", _RUN_DEMO, str(ws)], check=True, env=env, cwd=REPO,
                       timeout=900)
        latest.append(json.loads((ws / "latest.json").read_text())["stages"])
    a, b = latest
    assert sorted(a) == sorted(b) and len(a) >= 17
    assert _differences(a, b) == {}
    # and no artifact file holds either workspace's path or a temp dir of the run
    for ws, stages in zip((tmp_path / "ws-one", tmp_path / "second" / "workspace"), latest):
        for label, r in stages.items():
            m = json.loads((Path(r["artifact"]) / "manifest.json").read_text())
            for f in m["files"]:
                if f["path"] in m.get("digest_exclude", ()) or f["size"] > 4 << 20:
                    continue
                data = (Path(r["artifact"]) / f["path"]).read_bytes()
                assert str(ws).encode() not in data, (label, f["path"])
