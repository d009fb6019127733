"""merge stage: fidelity against peft, vocabulary growth, validation before writing, formats."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from steps import merge
from steps.checks import VocabMismatch
from steps.merge import MergeError, merge_adapters
from steps.tokenizer import save_hf_tokenizer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PT_VOCAB = 352          # stands in for Chinese-LLaMA's 49953 (base 320 stands in for 32000)


def _load(model_dir, vocab=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if vocab is not None and vocab != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(vocab, mean_resizing=False)
    return model.eval()


def _make_adapter(model, out: Path, *, seed: int, r: int = 4, alpha: int = 8,
                  modules_to_save=("embed_tokens", "lm_head"), **lora_kwargs) -> Path:
    """A peft LoRA on all 7 projections with non-zero B (zero at init) and perturbed saved
    modules, as if trained."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS,
                     modules_to_save=list(modules_to_save) or None, **lora_kwargs)
    peft_model = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_hf_model):
    """pt: 320 -> 352 rows (modules_to_save); sft: trained on base + pt, 353 rows (+[PAD])."""
    from peft import PeftModel

    from tests.tiny import train_tiny_tokenizer

    root = tmp_path_factory.mktemp("adapters")
    sp_pt = train_tiny_tokenizer(root / "sp_pt" / "tokenizer.model", vocab_size=PT_VOCAB)
    pt = _make_adapter(_load(tiny_hf_model, PT_VOCAB), root / "pt", seed=1)
    assert save_hf_tokenizer(sp_pt, pt) == PT_VOCAB

    base_pt = PeftModel.from_pretrained(_load(tiny_hf_model, PT_VOCAB), pt).merge_and_unload()
    base_pt.resize_token_embeddings(PT_VOCAB + 1, mean_resizing=False)
    # a different rank, alpha and a per-module pattern, as the recipe's SFT LoRA differs from PT's
    sft = _make_adapter(base_pt, root / "sft", seed=2, r=8, alpha=32,
                        rank_pattern={"down_proj": 2}, alpha_pattern={"down_proj": 4})
    assert save_hf_tokenizer(sp_pt, sft, pad_token="[PAD]") == PT_VOCAB + 1
    return {"pt": pt, "sft": sft}


def _ids(vocab: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 24), generator=g)
    ids[:, -4:] = torch.arange(vocab - 4, vocab)   # the newest rows ([PAD] included) are exercised
    return ids


def _logits(model, vocab):
    with torch.no_grad():
        return model(_ids(vocab)).logits


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_single_adapter_matches_peft_unmerged(tmp_path, tiny_hf_model, adapters):
    from peft import PeftModel

    out = merge_adapters(tiny_hf_model, [adapters["pt"]], tmp_path / "m")
    ref = PeftModel.from_pretrained(_load(tiny_hf_model, PT_VOCAB), adapters["pt"]).eval()
    got = _load(out)
    diff = (_logits(got, PT_VOCAB) - _logits(ref, PT_VOCAB)).abs().max().item()
    assert diff <= 1e-4, diff
    # the merge really changed the base: the unmerged LoRA path is not the identity
    base_logits = _logits(_load(tiny_hf_model, PT_VOCAB), PT_VOCAB)
    assert (_logits(got, PT_VOCAB) - base_logits).abs().max().item() > 1e-2
    assert json.loads((out / "config.json").read_text())["vocab_size"] == PT_VOCAB
    from steps.checks import check_model
    v = check_model(out)
    assert (v.tokenizer, v.embed_rows, v.lm_head_rows) == (PT_VOCAB, PT_VOCAB, PT_VOCAB)


def test_two_adapters_in_order_match_peft(tmp_path, tiny_hf_model, adapters):
    """pt then sft (sft trained on base + pt): 320 -> 352 -> 353 rows, the tokenizer is sft's."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    cfg = merge.Config()
    result = merge.run(cfg, tmp_path / "m", base=tiny_hf_model,
                       adapters=[adapters["pt"], adapters["sft"]])
    out = tmp_path / "m"
    assert all(isinstance(v, (str, int, float)) for v in result.values())   # MLflow-loggable
    parent = adapters["pt"].parent.name
    assert result["order"] == f"{parent}/pt,{parent}/sft"
    assert result["vocab_size"] == PT_VOCAB + 1
    # 2 layers x 7 targets per adapter; embed_tokens + lm_head replaced by each
    assert result["lora_deltas_applied"] == 28 and result["tensors_replaced"] == 4

    ref = PeftModel.from_pretrained(_load(tiny_hf_model, PT_VOCAB), adapters["pt"]).merge_and_unload()
    ref.resize_token_embeddings(PT_VOCAB + 1, mean_resizing=False)
    ref = PeftModel.from_pretrained(ref, adapters["sft"]).eval()   # sft applied unmerged
    got = _load(out)
    diff = (_logits(got, PT_VOCAB + 1) - _logits(ref, PT_VOCAB + 1)).abs().max().item()
    assert diff <= 1e-4, diff

    info = json.loads((out / "merge_info.json").read_text())
    from steps.digests import adapter_digest
    digests = [adapter_digest(adapters["pt"]), adapter_digest(adapters["sft"])]
    assert info["order"] == digests and [a["digest"] for a in info["adapters"]] == digests
    assert info["tokenizer_from"] == digests[1]      # sft's tokenizer (with [PAD]) wins
    text = (out / "merge_info.json").read_text()      # no path: the same merge, the same bytes
    assert str(adapters["pt"].parent) not in text and str(tiny_hf_model) not in text
    assert [a["r"] for a in info["adapters"]] == [4, 8]
    assert info["adapters"][1]["ranks"] == [2, 8]     # rank_pattern honoured
    assert info["adapters"][0]["targets"] == sorted(TARGETS)
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == PT_VOCAB + 1 and tok.pad_token == "[PAD]"
    assert json.loads((out / "config.json").read_text())["vocab_size"] == PT_VOCAB + 1
    assert (out / "generation_config.json").is_file() and (out / "tokenizer.model").is_file()


def test_merge_formula_with_fan_in_fan_out_and_rslora(tmp_path, tiny_hf_model):
    """W += T(B A) * alpha/sqrt(r) computed by hand from the saved tensors."""
    from safetensors.torch import load_file

    ad = tmp_path / "ad"
    _make_adapter(_load(tiny_hf_model), ad, seed=3, r=4, alpha=8, modules_to_save=(),
                  use_rslora=True)
    # peft refuses fan_in_fan_out on nn.Linear, so flip the flag and transpose the saved pair:
    # a Conv1D-style (in, out) adapter must give the same merged weights.
    sd = load_file(str(ad / "adapter_model.safetensors"))
    flipped = tmp_path / "flipped"
    flipped.mkdir()
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["fan_in_fan_out"] = True
    (flipped / "adapter_config.json").write_text(json.dumps(cfg))
    from safetensors.torch import save_file
    swapped = {}
    for k, v in sd.items():
        if k.endswith("lora_A.weight"):
            swapped[k] = sd[k.replace("lora_A", "lora_B")].T.contiguous()
        else:
            swapped[k] = sd[k.replace("lora_B", "lora_A")].T.contiguous()
    save_file(swapped, str(flipped / "adapter_model.safetensors"))

    a = _tensors(merge_adapters(tiny_hf_model, [ad], tmp_path / "a"))
    b = _tensors(merge_adapters(tiny_hf_model, [flipped], tmp_path / "b"))
    base = _tensors(tiny_hf_model)
    key = "model.layers.1.mlp.down_proj.weight"
    A = sd[f"base_model.model.{key[:-7]}.lora_A.weight"]
    B = sd[f"base_model.model.{key[:-7]}.lora_B.weight"]
    expected = base[key] + (B @ A) * (8 / 4 ** 0.5)
    torch.testing.assert_close(a[key], expected, rtol=0, atol=1e-6)
    for k in base:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_multi_shard_base_and_output(tmp_path, tiny_hf_model, adapters):
    """A base saved as several safetensors shards + index; sharded output with an index
    (docs/recipe.md, "Merge bases are safetensors, in any number of shards")."""
    sharded = tmp_path / "base"
    _load(tiny_hf_model).save_pretrained(sharded, max_shard_size="100KB")
    for f in tiny_hf_model.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copyfile(f, sharded / f.name)
    assert len(list(sharded.glob("*.safetensors"))) > 2
    assert (sharded / "model.safetensors.index.json").is_file()

    single = merge_adapters(tiny_hf_model, [adapters["pt"], adapters["sft"]], tmp_path / "one",
                            check_base_digest=False)
    multi = merge_adapters(sharded, [adapters["pt"], adapters["sft"]], tmp_path / "many",
                           max_shard_size="150KB", check_base_digest=False)
    shards = sorted(multi.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and all(f.stat().st_size <= 150_000 + 200_000 for f in shards)
    index = json.loads((multi / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in shards}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in _tensors(multi).values())
    a, b = _tensors(single), _tensors(multi)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and transformers reads the sharded output
    torch.testing.assert_close(_logits(_load(multi), PT_VOCAB + 1),
                               _logits(_load(single), PT_VOCAB + 1), rtol=0, atol=0)


def test_output_dtype(tmp_path, tiny_hf_model, adapters):
    out = merge_adapters(tiny_hf_model, [adapters["pt"]], tmp_path / "m", dtype="bfloat16")
    t32 = _tensors(merge_adapters(tiny_hf_model, [adapters["pt"]], tmp_path / "f"))
    t16 = _tensors(out)
    assert all(t.dtype == torch.bfloat16 for t in t16.values())
    assert all(torch.equal(t16[k], t32[k].bfloat16()) for k in t32)   # fp32 math, one rounding
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def _assert_nothing_written(out: Path):
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


def test_wrong_order_fails_before_writing(tmp_path, tiny_hf_model, adapters):
    out = tmp_path / "m"
    with pytest.raises(VocabMismatch, match=r"353 rows.*shrink|shrink") as e:
        merge_adapters(tiny_hf_model, [adapters["sft"], adapters["pt"]], out)
    assert str(adapters["pt"]) in str(e.value) and "352" in str(e.value)
    _assert_nothing_written(out)


def test_adapter_from_another_base(tmp_path, tiny_sp_model, adapters):
    """An adapter trained on a base with another FFN width: the error names module and shapes."""
    from tests.tiny import make_tiny_hf_model

    other = make_tiny_hf_model(tmp_path / "other", tiny_sp_model, intermediate=96)
    out = tmp_path / "m"
    with pytest.raises(MergeError) as e:
        merge_adapters(other, [adapters["pt"]], out, check_base_digest=False)
    msg = str(e.value)
    assert str(adapters["pt"]) in msg and "model.layers.0.mlp.down_proj.weight" in msg
    assert "[64, 128]" in msg and "[64, 96]" in msg
    _assert_nothing_written(out)


def test_missing_files(tmp_path, tiny_hf_model, adapters):
    broken = tmp_path / "no_weights"
    broken.mkdir()
    shutil.copyfile(adapters["pt"] / "adapter_config.json", broken / "adapter_config.json")
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        merge_adapters(tiny_hf_model, [adapters["pt"], broken], tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        merge_adapters(tiny_hf_model, [tmp_path / "nowhere"], tmp_path / "m")
    _assert_nothing_written(tmp_path / "m")


@pytest.mark.parametrize("damage", ["truncated", "html"])
def test_unreadable_base_shard_names_the_file(tmp_path, tiny_hf_model, adapters, damage):
    """Headers are read by steps.safetensors_io.read_header: a damaged file is named."""
    base = tmp_path / "base"
    shutil.copytree(tiny_hf_model, base)
    raw = (base / "model.safetensors").read_bytes()
    (base / "model.safetensors").write_bytes(raw[: len(raw) // 2] if damage == "truncated" else
                                             b"<html><body>403 Forbidden</body></html>")
    with pytest.raises(ValueError, match=r"model\.safetensors: (truncated|not a safetensors file)"):
        merge_adapters(base, [adapters["pt"]], tmp_path / "m", check_base_digest=False)
    _assert_nothing_written(tmp_path / "m")


def test_vocab_growth_without_tokenizer(tmp_path, tiny_hf_model, adapters):
    bare = tmp_path / "pt_no_tok"
    bare.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copyfile(adapters["pt"] / f, bare / f)
    with pytest.raises(MergeError, match="from 320 to 352 rows but carries no tokenizer"):
        merge_adapters(tiny_hf_model, [bare], tmp_path / "m")
    _assert_nothing_written(tmp_path / "m")


def test_unsupported_adapter_types(tmp_path, tiny_hf_model):
    from peft import IA3Config, get_peft_model

    ia3 = tmp_path / "ia3"
    get_peft_model(_load(tiny_hf_model), IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                   feedforward_modules=["down_proj"])
                   ).save_pretrained(ia3)
    with pytest.raises(MergeError, match="peft_type='IA3'"):
        merge_adapters(tiny_hf_model, [ia3], tmp_path / "m")
    dora = _make_adapter(_load(tiny_hf_model), tmp_path / "dora", seed=4, modules_to_save=(),
                         use_dora=True)
    with pytest.raises(MergeError, match="use_dora"):
        merge_adapters(tiny_hf_model, [dora], tmp_path / "m")
    _assert_nothing_written(tmp_path / "m")


def test_provenance_recorded_by_training(tmp_path, tiny_hf_model, adapters):
    """training_info.json (steps.train) names the base digest and the adapters merged in before
    training: a different base or a missing earlier adapter is refused (docs/recipe.md, "An
    adapter merges only onto the base it was trained on")."""
    from steps.digests import adapter_digest, base_digest

    pt, sft = tmp_path / "pt", tmp_path / "sft"
    shutil.copytree(adapters["pt"], pt)
    shutil.copytree(adapters["sft"], sft)
    (pt / "training_info.json").write_text(json.dumps(
        {"base_digest": base_digest(tiny_hf_model), "adapters_applied": []}))
    (sft / "training_info.json").write_text(json.dumps(
        {"base_digest": base_digest(tiny_hf_model),
         "adapters_applied": [{"path": str(pt), "digest": adapter_digest(pt)}]}))
    merge_adapters(tiny_hf_model, [pt, sft], tmp_path / "ok")       # the right base and order

    other_base = tmp_path / "other_base"
    shutil.copytree(tiny_hf_model, other_base)
    cfg = json.loads((other_base / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-6        # same shapes, another model
    (other_base / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MergeError, match="only valid on the base"):
        merge_adapters(other_base, [pt, sft], tmp_path / "m")
    merge_adapters(other_base, [pt, sft], tmp_path / "forced", check_base_digest=False)

    # sft on base + an adapter it was not trained after: same vocab, so only provenance catches it
    pt2 = tmp_path / "pt2"
    shutil.copytree(pt, pt2)
    _make_adapter(_load(tiny_hf_model, PT_VOCAB), pt2, seed=9)   # other weights, same shapes
    with pytest.raises(MergeError, match="training order"):
        merge_adapters(tiny_hf_model, [pt2, sft], tmp_path / "m")
    _assert_nothing_written(tmp_path / "m")


@pytest.fixture(scope="module")
def plain_adapters(tmp_path_factory, tiny_hf_model):
    """Two LoRAs of equal rank on the same base, no modules_to_save (what peft can combine)."""
    root = tmp_path_factory.mktemp("plain")
    return [_make_adapter(_load(tiny_hf_model), root / f"a{i}", seed=10 + i, modules_to_save=())
            for i in range(2)]


@pytest.mark.parametrize("strategy,density", [("linear", None), ("cat", None), ("ties", 0.5),
                                              ("dare_linear", 0.5), ("dare_ties", 0.5)])
def test_weighted_strategies_equal_peft(tmp_path, tiny_hf_model, plain_adapters, strategy, density):
    from peft import PeftModel

    weights = [0.7, 0.4]
    out = merge_adapters(tiny_hf_model, plain_adapters, tmp_path / "m", strategy=strategy,
                         weights=weights, density=density, seed=5)
    # peft's own add_weighted_adapter + merge_and_unload, written out here
    pm = PeftModel.from_pretrained(_load(tiny_hf_model), plain_adapters[0], adapter_name="x")
    pm.load_adapter(plain_adapters[1], adapter_name="y")
    torch.manual_seed(5)
    pm.add_weighted_adapter(["x", "y"], weights, "w", combination_type=strategy,
                            **({"density": density} if density else {}))
    pm.set_adapter("w")
    ref = pm.merge_and_unload().state_dict()
    got = _tensors(out)
    base = _tensors(tiny_hf_model)
    assert got.keys() == base.keys()
    assert all(torch.equal(got[k], ref[k]) for k in got)
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"],
                           base["model.layers.0.self_attn.q_proj.weight"])
    if strategy == "cat":   # cat is exact: W + sum_i w_i * (alpha/r) * B_i A_i
        seq = _tensors(merge_adapters(tiny_hf_model, plain_adapters, tmp_path / "s"))
        # the sequential merge is the weights=[1, 1] special case; rescale to compare
        key = "model.layers.1.mlp.up_proj.weight"
        from safetensors.torch import load_file
        sds = [load_file(str(p / "adapter_model.safetensors")) for p in plain_adapters]
        m = key[:-7]
        deltas = [sd[f"base_model.model.{m}.lora_B.weight"] @ sd[f"base_model.model.{m}.lora_A.weight"]
                  * 2.0 for sd in sds]
        torch.testing.assert_close(got[key], base[key] + 0.7 * deltas[0] + 0.4 * deltas[1],
                                   rtol=0, atol=1e-5)
        torch.testing.assert_close(seq[key], base[key] + deltas[0] + deltas[1], rtol=0, atol=1e-5)


def test_weighted_refuses_modules_to_save(tmp_path, tiny_hf_model, adapters, plain_adapters):
    with pytest.raises(MergeError, match="modules_to_save.*sequential"):
        merge_adapters(tiny_hf_model, [plain_adapters[0], adapters["pt"]], tmp_path / "m",
                       strategy="linear", check_base_digest=False)
    with pytest.raises(MergeError, match="density"):
        merge_adapters(tiny_hf_model, plain_adapters, tmp_path / "m", strategy="ties")
    _assert_nothing_written(tmp_path / "m")


def test_meta_output_round_trips_through_convert(tmp_path, tiny_hf_model, adapters):
    from steps import convert
    hf = merge_adapters(tiny_hf_model, [adapters["pt"], adapters["sft"]], tmp_path / "hf")
    for n_shards in (1, 2):
        out = merge_adapters(tiny_hf_model, [adapters["pt"], adapters["sft"]],
                             tmp_path / f"meta{n_shards}", output_format="meta",
                             meta_n_shards=n_shards)
        assert len(list(out.glob("consolidated.*.pth"))) == n_shards
        assert json.loads((out / "params.json").read_text())["vocab_size"] == PT_VOCAB + 1
        back = convert.convert_meta_to_hf(out, tmp_path / f"back{n_shards}", dtype="float32")
        a, b = _tensors(hf), _tensors(back)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_config_yaml_mirrors_config():
    import yaml

    conf = yaml.safe_load((Path(__file__).resolve().parents[1] / "conf" / "merge" /
                           "default.yaml").read_text())
    assert conf == merge.Config().model_dump()
