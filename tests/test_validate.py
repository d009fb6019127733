"""Every config problem before any work (pipelines/validate.py): one ConfigError naming each bad
key, its value and the fix, raised by the flow before the workspace or an MLflow run exists, by
`llamaflow run` before Prefect starts, and by `llamaflow config --check`."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.config import REPO, ConfigError, load_config
from pipelines.validate import _upper_bound, check, plan

DEMO = ["recipe=demo", "source=url", "source.url=http://127.0.0.1:9/"]   # never contacted


def _problems(overrides, **kw) -> str:
    with pytest.raises(ConfigError) as e:
        check(overrides, **kw)
    return str(e.value)


# -- one typo per stage: the flow fails before anything is written ---------------------------

TYPOS = {   # stage -> (override with a typo, the key the error must name, what it must suggest)
    "download": ("+source.urll=http://x/", "source.urll", "did you mean source.url?"),
    "convert": ("+convert.dtyp=float16", "convert.dtyp", "did you mean convert.dtype?"),
    "vocab": ("+vocab.vocab_sise=300", "vocab.vocab_sise", "did you mean vocab.vocab_size?"),
    "pretrain": ("+pretrain.learning_rat=0.1", "pretrain.learning_rat",
                 "did you mean pretrain.learning_rate?"),
    "sft": ("sft.max_seq_len=512", "sft.max_seq_len", "did you mean sft.max_seq_length?"),
    "merge": ("merge.strategy=sequentail", "merge.strategy", "'sequential'"),
    "quantize": ("quantize.types=[f16,q4_k_mm]", "quantize.types", "did you mean q4_k_m?"),
    "evaluate": ("+evaluate.eval_sets.en.pth=x", "evaluate.eval_sets.en.pth",
                 "did you mean evaluate.eval_sets.en.path?"),
    "report": ("+report.on_fial=fail", "report.on_fial", "did you mean report.on_fail?"),
}


@pytest.mark.parametrize("stage", sorted(TYPOS))
def test_a_typo_in_any_stage_fails_the_flow_before_any_work(stage, tmp_path, prefect_harness):
    from pipelines.lifecycle import lifecycle

    override, key, hint = TYPOS[stage]
    workdir = tmp_path / "ws"
    t0 = time.time()
    with pytest.raises(ConfigError) as e:
        lifecycle(overrides=[*DEMO, f"workdir={workdir}", override])
    message = str(e.value)
    assert f"{key} = " in message and hint in message, message
    assert message.count("\n  - ") == 1, message      # just this problem, nothing spurious
    assert not workdir.exists()                       # no artifacts/, no mlflow.db, no prefect/
    print(f"{stage}: failed after {time.time() - t0:.2f} s")


def test_a_config_error_inside_a_task_is_not_retried(tmp_path, prefect_harness, monkeypatch):
    """The runner's own per-stage check (a config changed after the flow's check, a flow that
    calls run.stage itself) raises ConfigError in the task: retries.download=2 must not repeat it."""
    from prefect import flow

    from pipelines import runner

    calls = []

    def counting(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    real = runner.step_config
    monkeypatch.setattr(runner, "step_config", counting)
    cfg = load_config([*DEMO, f"workdir={tmp_path}", "retries.download=2", "+download.worker=3"])

    @flow
    def one_stage():
        runner.LifecycleRun(cfg, tracker=None, parent_run_id="").stage("download")

    with pytest.raises(ConfigError, match="download.worker = 3: unknown key; did you mean "
                                          "download.workers?"):
        one_stage()
    assert calls == ["download"]


def test_every_problem_is_listed_at_once():
    message = _problems([*DEMO, "sft.max_seq_length=4", "+sft.max_seq_len=3",
                         "pretrain.learning_rate=-1", "quantize.types=[f16,bf16]",
                         "evaluate.models=[base,mergd]", "retries.downlaod=1"])
    for expected in ("sft.max_seq_length = 4: must be >= 8",
                     "sft.max_seq_len = 3: unknown key; did you mean sft.max_seq_length?",
                     "pretrain.learning_rate = -1: must be > 0",
                     "quantize.types = 'bf16': the lifecycle exports only f16",
                     "evaluate.models = 'mergd': not a model of the lifecycle; did you mean merged?",
                     "retries.downlaod = 1: unknown key; did you mean retries.download?"):
        assert expected in message, message
    assert message.startswith("6 config problems (nothing was run):")


def test_missing_values_are_named_with_the_fix():
    message = _problems(["recipe=chinese-llama-alpaca", "source=hf"])
    assert "source.repo_id: must be set (the config leaves it as ???): pass source.repo_id=..." in message
    assert "source.revision: must be set" in message
    assert "pretrain.data = []: pretrain.data is empty" in message
    assert message.count("\n  - source") == 2, message   # not again from the step's own check


def test_fsdp_with_fp16_is_refused_at_flow_start():
    message = _problems([*DEMO, "launcher@pretrain.launcher=fsdp", "pretrain.precision=fp16"])
    assert "pretrain: launcher.strategy=fsdp trains in bf16 or fp32" in message


def test_only_the_stages_the_run_needs_are_checked():
    # stages=[convert]: download's config is needed (its cache key), sft's typo is not looked at
    cfg, checked = check([*DEMO, "stages=[convert]", "sft.max_seq_length=4"])
    assert checked == ["download", "convert"]
    assert check([*DEMO, "stages=[]"])[1] == []


def test_a_single_stage_name_is_one_stage_not_its_letters():
    assert plan({"stages": "evaluate", "force": "quantize"}) == \
        (["quantize", "evaluate"], {"quantize"}, 7)           # a forced upstream stage runs too
    with pytest.raises(ConfigError) as e:
        plan({"stages": "evaluat"})
    assert "stages = 'evaluat': unknown stage; did you mean evaluate?" in str(e.value)
    assert "several: stages=[a,b]" in str(e.value)
    message = _problems([*DEMO, "stages=quantize,evaluate"])
    assert "for a list write stages=[quantize,evaluate]" in message


def test_a_quant_type_the_installed_llama_cpp_lacks_is_refused(monkeypatch):
    import llama_cpp

    monkeypatch.delattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_Q4_K_M")
    message = _problems([*DEMO])
    assert "quantize.types = 'q4_k_m': the installed llama.cpp" in message
    assert "has no Q4_K_M" in message


# -- unknown group options -------------------------------------------------------

def test_a_misspelled_recipe_is_an_error_listing_the_known_ones(capsys):
    from pipelines.cli import main

    with pytest.raises(ConfigError, match="did you mean chinese-llama-alpaca"):
        load_config(["recipe=chinese-llama-alpacca", "model=llama-7b"])
    assert main(["config", "recipe=chinese-llama-alpacca", "model=llama-7b"]) == 2
    err = capsys.readouterr().err
    assert "recipe = 'chinese-llama-alpacca': no such option in conf/recipe/" in err
    from pipelines.config import CONF_DIR

    known = sorted(p.stem for p in (CONF_DIR / "recipe").glob("*.yaml"))
    assert {"chinese-llama-alpaca", "demo", "demo-llama3", "stories260k"} <= set(known)
    assert f"(the options: {', '.join(known)})" in err
    with pytest.raises(ConfigError, match="did you mean fsdp"):
        load_config(["launcher@pretrain.launcher=fsdpp"])
    assert load_config(["recipe=demo"])["model"]["name"] == "tiny"


# -- llamaflow config --check / run ------------------------------------------------------------

def test_config_check_says_ok_or_lists_the_problems(capsys):
    from pipelines.cli import main

    assert main(["config", "--check", *DEMO]) == 0
    assert capsys.readouterr().out.startswith("config OK: 16 stages checked (download, convert,")
    assert main(["config", "--check", *DEMO, "sft.max_seq_length=4", "convert.dtype=fp16"]) == 2
    err = capsys.readouterr().err
    assert "sft.max_seq_length = 4: must be >= 8" in err
    assert "convert.dtype = 'fp16': must be one of 'bfloat16', 'float16' or 'float32'" in err


def test_llamaflow_run_refuses_a_bad_config_before_prefect_starts(tmp_path):
    workdir = tmp_path / "ws"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    p = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", *DEMO, f"workdir={workdir}",
                        "sft.max_seq_len=512"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2, p.stderr
    assert "sft.max_seq_len = 512: unknown key; did you mean sft.max_seq_length?" in p.stderr
    assert "Traceback" not in p.stderr and "prefect" not in p.stderr.lower()
    assert not workdir.exists() and not (tmp_path / "prefect-home").exists()


# -- defect 7: errors at flow start that say what to do ----------------------------------------

@pytest.mark.parametrize("content", [b"", b"\n  \n\n"])
def test_an_empty_pretraining_corpus_is_named(tmp_path, content):
    empty = tmp_path / "corpus" / "empty.txt"
    empty.parent.mkdir()
    empty.write_bytes(content)
    message = _problems([*DEMO, f"pretrain.data=[{tmp_path / 'corpus'}]"])
    assert f"pretrain.data = '{empty}': " in message
    assert "(no text)" in message and "add text to it or leave it out of pretrain.data" in message


def test_missing_and_unusable_data_files_are_named(tmp_path):
    (tmp_path / "notes.md").write_text("x")
    message = _problems([*DEMO, f"sft.data=[{tmp_path / 'nope.json'}]",
                         f"pretrain.data=[{tmp_path / 'notes.md'}]",
                         f"evaluate.prompts={tmp_path / 'prompts.json'}"])
    assert f"sft.data = ['{tmp_path / 'nope.json'}']: {tmp_path / 'nope.json'} does not exist" in message
    assert "has suffix '.md'" in message
    assert f"evaluate.prompts = '{tmp_path / 'prompts.json'}': prompt set" in message


def test_a_garbage_tokenizer_model_is_named_at_flow_start(tmp_path, shared_data):
    junk = tmp_path / "tokenizer.model"
    junk.write_bytes(b"<html>not a model</html>" * 10)
    message = _problems([*DEMO, f"vocab.extra_sp={junk}"])
    assert f"vocab.extra_sp = '{junk}': {junk} is not a SentencePiece model" in message
    assert "pass a tokenizer.model written by sentencepiece" in message
    message = _problems(["recipe=stories260k", f"source.tokenizer_model={junk}"])
    assert f"source.tokenizer_model = '{junk}': {junk} is not a SentencePiece model" in message


def _unwritable_workdirs(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    yield blocker / "ws"                    # a file where a folder should be
    yield Path("/sys/llamaflow-workspace")  # a folder nobody may create (sysfs), root included
    if os.geteuid() != 0:                   # root writes into any mode-555 folder
        ro = tmp_path / "read-only"
        ro.mkdir(mode=0o555)
        yield ro


def test_a_workspace_that_cannot_be_written_is_named_before_prefect(tmp_path, capsys):
    from pipelines.cli import main

    for workdir in _unwritable_workdirs(tmp_path):
        assert main(["run", *DEMO, f"workdir={workdir}"]) == 2
        err = capsys.readouterr().err
        assert f"workdir = '{workdir}'" in err, err
        assert "pass workdir=/a/writable/folder or set LLAMAFLOW_WORKDIR" in err
        assert main(["config", "--check", *DEMO, f"workdir={workdir}"]) == 2
        assert f"workdir = '{workdir}'" in capsys.readouterr().err


# -- eval sets too short for one llama.cpp chunk (defect 1) ------------------------------------

def test_the_stories260k_recipe_evaluates_sets_long_enough(shared_data):
    cfg, checked = check(["recipe=stories260k"])
    assert set(cfg["evaluate"]["eval_sets"]) == {"tinystories", "zh"}   # replaced, not merged
    assert cfg["evaluate"]["n_ctx"] == 256 and checked[-1] == "report"


def test_the_old_stories260k_eval_sets_are_refused_at_flow_start(shared_data):
    # what the recipe composed before it had its own evaluate option: the demo's sets at 256
    message = _problems(["recipe=stories260k", "evaluate=demo", "evaluate.n_ctx=256"])
    assert ("evaluate.eval_sets.en.path = '" + str(REPO / "pipelines/demo_data/eval_en.txt")) in message
    assert "needs 2 x n_ctx = 512 tokens (evaluate.n_ctx=256); base: 361 tokens with the " \
           "source's tokenizer" in message
    assert "evaluate.eval_sets.zh.path" in message
    assert ": 276 tokens with the merged vocabulary" in message   # the vocab stage's 276
    assert "Fix: a longer text, a smaller evaluate.n_ctx" in message
    assert check(["recipe=stories260k", "evaluate=demo", "evaluate.n_ctx=128"])  # 361, 276 >= 256


def test_a_budget_below_n_ctx_is_refused():
    message = _problems([*DEMO, "evaluate.eval_sets.en.max_tokens=32"])
    assert "evaluate.eval_sets.en.max_tokens = 32: < n_ctx 64" in message


def test_the_token_bounds_never_undercount(shared_data, tmp_path):
    """The bound that refuses a set when no tokenizer exists yet must be >= the real count under
    every tokenizer the lifecycle makes, on real texts (else it would refuse a good set)."""
    import sentencepiece as spm

    from steps.vocab import merge_tokenizers

    llama = shared_data / "tokenizers" / "llama_tokenizer.model"
    merged = merge_tokenizers(llama, shared_data / "tokenizers" / "chinese_sp.model", tmp_path / "m")
    sps = {"llama": spm.SentencePieceProcessor(model_file=str(llama)),
           "merged": spm.SentencePieceProcessor(model_file=str(merged / "tokenizer.model")),
           "tok512": spm.SentencePieceProcessor(
               model_file=str(shared_data / "models/stories260K/tok512.model"))}
    texts = [REPO / "pipelines/demo_data/eval_en.txt", REPO / "pipelines/demo_data/eval_zh.txt",
             shared_data / "eval/zh/libai_doc.txt", shared_data / "eval/tinystories/tinystories_sample.txt"]
    for path in texts:
        text = path.read_text(encoding="utf-8")
        for name, sp in sps.items():
            n = len(sp.encode(text)) + 1
            assert _upper_bound(text) >= n, (path, name)
            base = sps["tok512" if name == "tok512" else "llama"]
            assert _upper_bound(text, base) >= n, (path, name)


def test_a_forced_stage_upstream_of_the_selection_runs():
    """force=[merge] stages=[quantize,evaluate] recomputes merge and then the selection (it used
    to fail: merge was forced, so not looked up, and not selected, so 'not cached'); a forced
    stage after the last selected one does not extend the run."""
    from pipelines.validate import plan

    p = plan({"stages": ["quantize", "evaluate"], "force": ["merge"]})
    assert p.selected == ["merge", "quantize", "evaluate"] and p.force == {"merge"}
    p = plan({"stages": ["download"], "force": ["evaluate"]})
    assert p.selected == ["download"] and p.last == 0


def test_a_given_tokenizer_is_checked_against_the_source_before_any_stage(shared_data):
    """vocab.mode=given: a missing vocab.tokenizer, and one that does not extend the source's
    tokenizer (stories260K's 512 pieces here), are refused at flow start, key named."""
    out = _problems(["recipe=stories260k", "vocab.mode=given"])
    assert "vocab.tokenizer" in out and "set vocab.tokenizer=PATH" in out
    zh = shared_data / "tokenizers" / "chinese_sp.model"
    out = _problems(["recipe=stories260k", "vocab.mode=given", f"vocab.tokenizer={zh}"])
    assert f"vocab.tokenizer = '{zh}'" in out and "the base's is" in out and "id 3 is" in out
    llama = shared_data / "tokenizers" / "llama_tokenizer.model"
    out = _problems(["recipe=chinese-llama2-alpaca2", "source=hf", "source.repo_id=x/y",
                     "source.revision=main", f"pretrain.data=[{zh}]", f"sft.data=[{zh}]",
                     f"vocab.tokenizer={llama}"])   # 32000 + <pad>: not a multiple of 256
    assert "vocab.pad_to_multiple_of = 256" in out and "32001 tokens, not a multiple" in out


def test_imatrix_calibration_is_checked_at_flow_start():
    """Only when a type uses the matrix; no text, an eval set's own text, and a text that cannot
    hold llama-imatrix's 2 chunks are each refused with imatrix.data named."""
    assert "imatrix" not in check([*DEMO, "quantize.types=[f16,q4_0]"])[1]
    types = "quantize.types=[f16,q4_k_m@imatrix]"
    assert "imatrix" in check([*DEMO, types])[1]
    out = _problems([*DEMO, types, "imatrix.data=[]"])
    assert "imatrix.data" in out and "no calibration text" in out
    zh = REPO / "pipelines" / "demo_data" / "eval_zh.txt"
    out = _problems([*DEMO, "quantize.types=[f16,iq4_xs]", f"imatrix.data=[{zh}]",
                     f"evaluate.eval_sets.zh.path={zh}", "imatrix.n_ctx=512"])
    assert "is eval set `zh`'s text" in out and "llama-imatrix needs 1024" in out


def test_kld_with_the_strided_protocol_is_refused_at_flow_start():
    out = _problems([*DEMO, "evaluate.protocol=strided"])
    assert "evaluate.kld_reference = 'gguf-f16'" in out and "evaluate.kld_reference=null" in out
    check([*DEMO, "evaluate.protocol=strided", "evaluate.kld_reference=null"])
    check([*DEMO, "evaluate.protocol=strided", "evaluate.kld=false"])
