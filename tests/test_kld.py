"""KL divergence (steps/kld.py): the statistics on hand-made logits against a direct numpy
computation, the refusal of a reference with another tokenizer, and (slow) equality with
`llama-perplexity --kl-divergence` to every digit it prints, on stories260K GGUFs."""
from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from steps import kld as K


def _logits(rng, rows: int, vocab: int, spread: float = 4.0) -> np.ndarray:
    return (rng.standard_normal((rows, vocab)) * spread).astype(np.float32)


def _log_softmax64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))


def test_reference_log_probs_are_16_bit_log_softmax():
    """Within half a quantization step of the exact log-softmax where it is above max-16; the
    rest collapses to the row's floor, min_log_prob."""
    rng = np.random.default_rng(0)
    x = _logits(rng, 64, 300, spread=6.0)   # wide enough that some logits are below max-16
    scale, floor, q = K.quantize_reference(x)
    got = K.reference_log_probs(scale, floor, q).astype(np.float64)
    exact = _log_softmax64(x)
    above = x > (x.max(axis=1) - 16)[:, None]
    assert (~above).any() and above.all(axis=1).sum() < len(x)
    err = np.abs(got - exact)[above]
    assert err.max() <= (scale[:, None] * np.ones_like(x))[above].max() * 0.5 + 1e-5
    assert np.array_equal(got[~above], np.broadcast_to(floor[:, None], x.shape)[~above])
    assert q.dtype == np.uint16 and q.max() == 65535


def test_token_stats_equal_a_direct_computation():
    rng = np.random.default_rng(1)
    ref = _logits(rng, 200, 50)
    mine = ref + _logits(rng, 200, 50, spread=0.3)   # a perturbed model
    targets = rng.integers(0, 50, 200)
    t = K.token_stats(K.quantize_reference(ref), mine, targets)

    lp_base = K.reference_log_probs(*K.quantize_reference(ref)).astype(np.float64)
    lp = _log_softmax64(mine)
    rows = np.arange(200)
    kld = np.where(lp_base > -16, np.exp(lp_base) * (lp_base - lp), 0).sum(axis=1)
    # llama.cpp forms each term p·(log p_base - log p) in float: ~1e-7 per term of size ~1
    np.testing.assert_allclose(t["kld"], kld, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(t["nll"], -lp[rows, targets], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(t["nll_base"], -lp_base[rows, targets], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(t["dp"], np.exp(lp[rows, targets]) - np.exp(lp_base[rows, targets]),
                               atol=1e-6)
    assert np.array_equal(t["same_top"], mine.argmax(1) == ref.argmax(1))
    assert 0 < t["same_top"].mean() < 1 and (t["kld"] > 0).all()


def _direct_summary(ref: np.ndarray, mine: np.ndarray, targets: np.ndarray) -> dict:
    """The summary from textbook formulas on float64 per-token values."""
    lp_base = K.reference_log_probs(*K.quantize_reference(ref)).astype(np.float64)
    lp = _log_softmax64(mine)
    rows = np.arange(len(targets))
    kld = np.where(lp_base > -16, np.exp(lp_base) * (lp_base - lp), 0).sum(axis=1)
    a, b = -lp[rows, targets], -lp_base[rows, targets]
    dp = np.exp(-a) - np.exp(-b)
    n = len(a)
    se = lambda v: v.std() / math.sqrt(n - 1)   # noqa: E731 - the standard error of a mean
    return {"ppl": math.exp(a.mean()), "ppl_err": math.exp(a.mean()) * se(a),
            "ppl_base": math.exp(b.mean()), "ln_ppl_cor": np.corrcoef(a, b)[0, 1],
            "ln_ppl_ratio": a.mean() - b.mean(), "ln_ppl_ratio_err": se(a - b),
            "ppl_ratio": math.exp(a.mean() - b.mean()),
            "kld_mean": kld.mean(), "kld_err": se(kld), "kld_max": kld.max(),
            "kld_p99": np.percentile(kld, 99), "kld_p90": np.percentile(kld, 90),
            "kld_median": np.median(kld), "kld_p1": np.percentile(kld, 1), "kld_min": kld.min(),
            "dp_mean": dp.mean(), "dp_err": se(dp), "dp_p75": np.percentile(dp, 75),
            "dp_median": np.median(dp), "dp_p25": np.percentile(dp, 25),
            "rms_dp": math.sqrt((dp ** 2).mean()),
            "rms_dp_err": 0.5 / math.sqrt((dp ** 2).mean()) * se(dp ** 2),
            "same_top_p": (mine.argmax(1) == ref.argmax(1)).mean()}


def test_streamed_summary_equals_direct_computation():
    """Four chunks added one by one give the textbook statistics of all their tokens."""
    rng = np.random.default_rng(2)
    ref = _logits(rng, 4 * 63, 80)
    mine = ref + _logits(rng, 4 * 63, 80, spread=0.5)
    targets = rng.integers(0, 80, 4 * 63)
    stats = K.KLDStats()
    for c in range(4):
        sl = slice(c * 63, (c + 1) * 63)
        stats.add(ref[sl], mine[sl], targets[sl])
    got = stats.summary()
    want = _direct_summary(ref, mine, targets)
    assert got["n_scored"] == 4 * 63
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-4, abs=1e-6), (k, got[k], v)
    p = want["same_top_p"]
    assert got["same_top_p_err"] == pytest.approx(math.sqrt(p * (1 - p) / (4 * 63 - 1)))


def test_streaming_does_not_depend_on_chunking():
    rng = np.random.default_rng(3)
    ref, mine = _logits(rng, 120, 40), _logits(rng, 120, 40)
    targets = rng.integers(0, 40, 120)
    whole, parts = K.KLDStats(), K.KLDStats()
    whole.add(ref, mine, targets)
    for c in range(0, 120, 30):
        parts.add(ref[c:c + 30], mine[c:c + 30], targets[c:c + 30])
    a, b = whole.summary(), parts.summary()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-12, abs=1e-15), k


def test_a_model_against_itself():
    """Same logits: KLD is only the 16-bit storage error, argmax always agrees, PPL ratio ~1.
    (Logits within 16 of the maximum: below it the stored reference is floored, as llama.cpp's.)"""
    rng = np.random.default_rng(4)
    x = _logits(rng, 150, 64, spread=2.0)
    stats = K.KLDStats()
    stats.add(x, x, rng.integers(0, 64, 150))
    s = stats.summary()
    assert s["same_top_p"] == 1.0 and s["same_top_p_err"] == 0.0
    # what is left is the 16-bit storage error: each stored log-prob is off by at most half a
    # step, so |KLD| = |Σ p_base·error| <= step/2 (it can come out negative), ~0 on average
    half_step = 0.5 * float(K.quantize_reference(x)[0].max()) + 1e-6
    assert max(abs(s["kld_max"]), abs(s["kld_min"])) <= half_step and abs(s["kld_mean"]) < 1e-6
    assert abs(s["ppl_ratio"] - 1) < 1e-4 and s["ln_ppl_cor"] > 0.9999


def test_percentile_is_llama_cpps_interpolation():
    v = np.array([0.0, 1.0, 2.0, 10.0], dtype=np.float32)
    assert K.percentile(v, 0.5) == 1.5          # p = 0.5*3 = 1.5, between v[1] and v[2]
    assert K.percentile(v, 0.999) == pytest.approx(2.0 + 0.997 * 8, rel=1e-6)
    assert K.percentile(v, 0.0) == 0.0 and K.percentile(v, 1.0) == 10.0
    assert K.median(v) == 1.5 and K.median(v[:3]) == 1.0


def test_misaligned_chunk_is_refused():
    with pytest.raises(ValueError, match="do not line up"):
        K.KLDStats().add(np.zeros((3, 5)), np.zeros((3, 6)), [0, 1, 2])


class _Fake:
    """A model from steps.evaluate.load as far as the tokenizer check looks."""

    def __init__(self, path: str, n_vocab: int, offset: int = 0, bos_id: int = 1):
        self.path, self.n_vocab, self.offset, self.bos_id = Path(path), n_vocab, offset, bos_id

    def tokenize(self, text: str) -> list[int]:
        return [self.bos_id] + [(ord(c) + self.offset) % self.n_vocab for c in text]


def test_reference_with_another_tokenizer_is_refused():
    model = _Fake("/a/q4_0.gguf", 512)
    with pytest.raises(ValueError, match=r"reference f16-other.gguf has n_vocab 320, model "
                                         r"q4_0.gguf 512"):
        K.same_tokenizer(model, _Fake("/b/f16-other.gguf", 320), [("en", "abc")])
    with pytest.raises(ValueError, match=r"eval set `en`: model q4_0.gguf and reference "
                                         r"hf-fp32 tokenize it differently .*token 1\)"):
        K.same_tokenizer(model, _Fake("/b/hf-fp32", 512, offset=1), [("en", "abc")])
    assert K.same_tokenizer(model, _Fake("/b/f16.gguf", 512), [("en", "ab")]) == {
        "en": [1, 97, 98]}


# ---------------------------------------------------------------------------------------------
# the evaluate stage with a reference


@pytest.fixture(scope="module")
def tiny_ggufs(tiny_hf_model, tmp_path_factory) -> dict[str, Path]:
    from steps import quantize as Q

    out = tmp_path_factory.mktemp("kld_gguf")
    f16 = Q.export_gguf(tiny_hf_model, out / "tiny-f16.gguf", "f16")
    return {"f16": f16, "q4_0": Q.quantize_gguf(f16, out / "tiny-q4_0.gguf", "q4_0"),
            "f32": Q.export_gguf(tiny_hf_model, out / "tiny-f32.gguf", "f32")}


def _stage_cfg(**kw):
    from steps import evaluate as ev
    from tests.tiny import DEMO_DATA

    base = dict(eval_sets={"en": {"path": str(DEMO_DATA / "eval_en.txt")}}, n_ctx=64,
                prompts=None, n_threads=2)
    return ev.Config(**(base | kw))


def test_stage_kld_equals_the_statistics_of_both_models_logits(tiny_ggufs, tmp_path):
    """The stage scores the llama.cpp protocol's chunks and positions: its statistics are those
    of KLDStats fed by hand with both models' logits there; perplexity is untouched by it."""
    from steps import evaluate as ev

    plain, with_ref = tmp_path / "plain", tmp_path / "ref"
    plain.mkdir(), with_ref.mkdir()
    ev.run(_stage_cfg(), plain, model=tiny_ggufs["q4_0"])
    seen = []
    metrics = ev.run(_stage_cfg(), with_ref, model=tiny_ggufs["q4_0"],
                     reference=tiny_ggufs["f16"], on_metrics=lambda d, s: seen.append(d))
    a = json.loads((plain / "results.json").read_text(encoding="utf-8"))
    b = json.loads((with_ref / "results.json").read_text(encoding="utf-8"))
    got = b["sets"]["en"].pop("kld")
    assert b.pop("reference") == "tiny-f16.gguf" and a == b   # the rest as without a reference
    assert "reference" not in a and "kld" not in a["sets"]["en"]

    q, f = (ev.load(p, n_ctx=64, n_threads=2) for p in (tiny_ggufs["q4_0"], tiny_ggufs["f16"]))
    try:
        ids = q.tokenize((Path(_stage_cfg().eval_sets["en"].path)).read_text(encoding="utf-8"))
        windows = ev.windows_for(ids, n_ctx=64, protocol="llama.cpp", stride=None,
                                 bos_id=q.bos_id, max_tokens=None)
        stats = K.KLDStats()
        for (w, s), lf, lq in zip(windows, f.window_logits(windows), q.window_logits(windows)):
            assert lf.shape == (64 - 1 - 32, q.n_vocab)
            stats.add(lf, lq, w[s + 1:])
        separate = K.kl_divergence(q, f, ids, n_ctx=64, batch_size=3, progress=False)
    finally:
        q.close(), f.close()
    want = stats.summary()
    assert got["n_scored"] == a["sets"]["en"]["n_scored"] == want["n_scored"]
    for k, v in want.items():   # the stage compares its perplexity pass's own logits
        assert got[k] == pytest.approx(v, rel=1e-9), k
        assert separate[k] == pytest.approx(v, rel=1e-9), k   # and a pass of its own the same
    assert separate["n_chunks"] == got["n_chunks"] == len(windows)
    assert 0 < got["kld_mean"] < 1 and 0 < got["same_top_p"] <= 1
    assert metrics["en.kld_mean"] == got["kld_mean"] and metrics["en.rms_dp"] == got["rms_dp"]
    assert {"en.kld_p99", "en.same_top_p", "en.ppl_ratio"} <= seen[0].keys()
    t = json.loads((with_ref / "timings.json").read_text(encoding="utf-8"))
    assert t["sets"]["en"]["kld_seconds"] == metrics["en.kld_seconds"] > 0


@pytest.mark.parametrize("batch_size,hf_is_reference", [(1, True), (3, True), (3, False)])
def test_hf_fp32_and_its_own_f32_gguf(tiny_hf_model, tiny_ggufs, tmp_path, batch_size,
                                      hf_is_reference):
    """The HF model in fp32 as the reference of its f32 GGUF (batched forward passes), and the
    other way round: the same weights, so only float noise and the 16-bit storage are left."""
    from steps import evaluate as ev

    model, reference = tiny_ggufs["f32"], tiny_hf_model
    if not hf_is_reference:
        model, reference = reference, model
    m = ev.run(_stage_cfg(batch_size=batch_size, device="cpu"), tmp_path, model=model,
               reference=reference)
    res = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    k = res["sets"]["en"]["kld"]
    assert res["reference"] == reference.name and k["reference"] == reference.name
    assert k["n_scored"] == res["sets"]["en"]["n_scored"] > 100
    assert abs(m["en.kld_mean"]) < 1e-5 and m["en.same_top_p"] == 1.0
    assert abs(k["ppl"] / res["sets"]["en"]["ppl"] - 1) < 1e-5   # PPL(Q) is the model's PPL
    assert abs(k["ln_ppl_ratio"]) < 1e-3 and k["ln_ppl_cor"] > 0.999


def test_stage_refuses_a_reference_with_another_tokenizer(tiny_hf_model, tmp_path):
    from steps import evaluate as ev
    from tests.tiny import make_tiny_hf_model, train_tiny_tokenizer

    sp = train_tiny_tokenizer(tmp_path / "sp340" / "tokenizer.model", vocab_size=340)
    other = make_tiny_hf_model(tmp_path / "other-hf", sp)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match=rf"reference other-hf has n_vocab 340, model "
                                         rf"{tiny_hf_model.name} 320"):
        ev.run(_stage_cfg(), out, model=tiny_hf_model, reference=other)
    assert list(out.iterdir()) == []          # nothing scored, nothing written
    with pytest.raises(ValueError, match="protocol='strided'.*evaluate.kld=false"):
        ev.run(_stage_cfg(protocol="strided"), out, model=tiny_hf_model, reference=other)
    with pytest.raises(FileNotFoundError, match="reference model .*nope"):
        ev.run(_stage_cfg(), out, model=tiny_hf_model, reference=tmp_path / "nope")
    # kld: false ignores the reference altogether
    ev.run(_stage_cfg(kld=False), out, model=tiny_hf_model, reference=other)
    assert "kld" not in json.loads((out / "results.json").read_text())["sets"]["en"]


# ---------------------------------------------------------------------------------------------
# against llama-perplexity itself (builds llama.cpp's tools on first use: ~5 min on 2 cores)

N_CTX_TOOL = 128   # the TinyStories sample: 14 chunks, 882 scored tokens (llama.cpp wants >= 100)


@pytest.fixture(scope="module")
def stories_ggufs(shared_data, tmp_path_factory) -> dict[str, Path]:
    """stories260K (dim 64, 5 layers, vocab 512) as f16, q8_0 and q4_0 GGUFs, as
    tests/test_quantize.py makes them."""
    from steps import quantize as Q
    from steps.convert import convert_meta_to_hf
    from steps.llama2c import import_llama2c

    d = shared_data / "models" / "stories260K"
    tmp = tmp_path_factory.mktemp("kld_stories260K")
    meta = import_llama2c(d / "stories260K.bin", d / "tok512.model", tmp / "meta")
    hf = convert_meta_to_hf(meta, tmp / "hf", dtype="float32")
    f16 = Q.export_gguf(hf, tmp / "f16.gguf", "f16")
    return {"f16": f16} | {q: Q.quantize_gguf(f16, tmp / f"{q}.gguf", q) for q in ("q8_0", "q4_0")}


@pytest.fixture(scope="module")
def can_build_tools():
    """A skip where cmake or a compiler is missing and the tools are not built (a user's own
    machine); under CI=true that is an error, never a silent skip."""
    from steps import llamacpp_tools as T

    if os.environ.get(T.ENV_BIN) or os.environ.get("CI") == "true":
        return
    if all((T.build_dir() / "bin" / t).is_file() for t in T.TOOLS):
        return
    try:
        T.check_prerequisites()
    except RuntimeError as e:
        pytest.skip(str(e))


def _llama_perplexity(args: list, wheel_libs: bool) -> str:
    from steps import llamacpp_tools as T

    # -fa off: the stage's flash_attn false; -nr: its extra_buffers false (no repacked weights);
    # -b n_ctx: one decode per chunk, as the stage; -t 1: a thread count cannot change the sums
    cmd = [T.tool("llama-perplexity"), *args, "-c", N_CTX_TOOL, "-b", N_CTX_TOOL, "-fa", "off",
           "-t", "1", "-nr", "-ngl", "0"]
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                       env=T.env(wheel_libs=wheel_libs), timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout + r.stderr


@pytest.mark.slow
def test_kld_equals_llama_perplexity_to_every_printed_digit(stories_ggufs, shared_data, tmp_path,
                                                            can_build_tools):
    from steps import evaluate as ev

    text = shared_data / "eval" / "tinystories" / "tinystories_sample.txt"
    base = {}
    for wheel_libs in (False, True):   # the tools on their own libraries, then on the wheel's
        base[wheel_libs] = tmp_path / f"base-{wheel_libs}.kld"
        _llama_perplexity(["-m", stories_ggufs["f16"], "-f", text, "--kl-divergence-base",
                           base[wheel_libs]], wheel_libs)
    # the build reproduces the wheel's kernels: the same 16-bit reference log-probs, bit for bit
    assert base[False].read_bytes() == base[True].read_bytes()

    cfg = ev.Config(eval_sets={"ts": {"path": str(text)}}, n_ctx=N_CTX_TOOL, prompts=None,
                    n_threads=2, extra_buffers=False, flash_attn=False)
    for q in ("q8_0", "q4_0"):
        printed = K.printed_summary(_llama_perplexity(
            ["-m", stories_ggufs[q], "--kl-divergence-base", base[False], "--kl-divergence"],
            wheel_libs=False))
        out = tmp_path / q
        out.mkdir()
        ev.run(cfg, out, model=stories_ggufs[q], reference=stories_ggufs["f16"])
        stats = json.loads((out / "results.json").read_text(encoding="utf-8"))["sets"]["ts"]["kld"]
        ours = K.report_lines(stats)
        print(f"\n{q}: llama-perplexity | ours\n" + "\n".join(
            f"{a:48s} | {b}" for a, b in zip(printed, ours)))
        assert len(printed) == 39 and stats["n_scored"] == 14 * 63
        assert ours == printed
    assert 0 < stats["kld_mean"] and stats["same_top_p"] < 1   # q4_0: a real divergence


# ---------------------------------------------------------------------------------------------
# steps/llamacpp_tools.py without building anything


def test_build_flags_follow_the_wheels_cpu_features():
    from steps import llamacpp_tools as T

    opts = T.cmake_options({"AVX", "AVX2", "FMA", "F16C", "AMX_INT8", "OPENMP", "SSE3"})
    on = {o[2:-3] for o in opts if o.endswith("=ON")}
    assert {"GGML_AVX", "GGML_AVX2", "GGML_FMA", "GGML_F16C", "GGML_AMX_TILE", "GGML_AMX_INT8",
            "GGML_OPENMP", "GGML_SSE42"} <= on
    assert {"-DGGML_AVX512=OFF", "-DGGML_NATIVE=OFF", "-DLLAMA_CURL=OFF"} <= set(opts)
    assert T.build_dir("0.3.36", opts) != T.build_dir("0.3.36", T.cmake_options({"AVX"}))
    assert T.build_dir("0.3.36", opts).name.startswith("llama.cpp-0.3.36-")
    features = T.wheel_features()   # the installed wheel's own report, parsed
    assert features and all(f.isupper() or "_" in f for f in features) and "CPU" not in features


def test_tool_dir_from_the_environment(tmp_path, monkeypatch):
    from steps import llamacpp_tools as T

    monkeypatch.setenv(T.ENV_BIN, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="has no llama-bench"):
        T.tool("llama-bench")
    (tmp_path / "llama-bench").write_text("")
    assert T.tool("llama-bench") == tmp_path / "llama-bench"
    with pytest.raises(ValueError, match="unknown llama.cpp tool 'llama-cli'"):
        T.tool("llama-cli")
    e = T.env(wheel_libs=True)
    assert e["LD_LIBRARY_PATH"].split(":")[0] == str(T.wheel_lib_dir())


def test_two_processes_build_once(tmp_path, monkeypatch):
    """The build runs under an flock: whoever comes second waits, then finds the tools."""
    import threading
    import time

    from steps import llamacpp_tools as T

    monkeypatch.delenv(T.ENV_BIN, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    builds = []

    def fake_build(version, options, root):
        builds.append(root)
        time.sleep(0.3)                       # long enough for the other caller to queue
        (root / "bin").mkdir(parents=True)
        for t in T.TOOLS:
            (root / "bin" / t).write_text("")

    monkeypatch.setattr(T, "_build", fake_build)
    got = []
    threads = [threading.Thread(target=lambda: got.append(T.tool("llama-perplexity")))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and len(got) == 2 and got[0] == got[1]
    assert got[0].parent.parent.parent == tmp_path / "llamaflow"


def test_missing_compiler_is_a_clear_error(monkeypatch):
    from steps import llamacpp_tools as T

    monkeypatch.setattr(T.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.delenv("CC", raising=False)
    with pytest.raises(RuntimeError,
                       match=r"needs cmake, c\+\+, cc, make.*apt-get install -y cmake g\+\+ make"):
        T.check_prerequisites()
