"""Hydra composition (the Compose API, never @hydra.main) into a plain, resolved dict.

Flows take a list of override strings and compose the config themselves, so a CLI run, a
Prefect deployment run and a test all go through this one function.
"""
from __future__ import annotations

import difflib
import functools
import itertools
import os
import re
from pathlib import Path
from typing import Any, NamedTuple

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = Path(os.environ.get("LLAMAFLOW_CONF_DIR", REPO / "conf"))


def shared_data_dir() -> Path:
    """../shared/data beside the repo (the project's real test/demo data), or LLAMAFLOW_SHARED_DATA."""
    return Path(os.environ.get("LLAMAFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))


def _register_resolvers() -> None:
    # ${repo:pipelines/demo_data/x.txt} and ${shared_data:eval/...}: absolute paths that do not
    # depend on the directory llamaflow is started from.
    if not OmegaConf.has_resolver("repo"):
        OmegaConf.register_new_resolver("repo", lambda p="": str(REPO / p))
    if not OmegaConf.has_resolver("shared_data"):
        OmegaConf.register_new_resolver("shared_data", lambda p="": str(shared_data_dir() / p))
    # ${all_stages:}: config.yaml's `stages` default, every stage in order (pipelines/stages.py
    # reads them from the defaults list), so the list is written once
    if not OmegaConf.has_resolver("all_stages"):
        OmegaConf.register_new_resolver("all_stages", _all_stages)


def _all_stages() -> list[str]:
    from pipelines.stages import stage_order  # here: pipelines.stages reads this module's CONF_DIR

    return stage_order()


class Problem(NamedTuple):
    """One thing wrong with a config: the dotted key, the value it has, what is wrong and the fix."""
    key: str
    value: Any
    message: str

    def __str__(self) -> str:
        if self.value is _NO_VALUE:
            return f"{self.key}: {self.message}" if self.key else self.message
        from pipelines.tracking import redact  # a bad source.url may carry its signature

        shown = redact(repr(self.value))
        shown = shown if len(shown) <= 120 else shown[:117] + "..."
        return f"{self.key} = {shown}: {self.message}"


_NO_VALUE = type("_NoValue", (), {"__repr__": lambda self: "<no value>"})()
NO_VALUE = _NO_VALUE   # Problem.value when there is none to show (e.g. a key that is missing)


class ConfigError(ValueError):
    """Everything wrong with a config, found before any work; never worth a retry."""

    def __init__(self, problems: list[Problem]):
        # the same problem found twice (the CLI's check, then the flow's) shows once
        self.problems = list({str(p): p for p in problems}.values())
        n = len(self.problems)
        super().__init__(f"{n} config problem{'s' if n != 1 else ''} (nothing was run):\n"
                         + "\n".join(f"  - {p}" for p in self.problems))


def suggest(word: str, candidates, prefix: str = "") -> str:
    """ "; did you mean X?" for the closest candidate, or "" when none is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.6)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def group_options(group: str, nested: bool = False) -> list[str]:
    """The options of a conf/ group folder (`recipe` -> chinese-llama-alpaca, demo, ...); with
    `nested`, also those in its subfolders (`launcher` -> accelerate/fsdp), which Hydra loads too."""
    root = CONF_DIR / group
    files = root.rglob("*.yaml") if nested else root.glob("*.yaml")
    return sorted(str(p.relative_to(root).with_suffix("")) for p in files)


def _group_problems(parsed) -> dict[int, Problem]:
    """Overrides picking a group option that does not exist (index -> problem). `recipe` is an
    optional group in config.yaml, so Hydra itself drops a misspelled recipe without a word."""
    out = {}
    for i, o in enumerate(parsed):
        group = o.key_or_group
        if o.is_delete() or not (CONF_DIR / group).is_dir():
            continue
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.value()]
        options = group_options(group)
        for v in values:
            if v is None or (isinstance(v, str) and v in group_options(group, nested=True)):
                continue
            out[i] = Problem(o.get_key_element(), v,
                             f"no such option in conf/{group}/{suggest(v, options)} (the options: "
                             f"{', '.join(options)})")
    return out


_COMPOSE_KEY = re.compile(r"(?:Could not override|An item is already at|Could not delete from "
                          r"config\. No match for) '([^']+)'")


def _override_problem(o, message: str, cfg: dict | None) -> Problem:
    """A Hydra composition error of one override, said with its key and the fix."""
    key = o.get_key_element().lstrip("+~")
    value = o.value() if not o.is_sweep_override() else o.input_line.split("=", 1)[-1]
    if "already at" in message:
        return Problem(key, value, f"the key exists: change it with `{key}=...` (no +)")
    if "Ambiguous value" in message:
        return Problem(key, value, f"a comma list is a sweep (`llamaflow run -m`); for a list "
                                   f"write {key}=[{value}]")
    parent, _, leaf = key.rpartition(".")
    node = cfg
    for part in parent.split(".") if parent else []:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):
        hint = suggest(leaf, node, f"{parent}." if parent else "")
        where = parent or "the config"
        return Problem(key, value, "unknown key" + (hint or f"; {where} has: {', '.join(map(str, node))}"))
    return Problem(key, value, "unknown key: " + message.splitlines()[0])


def compose_config(overrides: list[str] | tuple[str, ...] = (), config_name: str = "config",
                   problems: list[Problem] | None = None) -> dict | None:
    """Compose conf/ with Hydra overrides into the resolved config as a plain dict.

    Every override that cannot apply (an unknown group option, an unknown key, + on a key that
    exists) is a Problem: with `problems` given they are appended there and the config is
    composed from the other overrides (None when even that fails); without it they raise one
    ConfigError."""
    collect = problems is not None
    problems = problems if collect else []
    overrides = list(overrides)
    _register_resolvers()
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        problems.append(Problem("overrides", overrides, f"not Hydra override syntax: {e}"))
        if not collect:
            raise ConfigError(problems) from None
        return None
    bad = _group_problems(parsed)
    failed: list[tuple[int, str]] = []
    cfg = None
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        while True:
            keep = [o for i, o in enumerate(overrides) if i not in bad]
            try:
                cfg = OmegaConf.to_container(compose(config_name, overrides=keep), resolve=True)
                break
            except HydraException as e:
                message = str(e)
                m = _COMPOSE_KEY.search(message)
                keys = [i for i, o in enumerate(parsed) if i not in bad
                        and (m and o.get_key_element().lstrip("+~") == m[1]
                             or "Ambiguous value" in message and o.input_line in message)]
                if not keys:  # not one override's fault: report Hydra's own words
                    problems.append(Problem("", NO_VALUE, message.split("\nConfig search path")[0]))
                    break
                failed.append((keys[0], message))
                bad[keys[0]] = None
    for i, message in failed:
        bad[i] = _override_problem(parsed[i], message, cfg)
    problems += [p for _, p in sorted(bad.items())]
    if problems and not collect:
        raise ConfigError(problems)
    return cfg


def top_level_keys() -> frozenset[str]:
    """The top-level keys of the default config (any other is unknown)."""
    return _top_level_keys(CONF_DIR)


@functools.lru_cache(maxsize=4)
def _top_level_keys(conf_dir: Path) -> frozenset[str]:
    # keyed on conf_dir: another conf/ (a copy with one more stage) has other keys
    return frozenset(compose_config([]))


def load_config(overrides: list[str] | tuple[str, ...] = (), config_name: str = "config") -> dict:
    """Compose conf/ with Hydra overrides and return the resolved config as a plain dict;
    ConfigError (naming every bad override) when an override cannot apply."""
    return compose_config(overrides, config_name)


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """Hydra multirun syntax (`a=1,2 b=x,y`) → one override list per combination."""
    choices = []
    for o in OverridesParser.create().parse_overrides(overrides):
        key = o.get_key_element()
        if o.is_sweep_override():
            choices.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            choices.append([o.input_line])
    return [list(combo) for combo in itertools.product(*choices)]


def to_yaml(cfg: dict) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(cfg))
