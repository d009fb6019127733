"""The conf/ files written from the stages' own pydantic models.

A stage's Config, and its STAGE.flow model (the keys the flow reads, not run()), are the one
place where a default is set and where its meaning is written (the field's description).
conf/<stage>/default.yaml, which Hydra composes, is generated from them by
`llamaflow config --write-defaults`, each description becoming the key's comment;
tests/test_defaults.py fails when a committed file is not what the models give, and
`llamaflow config --help-stage STAGE` shows the same keys with their types and defaults.
A field without a default is written as Hydra's `???` (mandatory: the run stops until it is set).

Group options are written from models too, each holding every field of its model:
  * the option a `conf_option` field holding a model names (conf/launcher/single.yaml is
    LauncherSettings(), TrainConfig.launcher's default);
  * conf/<section>/<kind>.yaml for each model of a top-level section that is a union
    discriminated by `kind` (conf/source/local.yaml ... from steps/download.py's Source models).
A group's other options extend one of these (`defaults: [single, _self_]`) and hold only what they
change, so the composed config still holds every key (Hydra refuses `source.hardlink=true` where
the key does not exist).

A field's `json_schema_extra` may say what the file holds instead of the Python default:
  conf         a value only the composed config can give, written as it is: an interpolation
               such as ${model.context_length}, or a file of this repository;
  conf_option  on a stage's top-level field: the conf/ group option that holds the field's value:
               "/launcher/single" is conf/launcher/single.yaml, "eval_sets/default"
               conf/<stage>/eval_sets/default.yaml. The file picks it in its `defaults:` list and
               writes none of its keys (a mapping from a group option is replaced whole when
               another option is picked; one given as keys would be merged key by key).
Fields the stage takes from a top-level section (STAGE.global_sections, such as `source`) are
not written in conf/<stage>/default.yaml.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import json
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Callable, NamedTuple

import pydantic
import yaml
from omegaconf import OmegaConf
from pydantic.fields import FieldInfo

from pipelines import config
from pipelines.stages import declared, task_names

REGENERATE = "llamaflow config --write-defaults"
WIDTH = 100      # the repository's line length; comments are wrapped to it
MISSING = "???"  # Hydra's mandatory value: what a field without a default is written as


class Key(NamedTuple):
    """One top-level key of a stage's conf section."""
    name: str
    field: FieldInfo
    flow: bool          # read by the flow (STAGE.flow), not passed to the step's Config


class GeneratedOption(NamedTuple):
    """A conf/ group option written from a model: every field, with its default and meaning."""
    name: str                           # its path under conf/ without .yaml: "source/local"
    model: type[pydantic.BaseModel]

    @property
    def path(self) -> Path:
        return config.CONF_DIR / f"{self.name}.yaml"


def path(stage: str) -> Path:
    return config.CONF_DIR / stage / "default.yaml"


def config_model(stage: str) -> type[pydantic.BaseModel]:
    """The Config that steps/<stage>.py runs with."""
    return importlib.import_module(f"steps.{stage}").Config


def keys(stage: str) -> list[Key]:
    """The stage's conf keys in file order: the flow's first, then Config's."""
    cfg, stage_decl = config_model(stage), declared(stage)
    flow = stage_decl.flow
    out = [Key(n, f, True) for n, f in (flow.model_fields if flow else {}).items()]
    clash = set(flow.model_fields if flow else ()) & set(cfg.model_fields)
    if clash:
        raise TypeError(f"steps/{stage}.py: {', '.join(sorted(clash))} is both a flow key and a "
                        "Config field")
    return out + [Key(n, f, False) for n, f in cfg.model_fields.items()
                  if n not in stage_decl.global_sections]


def section_fields(stage: str) -> dict[str, FieldInfo]:
    """The Config fields the stage takes from top-level sections (download's `source`)."""
    cfg = config_model(stage)
    return {name: cfg.model_fields[name] for name in declared(stage).global_sections}


def _extra(field: FieldInfo) -> dict:
    extra = field.json_schema_extra
    return extra if isinstance(extra, dict) else {}


def _single_literal(field: FieldInfo) -> tuple[bool, Any]:
    """(True, value) for a field that can hold one value only (a source's `kind`)."""
    args = typing.get_args(field.annotation)
    one = typing.get_origin(field.annotation) is typing.Literal and len(args) == 1
    return one, (args[0] if one else None)


def python_default(field: FieldInfo) -> Any:
    """The field's default as plain data (what the YAML would hold without `conf`); MISSING for a
    field without one, except one that can hold one value only (a source's `kind`)."""
    if field.is_required():
        one, value = _single_literal(field)
        return value if one else MISSING
    value = field.get_default(call_default_factory=True)
    return pydantic.TypeAdapter(field.annotation).dump_python(value, mode="json")


def conf_default(field: FieldInfo) -> Any:
    """What conf/ gives the field: its `conf` value, else its Python default; for a required field
    holding a model, that model's fields' (each MISSING where it has no default)."""
    extra = _extra(field)
    if "conf" in extra:
        return extra["conf"]
    held = held_model(field.annotation)
    if field.is_required() and held:
        return {name: conf_default(f) for name, f in held.model_fields.items()}
    return python_default(field)


def held_model(annotation) -> type[pydantic.BaseModel] | None:
    """The pydantic model a field holds (Optional allowed), else None."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    ok = isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel)
    return annotation if ok else None


def entry_model(annotation) -> type[pydantic.BaseModel] | None:
    """The model of each value of a dict[str, Model] field, else None."""
    if typing.get_origin(annotation) is dict:
        return held_model(typing.get_args(annotation)[-1])
    return None


def kinds(field: FieldInfo) -> dict[str, type[pydantic.BaseModel]]:
    """The models of a union field discriminated by a one-value Literal (a source's `kind`), by
    that value; {} for any other field."""
    tag = field.discriminator
    if not isinstance(tag, str):
        return {}
    return {str(python_default(m.model_fields[tag])): m for m in typing.get_args(field.annotation)
            if isinstance(m, type) and issubclass(m, pydantic.BaseModel) and tag in m.model_fields}


def nested_fields(model: type[pydantic.BaseModel]) -> dict[str, FieldInfo]:
    """The fields of a model written inside a section; `conf_option` is read on a stage's
    top-level fields only (its `defaults:` list picks the option), so one here is an error."""
    for name, f in model.model_fields.items():
        if _option(f):
            raise TypeError(f"{model.__name__}.{name}: conf_option works only on a stage Config's "
                            "(or flow model's) own fields, where the stage's defaults: list picks "
                            "the option; here it would be ignored")
    return model.model_fields


def _python_values(model: type[pydantic.BaseModel]) -> dict:
    return {name: python_default(f) for name, f in model.model_fields.items()}


def generated_options() -> dict[str, GeneratedOption]:
    """The group options written from a model, by name ("launcher/single", "source/local")."""
    found: dict[str, type[pydantic.BaseModel]] = {}

    def add(name: str, model: type[pydantic.BaseModel]) -> None:
        if found.setdefault(name, model) is not model:
            raise TypeError(f"conf/{name}.yaml would be written from both "
                            f"{found[name].__name__} and {model.__name__}")

    for stage in task_names():
        for k in keys(stage):
            option, held = _option(k.field), held_model(k.field.annotation)
            if option and held:
                if python_default(k.field) != _python_values(held):
                    raise TypeError(f"steps/{stage}.py: {k.name}'s default is not {held.__name__}()"
                                    f", which conf/{option_folder(stage, option[0])}/{option[1]}"
                                    ".yaml is written from")
                add(f"{option_folder(stage, option[0])}/{option[1]}", held)
        for section, field in section_fields(stage).items():
            for kind, model in kinds(field).items():
                add(f"{section}/{kind}", model)
    return {name: GeneratedOption(name, model) for name, model in found.items()}


# ----------------------------------------------------------------------------- the YAML text

def _reads_back(text: str, value: Any) -> bool:
    """Whether OmegaConf (which reads 1e5 as a float, unlike PyYAML) gives `value` for `text`."""
    try:
        back = OmegaConf.to_container(OmegaConf.create(f"k: {text}"), resolve=False)["k"]
    except Exception:
        return False
    return json.dumps(back) == json.dumps(value)   # also tells 1 from 1.0 and true


def flow_text(value: Any) -> str:
    """One value on one line, as OmegaConf reads it back (strings quoted only where it needs it;
    one with a line break or edge spaces as a double-quoted string with escapes)."""
    if value == MISSING:
        return MISSING                                 # as Hydra writes it, not quoted
    if isinstance(value, str) and ("\n" in value or value != value.strip()):
        return json.dumps(value, ensure_ascii=False)   # JSON strings are YAML double-quoted ones
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf"), allow_unicode=True,
                          sort_keys=False).removesuffix("\n...\n").rstrip("\n")
    if _reads_back(text, value):
        return text
    if isinstance(value, str):                         # "1e5": a float to OmegaConf
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return f"[{', '.join(flow_text(v) for v in value)}]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{flow_text(k)}: {flow_text(v)}" for k, v in value.items()) + "}"
    raise ValueError(f"{value!r} does not read back from YAML as itself")


def _comment(text: str | None, indent: str) -> list[str]:
    """`text` as comment lines wrapped to WIDTH; its own line breaks start new lines."""
    lines = []
    for line in (text or "").splitlines():
        lines += [f"{indent}# {w}" for w in textwrap.wrap(
            line, WIDTH - len(indent) - 2, break_long_words=False, break_on_hyphens=False)]
    return lines


def _model_lines(model: type[pydantic.BaseModel], value: dict, indent: str) -> list[str]:
    """The fields of `model` that `value` holds, in the model's order, each with its description
    (a `conf` mapping may give only some); keys that are no field are written as given."""
    fields = nested_fields(model)
    lines = []
    for name, f in fields.items():
        if name in value:
            lines += _key_lines(name, f, value[name], indent)
    return lines + [f"{indent}{k}: {flow_text(v)}" for k, v in value.items() if k not in fields]


def _key_lines(name: str, field: FieldInfo, value: Any, indent: str) -> list[str]:
    """A key with its description above it; a model's fields (and each entry of a dict of
    models) nested, each with its own."""
    lines = _comment(field.description, indent)
    model, entries = held_model(field.annotation), entry_model(field.annotation)
    if model and isinstance(value, dict):
        lines.append(f"{indent}{name}:")
        lines += _model_lines(model, value, indent + "  ")
    elif entries and isinstance(value, dict) and value:
        lines.append(f"{indent}{name}:")
        for entry, fields in value.items():
            if isinstance(fields, dict):
                lines.append(f"{indent}  {entry}:")
                lines += _model_lines(entries, fields, indent + "    ")
            else:
                lines.append(f"{indent}  {entry}: {flow_text(fields)}")
    else:
        lines.append(f"{indent}{name}: {flow_text(value)}")
    return lines


def _option(field: FieldInfo) -> tuple[str, str] | None:
    """(group, option) of a `conf_option` field: ("/launcher", "single")."""
    spec = _extra(field).get("conf_option")
    return tuple(spec.rsplit("/", 1)) if spec else None


def option_folder(stage: str, group: str) -> str:
    """The conf/ folder of a `conf_option` group: absolute (/launcher) or the stage's own."""
    return group[1:] if group.startswith("/") else f"{stage}/{group}"


def _defaults_entry(name: str, group: str, option: str) -> str:
    """The Hydra defaults-list entry that puts `group`'s `option` at the key `name`."""
    return f"{group}: {option}" if group == name else f"{group}@{name}: {option}"


def _source_files(*models: type[pydantic.BaseModel] | None) -> list[str]:
    """The files `models` are written in: the first one's first, then those of the models they
    extend or hold."""
    found: list[type] = []

    def visit(model):
        for cls in model.__mro__:
            if issubclass(cls, pydantic.BaseModel) and cls is not pydantic.BaseModel \
                    and cls not in found:
                found.append(cls)
                for f in cls.model_fields.values():
                    for inner in (held_model(f.annotation), entry_model(f.annotation)):
                        if inner:
                            visit(inner)

    for m in models:
        if m:
            visit(m)
    files = [_repo_relative(Path(inspect.getsourcefile(c)).resolve()) for c in found]
    return list(dict.fromkeys(files))


def sources(stage: str) -> list[str]:
    """The files the stage's conf section is written from: its module first, then those of the
    models its fields extend or hold."""
    return _source_files(config_model(stage), declared(stage).flow)


def _repo_relative(source: Path) -> str:
    """A source file as the header names it: relative to the repo when it is in it."""
    return source.relative_to(config.REPO).as_posix() if source.is_relative_to(config.REPO) \
        else str(source)


def _doc(model: type) -> str:
    return inspect.cleandoc(model.__dict__.get("__doc__") or "")


def _header(files: list[str], doc: str) -> list[str]:
    """The comment a generated file starts with: where it comes from, then the model's doc."""
    lines = _comment(f"GENERATED from {', '.join(files)} by `{REGENERATE}`: change a default or "
                     "its description there, then run that command (tests/test_defaults.py fails "
                     "while this file differs).", "")
    return lines + (["#"] + [f"# {line}".rstrip() for line in doc.splitlines()] if doc else [])


def render(stage: str) -> str:
    """conf/<stage>/default.yaml as the stage's models give it."""
    lines = _header(sources(stage), _doc(config_model(stage)))
    stage_keys = keys(stage)
    picked = [(k, _option(k.field)) for k in stage_keys if _option(k.field)]
    if picked:
        lines += ["defaults:"]
        for k, (group, option) in picked:
            lines += _comment(k.field.description, "  ")
            lines.append(f"  - {_defaults_entry(k.name, group, option)}   # options: "
                         f"conf/{option_folder(stage, group)}/")
        lines += ["  - _self_"]
    lines.append("")
    for k in stage_keys:
        if not _option(k.field):
            lines += _key_lines(k.name, k.field, conf_default(k.field), "")
    return "\n".join(lines) + "\n"


def render_option(option: GeneratedOption) -> str:
    """A generated group option (conf/source/local.yaml) as its model gives it."""
    lines = _header(_source_files(option.model), _doc(option.model)) + [""]
    values = {name: conf_default(f) for name, f in option.model.model_fields.items()}
    return "\n".join(lines + _model_lines(option.model, values, "")) + "\n"


def generated_files() -> dict[str, tuple[Path, Callable[[], str]]]:
    """Every generated file by name (a stage, `merge`, or an option, `source/local`): its path
    and what it should hold."""
    out = {s: (path(s), functools.partial(render, s)) for s in task_names()}
    out.update({name: (o.path, functools.partial(render_option, o))
                for name, o in generated_options().items()})
    return out


def stale() -> list[str]:
    """The generated files (by name) that are not what their models give."""
    return [name for name, (p, text) in generated_files().items()
            if not p.is_file() or p.read_text(encoding="utf-8") != text()]


def write() -> list[Path]:
    """Regenerate every stale generated file; the files written."""
    files, written = generated_files(), []
    for name in stale():
        p, text = files[name]
        p.parent.mkdir(parents=True, exist_ok=True)   # a new stage's group
        p.write_text(text(), encoding="utf-8")
        written.append(p)
    return written


# ----------------------------------------------------------------------------- --help-stage

def type_name(annotation) -> str:
    """A field's type as a reader writes it: `int | null`, `cosine | linear`, `list[str]`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin in (list, dict, tuple, set):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def _bounds(field: FieldInfo) -> str:
    ops = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
    found = [f"{op} {getattr(m, attr)}" for m in field.metadata for attr, op in ops
             if getattr(m, attr, None) is not None]
    return f", {', '.join(found)}" if found else ""


def _override(stage: str, name: str, group: str) -> str:
    """How a run picks another option of a `conf_option` field's group."""
    if group.startswith("/"):
        return f"{group[1:]}@{stage}.{name}=NAME"
    return f"{stage}/{group}=NAME" if group == name else f"{stage}/{group}@{stage}.{name}=NAME"


def _head(stage: str, dotted: str, field: FieldInfo, value: Any, note: str) -> str:
    """`key = default  (type)`; a group option's key names its file, a model's only its type."""
    kind = type_name(field.annotation) + _bounds(field) + note
    option = _option(field)
    if option:
        group, choice = option
        name = dotted.rpartition(".")[2]
        return f"{dotted}: conf/{option_folder(stage, group)}/{choice}.yaml  ({kind}; another: " \
               f"{_override(stage, name, group)})"
    required = "; required" if field.is_required() else ""
    if held_model(field.annotation) and isinstance(value, dict):
        return f"{dotted}  ({kind}{required})"
    if "conf" in _extra(field):
        python = "required" if required else flow_text(python_default(field))
        return f"{dotted} = {flow_text(value)}  ({kind}; in Python: {python})"
    if required:
        return f"{dotted}  ({kind}{required})"
    return f"{dotted} = {flow_text(value)}  ({kind})"


def _wrapped(text: str | None, indent: str = "      ") -> list[str]:
    return [f"{indent}{w}" for line in (text or "").splitlines()
            for w in textwrap.wrap(line, WIDTH - len(indent), break_long_words=False,
                                   break_on_hyphens=False)]


def _describe(stage: str, dotted: str, field: FieldInfo, value: Any, note: str = "") -> list[str]:
    """One key for --help-stage, its description below; a model's fields (and a dict of
    models' entry fields) after it."""
    lines = [f"  {_head(stage, dotted, field, value, note)}"] + _wrapped(field.description)
    model, entries = held_model(field.annotation), entry_model(field.annotation)
    if model:
        values = value if isinstance(value, dict) else {}
        for sub, f in nested_fields(model).items():
            lines += _describe(stage, f"{dotted}.{sub}", f, values.get(sub, conf_default(f)))
    elif entries:
        for sub, f in nested_fields(entries).items():
            lines += _describe(stage, f"{dotted}.<name>.{sub}", f, conf_default(f))
    return lines


def _describe_section(stage: str, name: str, field: FieldInfo) -> list[str]:
    """A top-level section the stage's Config holds (download's `source`): for a union by kind,
    each kind's option file and keys."""
    by_kind = kinds(field)
    if not by_kind:
        return _describe(stage, name, field, conf_default(field))
    tag = field.discriminator
    lines = [f"  {name}  (a conf/{name}/ option, by {tag}: {' | '.join(by_kind)}; another: "
             f"{name}=NAME)"] + _wrapped(field.description)
    for kind, model in by_kind.items():
        lines += ["", f"  {name}.{tag} = {kind}: conf/{name}/{kind}.yaml"]
        lines += _wrapped(_doc(model).replace("\n", " "))
        lines += [line for sub, f in nested_fields(model).items() if sub != tag
                  for line in _describe(stage, f"{name}.{sub}", f, conf_default(f))]
    return lines


def describe(stage: str) -> str:
    """Every key of a stage's conf section with its default, type and meaning (--help-stage)."""
    lines = [f"{stage}: conf/{stage}/default.yaml, from {', '.join(sources(stage))}"]
    lines += [f"  {line}".rstrip() for line in _doc(config_model(stage)).splitlines()] + [""]
    for k in keys(stage):
        note = "; read by the flow, not the step" if k.flow else ""
        lines += _describe(stage, f"{stage}.{k.name}", k.field, conf_default(k.field), note)
    sections = section_fields(stage)
    for name, field in sections.items():
        lines += [""] + _describe_section(stage, name, field)
    also = "".join(f", `{name}.KEY=VALUE`" for name in sections)
    lines += ["", f"Change one with `{stage}.KEY=VALUE`{also} (llamaflow run / config)."]
    return "\n".join(lines)
