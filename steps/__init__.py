"""llamaflow stages as plain Python: typed config in, paths in, an artifact directory out.

Nothing here imports Prefect, Hydra or MLflow; `pipelines/` adds caching, tracking and
orchestration on top. Each stage module exposes the same small protocol (see README,
"Adding a stage"):

    VERSION: str                        # bump when the same inputs + config give other bytes
    STAGE = Stage(...)                  # what pipelines/ needs to know to run it (below)
    class Config(pydantic.BaseModel)    # every default and its meaning (Field(description=)):
                                        # conf/<stage>/default.yaml is generated from it
    DATA_FIELDS: tuple[str, ...]        # Config fields naming user files hashed into the cache key
    CACHE_EXCLUDE: tuple[str, ...]      # optional: speed-only Config fields left out of the key
    CACHE_OMIT_AT_DEFAULT: dict         # optional: {field: value} left out of the key at that
                                        # value (a knob added later: old keys stay valid)
    DIGEST_EXCLUDE: tuple[str, ...]     # optional: output files whose bytes vary run to run
                                        # (timings), counted by name only in the artifact digest
    def public_config(config) -> dict   # optional: the config as the cache key and MLflow show
                                        # it (e.g. a URL read from the environment, redacted)
    def not_reusable(path) -> str | None  # optional: why a stored artifact must be computed again
                                        # (the judge's, made while its endpoint was down)
    def run(config, out_dir, *, on_metrics=None, **inputs) -> dict[str, float | int | str]

`run` writes only inside `out_dir` (an empty temp dir that pipelines renames into place) and
returns summary metrics; `on_metrics(values, step)` streams step-wise metrics while it runs.
A module is a stage when its conf group is in conf/config.yaml's `defaults:` list, whose order
is the order the stages run in, and it declares STAGE.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import pydantic

MetricsCallback = Callable[[dict, int], None]


@dataclass(frozen=True)
class Stage:
    """What the orchestration layer needs to know about a stage, declared by the stage itself
    (`STAGE = Stage(...)` in its module), so the runner holds no stage names."""
    # Runs on an accelerator where there is one: its Prefect task is tagged `gpu` (which a gpu
    # pool's concurrency limit counts) and MLflow samples system metrics while it runs.
    gpu: bool = False
    # Keys of the stage's conf section that the flow reads (which quant types to make, which
    # models to evaluate) rather than run(): a pydantic model with their defaults and meaning.
    # They are not passed to Config.
    flow: "type[pydantic.BaseModel] | None" = None
    # The stage this one runs as a part of (report, of evaluate): `stages`, `force` and `--from`
    # name that one, its task is tagged with it, and it is checked right after it.
    part_of: str | None = None
    # Top-level config sections that Config holds too, each under its own name (download's
    # `source`, which a conf/source/ option fills); a problem there is shown as `source.<key>`.
    global_sections: tuple[str, ...] = ()
    # run() takes `resume_dir`: a scratch dir kept per cache key, so a rerun after a crash
    # continues where it stopped; removed once the artifact is committed.
    resumable: bool = False
    # run() takes `data_cache_dir`: the workspace's cache of tokenized data, shared by every run,
    # which the step keys itself (on data and tokenizer).
    data_cache: bool = False
    # JSON Lines outputs that MLflow shows as a table for human review (`<stem>_table.json`),
    # each with the columns left out of it (token ids are for machines).
    tables: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # A JSON Lines output whose greedy answers a person can score: each becomes an MLflow trace
    # linked to the stage's run (pipelines/reviews.py; `llamaflow review` scores them).
    review: str | None = None
