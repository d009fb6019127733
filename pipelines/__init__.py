"""llamaflow orchestration: Prefect flows, the content-addressed stage cache, MLflow tracking, CLI."""
import os

# Offline and quiet by default (set before Prefect reads its settings): no analytics calls, and the
# stages' own stdlib loggers (`steps.*`) forwarded into the Prefect run log.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "steps")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The ephemeral Prefect server (no PREFECT_API_URL) gets 20 s to answer by default; on a busy
# 2-core laptop its start-up (imports, SQLite migrations) takes longer and the run died before
# any stage. Prefect counts only its own sleeps towards this limit, so the wall time is longer.
EPHEMERAL_STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
os.environ.setdefault(EPHEMERAL_STARTUP_TIMEOUT_ENV, "180")

# llama.cpp's own log: steps/llamacpp_log.py (quiet unless LLAMAFLOW_LLAMA_CPP_LOG asks).
