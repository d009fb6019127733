"""steps.meta: Meta layout facts (FFN sizes, rotary permutation, shard dims) and HF <-> Meta
round trips, bit for bit."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from steps.convert import convert_meta_to_hf
from steps.meta import (MetaFormatError, MetaParams, hf_to_meta, permute, save_meta_checkpoint,
                        unpermute)

PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32,
          "norm_eps": 1e-5, "vocab_size": 323}


def test_permute_is_the_rotary_reordering_and_unpermute_inverts_it():
    heads, hd, cols = 3, 8, 5
    w = torch.randn(heads * hd, cols)
    p = permute(w, heads)
    for h in range(heads):
        for j in range(hd):  # HF row j = Meta row 2j (first half) / 2(j - hd/2) + 1 (second half)
            src = 2 * j if j < hd // 2 else 2 * (j - hd // 2) + 1
            assert torch.equal(p[h * hd + j], w[h * hd + src])
    assert torch.equal(unpermute(p, heads), w)
    assert torch.equal(permute(unpermute(w, heads), heads), w)
    assert not torch.equal(p, w)


def _random_state(p: MetaParams, vocab: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g).to(torch.bfloat16) for n, s in p.shapes(vocab).items()}


def _read_hf(hf_dir) -> dict:
    out = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        out |= load_file(f)
    return out


@pytest.mark.parametrize("n_shards", [1, 2, 3])
def test_save_convert_hf_to_meta_round_trip_is_bit_identical(tmp_path, tiny_sp_model, n_shards):
    p = MetaParams.from_dict(PARAMS)
    state = _random_state(p, 323, seed=n_shards)
    meta = save_meta_checkpoint(state, p, tmp_path / "meta", n_shards, tiny_sp_model)
    shards = [torch.load(meta / f"consolidated.{r:02d}.pth", weights_only=True)
              for r in range(n_shards)]
    assert len(list(meta.glob("consolidated.*.pth"))) == n_shards
    rows = [sd["output.weight"].shape[0] for sd in shards]
    assert rows == {1: [323], 2: [162, 161], 3: [108, 108, 107]}[n_shards]
    # fairscale's layout: embeddings split on the embedding dim, wo/w2 on their input dim
    assert [sd["tok_embeddings.weight"].shape[1] for sd in shards] == \
        {1: [64], 2: [32, 32], 3: [22, 21, 21]}[n_shards]
    assert sum(sd["layers.0.feed_forward.w2.weight"].shape[1] for sd in shards) == p.ffn_dim
    assert all(torch.equal(sd["layers.1.ffn_norm.weight"], state["layers.1.ffn_norm.weight"])
               for sd in shards)

    hf = convert_meta_to_hf(meta, tmp_path / "hf", dtype="bfloat16")
    hf_state = _read_hf(hf)
    assert len(hf_state) == len(state)
    # q/k really are in HF order in the file (not just an identity both ways)
    assert torch.equal(hf_state["model.layers.0.self_attn.k_proj.weight"],
                       permute(state["layers.0.attention.wk.weight"], p.kv_heads))
    back = hf_to_meta(hf_state, json.loads((meta / "params.json").read_text()))
    assert set(back) == set(state)
    for name, t in state.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name


def test_fp32_to_fp16_cast_is_the_only_change(tmp_path, tiny_sp_model):
    p = MetaParams.from_dict(PARAMS | {"vocab_size": -1})
    g = torch.Generator().manual_seed(5)
    state = {n: torch.randn(s, generator=g) for n, s in p.shapes(320).items()}
    meta = save_meta_checkpoint(state, p, tmp_path / "meta", 2, tiny_sp_model)
    back = hf_to_meta(_read_hf(convert_meta_to_hf(meta, tmp_path / "hf", dtype="float16")), p)
    for name, t in state.items():
        assert torch.equal(back[name], t.half()), name


FFN = {"llama-7b": 11008, "llama-13b": 13824, "llama-30b": 17920, "llama-65b": 22016,
       "llama2-7b": 11008, "llama2-13b": 13824, "llama2-70b": 28672}
SHARDS = {"llama-7b": 1, "llama-13b": 2, "llama-30b": 4, "llama-65b": 8, "llama2-7b": 1,
          "llama2-13b": 2, "llama2-70b": 8}


def test_conf_model_params_give_meta_ffn_sizes():
    from pipelines.config import load_config

    for name, ffn in FFN.items():
        model = load_config([f"model={name}"])["model"]
        p = MetaParams.from_dict(model["params"], f"conf/model/{name}.yaml")
        assert p.ffn_dim == ffn, name
        assert model["n_shards"] == SHARDS[name], name
        assert p.vocab_size == -1 and p.rope_theta == 10000.0
        assert p.norm_eps == (1e-6 if name in ("llama-7b", "llama-13b", "llama-30b") else 1e-5), name
    assert MetaParams.from_dict(load_config(["model=llama2-70b"])["model"]["params"]).kv_heads == 8


@pytest.mark.parametrize("change, field", [
    ({"norm_eps": None}, "norm_eps"),
    ({"multiple_of": None}, "multiple_of"),
    ({"n_heads": "32"}, "n_heads"),
    ({"dim": 0}, "dim"),
    ({"vocab_size": -2}, "vocab_size"),
    ({"norm_eps": -1e-5}, "norm_eps"),
    ({"ffn_dim_multiplier": "1.3"}, "ffn_dim_multiplier"),
    ({"n_kv_heads": 3}, "n_kv_heads"),
    ({"use_scaled_rope": True}, "use_scaled_rope"),
])
def test_params_errors_name_file_and_field(tmp_path, change, field):
    d = dict(PARAMS)
    for k, v in change.items():
        if v is None:
            d.pop(k)
        else:
            d[k] = v
    path = tmp_path / "7B" / "params.json"
    path.parent.mkdir()
    path.write_text(json.dumps(d))
    with pytest.raises(MetaFormatError) as e:
        MetaParams.from_file(path)
    assert str(path) in str(e.value) and field in str(e.value), str(e.value)


def test_params_file_errors(tmp_path, shared_data):
    with pytest.raises(MetaFormatError, match="params.json not found"):
        MetaParams.from_file(tmp_path / "params.json")
    (tmp_path / "params.json").write_text("[1, 2]")
    with pytest.raises(MetaFormatError, match="expected a JSON object"):
        MetaParams.from_file(tmp_path / "params.json")
    # Meta's real 7B params.json parses to LLaMA-1's values; Llama 3.1's is refused by name
    p = MetaParams.from_file(shared_data / "models" / "llama-7b_params.json")
    assert (p.dim, p.n_layers, p.n_heads, p.norm_eps, p.ffn_dim, p.vocab_size) == \
        (4096, 32, 32, 1e-6, 11008, -1)
    with pytest.raises(MetaFormatError, match="use_scaled_rope"):
        MetaParams.from_file(shared_data / "models" / "llama31_8b_params.json")
