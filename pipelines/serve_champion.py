"""The flow of the `serve-champion` deployment (conf/deploy/default.yaml): keep the registered
model's champion served. Each run reconciles (pipelines/serve.py `reconcile`): nothing happens
while the alias's version is the one served and its server answers; when a lifecycle run has
moved the alias (or the server died), the old server is stopped by PID and the new version's f16
GGUF is started, detached, so it outlives the flow run. Scheduled every few minutes, it follows
the alias within that time; `stop=true` (a custom run in the UI) stops it."""
from __future__ import annotations

import os
from pathlib import Path

from prefect import flow, get_run_logger

from pipelines.serve import reconcile


@flow(name="serve-champion")
def serve_champion(alias: str = "champion", host: str = "127.0.0.1", port: int = 8650,
                   registered_model: str | None = None, threads: int | None = None,
                   gpu_layers: int = 0, stop: bool = False) -> dict:
    workdir = Path(os.environ.get("LLAMAFLOW_WORKDIR", "workspace"))
    result = reconcile(workdir, alias=alias, host=host, port=port,
                       registered_model=registered_model, threads=threads,
                       gpu_layers=gpu_layers, stop=stop)
    get_run_logger().info("serve-champion: %s %s", result["action"],
                          {k: result.get(k) for k in ("version", "url", "pid", "path")})
    return result
