"""llamaflow stages as plain Python: typed config in, paths in, an artifact directory out.

Nothing here imports Prefect, Hydra or MLflow; `pipelines/` adds caching, tracking and
orchestration on top. Each stage module exposes the same small protocol (see README,
"Adding a stage"):

    VERSION: str                        # bump when the same inputs + config give other bytes
    class Config(pydantic.BaseModel)    # every field mirrored in conf/<stage>/default.yaml
    DATA_FIELDS: tuple[str, ...]        # Config fields naming user files hashed into the cache key
    CACHE_EXCLUDE: tuple[str, ...]      # optional: speed-only Config fields left out of the key
    DIGEST_EXCLUDE: tuple[str, ...]     # optional: output files whose bytes vary run to run
                                        # (timings), counted by name only in the artifact digest
    def run(config, out_dir, *, on_metrics=None, **inputs) -> dict[str, float | int | str]

`run` writes only inside `out_dir` (an empty temp dir that pipelines renames into place) and
returns summary metrics; `on_metrics(values, step)` streams step-wise metrics while it runs.
"""
from __future__ import annotations

from typing import Callable

MetricsCallback = Callable[[dict, int], None]
