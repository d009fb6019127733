"""Which stages there are, in which order, and what each declares: read from conf/ and steps/.

The order is conf/config.yaml's `defaults:` list. A group there whose steps module
(`steps/<group>.py`) declares `STAGE = Stage(...)` is a stage; the other groups (model, source,
tracking) are plain config. A stage that is `part_of` another (report, of evaluate) is planned
as that one: `stages`, `force` and `--from` name only the others, the stage order.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
from pathlib import Path

import yaml

from pipelines import config
from steps import Stage


def declared(name: str) -> Stage:
    """The STAGE that steps/<name>.py declares."""
    return importlib.import_module(f"steps.{name}").STAGE


def task_names() -> list[str]:
    """Every stage, those part of another included, in the order of `defaults:` (the names that
    conf `retries` keys)."""
    root = config.CONF_DIR / "config.yaml"
    return list(_declaring(root, root.stat().st_mtime_ns))


def stage_order() -> list[str]:
    """The stages that `stages`, `force` and `--from` name, in the order they run."""
    return [name for name in task_names() if declared(name).part_of is None]


def parts_of(name: str) -> list[str]:
    """The stages that run as part of stage `name` (evaluate: report)."""
    return [t for t in task_names() if declared(t).part_of == name]


@functools.lru_cache(maxsize=4)
def _declaring(root: Path, mtime_ns: int) -> tuple[str, ...]:
    """The groups of `root`'s defaults whose steps module declares STAGE (mtime_ns: an edited
    config.yaml is read again, `llamaflow serve` being long-lived)."""
    return tuple(g for g in _groups(root) if importlib.util.find_spec(f"steps.{g}") is not None
                 and isinstance(getattr(importlib.import_module(f"steps.{g}"), "STAGE", None),
                                Stage))


def _groups(root: Path) -> list[str]:
    """The groups of a Hydra defaults list, in order (`optional recipe: null` -> recipe,
    `launcher@pretrain.launcher: x` -> launcher)."""
    entries = yaml.safe_load(root.read_text()).get("defaults") or []
    return [key.split()[-1].lstrip("/").split("@")[0]
            for entry in entries if isinstance(entry, dict) for key in entry]
