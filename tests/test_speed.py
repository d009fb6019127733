"""steps/speed.py: llama-bench's pp/tg protocol in this process. Only what a run does is tested
here (which tests, how many tokens each decoded, the statistics over its samples); how fast is
bench/speed.py's business (a ratio against llama-bench measured in the same run)."""
from __future__ import annotations

import statistics

import pytest

from steps import speed


@pytest.fixture(scope="module")
def tiny_gguf(tiny_hf_model, tmp_path_factory):
    from steps.quantize import export_gguf

    out = tmp_path_factory.mktemp("speed") / "model-f16.gguf"
    export_gguf(tiny_hf_model, out, "f16")
    return out


def test_default_thread_counts_double_up_to_the_cores():
    assert speed.default_threads(1) == [1]
    assert speed.default_threads(2) == [1, 2]
    assert speed.default_threads(6) == [1, 2, 4, 6]
    assert speed.default_threads(16) == [1, 2, 4, 8, 16]


def test_pp_and_tg_per_thread_count(tiny_gguf):
    rows = speed.measure(tiny_gguf, [1, 2], n_prompt=48, n_gen=8, repetitions=3, n_batch=16)
    assert [(r["test"], r["threads"]) for r in rows] == [
        ("pp48", 1), ("tg8", 1), ("pp48", 2), ("tg8", 2)]
    for r in rows:   # each test left exactly its tokens in the context (checked in measure too)
        assert len(r["samples_ts"]) == 3 and all(s > 0 for s in r["samples_ts"])
        assert r["avg_ts"] == statistics.fmean(r["samples_ts"])
        assert r["stdev_ts"] == statistics.stdev(r["samples_ts"])
    fastest_tg = max(rows[1::2], key=lambda r: r["avg_ts"])
    assert speed.best(rows, "tg") is fastest_tg and speed.best(rows, "xx") is None
    only_tg = speed.measure(tiny_gguf, [1], n_prompt=0, n_gen=4, repetitions=1)
    assert [(r["test"], r["stdev_ts"]) for r in only_tg] == [("tg4", 0.0)]


def test_bad_settings_are_refused_before_loading(tmp_path):
    with pytest.raises(ValueError, match="repetitions=0"):
        speed.measure(tmp_path / "none.gguf", [1], repetitions=0)
    with pytest.raises(ValueError, match=r"threads=\[0\]"):
        speed.measure(tmp_path / "none.gguf", [0])


def test_the_stage_writes_the_rows_and_the_machine(tiny_gguf, tmp_path):
    import json

    cfg = speed.Config(threads=[1], n_prompt=32, n_gen=4, repetitions=2)
    metrics = speed.run(cfg, tmp_path, gguf=tiny_gguf)
    data = json.loads((tmp_path / speed.SPEED_FILE).read_text())
    assert data["model"] == tiny_gguf.name and data["machine"]["cores"] >= 1
    assert [r["test"] for r in data["rows"]] == ["pp32", "tg4"]
    assert metrics["tg_best_threads"] == 1 and metrics["pp32_t1_ts"] == data["rows"][0]["avg_ts"]
    assert speed.DIGEST_EXCLUDE == (speed.SPEED_FILE,)   # machine numbers stay out of the digest
    settings = json.loads((tmp_path / speed.SETTINGS_FILE).read_text())   # what was measured
    assert (settings["threads"], settings["n_prompt"], settings["model"]) == ([1], 32, tiny_gguf.name)
    with pytest.raises(ValueError):
        speed.Config(threads=[0])
