"""convert: Meta checkpoint -> HF LlamaForCausalLM, checked against Meta's own forward pass."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from steps.convert import Config, convert_meta_to_hf, run
from steps.meta import MetaFormatError, MetaParams, synthesize_checkpoint
from tests import meta_reference

REPO = Path(__file__).resolve().parents[1]
BASE = {"dim": 64, "n_layers": 2, "n_heads": 4, "multiple_of": 32, "norm_eps": 1e-5,
        "vocab_size": -1}


def _hf_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


CASES = {
    "1shard": ({}, 1),
    "2shards": ({}, 2),
    "gqa": ({"n_kv_heads": 2}, 1),
    "gqa_2shards": ({"n_kv_heads": 2}, 2),
    "ffn_multiplier": ({"ffn_dim_multiplier": 1.3, "multiple_of": 48, "n_kv_heads": 1}, 2),
    "vocab_fixed_eps6": ({"vocab_size": 330, "norm_eps": 1e-6}, 1),
    "rope_theta": ({"rope_theta": 500000.0, "n_kv_heads": 2}, 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_meta_reference(case, tmp_path, tiny_sp_model):
    overrides, n_shards = CASES[case]
    params = BASE | overrides
    meta = synthesize_checkpoint(tmp_path / "meta", params, tiny_sp_model, n_shards=n_shards,
                                 dtype=torch.float32, std=0.1)
    assert len(list(meta.glob("consolidated.*.pth"))) == n_shards
    hf = convert_meta_to_hf(meta, tmp_path / "hf", dtype="float32")

    state, p = meta_reference.load_meta(meta)
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["intermediate_size"] == p.ffn_dim
    assert cfg["num_key_value_heads"] == p.kv_heads
    assert cfg["rms_norm_eps"] == p.norm_eps
    vocab = 330 if params["vocab_size"] == 330 else 320  # -1: the tokenizer's 320 pieces
    assert cfg["vocab_size"] == vocab == state["output.weight"].shape[0]
    if "ffn_multiplier" in case:
        assert p.ffn_dim == 48 * -(-int(1.3 * int(2 * 4 * 64 / 3)) // 48) == 240

    tokens = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(1))
    ref = meta_reference.forward(state, p, tokens)
    got = _hf_logits(hf, tokens)
    diff = (ref - got).abs().max().item()
    assert diff <= 1e-4, f"{case}: max |HF - Meta reference| = {diff}"
    assert ref.abs().max() > 0.1  # logits are not trivially zero


def test_rope_theta_reaches_the_hf_model(tmp_path, tiny_sp_model):
    """transformers 5 reads rope_parameters; a model that silently used 10000 would give other
    logits, so compare against the reference at the wrong theta too."""
    params = BASE | {"rope_theta": 500000.0}
    meta = synthesize_checkpoint(tmp_path / "meta", params, tiny_sp_model, dtype=torch.float32,
                                 std=0.3)
    hf = convert_meta_to_hf(meta, tmp_path / "hf", dtype="float32")
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["rope_parameters"]["rope_theta"] == 500000.0
    state, p = meta_reference.load_meta(meta)
    tokens = torch.randint(0, 320, (1, 64), generator=torch.Generator().manual_seed(2))
    got = _hf_logits(hf, tokens)
    right = (meta_reference.forward(state, p, tokens) - got).abs().max().item()
    wrong_p = MetaParams(**{**p.__dict__, "rope_theta": 10000.0})
    wrong = (meta_reference.forward(state, wrong_p, tokens) - got).abs().max().item()
    assert right <= 1e-4 < 1e-2 < wrong, (right, wrong)


def test_bf16_output_and_sharded_files(tmp_path, tiny_sp_model):
    meta = synthesize_checkpoint(tmp_path / "meta", BASE, tiny_sp_model, n_shards=2)
    hf = convert_meta_to_hf(meta, tmp_path / "hf", dtype="bfloat16", max_shard_size="40KB",
                            context_length=4096)
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in hf.glob("*.safetensors"))
    assert len(files) > 2 and set(index["weight_map"].values()) == set(files)
    cfg = json.loads((hf / "config.json").read_text())
    assert (cfg["dtype"], cfg["max_position_embeddings"]) == ("bfloat16", 4096)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf)
    assert next(model.parameters()).dtype == torch.bfloat16
    gen = json.loads((hf / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)
    assert (hf / "tokenizer.model").read_bytes() == tiny_sp_model.read_bytes()


def _lines(path: Path, n: int, encoding="utf-8") -> list[str]:
    out = []
    for line in path.read_text(encoding=encoding).splitlines():
        if line.strip():
            out.append(line)
        if len(out) == n:
            break
    return out


def test_llama_tokenizer_ids_match_sentencepiece(tmp_path, llama_tokenizer, shared_data):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    params = {"dim": 32, "n_layers": 1, "n_heads": 2, "multiple_of": 32, "norm_eps": 1e-5,
              "vocab_size": -1}
    meta = synthesize_checkpoint(tmp_path / "meta", params, llama_tokenizer)
    hf = convert_meta_to_hf(meta, tmp_path / "hf")
    assert json.loads((hf / "config.json").read_text())["vocab_size"] == 32000
    tok = AutoTokenizer.from_pretrained(hf)
    sp = spm.SentencePieceProcessor(model_file=str(llama_tokenizer))
    lines = (_lines(shared_data / "eval/wikitext-2-raw/wiki.test.raw", 300)
             + _lines(shared_data / "corpora/CLUECorpusSmall_sampled.txt", 300))
    assert len(lines) == 600
    bad = [ln for ln in lines if tok(ln)["input_ids"] != [1] + sp.encode(ln)]
    assert not bad, f"{len(bad)} lines differ, e.g. {bad[0][:80]!r}"
    assert tok.decode(tok(lines[0])["input_ids"], skip_special_tokens=True) == sp.decode(sp.encode(lines[0]))


# ----------------------------------------------------------------------------- bad inputs

def _meta(tmp_path, tok, n_shards=2, **over):
    return synthesize_checkpoint(tmp_path / "meta", BASE | over, tok, n_shards=n_shards)


def _assert_fails_clean(meta, out, match):
    with pytest.raises(MetaFormatError, match=match):
        convert_meta_to_hf(meta, out)
    assert not out.exists() or not any(out.iterdir()), "an output file was written on bad input"


def test_missing_shard(tmp_path, tiny_sp_model):
    meta = _meta(tmp_path, tiny_sp_model, n_shards=3)
    (meta / "consolidated.01.pth").unlink()
    _assert_fails_clean(meta, tmp_path / "out", r"consolidated\.01\.pth.*missing")


def test_params_missing_field(tmp_path, tiny_sp_model):
    meta = _meta(tmp_path, tiny_sp_model)
    d = json.loads((meta / "params.json").read_text())
    del d["norm_eps"]
    (meta / "params.json").write_text(json.dumps(d))
    _assert_fails_clean(meta, tmp_path / "out", r"params\.json.*norm_eps")


def test_params_not_json(tmp_path, tiny_sp_model):
    meta = _meta(tmp_path, tiny_sp_model)
    (meta / "params.json").write_text("<html><body>AccessDenied</body></html>")
    _assert_fails_clean(meta, tmp_path / "out", r"params\.json is not JSON")


def test_shard_with_wrong_shape(tmp_path, tiny_sp_model):
    meta = _meta(tmp_path, tiny_sp_model)
    sd = torch.load(meta / "consolidated.01.pth", weights_only=True)
    sd["layers.1.feed_forward.w2.weight"] = sd["layers.1.feed_forward.w2.weight"][:, :-8].clone()
    torch.save(sd, meta / "consolidated.01.pth")
    _assert_fails_clean(meta, tmp_path / "out", r"layers\.1\.feed_forward\.w2\.weight has shape")


@pytest.mark.parametrize("damage", ["truncated", "html"])
def test_unreadable_shard(tmp_path, tiny_sp_model, damage):
    meta = _meta(tmp_path, tiny_sp_model)
    shard = meta / "consolidated.01.pth"
    raw = shard.read_bytes()
    shard.write_bytes(raw[: len(raw) // 2] if damage == "truncated" else
                      b"<html><body>403 Forbidden</body></html>")
    _assert_fails_clean(meta, tmp_path / "out",
                        r"consolidated\.01\.pth: not a readable PyTorch weights file")


@pytest.mark.parametrize("vocab_field", [-1, 300])
def test_tokenizer_with_more_pieces_than_rows(tmp_path, tiny_sp_model, vocab_field):
    # 300 embedding rows, a 320-piece tokenizer: ids 300..319 would index past the embedding.
    meta = _meta(tmp_path, tiny_sp_model, vocab_size=300)
    (meta / "params.json").write_text(json.dumps(
        json.loads((meta / "params.json").read_text()) | {"vocab_size": vocab_field}))
    _assert_fails_clean(meta, tmp_path / "out", r"320 pieces.*300 rows")


def test_missing_tokenizer(tmp_path, tiny_sp_model):
    meta = _meta(tmp_path, tiny_sp_model)
    (meta / "tokenizer.model").unlink()
    _assert_fails_clean(meta, tmp_path / "out", r"tokenizer\.model not found")


# ----------------------------------------------------------------------------- stage entry

def test_run_stage_entry(tmp_path, tiny_sp_model):
    from pipelines.config import load_config

    conf = load_config(["model=tiny"])["convert"]
    assert set(conf) == set(Config.model_fields)  # conf/convert/default.yaml mirrors Config
    config = Config(**conf | {"dtype": "float32"})
    meta = synthesize_checkpoint(tmp_path / "meta", BASE | {"n_kv_heads": 2}, tiny_sp_model,
                                 n_shards=2, dtype=torch.float32)
    out = tmp_path / "out"
    out.mkdir()
    metrics = run(config, out, meta=meta)
    assert metrics["vocab_size"] == 320 and metrics["n_layers"] == 2 and metrics["n_shards_in"] == 2
    shapes = MetaParams.from_dict(BASE | {"n_kv_heads": 2}).shapes(320)
    assert metrics["params"] == sum(torch.Size(s).numel() for s in shapes.values())
    assert metrics["tensors"] == len(shapes)
    assert metrics["bytes"] == 4 * metrics["params"]
    assert (metrics["unk_id"], metrics["bos_id"], metrics["eos_id"]) == (0, 1, 2)
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 512
    assert not (out / "manifest.json").exists()
    for v in metrics.values():
        assert isinstance(v, (int, float, str))


# ----------------------------------------------------------------------------- memory

CHILD = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import torch, transformers, sentencepiece, safetensors  # noqa: F401  (the baseline)
    from steps.convert import convert_meta_to_hf

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    base = status("VmRSS")
    t0 = time.perf_counter()
    convert_meta_to_hf(Path(sys.argv[1]), Path(sys.argv[2]), dtype="bfloat16")
    print(json.dumps({"base": base, "hwm": status("VmHWM"), "seconds": time.perf_counter() - t0}))
""")


def test_peak_memory_well_under_checkpoint(tmp_path, tiny_sp_model):
    """A ~410 MB bf16 checkpoint converts with less than half of it added to the process' RSS
    (the whole model is never resident)."""
    params = {"dim": 1024, "n_layers": 16, "n_heads": 8, "multiple_of": 256, "norm_eps": 1e-5,
              "vocab_size": -1}
    meta = synthesize_checkpoint(tmp_path / "meta", params, tiny_sp_model, std=0.02)
    size = (meta / "consolidated.00.pth").stat().st_size
    assert 300e6 < size < 500e6
    proc = subprocess.run([sys.executable, "-c", CHILD, str(meta), str(tmp_path / "hf")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    added = r["hwm"] - r["base"]
    print(f"checkpoint {size / 1e6:.0f} MB, baseline RSS {r['base'] / 1e6:.0f} MB, peak "
          f"{r['hwm'] / 1e6:.0f} MB, added {added / 1e6:.0f} MB = {added / size:.2f}x, "
          f"{r['seconds']:.1f} s")
    assert added < 0.5 * size, f"conversion added {added / 1e6:.0f} MB RSS for a {size / 1e6:.0f} MB checkpoint"
    out = sum(f.stat().st_size for f in (tmp_path / "hf").glob("*.safetensors"))
    assert abs(out - size) < 0.01 * size
