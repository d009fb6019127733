"""Hydra composition (the Compose API, never @hydra.main) into a plain, resolved dict.

Flows take a list of override strings and compose the config themselves, so a CLI run, a
Prefect deployment run and a test all go through this one function.
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
STAGES = ["download", "convert", "vocab", "pretrain", "sft", "merge", "quantize", "evaluate"]
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


def load_config(overrides: list[str] | tuple[str, ...] = (), config_name: str = "config") -> dict:
    """Compose conf/ with Hydra overrides and return the resolved config as a plain dict."""
    _register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


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
