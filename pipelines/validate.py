"""Every problem of a lifecycle config, found before any stage runs.

A typo in the sft section, a missing data file or an eval set too short for llama.cpp's protocol
used to surface when its task started, after download, convert, vocab and pretrain had run (and
the download task's retries had repeated it). `validate(cfg)` checks, for every stage the run
will compute or look up in the cache (each needs a valid config for its cache key):
  * the step's pydantic Config (unknown keys with the closest known one, bounds, choices,
    launcher vs precision), Hydra's ??? left unset, and for quantize every entry of
    quantize.types against the llama.cpp that is installed;
  * the user files the step reads (DATA_FIELDS, directories expanded as the steps expand them):
    they exist, are readable and hold text; user-given SentencePiece models parse;
  * every eval set is long enough for one llama.cpp chunk (2 x n_ctx tokens), see
    `_eval_token_problems` for how tokens are counted before the tokenizer exists;
and raises one ConfigError listing all of them, each with its dotted key, value and fix. It runs
in the flow before the MLflow parent run (so deployments get it too), in `llamaflow run` before
Prefect starts, and in `llamaflow config --check`. Nothing here imports Prefect or torch.
"""
from __future__ import annotations

import functools
import importlib
import json
import os
import shutil
import tempfile
import types
import typing
import unicodedata
from pathlib import Path
from typing import Any, NamedTuple

import pydantic

from pipelines.config import (NO_VALUE, ConfigError, Problem, compose_config, suggest,
                              top_level_keys)
from pipelines.stages import declared, parts_of, stage_order, task_names

# SentencePiece's default max_sentencepiece_length: no piece the vocab stage trains is longer.
SP_MAX_PIECE = 16
# A corpus the vocab stage trains on that is at most this big is trained here too, to count the
# eval sets with the vocabulary the run will make (a few hundred ms); bigger ones are not.
RETRAIN_MAX_BYTES = 256 << 10


# ----------------------------------------------------------------------------- the plan

class Plan(NamedTuple):
    selected: list[str]     # stages that run (the others up to `last` come from the cache)
    force: set[str]         # stages recomputed even on a cache hit
    last: int               # index in stage_order() of the last selected stage (-1: none)


def stage_names(value, key: str, problems: list[Problem]) -> list[str]:
    """`stages`/`force` as a list of stage names. A single name (`stages=evaluate`) is one stage,
    not its letters."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        problems.append(Problem(key, value, f"a list of stages, e.g. {key}=[quantize,evaluate]"))
        return []
    order = stage_order()
    for v in value:
        if v not in order:
            problems.append(Problem(key, v, f"unknown stage{suggest(v, order)} (the stages: "
                                            f"{', '.join(order)}; several: {key}=[a,b])"))
    return [v for v in value if v in order]


def _plan(cfg: dict, from_stage: str | None, problems: list[Problem]) -> Plan:
    order = stage_order()
    wanted = stage_names(cfg.get("stages", order), "stages", problems)
    force = set(stage_names(cfg.get("force", []), "force", problems))
    selected = [s for s in order if s in wanted]
    if from_stage is not None:
        if from_stage not in order:
            problems.append(Problem("--from", from_stage, f"unknown stage{suggest(from_stage, order)}"
                                                          f" (the stages: {', '.join(order)})"))
        else:
            i = order.index(from_stage)
            selected = [s for s in selected if order.index(s) >= i]
            force |= set(order[i:])   # "rerun from X": X and everything after it recompute
    last = max((order.index(s) for s in selected), default=-1)
    # A forced stage upstream of the last selected one is recomputed, so it runs, whether or not
    # `stages` names it (`force=[merge] stages=[quantize]`: merge, then quantize on its output);
    # one downstream of it does not extend the run.
    selected = [s for s in order if s in selected or (s in force and order.index(s) <= last)]
    return Plan(selected, force, last)


def plan(cfg: dict, from_stage: str | None = None) -> Plan:
    """Which stages run, which are forced, the last one; ConfigError for unknown stage names."""
    problems: list[Problem] = []
    p = _plan(cfg, from_stage, problems)
    if problems:
        raise ConfigError(problems)
    return p


# ----------------------------------------------------------------------------- one stage

def dotted(name: str, key: str) -> str:
    """A key of stage `name`'s Config as the config spells it: a key in one of the top-level
    sections the Config also holds (download's `source`) is that section's."""
    return key if key.split(".")[0] in declared(name).global_sections else f"{name}.{key}"


def flow_keys(name: str) -> set[str]:
    """Keys under stage `name`'s section that steer the flow rather than the step (e.g. which
    quant types to make); they are not passed to the step's Config."""
    flow = declared(name).flow
    return set(flow.model_fields) if flow is not None else set()


def stage_section(cfg: dict, name: str, extra: dict | None = None) -> dict:
    """The dict a stage's Config is made from (a plain JSON copy)."""
    section = {k: v for k, v in (cfg.get(name) or {}).items() if k not in flow_keys(name)}
    section.update(extra or {})
    for shared in declared(name).global_sections:
        section = {**section, shared: cfg.get(shared)}
    return json.loads(json.dumps(section))


def _missing(d, path: str = "") -> list[str]:
    """Dotted keys whose value is Hydra's mandatory marker ??? (left unresolved)."""
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _missing(v, f"{path}{k}.")
        elif v == "???":
            out.append(f"{path}{k}")
    return out


def missing_problems(name: str, raw: dict) -> list[Problem]:
    return [Problem(dotted(name, m), NO_VALUE, f"must be set (the config leaves it as ???): "
                                               f"pass {dotted(name, m)}=...") for m in _missing(raw)]


def get_all(d: dict, dotted: str) -> list[tuple[str, Any]]:
    """Values at a DATA_FIELDS spec such as "corpus" or "eval_sets.*.path" as (path-key, value)."""
    found = [("", d)]
    for p in dotted.split("."):
        nxt = []
        for path, node in found:
            if not isinstance(node, dict):
                continue
            items = node.items() if p == "*" else ([(p, node[p])] if p in node else [])
            nxt += [(f"{path}.{k}".lstrip("."), v) for k, v in items]
        found = nxt
    return found


def set_at(d: dict, dotted_key: str, value) -> None:
    parts = dotted_key.split(".")
    for p in parts[:-1]:
        d = d[p]
    d[parts[-1]] = value


def data_values(module, raw: dict):
    """(dotted key in the section, value) of every DATA_FIELDS entry the section sets."""
    for spec in getattr(module, "DATA_FIELDS", ()):
        for key, value in get_all(raw, spec):
            if value is not None and value != "???":
                yield key, value


def absolute_paths(module, raw: dict) -> dict[str, list[str]]:
    """Make the section's data paths absolute in place; {key: [absolute paths]}."""
    out = {}
    for key, value in list(data_values(module, raw)):
        values = value if isinstance(value, list) else [value]
        absolute = [str(Path(str(v)).expanduser().resolve()) for v in values]
        set_at(raw, key, absolute if isinstance(value, list) else absolute[0])
        out[key] = absolute
    return out


def _walk(model: type, loc: tuple) -> tuple[list[str], set[str] | None]:
    """The user-facing key parts of a pydantic error location (a discriminated union's tag left
    out: `source.local.path` is `source.path`) and the field names allowed at its last level
    (None when unknown)."""
    parts: list[str] = []
    node: Any = model
    for i, item in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(node, type) and issubclass(node, pydantic.BaseModel):
            if last:
                return parts + [str(item)], set(node.model_fields)
            if item not in node.model_fields:
                break
            parts.append(str(item))
            node = node.model_fields[item].annotation
            continue
        tagged = [m for m in _models_in(node) if _tag(m) == item]
        if tagged:
            node = tagged[0]
            if last:
                return parts, set(node.model_fields)
            continue
        inner = _strip_optional(node)
        args = typing.get_args(inner)
        if typing.get_origin(inner) in (dict, list) and args:
            parts.append(str(item))      # a dict key (an eval set's name) or a list index
            node = args[-1]
            if last:
                return parts, _fields(node)
            continue
        break
    else:
        return parts, _fields(node)
    return parts + [str(x) for x in loc[i:]], None


def _strip_optional(t):
    args = [a for a in typing.get_args(t) if a is not type(None)]
    if typing.get_origin(t) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    if typing.get_origin(t) is typing.Annotated:
        return typing.get_args(t)[0]
    return t


def _models_in(t) -> list[type]:
    t = _strip_optional(t)
    if typing.get_origin(t) is typing.Annotated:
        t = typing.get_args(t)[0]
    args = typing.get_args(t) if typing.get_origin(t) in (typing.Union, types.UnionType) else (t,)
    return [a for a in args if isinstance(a, type) and issubclass(a, pydantic.BaseModel)]


def _fields(t) -> set[str] | None:
    models = _models_in(t)
    return set().union(*(m.model_fields for m in models)) if models else None


def _tag(model: type) -> str | None:
    field = model.model_fields.get("kind")
    args = typing.get_args(field.annotation) if field else ()
    return args[0] if len(args) == 1 and isinstance(args[0], str) else None


def _pydantic_problem(name: str, model: type, err: dict) -> Problem:
    parts, allowed = _walk(model, tuple(err["loc"]))
    key = dotted(name, ".".join(parts)) if parts else name
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input", NO_VALUE)
    if kind == "extra_forbidden":
        parent = key.rpartition(".")[0]
        hint = suggest(parts[-1], allowed or (), parent + ".") if parts else ""
        listed = f"; {parent or name} has: {', '.join(sorted(allowed))}" if allowed else ""
        return Problem(key, value, "unknown key" + (hint or listed))
    if kind == "missing":
        return Problem(key, NO_VALUE, f"must be set: pass {key}=...")
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=",
              "less_than": "<"}
    if kind in bounds:
        limit = next(iter(ctx.values()))
        return Problem(key, value, f"must be {bounds[kind]} {limit}: change {key} in your "
                                   "overrides or the recipe")
    if kind == "literal_error":
        return Problem(key, value, f"must be one of {ctx.get('expected')}")
    if kind == "union_tag_invalid":   # source.kind: say which conf/source/ options exist
        group = parts[0] if parts else name
        return Problem(f"{key}.kind", ctx.get("tag"), f"must be one of {ctx.get('expected_tags')}: "
                                                      f"pick a conf/{group}/ option, e.g. {group}=local")
    message = err["msg"].removeprefix("Value error, ")
    if not parts:  # a check across fields (e.g. launcher vs precision): keys are the stage's
        return Problem(name, NO_VALUE, f"{message} (keys under {name}.)")
    return Problem(key, value, f"{message}: fix {key} in your overrides or the recipe")


def build_config(module, name: str, raw: dict, problems: list[Problem],
                 skip: set[str] = frozenset()):
    """module.Config(**raw), or None with a Problem per pydantic error appended (errors on keys
    in `skip`, already reported as ???, are left out)."""
    try:
        return module.Config(**raw)
    except pydantic.ValidationError as e:
        for err in e.errors():
            p = _pydantic_problem(name, module.Config, err)
            if not any(k == p.key or k.startswith(p.key + ".") for k in skip):
                problems.append(p)
    except (TypeError, ValueError) as e:
        problems.append(Problem(name, NO_VALUE, str(e)))
    return None


def step_config(cfg: dict, name: str, extra: dict | None = None):
    """(module, validated Config, the raw section with absolute data paths, {key: paths}) of one
    stage: the runner's per-task check. ConfigError for every config problem of the stage."""
    module = importlib.import_module(f"steps.{name}")
    raw = stage_section(cfg, name, extra)
    problems = missing_problems(name, raw)
    if problems:
        raise ConfigError(problems)
    paths = absolute_paths(module, raw)
    config = build_config(module, name, raw, problems)
    if problems:
        raise ConfigError(problems)
    return module, config, raw, paths


# ----------------------------------------------------------------------------- files

def _readable(path: Path) -> str | None:
    """Why `path` cannot be read as a file, or None."""
    try:
        with open(path, "rb") as f:
            f.read(1)
    except FileNotFoundError:
        return "file not found"
    except IsADirectoryError:
        return "a directory, not a file"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    return None


def _has_text(path: Path) -> bool:
    """A data file holds something: a non-blank line (text, JSON Lines, JSON); .parquet: bytes."""
    if path.suffix == ".parquet":
        return path.stat().st_size > 0
    with open(path, "rb") as f:
        return any(line.strip() for line in f)


def _data_files(key: str, value, suffixes: tuple[str, ...], problems: list[Problem],
                need_text: bool = True) -> list[Path]:
    """Files and directories expanded as the steps expand them (steps.files.data_files),
    each readable and, with need_text, not empty."""
    from steps.files import data_files

    values = value if isinstance(value, list) else [value]
    try:
        files = data_files(values, suffixes, key)
    except (OSError, ValueError) as e:
        problems.append(Problem(key, value, str(e).removeprefix(f"{key}: ") +
                                f": fix {key} (files or directories of {'/'.join(suffixes)})"))
        return []
    good = []
    for f in files:
        why = _readable(f)
        if why is None and need_text and not _has_text(f):
            why = ("is empty, 0 bytes (no text)" if f.stat().st_size == 0 else
                   "holds only blank lines (no text)")
            why += f": add text to it or leave it out of {key}"
        if why:
            problems.append(Problem(key, str(f), why))
        else:
            good.append(f)
    return good


def _sp_model(key: str, path, problems: list[Problem]):
    """A user-given SentencePiece model parsed (steps.tokenizer's error names the file)."""
    from steps.tokenizer import load_sp_proto

    try:
        return load_sp_proto(Path(path))
    except (OSError, ValueError) as e:
        problems.append(Problem(key, str(path), f"{e}; fix {key}"))
        return None


def _given_tokenizer_problems(cfg: dict, config, given, problems: list[Problem]) -> None:
    """vocab.tokenizer against the source's tokenizer.model, where that is on disk already, and
    against vocab.pad_to_multiple_of (checked, not applied, in mode given)."""
    from steps.vocab import check_extends

    n = len(given.pieces) + (config.pad_token is not None and
                             config.pad_token not in {p.piece for p in given.pieces})
    if config.pad_to_multiple_of and n % config.pad_to_multiple_of:
        problems.append(Problem("vocab.pad_to_multiple_of", config.pad_to_multiple_of,
                                f"vocab.tokenizer={config.tokenizer} has {n} tokens, not a "
                                "multiple: set vocab.pad_to_multiple_of=null (mode given takes "
                                "the file as it is)"))
    base = base_tokenizer(cfg)
    if base is None or not Path(base).is_file():
        return
    try:
        check_extends(Path(base), Path(config.tokenizer))
    except ValueError as e:
        problems.append(Problem("vocab.tokenizer", str(config.tokenizer), str(e)))


def base_tokenizer(cfg: dict) -> Path | None:
    """The source's own tokenizer.model when it is on disk before the run (local and llama2c
    sources; hub and URL sources bring theirs with the download)."""
    src = cfg.get("source") or {}
    if src.get("kind") == "llama2c" and src.get("tokenizer_model") not in (None, "???"):
        return Path(src["tokenizer_model"]).expanduser().resolve()
    if src.get("kind") == "local_hf" and src.get("path") not in (None, "???"):
        p = Path(src["path"]).expanduser().resolve() / "tokenizer.model"
        return p if p.is_file() else None
    if src.get("kind") == "local" and src.get("path") not in (None, "???"):
        root = Path(src["path"]).expanduser().resolve()
        for p in (root / "tokenizer.model", root / (src.get("model_dir") or "") / "tokenizer.model"):
            if p.is_file():
                return p
    return None


def _source_problems(cfg: dict, config, problems: list[Problem]) -> None:
    src = config.source
    if src.kind == "llama2c":
        why = _readable(Path(src.bin_path))
        if why:
            problems.append(Problem("source.bin_path", src.bin_path,
                                    f"{why}: point source.bin_path at the llama2.c .bin file"))
        _sp_model("source.tokenizer_model", src.tokenizer_model, problems)
    elif src.kind == "local":
        root = Path(src.path).expanduser()
        model = root / src.model_dir if src.model_dir else root
        if not model.is_dir():
            key, value = (("source.path", src.path) if not root.is_dir() else
                          ("source.model_dir", src.model_dir))
            problems.append(Problem(key, value, f"{model} is not a folder: source.path is the Meta "
                                                "download root (holding tokenizer.model), "
                                                "source.model_dir its model folder (e.g. 7B)"))
        elif not (model / "checklist.chk").is_file():
            problems.append(Problem("source.path", src.path, f"no checklist.chk in {model}: a Meta "
                                    "download has one next to params.json"))
        tok = base_tokenizer(cfg)
        if tok is not None:
            _source_tokenizer_problems(tok, problems)
    elif src.kind == "local_hf":
        _local_hf_problems(cfg, src, problems)
    elif src.kind == "url" and src.url is None and not os.environ.get(src.url_env or ""):
        problems.append(Problem("source.url_env", src.url_env,
                                f"the environment variable {src.url_env} is not set: export the "
                                "presigned URL into it, or pass source.url=..."))


def _source_tokenizer_problems(tok: Path, problems: list[Problem]) -> None:
    """A Meta download's tokenizer.model parsed: tiktoken's (Llama 3) or SentencePiece's."""
    from steps import llama3

    if not llama3.is_tiktoken(tok):
        _sp_model("source.path", tok, problems)
        return
    try:
        llama3.read_ranks(tok)
    except ValueError as e:  # MetaFormatError names the file and line
        problems.append(Problem("source.path", str(tok), f"{e}; fix source.path"))


def source_is_bpe(cfg: dict) -> bool | None:
    """Whether the source's tokenizer, on disk before the run, is a byte-level BPE (a Llama 3
    tiktoken tokenizer.model, or an HF folder with tokenizer.json and no SentencePiece model);
    None when it is not on disk yet (hub and URL sources)."""
    from steps import llama3

    src = cfg.get("source") or {}
    if src.get("kind") == "local_hf" and src.get("path") not in (None, "???"):
        root = Path(src["path"]).expanduser().resolve()
        if (root / "tokenizer.model").is_file():
            return False
        return True if (root / "tokenizer.json").is_file() else None
    tok = base_tokenizer(cfg)
    return None if tok is None else llama3.is_tiktoken(tok)


def _bpe_counter(cfg: dict):
    """(text -> tokens the evaluate stage gets: ids plus BOS, tokenizer path) for a byte-level
    BPE source on disk, or (None, None): counted with the tokenizer convert will write."""
    from steps import llama3

    if not source_is_bpe(cfg):
        return None, None
    src = cfg["source"]
    try:
        if src.get("kind") == "local_hf":
            from tokenizers import Tokenizer

            path = Path(src["path"]).expanduser().resolve() / "tokenizer.json"
            tok = Tokenizer.from_file(str(path))
        else:
            path = base_tokenizer(cfg)
            tok = llama3.build_tokenizer(llama3.read_ranks(path))
    except Exception:  # a bad file (any parse error): the download check reports it
        return None, None
    return (lambda text: len(tok.encode(text, add_special_tokens=False).ids) + 1), path


def _local_hf_problems(cfg: dict, src, problems: list[Problem]) -> None:
    """An HF-format folder is checked as the convert stage will check it (headers only), so a
    missing shard or a foreign architecture stops the run before the download copies a byte."""
    from steps.hf_import import inspect

    root = Path(src.path).expanduser()
    if not (root / "config.json").is_file():
        problems.append(Problem("source.path", src.path, f"no config.json in {root}: point "
                                "source.path at an HF-format folder (config.json, *.safetensors, "
                                "tokenizer files)"))
        return
    allow = bool((cfg.get("convert") or {}).get("allow_pickle"))
    try:
        inspect(root, allow_pickle=allow)
    except ValueError as e:  # HfFormatError (a MetaFormatError), a tokenizer that does not parse
        key = "convert.allow_pickle" if "allow_pickle" in str(e) else "source.path"
        problems.append(Problem(key, allow if key.startswith("convert") else src.path, str(e)))


def _vocab_mode_problems(cfg: dict, config, problems: list[Problem]) -> bool:
    """vocab.mode against the source's tokenizer (when on disk), and add_tokens' own inputs;
    False when the mode does not fit the base."""
    from steps.vocab_bpe import check_mode

    bpe = source_is_bpe(cfg)
    if bpe is not None:
        try:
            check_mode(config.mode, not bpe, "the source")
        except ValueError as e:
            problems.append(Problem("vocab.mode", config.mode, str(e)))
            return False
    if config.mode != "add_tokens":
        return True
    if config.add_tokens_file is not None:
        why = _readable(Path(config.add_tokens_file))
        if why:
            problems.append(Problem("vocab.add_tokens_file", str(config.add_tokens_file),
                                    f"{why}: fix vocab.add_tokens_file or set it to null"))
    elif not config.add_tokens:
        problems.append(Problem("vocab.add_tokens", [], "vocab.mode=add_tokens: set "
                                "vocab.add_tokens (a list of tokens) or vocab.add_tokens_file"))
    return True


def _file_problems(cfg: dict, name: str, config, problems: list[Problem]) -> None:
    """The user files stage `name` reads: there, readable, holding text, parsing."""
    if name == "download":
        _source_problems(cfg, config, problems)
    elif name == "vocab":
        # a mode refused for the base needs another mode, not the inputs of the refused one
        if not _vocab_mode_problems(cfg, config, problems) or config.mode in ("none", "add_tokens"):
            pass
        elif config.mode == "given":
            if config.tokenizer is None:
                problems.append(Problem("vocab.tokenizer", None, "vocab.mode=given takes a "
                                        "finished tokenizer.model that extends the base's (e.g. "
                                        "Chinese-LLaMA-2's scripts/tokenizer/tokenizer.model): "
                                        "set vocab.tokenizer=PATH"))
            elif (given := _sp_model("vocab.tokenizer", config.tokenizer, problems)) is not None:
                _given_tokenizer_problems(cfg, config, given, problems)
        elif config.extra_sp is not None:
            _sp_model("vocab.extra_sp", config.extra_sp, problems)
        elif config.corpus is not None:
            corpus = config.corpus if isinstance(config.corpus, list) else [config.corpus]
            _data_files("vocab.corpus", [str(c) for c in corpus], (".txt", ".jsonl"), problems)
        else:
            problems.append(Problem("vocab.extra_sp", None, "set vocab.extra_sp (a SentencePiece "
                                    "model to merge) or vocab.corpus (text to train one on)"))
        for field in ("eval_zh", "eval_en"):
            path = getattr(config, field)
            why = path is not None and _readable(Path(path))
            if why:
                problems.append(Problem(f"vocab.{field}", str(path), f"{why}: fix vocab.{field} "
                                                                     "or set it to null"))
    elif name == "imatrix":
        _imatrix_problems(cfg, config, problems)
    elif name == "pretrain":
        from steps.pretrain import SUFFIXES

        _data_files("pretrain.data", config.data, SUFFIXES, problems)
    elif name == "sft":
        from steps.sft import SUFFIXES

        _data_files("sft.data", config.data, SUFFIXES, problems)
        if config.validation_data:
            _data_files("sft.validation_data", config.validation_data, SUFFIXES, problems)
    elif name == "evaluate":
        from steps.evaluate import load_prompts

        if config.prompts is not None:
            try:
                load_prompts(Path(config.prompts))
            except (OSError, ValueError) as e:
                problems.append(Problem("evaluate.prompts", config.prompts,
                                        f"{e}: fix evaluate.prompts or set it to null"))
        _mc_problems(config, problems)


def _mc_problems(config, problems: list[Problem]) -> None:
    """Each multiple-choice set read as the stage reads it: layout, columns, answers, enough dev
    examples for evaluate.mc_shots."""
    from steps.mc import check_shots, read_set

    for name, s in config.mc_sets.items():
        try:
            check_shots(name, read_set(s), config.mc_shots)
        except (OSError, ValueError) as e:
            problems.append(Problem(f"evaluate.mc_sets.{name}", s.path, (
                f"{e}: fix evaluate.mc_sets.{name} or leave the set out")))


def _imatrix_used(cfg: dict) -> bool:
    """Whether a quantize type asks for the importance matrix (so the imatrix stage runs)."""
    from steps.quantize import uses_imatrix

    types_ = (cfg.get("quantize") or {}).get("types") or []
    try:
        return isinstance(types_, list) and any(uses_imatrix(q) for q in types_)
    except ValueError:   # an unknown type: _quantize_problems names it
        return False


def _llama_cpp_tools_problems(cfg: dict, problems: list[Problem]) -> None:
    """The importance matrix is made and used by llama.cpp's own tools: built already, given
    by LLAMAFLOW_LLAMA_CPP_BIN, or buildable here (cmake and a compiler)."""
    from steps import llamacpp_tools as tools

    if os.environ.get(tools.ENV_BIN) or all((tools.build_dir() / "bin" / t).is_file()
                                            for t in tools.TOOLS):
        return
    try:
        tools.check_prerequisites()
    except RuntimeError as e:
        problems.append(Problem("quantize.types", (cfg.get("quantize") or {}).get("types"),
                                f"the @imatrix and IQ types need llama.cpp's tools; {e}; or "
                                "leave those types out"))


def _imatrix_problems(cfg: dict, config, problems: list[Problem]) -> None:
    """Calibration text: given, readable, not an eval set's file, and long enough for the two
    chunks llama-imatrix needs where that can be proven short before the run; and the tools."""
    from steps.vocab import iter_corpus

    _llama_cpp_tools_problems(cfg, problems)

    if not config.data:
        problems.append(Problem("imatrix.data", [], "no calibration text for the importance "
                                "matrix: set imatrix.data (files or directories of .txt/.jsonl; "
                                "the default is pretrain.data), or leave the types that use it "
                                "(@imatrix, iq*) out of quantize.types"))
        return
    # the default, pretrain.data: a problem with those files is pretrain.data's, said once
    resolved = lambda paths: [Path(str(p)).expanduser().resolve() for p in paths]  # noqa: E731
    pretrain = (cfg.get("pretrain") or {}).get("data") or []
    same = resolved(config.data) == resolved(pretrain if isinstance(pretrain, list) else [pretrain])
    files = _data_files("imatrix.data", [str(p) for p in config.data], (".txt", ".jsonl"),
                        [] if same else problems)
    evals = {Path(s["path"]).expanduser().resolve(): name for name, s in
             ((cfg.get("evaluate") or {}).get("eval_sets") or {}).items()
             if isinstance(s, dict) and s.get("path")}
    for f in files:
        if f.resolve() in evals:
            problems.append(Problem("imatrix.data", str(f), f"is eval set `{evals[f.resolve()]}`'s "
                                    "text: the importance matrix would be fitted to the text it "
                                    "is scored on; calibrate on other text (the training corpus)"))
    if not files or len(files) != len(set(files)):
        return
    # Only as much text as could prove it short: every character is a token or more, so once
    # `need` characters are read the text is long enough (a big corpus is never read whole).
    need, lines, chars = 2 * config.n_ctx, [], 0
    for line in iter_corpus(files):
        lines.append(line)
        chars += len(line) + 1
        if chars >= need:
            return
    bound = _upper_bound("\n".join(lines))
    if bound < need:
        problems.append(Problem("imatrix.data", [str(p) for p in config.data], f"at most "
                                f"{bound} tokens of calibration text; llama-imatrix needs {need} "
                                f"(2 chunks of imatrix.n_ctx={config.n_ctx}): give more text or "
                                "a smaller imatrix.n_ctx"))


def _quantize_problems(types_: Any, problems: list[Problem]) -> list[str]:
    """quantize.types: the lifecycle exports f16 from the merged model and makes every other type
    from that GGUF with llama.cpp's quantizer, so each must be one llama.cpp (the installed one)
    knows. Returns the good types."""
    from steps import quantize

    if not isinstance(types_, list):
        problems.append(Problem("quantize.types", types_, "a list, e.g. quantize.types=[f16,q4_0]"))
        return []
    try:
        import llama_cpp
    except ImportError as e:  # the quantizer itself would fail the same way
        problems.append(Problem("quantize.types", types_, f"llama-cpp-python is not importable "
                                                          f"({e}): install the project's deps"))
        return []
    good = []
    for q in types_:
        try:
            qn = quantize.normalize_qtype(q)
        except ValueError as e:
            problems.append(Problem("quantize.types", q, f"{e}{suggest(str(q).lower(), quantize.ALL_TYPES)}"))
            continue
        if qn == "f16":
            continue
        base = quantize.split_qtype(qn)[0]
        if base not in quantize.LLAMA_CPP_TYPES:
            problems.append(Problem("quantize.types", q, f"the lifecycle exports only f16 from the "
                                    f"merged model and quantizes the rest with llama.cpp, which "
                                    f"does not make {qn}: leave it out of quantize.types"))
        elif not hasattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{base.upper()}"):
            problems.append(Problem("quantize.types", q, f"the installed llama.cpp (llama-cpp-python "
                                    f"{getattr(llama_cpp, '__version__', '?')}) has no {base.upper()}: "
                                    "leave it out of quantize.types or upgrade llama-cpp-python"))
        else:
            good.append(qn)
    return list(dict.fromkeys(good))


# ----------------------------------------------------------------------------- eval tokens

def _eval_token_problems(cfg: dict, ev, vocab_config, problems: list[Problem]) -> None:
    """Eval sets too short for one llama.cpp chunk (2 x n_ctx tokens), found before any work.

    The tokenizers that count at evaluate time do not exist yet (convert and vocab make them), so
    each model's count is the best figure available before the run, and a set is refused only
    when that figure proves it too short (never on a guess):
      * `base` uses the source's tokenizer.model; where it is on disk (local, llama2c sources)
        the count is exact (SentencePiece ids = the HF ids the evaluate stage uses).
      * the models with the merged vocabulary (base-zh, base-zh+pt, merged, gguf-*): with the
        base tokenizer on disk and vocab.extra_sp given, the merge is rebuilt here (vocab's own
        merge_tokenizers, about a second for Chinese-LLaMA's 20K pieces) and the count is exact;
        with a small vocab.corpus (<= RETRAIN_MAX_BYTES) the extra model is trained here as the
        stage trains it (same corpus, size, seed and thread count: the same pieces) and its
        count is exact too.
      * otherwise an upper bound: BPE starts from characters (a character missing from the
        vocabulary from its UTF-8 bytes, with byte fallback) and every merge only shortens, and
        a merged vocabulary keeps every base piece; so the base vocabulary's single-character
        pieces bound the merged count, and with no tokenizer at all 1 + 3 + the UTF-8 bytes
        (a space as the 3 bytes of "▁") bound any SentencePiece tokenizer's.
    """
    from steps.evaluate import read_text

    n_ctx, need = ev.n_ctx, 2 * ev.n_ctx
    wanted = set(cfg.get("evaluate", {}).get("models") or [])
    merged_models = sorted(m for m in wanted if m != "base")
    base_tok = base_tokenizer(cfg)
    base_sp = _sp_processor(str(base_tok)) if base_tok else None
    base_tok = base_tok if base_sp is not None else None
    merged = _merged_counter(base_tok, vocab_config) if (base_tok and merged_models and
                                                         vocab_config is not None) else None
    bpe, bpe_path = _bpe_counter(cfg) if base_sp is None else (None, None)
    if bpe is not None and vocab_config is not None and vocab_config.mode == "none":
        merged = lambda text: (bpe(text), True, "vocab.mode none: the source's tokenizer")
    for name, s in ev.eval_sets.items():
        key = f"evaluate.eval_sets.{name}"
        budget = s.max_tokens if s.max_tokens is not None else ev.max_tokens
        if budget is not None and budget < n_ctx:
            bkey = f"{key}.max_tokens" if s.max_tokens is not None else "evaluate.max_tokens"
            problems.append(Problem(bkey, budget, f"< n_ctx {n_ctx}: leaves no chunk to evaluate; "
                                                  f"raise it to at least {n_ctx} (or null)"))
        try:
            text = read_text(Path(s.path), s.kind)
        except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
            problems.append(Problem(f"{key}.path", s.path, f"{e}: fix {key}.path (a UTF-8 text "
                                                           "file) or leave the set out"))
            continue
        if ev.protocol != "llama.cpp":
            if not text.strip():
                problems.append(Problem(f"{key}.path", s.path, "the text is empty: nothing to score"))
            continue
        short = []
        if "base" in wanted:
            if base_sp is not None or bpe is not None:
                n = _count(base_sp, text) if base_sp is not None else bpe(text)
                if n < need:
                    short.append(f"base: {n} tokens with the source's tokenizer "
                                 f"{base_tok or bpe_path}")
            elif (n := _upper_bound(text)) < need:
                short.append(f"base: at most {n} tokens with any tokenizer")
        if merged_models:
            counted = merged(text) if merged is not None else None
            if counted is not None:
                n, exact, how = counted
                if n < need:
                    short.append(f"{', '.join(merged_models)}: {'' if exact else 'about '}{n} "
                                 f"tokens with the merged vocabulary ({how})")
            else:
                n = _upper_bound(text, base_sp)
                if n < need:
                    short.append(f"{', '.join(merged_models)}: at most {n} tokens with the merged "
                                 "vocabulary")
        if short:
            problems.append(Problem(f"{key}.path", s.path, (
                f"too short for one chunk of protocol llama.cpp, which needs 2 x n_ctx = {need} "
                f"tokens (evaluate.n_ctx={n_ctx}); {'; '.join(short)}. Fix: a longer text, a "
                f"smaller evaluate.n_ctx, or a recipe whose evaluate option leaves this set out")))


def _sp_processor(path: str):
    """The SentencePiece model at `path`, or None when it does not load (the download check
    has reported it)."""
    p = Path(path)
    try:
        st = p.stat()
        return _load_sp(str(p), st.st_size, st.st_mtime_ns)
    except (OSError, RuntimeError):
        return None


@functools.lru_cache(maxsize=8)
def _load_sp(path: str, size: int, mtime_ns: int):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=path)


def _count(sp, text: str) -> int:
    """Tokens the evaluate stage gets: the text's ids plus BOS (as llama-perplexity)."""
    return len(sp.encode(text)) + (1 if sp.bos_id() >= 0 else 0)


def _upper_bound(text: str, sp=None) -> int:
    """Most tokens a SentencePiece BPE tokenizer with (at least) `sp`'s pieces can give `text`
    (None: any SentencePiece tokenizer); see _eval_token_problems."""
    variants = {text, unicodedata.normalize("NFKC", text)}  # a normalizer may expand characters
    if sp is None:
        return max(1 + 3 + sum(3 if c == " " else len(c.encode("utf-8")) for c in t)
                   for t in variants)
    single = _single_pieces(sp)
    fallback = any(sp.is_byte(i) for i in range(sp.get_piece_size()))
    total = 0
    for t in variants:
        t = "▁" + t.replace(" ", "▁")
        total = max(total, 1 + sum(1 if c in single else (len(c.encode("utf-8")) if fallback else 1)
                                   for c in t))
    return total


@functools.lru_cache(maxsize=8)
def _single_pieces(sp) -> frozenset[str]:
    return frozenset(p for p in (sp.id_to_piece(i) for i in range(sp.get_piece_size()))
                     if len(p) == 1 and not sp.is_byte(sp.piece_to_id(p)))


def _merged_counter(base_tok: Path, vocab_config):
    """text -> (tokens, exact, how) with the merged vocabulary the vocab stage will make, when
    it can be rebuilt cheaply here; None when it cannot."""
    if vocab_config.score_strategy != "rank" or vocab_config.mode == "given":
        return None  # HF and SentencePiece ids differ (score 0 pieces); a given file: not rebuilt
    extra = vocab_config.extra_sp
    if extra is not None:
        sp = _merged_sp(str(base_tok), str(extra), None, _vocab_key(vocab_config),
                        _stamp([base_tok, extra]))
        how = f"{Path(base_tok).name} + {Path(extra).name}, merged here"
        return (lambda text: (_count(sp, text), True, how)) if sp is not None else None
    corpus = vocab_config.corpus
    if corpus is None:
        return None
    from steps.files import data_files

    try:
        files = data_files(corpus if isinstance(corpus, list) else [corpus], (".txt", ".jsonl"),
                           "vocab.corpus")
    except (OSError, ValueError):
        return None
    if sum(f.stat().st_size for f in files) > RETRAIN_MAX_BYTES:
        return None
    sp = _merged_sp(str(base_tok), None, tuple(map(str, files)), _vocab_key(vocab_config),
                    _stamp([base_tok, *files]))
    how = "the extra vocabulary trained here on vocab.corpus as the vocab stage trains it"
    return (lambda text: (_count(sp, text), True, how)) if sp is not None else None


def _stamp(paths) -> tuple:
    """(size, mtime) of each file: a changed file is merged again (`llamaflow serve` is long-lived)."""
    out = []
    for p in paths:
        try:
            st = Path(p).stat()
            out.append((st.st_size, st.st_mtime_ns))
        except OSError:
            out.append(None)
    return tuple(out)


def _vocab_key(v) -> str:
    return json.dumps(v.model_dump(mode="json"), sort_keys=True, default=str)


@functools.lru_cache(maxsize=4)
def _merged_sp(base: str, extra: str | None, corpus: tuple[str, ...] | None, vocab_json: str,
               stamp: tuple = ()):
    """The merged SentencePiece model (vocab.merge_tokenizers into a temp dir), or None when it
    cannot be made (then the bound applies; the vocab stage reports its own error)."""
    from steps.vocab import merge_tokenizers, train_tokenizer

    import sentencepiece as spm

    v = json.loads(vocab_json)
    work = Path(tempfile.mkdtemp(prefix="llamaflow-check-"))
    try:
        if extra is None:
            extra = train_tokenizer([Path(c) for c in corpus], work / "extra", v["vocab_size"],
                                    model_type=v["model_type"],
                                    character_coverage=v["character_coverage"],
                                    input_sentence_size=v["input_sentence_size"],
                                    num_threads=v["num_threads"], seed=v["seed"])
        out = merge_tokenizers(Path(base), Path(extra), work / "merged", mode=v["mode"],
                               pad_token=v["pad_token"], pad_to_multiple_of=v["pad_to_multiple_of"],
                               score_strategy=v["score_strategy"])
        return spm.SentencePieceProcessor(model_proto=(out / "tokenizer.model").read_bytes())
    except Exception:  # a corpus the trainer refuses, etc.: the vocab stage says why
        return None
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------- the whole run

def eval_models() -> list[str]:
    """What evaluate.models may name: the lifecycle's models (lifecycle_steps' candidates; gguf =
    every quant type), which is what evaluate's FlowKeys.models evaluates by default. Read when
    needed: steps.evaluate imports no torch, but more than this module needs to start."""
    return list(declared("evaluate").flow.model_fields["models"].default)


def workdir_problem(path, create: bool = False) -> Problem | None:
    """The workspace must be creatable and writable (MLflow's database, Prefect's home and every
    artifact live there). create=True makes it (the CLI, before Prefect starts); otherwise a
    folder is made and removed in it, or in the nearest existing folder above it, leaving no
    trace (permission bits do not tell: root writes anywhere but on sysfs or a read-only mount)."""
    path = Path(path).expanduser()
    fix = ("pass workdir=/a/writable/folder or set LLAMAFLOW_WORKDIR (it holds MLflow's database, "
           "Prefect's home and every artifact)")
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
            probe = path
        else:
            probe = path
            while not probe.exists() and probe != probe.parent:
                probe = probe.parent
            if not probe.is_dir():
                return Problem("workdir", str(path), f"{probe} is a file, not a folder: {fix}")
        os.rmdir(tempfile.mkdtemp(dir=probe, prefix=".llamaflow-write-test-"))
    except OSError as e:
        return Problem("workdir", str(path), f"cannot create or write there "
                                             f"({e.strerror or e}): {fix}")
    return None


def _top_problems(cfg: dict, problems: list[Problem]) -> None:
    known = top_level_keys()
    for k in cfg:
        if k not in known:
            problems.append(Problem(k, cfg[k], "unknown key" + (suggest(k, known) or
                                    f"; the top-level keys: {', '.join(sorted(known))}")))
    tasks = task_names()   # as conf `retries` keys them
    for k, v in (cfg.get("retries") or {}).items():
        if k not in tasks:
            problems.append(Problem(f"retries.{k}", v, f"no such stage{suggest(k, tasks, 'retries.')}"))
        elif not isinstance(v, int) or isinstance(v, bool) or v < 0:
            problems.append(Problem(f"retries.{k}", v, "a number of retries >= 0"))
    models = (cfg.get("evaluate") or {}).get("models")
    if models is not None:
        allowed = eval_models() + [f"gguf-{q}" for q in (cfg.get("quantize") or {}).get("types") or []]
        for m in models if isinstance(models, list) else [models]:
            if m not in allowed:
                problems.append(Problem("evaluate.models", m, f"not a model of the lifecycle"
                                        f"{suggest(m, allowed)} (the models: {', '.join(allowed)})"))
    _kld_problems(cfg.get("evaluate") or {}, problems)
    _judge_problems(cfg, problems)
    if "workdir" in cfg and (p := workdir_problem(cfg["workdir"])):
        problems.append(p)


def _judge_problems(cfg: dict, problems: list[Problem]) -> None:
    """The judge's local model is a GGUF this run makes; its pairs name models of the lifecycle."""
    judge = cfg.get("judge") or {}
    if not judge.get("enabled"):
        return
    types = [q for q in (cfg.get("quantize") or {}).get("types") or [] if isinstance(q, str)]
    local = judge.get("local_model")
    if local is not None and local not in [f"gguf-{q}" for q in types]:
        problems.append(Problem("judge.local_model", local, (
            f"not a GGUF this run makes (quantize.types: {types}): name one as gguf-<type>, "
            "or null to use the endpoint from the environment")))
    names = [m for m in eval_models() if m != "gguf"]
    for pair in judge.get("pairs") or []:
        for m in pair if isinstance(pair, list) else [pair]:
            # a GGUF this run does not make is skipped by the stage (and said so), as a gate on
            # it is; a name that is no model of the lifecycle is a typo
            if not (isinstance(m, str) and (m in names or m.startswith("gguf-"))):
                problems.append(Problem("judge.pairs", m, (
                    f"not a model of the lifecycle{suggest(str(m), names)} (the models: "
                    f"{', '.join(names)}, gguf-<type>)")))


def _kld_problems(ev: dict, problems: list[Problem]) -> None:
    """KL divergence is measured on llama-perplexity's chunks, so only with that protocol (and
    only GGUF evaluations measure it)."""
    models = ev.get("models") or []
    ggufs = any(str(m).startswith("gguf") for m in (models if isinstance(models, list) else [models]))
    if ggufs and ev.get("kld_reference") and ev.get("kld", True) and \
            ev.get("protocol", "llama.cpp") != "llama.cpp":
        problems.append(Problem("evaluate.kld_reference", ev["kld_reference"], (
            f"KL divergence is measured on llama.cpp's chunks, not with protocol "
            f"{ev.get('protocol')!r}: set evaluate.kld_reference=null (or evaluate.kld=false), "
            "or evaluate.protocol=llama.cpp")))


def _check_stage(cfg: dict, name: str, extra: dict | None, problems: list[Problem],
                 check_files: bool):
    module = importlib.import_module(f"steps.{name}")
    raw = stage_section(cfg, name, extra)
    missing = missing_problems(name, raw)
    problems += missing
    absolute_paths(module, raw)
    config = build_config(module, name, raw, problems, skip={p.key for p in missing})
    if config is not None and check_files:
        _file_problems(cfg, name, config, problems)
    return config


def validate(cfg: dict, from_stage: str | None = None, *, check_files: bool = True) -> list[str]:
    """Check the config of every stage this run computes or looks up, with its files; return the
    stage configs checked (labels as the flow names its tasks) or raise one ConfigError with
    every problem. check_files=False checks the configs only (for configs meant for another
    machine, whose data is not here)."""
    problems: list[Problem] = []
    _top_problems(cfg, problems)
    before = len(problems)
    p = _plan(cfg, from_stage, problems)
    # a misspelled stage list says nothing of what runs: check them all, to show every problem
    order = stage_order()
    last = len(order) - 1 if len(problems) > before else p.last
    checked: list[str] = []
    configs: dict[str, Any] = {}
    for name in order[:last + 1]:
        if name == "quantize":
            configs[name] = _check_stage(cfg, name, {"qtype": "f16"}, problems, check_files)
            good = _quantize_problems((cfg.get("quantize") or {}).get("types", []), problems)
            checked += ["quantize[f16]"] + [f"quantize[{q}]" for q in good]
        else:
            configs[name] = _check_stage(cfg, name, None, problems, check_files)
            checked.append(name)
        for part in parts_of(name):   # report, with evaluate; imatrix, with quantize
            if part == "imatrix" and not _imatrix_used(cfg):
                continue
            configs[part] = _check_stage(cfg, part, None, problems, check_files)
            checked.append(part)
    ev = configs.get("evaluate")
    if ev is not None and check_files:
        _eval_token_problems(cfg, ev, configs.get("vocab"), problems)
    if problems:
        raise ConfigError(problems)
    return checked


def check(overrides: list[str], from_stage: str | None = None, *,
          check_files: bool = True) -> tuple[dict, list[str]]:
    """Compose `overrides` and validate the result: (config, stages checked), or one ConfigError
    with the composition's problems and the validation's together."""
    problems: list[Problem] = []
    cfg = compose_config(overrides, problems=problems)
    if cfg is None:
        raise ConfigError(problems)
    try:
        checked = validate(cfg, from_stage, check_files=check_files)
    except ConfigError as e:
        problems += e.problems
        checked = []
    if problems:
        raise ConfigError(problems)
    return cfg, checked
