"""Every stage default has one source, its pydantic models: conf/<stage>/default.yaml and the
group options written from a model (conf/source/<kind>.yaml, conf/launcher/single.yaml) are what
pipelines/defaults.py writes from them, `llamaflow config --help-stage` shows them, and the other
options of a group hold only what they change."""
from __future__ import annotations

import shutil
import sys
import types
from typing import Literal

import pydantic
import pytest
import yaml
from omegaconf import OmegaConf
from pydantic import Field

from pipelines import config, defaults
from pipelines.cli import main
from pipelines.stages import task_names
from steps import Stage

STAGE_NAMES = task_names()
GENERATED = sorted(defaults.generated_options())


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_committed_default_yaml_is_what_the_config_gives(stage):
    committed = defaults.path(stage).read_text(encoding="utf-8")
    assert committed == defaults.render(stage), (
        f"conf/{stage}/default.yaml is not what {', '.join(defaults.sources(stage))} give: run "
        f"`{defaults.REGENERATE}` (and commit the file it writes)")


@pytest.mark.parametrize("name", GENERATED)
def test_committed_generated_options_are_what_their_models_give(name):
    option = defaults.generated_options()[name]
    assert option.path.read_text(encoding="utf-8") == defaults.render_option(option), (
        f"conf/{name}.yaml is not what {option.model.__name__} gives: run `{defaults.REGENERATE}`")
    raw = OmegaConf.to_container(OmegaConf.create(defaults.render_option(option)), resolve=False)
    assert raw == {n: defaults.conf_default(f) for n, f in option.model.model_fields.items()}


def test_the_generated_options_are_the_launcher_default_and_one_per_source_kind():
    assert GENERATED == ["launcher/single", "source/hf", "source/hf_model", "source/llama2c",
                         "source/local", "source/local_hf", "source/url"]


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_the_yaml_reads_back_as_each_default(stage):
    """Quoting and flow style keep every value (a template with line breaks and a trailing space,
    interpolations, floats); group-option fields are picked in `defaults:`, not written."""
    raw = OmegaConf.to_container(OmegaConf.create(defaults.render(stage)), resolve=False)
    picked = raw.pop("defaults", [])
    expected, options = {}, []
    for k in defaults.keys(stage):
        spec = (k.field.json_schema_extra or {}).get("conf_option")
        if spec:
            options.append(spec)
        else:
            expected[k.name] = defaults.conf_default(k.field)
    assert raw == expected
    if options:
        assert len(picked) == len(options) + 1 and picked[-1] == "_self_"
    else:
        assert picked == []
    for spec in options:   # the option a field names exists
        group, option = spec.rsplit("/", 1)
        folder = config.CONF_DIR / defaults.option_folder(stage, group)
        assert (folder / f"{option}.yaml").is_file(), spec


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_other_options_of_a_stage_hold_only_what_they_change(stage):
    """An option built on default.yaml (conf/evaluate/demo.yaml) repeats none of its values."""
    base = OmegaConf.to_container(OmegaConf.load(defaults.path(stage)), resolve=False)
    for option in sorted((config.CONF_DIR / stage).glob("*.yaml")):
        raw = yaml.safe_load(option.read_text(encoding="utf-8")) or {}
        if option.name == "default.yaml" or "default" not in (raw.get("defaults") or []):
            continue
        same = [k for k, v in raw.items() if k != "defaults" and base.get(k) == v]
        assert not same, f"{option.relative_to(config.REPO)} repeats default.yaml's {same}"


def test_write_defaults_rewrites_only_a_stale_file(tmp_path, monkeypatch, capsys):
    conf = tmp_path / "conf"
    shutil.copytree(config.CONF_DIR, conf)
    monkeypatch.setattr(config, "CONF_DIR", conf)
    files = defaults.generated_files()
    assert set(files) == {*STAGE_NAMES, *GENERATED}
    fresh = {name: text() for name, (_, text) in files.items()}
    for name, (path, _) in files.items():   # the checkout may be mid-edit: start from the models
        path.write_text(fresh[name], encoding="utf-8")
    (conf / "merge" / "default.yaml").write_text("strategy: linear\n", encoding="utf-8")
    (conf / "source" / "hf.yaml").unlink()
    assert defaults.stale() == ["merge", "source/hf"]
    assert main(["config", "--write-defaults"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"wrote {conf / 'merge' / 'default.yaml'}",
                                                    f"wrote {conf / 'source' / 'hf.yaml'}"]
    assert (conf / "merge" / "default.yaml").read_text(encoding="utf-8") == fresh["merge"]
    assert (conf / "source" / "hf.yaml").read_text(encoding="utf-8") == fresh["source/hf"]
    assert defaults.stale() == []
    assert main(["config", "--write-defaults"]) == 0
    assert "already what its Config gives" in capsys.readouterr().out


def test_help_stage_shows_every_key_with_its_default_type_and_meaning(capsys):
    from steps import sft

    assert main(["config", "--help-stage", "sft"]) == 0
    out = capsys.readouterr().out
    lr = sft.Config.model_fields["learning_rate"]
    assert "sft.learning_rate = 0.0001  (float, > 0)" in out
    assert lr.description.split()[0] in out.split("sft.learning_rate = ", 1)[1].splitlines()[1]
    assert "sft.lora.r = 8  (int, >= 1)" in out
    assert "sft.launcher" in out and "sft.launcher.nproc = 1" in out
    for stage in STAGE_NAMES:
        text = defaults.describe(stage)
        for k in defaults.keys(stage):
            assert f"  {stage}.{k.name}" in text, (stage, k.name)
    evaluate = defaults.describe("evaluate")
    assert "evaluate.models = [base, base-zh, base-zh+pt, merged, gguf]" in evaluate
    assert "read by the flow" in evaluate
    assert "evaluate.template = ${sft.prompt_template}  (str; in Python: \"Below is" in evaluate
    assert "evaluate.eval_sets: conf/evaluate/eval_sets/default.yaml" in evaluate


def test_help_stage_shows_the_keys_of_each_source_kind():
    from steps import download

    text = defaults.describe("download")
    by_kind = defaults.kinds(download.Config.model_fields["source"])
    assert list(by_kind) == ["local", "url", "hf", "llama2c", "hf_model", "local_hf"]
    for kind, model in by_kind.items():
        assert f"  source.kind = {kind}: conf/source/{kind}.yaml" in text
        part = text.split(f"source.kind = {kind}:", 1)[1].split("source.kind =", 1)[0]
        for name, field in model.model_fields.items():
            if name != "kind":
                assert f"  source.{name}" in part and field.description, (kind, name)
    assert "  source.hardlink = false  (bool)" in text
    assert "  source.model_dir = ${model.meta_dir}  (str; in Python: '')" in text
    assert "  source.n_shards = ${model.n_shards}  (int, >= 1; in Python: required)" in text
    assert "  source.repo_id  (str; required)" in text


# -- conf/launcher and conf/source: each option extends one written from the model ------------

# How a run picks an option of the group, and where its keys land.
PICK = {"launcher": ("launcher@pretrain.launcher={}", ("pretrain", "launcher")),
        "source": ("source={}", ("source",))}


@pytest.mark.parametrize("group", sorted(PICK))
def test_the_other_options_of_launcher_and_source_repeat_no_default(group):
    """conf/launcher/ddp_cpu.yaml extends the generated single.yaml, conf/source/demo.yaml the
    generated local.yaml, and each holds only what differs from its model's defaults, while the
    composed section still holds every key (so `pretrain.launcher.timeout_s=60` and
    `source.hardlink=true` work with any option). One that extends none (stories260k, which
    tests/test_download.py also reads alone) names its `kind` and repeats no default either."""
    generated = {n.split("/", 1)[1]: o.model for n, o in defaults.generated_options().items()
                 if n.startswith(f"{group}/")}
    pick, where = PICK[group]
    checked = []
    for option in sorted((config.CONF_DIR / group).glob("*.yaml")):
        if option.stem in generated:
            continue
        raw = yaml.safe_load(option.read_text(encoding="utf-8")) or {}
        extends = [d for d in raw.pop("defaults", None) or [] if d != "_self_"]
        assert len(extends) <= 1 and set(extends) <= set(generated), (option.name, extends)
        model = generated[extends[0]] if extends else generated.get(raw.get("kind"))
        assert model is not None, f"{option.name} extends no generated option of conf/{group}/"
        base = {n: defaults.conf_default(f) for n, f in model.model_fields.items()}
        assert set(raw) <= set(base), (option.name, set(raw) - set(base))
        selects = set() if extends else {"kind"}
        same = sorted(k for k, v in raw.items() if base[k] == v and k not in selects)
        assert not same, f"conf/{group}/{option.name} repeats {model.__name__}'s defaults {same}"
        if extends:
            composed = config.load_config([pick.format(option.stem), "workdir=/w"])
            for part in where:
                composed = composed[part]
            assert list(composed) == list(base), option.name
        checked.append(option.stem)
    assert checked == {"launcher": ["ddp_cpu", "ddp_gpu", "fsdp"],
                       "source": ["demo-llama3", "demo", "stories260k"]}[group]


# -- the generator itself -------------------------------------------------------------------

@pytest.fixture
def toy_stage(monkeypatch):
    """A stage `toy` whose Config is the one given (not in conf/config.yaml: only rendered)."""
    def make(cfg: type[pydantic.BaseModel]) -> str:
        module = types.ModuleType("steps.toy")
        module.Config, module.STAGE = cfg, Stage()
        monkeypatch.setitem(sys.modules, "steps.toy", module)
        return "toy"
    return make


class _Inner(pydantic.BaseModel):
    name: str = Field(description="required inside a model")
    size: int = Field(2, description="with a default")


def test_a_field_without_a_default_is_written_as_hydras_mandatory_value(toy_stage):
    class Config(pydantic.BaseModel):
        """toy stage."""
        data: list[str] = Field(description="files to read")
        inner: _Inner = Field(description="a model the config must give")
        kind: Literal["toy"]

    stage = toy_stage(Config)
    text = defaults.render(stage)
    assert "\ndata: ???\n" in text and "\n  name: ???\n" in text and "\nkind: toy\n" in text
    cfg = OmegaConf.create(text)
    assert OmegaConf.is_missing(cfg, "data") and OmegaConf.is_missing(cfg.inner, "name")
    assert cfg.inner.size == 2
    described = defaults.describe(stage)
    assert "  toy.data  (list[str]; required)" in described
    assert "  toy.inner  (_Inner; required)" in described
    assert "  toy.inner.name  (str; required)" in described
    assert "  toy.inner.size = 2  (int)" in described


def test_a_partial_conf_mapping_is_written_as_given(toy_stage):
    class Config(pydantic.BaseModel):
        inner: _Inner = Field(default_factory=lambda: _Inner(name="a"),
                              json_schema_extra={"conf": {"name": "${model.name}"}})

    text = defaults.render(toy_stage(Config))
    assert OmegaConf.to_container(OmegaConf.create(text), resolve=False) == {
        "inner": {"name": "${model.name}"}}
    assert "# required inside a model" in text


def test_a_conf_option_on_a_nested_field_is_an_error(toy_stage):
    from steps.train.config import LauncherSettings

    class Holder(pydantic.BaseModel):
        launcher: LauncherSettings = Field(default_factory=LauncherSettings,
                                           json_schema_extra={"conf_option": "/launcher/single"})

    class Config(pydantic.BaseModel):
        holder: Holder = Field(default_factory=Holder)

    stage = toy_stage(Config)
    for make in (defaults.render, defaults.describe):
        with pytest.raises(TypeError, match=r"Holder\.launcher: conf_option works only on"):
            make(stage)


@pytest.mark.parametrize("value", [
    "1e5", "1E5", "1e+5", "3e-4", "-2E-3", "1_000", "0x1F", ".inf", "nan", "true", "Yes", "null",
    "~", "12", "1.5", "", "${model.dim}", "a: b", "#x", "- x", "[a]", "你好 → Δ", "two\nlines",
    " edge ", ["1e5", "x"], {"lr": "3e-4", "n": 1}, 1e5, 3e-4, 2e-4, 1.0, 7, True, None, []])
def test_flow_text_reads_back_as_the_same_value(value):
    text = defaults.flow_text(value)
    assert "\n" not in text
    back = OmegaConf.to_container(OmegaConf.create(f"k: {text}"), resolve=False)["k"]
    assert back == value and type(back) is type(value), text


def test_strings_omegaconf_reads_as_numbers_are_quoted():
    for s in ("1e5", "1E5", "1e+5", "3e-4"):
        assert defaults.flow_text(s) == f'"{s}"'
    assert defaults.flow_text(["cosine", "1e5"]) == '[cosine, "1e5"]'
    assert defaults.flow_text(3e-4) == "0.0003" and defaults.flow_text("plain") == "plain"


def test_help_stage_names_the_stages_for_an_unknown_one(capsys):
    assert main(["config", "--help-stage", "evaluat"]) == 2
    err = capsys.readouterr().err
    assert "did you mean evaluate?" in err and "download, convert" in err
