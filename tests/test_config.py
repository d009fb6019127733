"""conf/ composes for every model and recipe, with Meta's exact params; CLI override handling."""
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
    monkeypatch.delenv("LLAMAFLOW_SOURCE_URL", raising=False)
    url = "https://dobf1k6cxlizq.cloudfront.net/*?Policy=abc&Signature=SECRET&Key-Pair-Id=K"
    out = _hide_secrets([f"source.url={url}", "model=llama-7b"])
    assert out == ["source.url=null", "source.url_env=LLAMAFLOW_SOURCE_URL", "model=llama-7b"]
    assert "SECRET" not in " ".join(out)
    import os
    assert os.environ["LLAMAFLOW_SOURCE_URL"] == url
    plain = "source.url=http://127.0.0.1:8000/"
    assert _hide_secrets([plain]) == [plain]
