"""An HF-format start (source=hf_model / local_hf): the convert stage's verifying import
(steps/hf_import.py), the two sources (steps/download.py), the flow-start check
(pipelines/validate.py) and the whole stories260K lifecycle started from its HF artifact."""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from steps import download as dl
from steps.convert import Config, convert_meta_to_hf, run
from steps.hf_import import HfFormatError, import_hf, inspect
from steps.meta import synthesize_checkpoint
from tests.http_fixtures import HubStub
from tests.test_download import TOKEN, hub_env  # noqa: F401  (the hub fixture: offline off, token)

PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32,
          "norm_eps": 1e-5, "vocab_size": -1}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out |= load_file(f)
    return out


def _weight_bytes(folder: Path) -> dict[str, bytes]:
    names = [*(p.name for p in folder.glob("*.safetensors")), "model.safetensors.index.json"]
    return {n: (folder / n).read_bytes() for n in names if (folder / n).is_file()}


@pytest.fixture(scope="module")
def hf_ckpt(tmp_path_factory, tiny_sp_model) -> Path:
    """An HF-format LLaMA (GQA) in 3+ safetensors shards with an index: what a Meta conversion
    writes, so importing it must give the same bytes back."""
    root = tmp_path_factory.mktemp("hf_ckpt")
    meta = synthesize_checkpoint(root / "meta", PARAMS, tiny_sp_model, n_shards=2,
                                 dtype=torch.float32, std=0.1)
    hf = convert_meta_to_hf(meta, root / "hf", dtype="float32", max_shard_size="60KB")
    assert len(list(hf.glob("*.safetensors"))) >= 3 and (hf / "model.safetensors.index.json").is_file()
    return hf


@pytest.fixture
def ckpt_copy(hf_ckpt, tmp_path) -> Path:
    return Path(shutil.copytree(hf_ckpt, tmp_path / "src"))


def test_import_writes_a_meta_conversions_layout_byte_for_byte(hf_ckpt, tmp_path):
    out = tmp_path / "out"
    metrics = run(Config(dtype="float32", max_shard_size="60KB"), out, meta=hf_ckpt)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in hf_ckpt.iterdir())
    assert _weight_bytes(out) == _weight_bytes(hf_ckpt)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (out / name).read_bytes() == (hf_ckpt / name).read_bytes(), name
    assert json.loads((out / "config.json").read_text()) == \
        json.loads((hf_ckpt / "config.json").read_text())
    assert metrics["source_format"] == "hf-safetensors" and metrics["vocab_size"] == 320
    assert metrics["n_shards_in"] == len(list(hf_ckpt.glob("*.safetensors")))


def test_import_casts_to_the_configured_dtype(hf_ckpt, tmp_path):
    out = tmp_path / "bf16"
    import_hf(hf_ckpt, out, dtype="bfloat16")
    src, got = _tensors(hf_ckpt), _tensors(out)
    assert set(got) == set(src)
    assert all(t.dtype == torch.bfloat16 and torch.equal(t, src[n].to(torch.bfloat16))
               for n, t in got.items())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def _edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _mistral(src: Path) -> str:
    _edit_json(src / "config.json", lambda c: c.update(model_type="mistral",
                                                       architectures=["MistralForCausalLM"]))
    return r"config.json: model_type 'mistral', architectures \['MistralForCausalLM'\]: not a LLaMA"


def _missing_shard(src: Path) -> str:
    shard = sorted(src.glob("*.safetensors"))[1]
    shard.unlink()
    return rf"model.safetensors.index.json: shard\(s\) \['{shard.name}'\] named in its weight_map"


def _tensor_not_in_its_shard(src: Path) -> str:
    index = src / "model.safetensors.index.json"
    first = sorted(src.glob("*.safetensors"))[0].name
    _edit_json(index, lambda d: d["weight_map"].update({"model.norm.weight": first}))
    return rf"{first}: tensor model.norm.weight missing \(the weight_map of model.safetensors.index"


def _vocab_size_disagrees(src: Path) -> str:
    _edit_json(src / "config.json", lambda c: c.update(vocab_size=999))
    return r"config.json: vocab_size 999 but model.embed_tokens.weight .* has 320 rows"


def _tokenizer_too_big(src: Path) -> str:
    from steps.tokenizer import save_hf_tokenizer
    from tests.tiny import train_tiny_tokenizer

    big = train_tiny_tokenizer(src.parent / "big" / "tokenizer.model", vocab_size=400)
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        (src / name).unlink(missing_ok=True)
    save_hf_tokenizer(big, src)
    return r"tokenizer.json: 400 tokens but model.embed_tokens.weight has only 320 rows"


BAD = {"not_llama": _mistral, "missing_shard": _missing_shard,
       "tensor_not_in_its_shard": _tensor_not_in_its_shard,
       "vocab_size_disagrees": _vocab_size_disagrees, "tokenizer_too_big": _tokenizer_too_big}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_hf_input_is_refused_before_anything_is_written(case, ckpt_copy, tmp_path):
    expected = BAD[case](ckpt_copy)
    with pytest.raises(HfFormatError, match=expected):
        import_hf(ckpt_copy, tmp_path / "out", dtype="float32")
    assert not (tmp_path / "out").exists()
    # the local_hf source refuses it before copying a byte
    with pytest.raises(HfFormatError, match=expected):
        dl.run(dl.Config(source={"kind": "local_hf", "path": str(ckpt_copy)}), tmp_path / "dl")
    assert not any((tmp_path / "dl").glob("*")) if (tmp_path / "dl").exists() else True


def _to_pickle(src: Path) -> None:
    torch.save(_tensors(src), src / "pytorch_model.bin")
    for f in [*src.glob("*.safetensors"), src / "model.safetensors.index.json"]:
        f.unlink()


def test_pickled_weights_are_refused_unless_allowed(hf_ckpt, ckpt_copy, tmp_path):
    _to_pickle(ckpt_copy)
    with pytest.raises(HfFormatError, match=r"pytorch_model\.bin; pickled weights can execute "
                                            r"code.*convert\.allow_pickle=true"):
        run(Config(dtype="float32"), tmp_path / "refused", meta=ckpt_copy)
    assert not (tmp_path / "refused").exists()
    out = tmp_path / "out"
    metrics = run(Config(dtype="float32", allow_pickle=True), out, meta=ckpt_copy)
    assert metrics["source_format"] == "hf-pickle"
    assert not list(out.glob("*.bin"))
    src, got = _tensors(hf_ckpt), _tensors(out)
    assert set(got) == set(src) and all(torch.equal(got[n], src[n]) for n in src)


def test_a_code_running_pickle_is_not_loaded_even_when_allowed(ckpt_copy, tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    _to_pickle(ckpt_copy)
    torch.save({"model.embed_tokens.weight": Evil()}, ckpt_copy / "pytorch_model.bin")
    with pytest.raises(HfFormatError, match="not a readable PyTorch weights file"):
        import_hf(ckpt_copy, tmp_path / "out", allow_pickle=True)


def test_fp16_overflow_is_named(ckpt_copy, tmp_path):
    from safetensors.torch import load_file, save_file

    f = next(p for p in sorted(ckpt_copy.glob("*.safetensors"))
             if "model.norm.weight" in load_file(p))
    tensors = load_file(f)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 1e6
    save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(HfFormatError, match="model.norm.weight overflows float16.*bfloat16"):
        import_hf(ckpt_copy, tmp_path / "out", dtype="float16")


def test_tied_embeddings_are_written_out(ckpt_copy, tmp_path):
    from safetensors.torch import load_file, save_file

    f = next(p for p in ckpt_copy.glob("*.safetensors") if "lm_head.weight" in load_file(p))
    tensors = load_file(f)
    del tensors["lm_head.weight"]
    save_file(tensors, f, metadata={"format": "pt"})
    _edit_json(ckpt_copy / "model.safetensors.index.json",
               lambda d: d["weight_map"].pop("lm_head.weight"))
    _edit_json(ckpt_copy / "config.json", lambda c: c.update(tie_word_embeddings=True))
    out = tmp_path / "out"
    import_hf(ckpt_copy, out, dtype="float32")
    got = _tensors(out)
    assert torch.equal(got["lm_head.weight"], got["model.embed_tokens.weight"])
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False


# ----------------------------------------------------------------------------- sources

def test_local_hf_source_takes_the_checkpoint_files(hf_ckpt, tmp_path):
    (tmp_path / "src").mkdir()
    for p in hf_ckpt.iterdir():
        shutil.copyfile(p, tmp_path / "src" / p.name)
    (tmp_path / "src" / "README.md").write_text("# not part of the checkpoint\n")
    metrics = dl.run(dl.Config(source={"kind": "local_hf", "path": str(tmp_path / "src")}),
                     tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == \
        sorted(p.name for p in hf_ckpt.iterdir())
    assert metrics["source_kind"] == "local_hf"
    key = dl.public_config(dl.Config(source={"kind": "local_hf", "path": str(tmp_path / "src")}))
    assert key["source"]["content"] == dl.public_config(dl.Config(
        source={"kind": "local_hf", "path": str(hf_ckpt)}))["source"]["content"]


REPO_ID = "meta-llama/Tiny-hf"
SHA = "89abcdef0123456789abcdef0123456789abcdef"


@pytest.fixture
def hub_files(hf_ckpt) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in hf_ckpt.iterdir()}
    files["original/consolidated.00.pth"] = b"\x80not fetched: Meta's files for source=hf"
    files["pytorch_model.bin"] = b"\x80pickles are not fetched where safetensors are"
    return files


def _lfs(files) -> set[str]:
    return {n for n in files if n.endswith((".safetensors", ".bin", ".model", ".pth"))}


def test_hf_model_source_pinned_verified_and_token_never_shown(hf_ckpt, hub_files, hub_env,
                                                               tmp_path, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    with HubStub(REPO_ID, hub_files, revisions={"main": SHA}, lfs=_lfs(hub_files),
                 token=TOKEN) as hub:
        hub_env(hub.url)
        metrics = dl.run(dl.Config(source={"kind": "hf_model", "repo_id": REPO_ID,
                                           "revision": "main"}), tmp_path / "out")
        paths = [r.path for r in hub.requests]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted([*(p.name for p in hf_ckpt.iterdir()),
                                                            "SHA256SUMS"])
    assert all((out / p.name).read_bytes() == p.read_bytes() for p in hf_ckpt.iterdir())
    assert not any(p.endswith((".bin", ".pth")) for p in paths)
    assert all(p.startswith(f"/{REPO_ID}/resolve/{SHA}/") for p in paths[1:])
    assert metrics["revision_sha"] == SHA
    assert "revision 'main' is not a commit sha" in caplog.text
    # every LFS file's hub sha256 was checked and is kept beside it
    assert dl.parse_checksums(out / "SHA256SUMS") == {
        n: ("sha256", hashlib.sha256(hub_files[n]).hexdigest())
        for n in hub_files if n.endswith((".safetensors", ".model"))}
    for text in (caplog.text, capfd.readouterr().err, json.dumps(metrics)):
        assert TOKEN not in text
    inspect(out)


def test_hf_model_sha256_mismatch_is_refetched_once_then_fails(hub_files, hub_env, tmp_path):
    shard = sorted(n for n in hub_files if n.endswith(".safetensors"))[0]
    with HubStub(REPO_ID, hub_files, revisions={SHA: SHA}, lfs=_lfs(hub_files), token=TOKEN,
                 bad_sha256={shard: "0" * 64}) as hub:
        hub_env(hub.url)
        with pytest.raises(dl.ChecksumError) as e:
            dl.download({"kind": "hf_model", "repo_id": REPO_ID, "revision": SHA},
                        tmp_path / "out", progress=False)
        gets = hub.gets(f"/{REPO_ID}/resolve/{SHA}/{shard}")
    assert (e.value.path.name, e.value.expected) == (shard, "0" * 64)
    assert e.value.actual == hashlib.sha256(hub_files[shard]).hexdigest()
    assert len(gets) == 2


def test_hf_model_repo_with_a_missing_shard_fails_in_download(hub_files, hub_env, tmp_path):
    shard = sorted(n for n in hub_files if n.endswith(".safetensors"))[-1]
    del hub_files[shard]
    with HubStub(REPO_ID, hub_files, revisions={SHA: SHA}, lfs=_lfs(hub_files)) as hub:
        hub_env(hub.url)
        with pytest.raises(HfFormatError, match=rf"\['{shard}'\] named in its weight_map"):
            dl.download({"kind": "hf_model", "repo_id": REPO_ID, "revision": SHA},
                        tmp_path / "out", progress=False)


# ----------------------------------------------------------------------------- flow start

def test_flow_start_names_the_bad_folder_and_the_fix(hf_ckpt, ckpt_copy, tmp_path):
    from pipelines.config import ConfigError
    from pipelines.validate import check

    base = ["recipe=demo", "source=local_hf", f"source.path={ckpt_copy}"]
    check(base)  # a good folder passes
    _missing_shard(ckpt_copy)
    with pytest.raises(ConfigError) as e:
        check(base)
    assert "source.path" in str(e.value) and "named in its weight_map are missing" in str(e.value)
    shutil.rmtree(ckpt_copy)
    _to_pickle(Path(shutil.copytree(hf_ckpt, ckpt_copy)))
    with pytest.raises(ConfigError) as e:
        check(base)
    assert "convert.allow_pickle" in str(e.value)
    check(base + ["convert.allow_pickle=true"])


# ----------------------------------------------------------------------------- the lifecycle

@pytest.fixture(scope="module")
def stories_hf(tmp_path_factory, shared_data) -> Path:
    """stories260K as an HF checkpoint: the stories260k recipe's own download + convert, as a
    user who converted it earlier would hold it."""
    import steps.convert as convert

    root = tmp_path_factory.mktemp("stories_hf")
    models = shared_data / "models" / "stories260K"
    dl.run(dl.Config(source={"kind": "llama2c", "bin_path": str(models / "stories260K.bin"),
                             "tokenizer_model": str(models / "tok512.model")}), root / "meta")
    convert.run(Config(dtype="float32", context_length=512), root / "hf", meta=root / "meta")
    return root / "hf"


@pytest.mark.slow
def test_stories260k_lifecycle_from_its_hf_checkpoint(stories_hf, tmp_path, prefect_harness):
    """The whole lifecycle from source=local_hf: the imported artifact is the HF checkpoint
    tensor for tensor (byte for byte), so every later stage gives the golden numbers of the
    Meta-layout start (tests/test_recipes.py)."""
    from pipelines.cli import main
    from tests.test_recipes import STORIES_PPL

    workdir = tmp_path / "ws"
    assert main(["run", "recipe=stories260k", "source=local_hf", f"source.path={stories_hf}",
                 f"workdir={workdir}"]) == 0
    result = json.loads((workdir / "latest.json").read_text())
    assert set(result["stages"]) >= {"download", "convert", "vocab", "pretrain", "sft", "merge",
                                     "quantize[f16]", "report"}
    hf = workdir / result["stages"]["convert"]["artifact"]
    src, got = _tensors(stories_hf), _tensors(hf)
    assert set(got) == set(src) and all(torch.equal(got[n], src[n]) for n in src)
    assert _weight_bytes(hf) == _weight_bytes(stories_hf)
    report = workdir / result["stages"]["report"]["artifact"]
    rows = json.loads((report / "table.json").read_text())
    ppl = {r["model"]: r["ppl"] for r in rows if r["set"] == "tinystories"}
    for model, golden in STORIES_PPL.items():
        assert ppl[model] == pytest.approx(golden, abs=1e-4), model


def test_hf_model_option_composes_and_names_what_is_unset():
    from pipelines.config import ConfigError
    from pipelines.validate import check

    cfg, _ = check(["recipe=demo", "source=hf_model", "source.repo_id=meta-llama/Llama-2-7b-hf",
                    f"source.revision={SHA}"])
    assert cfg["source"]["kind"] == "hf_model" and "*.safetensors" in cfg["source"]["allow_patterns"]
    with pytest.raises(ConfigError, match=r"source\.repo_id"):
        check(["recipe=demo", "source=hf_model", f"source.revision={SHA}"])
