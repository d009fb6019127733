"""Adding a stage is what README's "Adding a stage" says: one module (steps/<name>.py with its
STAGE), one conf group (conf/<name>/default.yaml and its line in conf/config.yaml's
`defaults:`), one line in `lifecycle_steps`. A toy stage added exactly so, in a temp copy of
conf/, is checked, run through the real flow, cached, and named like the others; and what each
real stage declares agrees with its run()."""
from __future__ import annotations

import importlib
import inspect
import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest

from pipelines import config, lifecycle
from pipelines.config import ConfigError

TOY_MODULE = '''
"""A toy stage: lists the files of the model it is given."""
import json
from pathlib import Path

import pydantic

from steps import Stage

VERSION = "1"
STAGE = Stage()


class Config(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    greeting: str = pydantic.Field("hello", description="written into toy.json")


DATA_FIELDS = ()


def not_reusable(path):
    # a stage may refuse its own stored result (the judge's, made while its endpoint was down)
    made = json.loads((Path(path) / "toy.json").read_text())
    return "it said no" if made["greeting"] == "no" else None


def run(config, out_dir, *, on_metrics=None, model):
    files = sorted(p.name for p in Path(model).iterdir())
    (Path(out_dir) / "toy.json").write_text(json.dumps({"greeting": config.greeting,
                                                         "files": files}))
    return {"model_files": len(files)}
'''
# the one line lifecycle_steps gains, after the stage whose output it takes
AFTER = 'hf = run.stage("convert", meta=meta)'
TOY_LINE = 'run.stage("toy", model=hf)'
STAGES = "stages=[download,convert,toy]"


def _with_line(function, after: str, line: str):
    """`function` with `line` added after its line `after` (same indent), compiled in its module."""
    source = textwrap.dedent(inspect.getsource(function))
    anchor = f"    {after}\n"
    assert anchor in source, f"lifecycle_steps no longer has the line {after!r}"
    module = sys.modules[function.__module__]
    namespace = dict(vars(module))
    exec(compile(source.replace(anchor, f"{anchor}    {line}\n"), module.__file__, "exec"),
         namespace)
    return namespace[function.__name__]


@pytest.fixture
def toy_stage(tmp_path, monkeypatch):
    """The three edits of README's "Adding a stage", made in copies: steps/toy.py (a folder on
    steps.__path__), conf/toy/default.yaml with `- toy: default` after convert in a copy of
    conf/, and lifecycle_steps with one more line."""
    import steps

    from pipelines.cli import main

    conf = tmp_path / "conf"
    shutil.copytree(config.CONF_DIR, conf)
    root = conf / "config.yaml"
    text = root.read_text()
    assert "  - convert: default\n" in text
    root.write_text(text.replace("  - convert: default\n",
                                 "  - convert: default\n  - toy: default\n", 1))
    modules = tmp_path / "toy_steps"
    modules.mkdir()
    (modules / "toy.py").write_text(TOY_MODULE)

    monkeypatch.setattr(config, "CONF_DIR", conf)
    monkeypatch.setattr(steps, "__path__", [*steps.__path__, str(modules)])
    monkeypatch.setattr(lifecycle, "lifecycle_steps",
                        _with_line(lifecycle.lifecycle_steps, AFTER, TOY_LINE))
    assert main(["config", "--write-defaults"]) == 0   # conf/toy/default.yaml, from the Config
    assert "greeting: hello" in (conf / "toy" / "default.yaml").read_text()
    yield
    sys.modules.pop("steps.toy", None)


def test_a_toy_stage_is_checked_run_and_cached(toy_stage, tmp_path, prefect_harness, shared_data,
                                               capsys):
    from pipelines.cli import main
    from pipelines.stages import stage_order, task_names
    from pipelines.validate import check

    assert stage_order()[:3] == ["download", "convert", "toy"]
    assert config.load_config([])["stages"][:3] == ["download", "convert", "toy"]
    assert "toy" in task_names()

    ws = tmp_path / "ws"
    overrides = ["recipe=stories260k", f"workdir={ws}", STAGES]
    # validation: the toy's Config is checked like any stage's, its name is a stage's name
    assert main(["config", "--check", *overrides]) == 0
    assert capsys.readouterr().out.strip() == \
        "config OK: 3 stages checked (download, convert, toy)"
    with pytest.raises(ConfigError, match=r"toy.greting = 'x': unknown key; did you mean "
                                          r"toy.greeting\?"):
        check([*overrides, "+toy.greting=x"])
    assert check([*overrides, "+retries.toy=1", "force=[toy]"])[1] == ["download", "convert", "toy"]

    first = lifecycle.lifecycle(overrides=overrides)
    assert {k: r["cache"] for k, r in first["stages"].items()} == \
        {"download": "miss", "convert": "miss", "toy": "miss"}
    toy = first["stages"]["toy"]
    made = json.loads((Path(toy["artifact"]) / "toy.json").read_text())
    convert_dir = Path(first["stages"]["convert"]["artifact"])
    assert made == {"greeting": "hello", "files": sorted(p.name for p in convert_dir.iterdir())}
    manifest = json.loads((Path(toy["artifact"]) / "manifest.json").read_text())
    assert manifest["stage"] == "toy"
    assert manifest["inputs"]["artifacts"] == {"model": first["stages"]["convert"]["digest"]}

    second = lifecycle.lifecycle(overrides=overrides)
    assert {k: r["cache"] for k, r in second["stages"].items()} == \
        {"download": "hit", "convert": "hit", "toy": "hit"}
    assert second["stages"]["toy"]["artifact"] == toy["artifact"]
    assert second["stages"]["toy"]["digest"] == toy["digest"]
    # a result its stage will not reuse is computed again, in place of the stored one
    refused = [*overrides, "toy.greeting=no"]
    assert lifecycle.lifecycle(overrides=refused)["stages"]["toy"]["cache"] == "miss"
    again = lifecycle.lifecycle(overrides=refused)["stages"]
    assert again["toy"]["cache"] == "retried" and again["convert"]["cache"] == "hit"
    assert not list((Path(again["toy"]["artifact"]).parent).glob(".tmp-*"))


STAGE_MODULES = ["download", "convert", "vocab", "pretrain", "sft", "merge", "quantize",
                 "imatrix", "evaluate", "speed", "judge", "report"]


def test_the_stages_are_the_declaring_groups_of_the_defaults_list():
    from pipelines.stages import stage_order, task_names

    assert task_names() == STAGE_MODULES
    assert stage_order() == [s for s in STAGE_MODULES if s not in ("imatrix", "speed", "judge",
                                                                  "report")]


@pytest.mark.parametrize("name", STAGE_MODULES)
def test_a_declaration_agrees_with_its_run(name):
    """resumable and data_cache say which directories the runner passes: run() must take them."""
    module = importlib.import_module(f"steps.{name}")
    params = inspect.signature(module.run).parameters
    assert module.STAGE.resumable == ("resume_dir" in params)
    assert module.STAGE.data_cache == ("data_cache_dir" in params)
    if module.STAGE.flow is not None:   # flow keys are the flow's, never the step's
        assert not set(module.STAGE.flow.model_fields) & set(module.Config.model_fields)
