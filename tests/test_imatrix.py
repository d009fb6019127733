"""imatrix stage and imatrix quants: llama.cpp's own llama-imatrix and llama-quantize (built from
the installed llama-cpp-python's source, run on its library) on stories260K."""
from __future__ import annotations

import json

import pytest

from steps import imatrix as im
from steps import quantize as qz
from tests.tiny import DEMO_DATA

pytestmark = pytest.mark.slow   # the first use builds llama.cpp's tools (~5 min on 2 cores)

CORPORA = [DEMO_DATA / "corpus_zh.txt", DEMO_DATA / "corpus_en.txt"]


@pytest.fixture(scope="module")
def f16(shared_data, tmp_path_factory):
    from steps.convert import convert_meta_to_hf
    from steps.llama2c import import_llama2c

    s = shared_data / "models" / "stories260K"
    root = tmp_path_factory.mktemp("imatrix")
    meta = import_llama2c(s / "stories260K.bin", s / "tok512.model", root / "meta")
    hf = convert_meta_to_hf(meta, root / "hf", dtype="float32", context_length=512)
    (root / "f16").mkdir()
    qz.run(qz.Config(qtype="f16"), root / "f16", model=hf)
    return root / "f16"


@pytest.fixture(scope="module")
def matrix(f16, tmp_path_factory):
    out = tmp_path_factory.mktemp("matrix")
    metrics = im.run(im.Config(data=CORPORA, n_ctx=64, max_chunks=8), out, gguf=f16)
    return out, metrics


def test_the_importance_matrix_is_llama_cpps_and_the_same_on_any_thread_count(f16, matrix,
                                                                               tmp_path):
    out, metrics = matrix
    info = json.loads((out / "imatrix_info.json").read_text())
    # stories260K: 5 layers x 7 projections; 8 chunks of 64 tokens of the demo corpora
    assert (info["chunk_count"], info["chunk_size"], info["entries"]) == (8, 64, 35)
    assert info["datasets"] == ["calibration.txt"]        # no workspace path in the file
    assert metrics["chunks"] == 8 and metrics["entries"] == 35
    assert (out / "calibration.txt").read_text().startswith(CORPORA[0].read_text().split("\n")[0])
    again = tmp_path / "again"
    again.mkdir()
    im.run(im.Config(data=CORPORA, n_ctx=64, max_chunks=8, nthread=1), again, gguf=f16)
    assert (again / "imatrix.gguf").read_bytes() == (out / "imatrix.gguf").read_bytes()


def test_llama_quantize_tool_is_the_library_quantizer_byte_for_byte(f16, tmp_path):
    """The tool (used for imatrix quants) and llama_model_quantize (every other type) are one
    quantizer: without a matrix they write the same bytes."""
    src = qz.find_gguf(f16)
    qz.quantize_gguf(src, tmp_path / "lib.gguf", "q4_k_m")
    qz.quantize_with_tool(src, tmp_path / "tool.gguf", "q4_k_m")
    assert (tmp_path / "lib.gguf").read_bytes() == (tmp_path / "tool.gguf").read_bytes()


def test_an_imatrix_quant_uses_and_records_the_matrix(f16, matrix, tmp_path):
    out, _ = matrix
    for q, kw in (("q4_k_m", {}), ("q4_k_m@imatrix", {"imatrix": out}), ("iq4_xs", {"imatrix": out})):
        (tmp_path / q).mkdir()
        qz.run(qz.Config(qtype=q), tmp_path / q, gguf=f16, **kw)
    plain, weighted, iq = (json.loads((tmp_path / q / "quant_info.json").read_text())
                           for q in ("q4_k_m", "q4_k_m@imatrix", "iq4_xs"))
    assert weighted["file"] == "model-q4_k_m-imatrix.gguf" and weighted["imatrix"] is True
    assert weighted["imatrix_meta"] == {"chunks_count": 8, "dataset": "calibration.txt",
                                        "entries_count": 35, "file": "imatrix.gguf"}
    assert "imatrix" not in plain and "imatrix_meta" not in plain
    assert weighted["tensor_types"] == plain["tensor_types"]   # same types, other rounding
    a = (tmp_path / "q4_k_m" / plain["file"]).read_bytes()
    b = (tmp_path / "q4_k_m@imatrix" / weighted["file"]).read_bytes()
    assert a != b
    assert iq["imatrix"] is True and iq["method"] == "llama.cpp --imatrix"


def test_types_and_inputs_that_do_not_fit_are_refused(f16, matrix, tmp_path):
    assert qz.split_qtype("Q4_K_M@imatrix") == ("q4_k_m", True)
    assert qz.split_qtype("iq3_m") == ("iq3_m", True) and qz.split_qtype("q4_0") == ("q4_0", False)
    with pytest.raises(ValueError, match="f16 is exported from the HF weights"):
        qz.normalize_qtype("f16@imatrix")
    with pytest.raises(ValueError, match="iq3_m uses an importance matrix"):
        qz.run(qz.Config(qtype="iq3_m"), tmp_path, gguf=f16)
    with pytest.raises(ValueError, match="q4_0 takes no importance matrix"):
        qz.run(qz.Config(qtype="q4_0"), tmp_path, gguf=f16, imatrix=matrix[0])
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time.\n")
    (tmp_path / "m").mkdir()
    with pytest.raises(ValueError, match=r"the calibration text is \d+ tokens; llama-imatrix "
                                         r"needs at least 128 .*more text"):
        im.run(im.Config(data=[short], n_ctx=64), tmp_path / "m", gguf=f16)
    with pytest.raises(ValueError, match="imatrix.data: no calibration text"):
        im.run(im.Config(), tmp_path / "m", gguf=f16)


def test_every_imatrix_type_on_an_odd_vocabulary(tiny_sp_model, tmp_path):
    """321 rows (320 pieces + [PAD]), width 256: every type that always uses the matrix is made
    with one, loads in llama.cpp with n_vocab 321 and gives finite logits (the K types' check in
    test_quantize.py, for the IQ types)."""
    import numpy as np

    from tests.test_quantize import _llama, _make_model

    hf = _make_model(tmp_path / "hf", tiny_sp_model, hidden=256, intermediate=512,
                     pad_token="[PAD]")
    (tmp_path / "f16").mkdir()
    qz.run(qz.Config(qtype="f16"), tmp_path / "f16", model=hf)
    (tmp_path / "m").mkdir()
    im.run(im.Config(data=CORPORA, n_ctx=32, max_chunks=4), tmp_path / "m", gguf=tmp_path / "f16")
    for q in qz.ALWAYS_IMATRIX:
        out = tmp_path / q
        out.mkdir()
        qz.run(qz.Config(qtype=q), out, gguf=tmp_path / "f16", imatrix=tmp_path / "m")
        info = json.loads((out / "quant_info.json").read_text())
        assert info["n_vocab"] == 321 and info["imatrix_meta"]["chunks_count"] == 4, q
        llm = _llama(out / info["file"])
        llm.eval([1, 5, 9, 13])
        assert llm.n_vocab() == 321 and np.isfinite(np.array(llm.scores[:4])).all(), q
        llm.close()
