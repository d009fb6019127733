"""conf/ composes for every model and recipe, with Meta's exact params; CLI override handling."""
import functools
import tempfile
from pathlib import Path

import pytest

from pipelines.cli import _hide_secrets
from pipelines.config import CONF_DIR, expand_sweep, load_config

FFN = {"llama-7b": 11008, "llama-13b": 13824, "llama-30b": 17920, "llama-65b": 22016,
       "llama2-7b": 11008, "llama2-13b": 13824, "llama2-70b": 28672}
SHARDS = {"llama-7b": 1, "llama-13b": 2, "llama-30b": 4, "llama-65b": 8,
          "llama2-7b": 1, "llama2-13b": 2, "llama2-70b": 8}


@pytest.mark.parametrize("model", sorted(FFN))
def test_model_groups_have_metas_exact_params(model):
    m = load_config([f"model={model}"])["model"]
    p = m["params"]
    assert m["n_shards"] == SHARDS[model]
    hidden = int(2 * 4 * p["dim"] / 3)
    hidden = int(p.get("ffn_dim_multiplier", 1.0) * hidden)
    assert p["multiple_of"] * -(-hidden // p["multiple_of"]) == FFN[model]
    assert p["vocab_size"] == -1
    assert p["norm_eps"] == (1e-6 if model in {"llama-7b", "llama-13b", "llama-30b"} else 1e-5)


@pytest.mark.parametrize("recipe", sorted(p.stem for p in (CONF_DIR / "recipe").glob("*.yaml")))
def test_every_recipe_composes(recipe):
    cfg = load_config([f"recipe={recipe}"])
    assert cfg["stages"][0] == "download"


def test_overrides_win_over_recipes():
    assert load_config(["recipe=demo", "model=llama-7b"])["model"]["name"] == "llama-7b"


def test_sweep_expands_to_the_cartesian_product():
    assert expand_sweep(["a=1,2", "b=x,y", "c=3"]) == [
        ["a=1", "b=x", "c=3"], ["a=1", "b=y", "c=3"], ["a=2", "b=x", "c=3"], ["a=2", "b=y", "c=3"]]


def test_presigned_url_on_the_command_line_moves_to_the_environment(monkeypatch):
    monkeypatch.setenv("LLAMAFLOW_SOURCE_URL", "")
    monkeypatch.delenv("LLAMAFLOW_SOURCE_URL")
    url = "https://dobf1k6cxlizq.cloudfront.net/*?Policy=abc&Signature=SECRET&Key-Pair-Id=K"
    out = _hide_secrets([f"source.url={url}", "model=llama-7b"])
    assert out == ["source.url=null", "source.url_env=LLAMAFLOW_SOURCE_URL", "model=llama-7b"]
    assert "SECRET" not in " ".join(out)
    import os
    assert os.environ["LLAMAFLOW_SOURCE_URL"] == url
    plain = "source.url=http://127.0.0.1:8000/"
    assert _hide_secrets([plain]) == [plain]


def test_a_quoted_presigned_url_is_caught_too(monkeypatch):
    monkeypatch.setenv("LLAMAFLOW_SOURCE_URL", "")
    monkeypatch.delenv("LLAMAFLOW_SOURCE_URL")
    out = _hide_secrets(["source.url='https://h.example/*?Policy=a=&Signature=SECRET'"])
    assert out == ["source.url=null", "source.url_env=LLAMAFLOW_SOURCE_URL"]


def test_other_spellings_of_a_secret_are_caught(monkeypatch):
    """Hydra's +/++ prefixes, and a tracking URI with a password or token: none becomes a flow
    parameter; config errors and redacted text show no userinfo or query of any scheme."""
    from pipelines.config import Problem
    from pipelines.tracking import redact

    # setenv first, so the variables _hide_secrets sets are undone after the test (delenv of an
    # unset variable records nothing to restore)
    for name in ("LLAMAFLOW_SOURCE_URL", "MLFLOW_TRACKING_URI"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    out = _hide_secrets(["++source.url=https://h.example/*?Signature=SECRET",
                         "tracking.tracking_uri=postgresql://mlflow:PASSWORD@db:5432/mlflow",
                         "tracking.tracking_uri=sqlite:////tmp/x.db"])
    assert out == ["source.url=null", "source.url_env=LLAMAFLOW_SOURCE_URL",
                   "tracking.tracking_uri=null", "tracking.tracking_uri=sqlite:////tmp/x.db"]
    import os
    assert os.environ["MLFLOW_TRACKING_URI"] == "postgresql://mlflow:PASSWORD@db:5432/mlflow"
    assert redact("s3://b/k?X-Amz-Signature=SECRET and mysql://u:PASSWORD@h/db") == \
        "s3://b/k and mysql://h/db"
    shown = str(Problem("source.url", "https://h.example/x?Signature=SECRET", "bad"))
    assert "SECRET" not in shown and "h.example/x" in shown


class _Run:
    """What runner._step_config reads of a lifecycle run."""
    def __init__(self, cfg, tmp_path):
        from pipelines.artifacts import HashCache

        self.cfg, self.hashes = cfg, HashCache(tmp_path / "hc.json")


def test_cache_key_config_ignores_speed_knobs_but_not_results(tmp_path):
    from pipelines.runner import _step_config

    def key_cfg(*overrides, extra=None):
        return _step_config(_Run(load_config(["recipe=demo", *overrides]), tmp_path),
                            "quantize", extra or {"qtype": "q4_0"})[2]

    assert key_cfg("quantize.nthread=0") == key_cfg("quantize.nthread=2")
    assert key_cfg() != key_cfg(extra={"qtype": "q8_0"})
    assert key_cfg() != key_cfg("quantize.pure=true")
    pt = lambda *o: _step_config(_Run(load_config(["recipe=demo", *o]), tmp_path), "pretrain", {})[2]
    assert pt("pretrain.launcher.timeout_s=60") == pt("pretrain.launcher.timeout_s=600")
    assert pt("pretrain.save_every=3") == pt("pretrain.save_every=7")
    assert pt("pretrain.lora.r=4") != pt()


def test_a_local_source_is_keyed_by_its_checklists_not_its_whole_folder(tmp_path):
    from pipelines.runner import _step_config

    root = tmp_path / "llama"
    (root / "7B").mkdir(parents=True)
    (root / "7B" / "checklist.chk").write_text("0" * 32 + "  consolidated.00.pth\n")
    (root / "tokenizer_checklist.chk").write_text("1" * 32 + "  tokenizer.model\n")
    cfg = lambda: load_config(["model=llama-7b", "source=local", f"source.path={root}"])
    before = _step_config(_Run(cfg(), tmp_path), "download", {})[2]
    (root / "13B").mkdir()
    (root / "13B" / "consolidated.00.pth").write_bytes(b"x" * 1000)  # another size beside it
    assert _step_config(_Run(cfg(), tmp_path), "download", {})[2] == before
    (root / "7B" / "checklist.chk").write_text("2" * 32 + "  consolidated.00.pth\n")
    assert _step_config(_Run(cfg(), tmp_path), "download", {})[2] != before


@pytest.mark.parametrize("launcher", sorted(p.stem for p in (CONF_DIR / "launcher").glob("*.yaml")))
def test_every_launcher_option_is_a_valid_stage_setting(launcher):
    from steps import pretrain, sft

    cfg = load_config([f"launcher@pretrain.launcher={launcher}", f"launcher@sft.launcher={launcher}"])
    pt, st = pretrain.Config.model_validate(cfg["pretrain"]), sft.Config.model_validate(cfg["sft"])
    assert pt.launcher == st.launcher
    assert (pt.launcher.strategy == "fsdp") == (launcher == "fsdp")


# -- every recipe x every launcher passes the flow-start validation (pipelines/validate.py) -----

# What a user adds to run a recipe that needs a real checkpoint (README: "Using it"); the data
# points at ../shared/data so the file checks run on real files.
@functools.lru_cache(maxsize=1)
def _upstream_layout(shared: str) -> Path:
    """LLaMA's pieces + <pad> + chinese_sp's, unused up to 256 x N: as Chinese-LLaMA-2's file."""
    from tests.tiny import upstream_layout_tokenizer

    tok = Path(tempfile.mkdtemp(prefix="upstream_layout_")) / "tokenizer.model"
    return upstream_layout_tokenizer(Path(shared) / "tokenizers" / "llama_tokenizer.model",
                                     Path(shared) / "tokenizers" / "chinese_sp.model", tok, 256)


def _needs(recipe: str, shared) -> list[str]:
    if recipe.startswith("chinese-"):
        model = ("llama2-7b" if "llama2" in recipe else
                 "llama3-8b" if recipe.endswith("-3") else "llama-7b")
        given = []
        if recipe == "chinese-llama2-alpaca2":  # upstream's own tokenizer file, laid out as it is
            given = [f"vocab.tokenizer={_upstream_layout(str(shared))}"]
        return [f"model={model}", "source=hf", "source.repo_id=x/y", "source.revision=main",
                f"pretrain.data=[{shared / 'corpora'}]",
                f"sft.data=[{shared / 'instructions' / 'alpaca_zh_demo.json'}]", *given]
    if recipe in ("demo", "demo-llama3"):   # as `llamaflow demo --http` runs it (never contacted)
        return ["source=url", "source.url=http://127.0.0.1:9/"]
    return []


@pytest.mark.parametrize("launcher", sorted(p.stem for p in (CONF_DIR / "launcher").glob("*.yaml")))
@pytest.mark.parametrize("recipe", sorted(p.stem for p in (CONF_DIR / "recipe").glob("*.yaml")))
def test_every_recipe_with_every_launcher_passes_validation(recipe, launcher, shared_data):
    from pipelines.validate import check

    cfg, checked = check([f"recipe={recipe}", *_needs(recipe, shared_data),
                          f"launcher@pretrain.launcher={launcher}", f"launcher@sft.launcher={launcher}"])
    assert checked[:6] == ["download", "convert", "vocab", "pretrain", "sft", "merge"]
    assert checked[-4:] == ["evaluate", "speed", "judge", "report"]
    assert {f"quantize[{q}]" for q in cfg["quantize"]["types"]} <= set(checked)
    assert cfg["pretrain"]["launcher"]["strategy"] == ("fsdp" if launcher == "fsdp" else "ddp")


@pytest.mark.parametrize("recipe", sorted(p.stem for p in (CONF_DIR / "recipe").glob("*.yaml")))
def test_every_recipe_config_validates_without_its_data(recipe):
    """check_files=False: the configs alone (a config meant for a machine holding the data)."""
    from pipelines.validate import validate

    cfg = load_config([f"recipe={recipe}", "source=hf", "source.repo_id=x/y", "source.revision=main"])
    assert validate(cfg, check_files=False)[-1] == "report"


# The upstream scripts' values the recipe comments cite (ymcui/Chinese-LLaMA-Alpaca-2 and -3,
# scripts/training/run_pt.sh, run_sft.sh, build_dataset.py), written out here on purpose.
UPSTREAM = {
    "chinese-llama2-alpaca2": {
        "pretrain": (2e-4, 64, 128, 512, 1.0), "sft": (1e-4, 64, 128, 512, 1.0),
        "template": "[INST] <<SYS>>\nYou are a helpful assistant. 你是一个乐于助人的助手。\n"
                    "<</SYS>>\n\n{instruction} [/INST]", "eos": None},
    "chinese-llama-alpaca-3": {
        "pretrain": (1e-4, 64, 128, 1024, 1.0), "sft": (1e-4, 64, 128, 512, 3.0),
        "template": "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant. "
                    "你是一个乐于助人的助手。<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
                    "{instruction}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
        "eos": "<|eot_id|>"},
}


@pytest.mark.parametrize("recipe", sorted(UPSTREAM))
def test_recipes_have_the_upstream_settings(recipe):
    from steps import pretrain, sft

    cfg = load_config([f"recipe={recipe}", "pretrain.data=[x]", "sft.data=[x]"])
    pt, st = pretrain.Config.model_validate(cfg["pretrain"]), sft.Config.model_validate(cfg["sft"])
    want = UPSTREAM[recipe]
    assert (pt.learning_rate, pt.lora.r, pt.lora.alpha, pt.block_size, pt.epochs) == want["pretrain"]
    assert (st.learning_rate, st.lora.r, st.lora.alpha, st.max_seq_length, st.epochs) == want["sft"]
    for c in (pt, st):
        assert (c.lora.dropout, c.lora.target_modules, c.lora.modules_to_save) == (
            0.05, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            ["embed_tokens", "lm_head"])
        assert (c.per_device_batch_size, c.gradient_accumulation_steps) == (1, 8)
    assert (pt.warmup_ratio, pt.weight_decay, st.warmup_ratio, st.weight_decay) == (0.05, 0.01, 0.03, 0)
    assert (st.prompt_template, st.eos_token) == (want["template"], want["eos"])
    if recipe.endswith("-3"):
        assert cfg["model"]["name"] == "llama3-8b" and cfg["vocab"]["mode"] == "none"
        assert st.prompt_template == sft.LLAMA3_CHAT_TEMPLATE
