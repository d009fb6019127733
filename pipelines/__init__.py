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

import logging as _logging

# The stages' INFO lines (training steps and losses, download and quantize summaries) reach the
# console and the Prefect run log; without a level of their own they inherit the root's WARNING.
_logging.getLogger("steps").setLevel(_logging.INFO)
# ... and not the libraries' chatter around them: MLflow's system-metrics monitor announces each
# start and stop, transformers draws a bar for loading a few tensors (the stages have their own
# progress), peft calls a transformers method deprecated in 5.x on every LoRA wrap.
_logging.getLogger("mlflow.system_metrics").setLevel(_logging.WARNING)
_logging.getLogger("mlflow.store.db.utils").setLevel(_logging.WARNING)  # "Creating tables..."
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import warnings as _warnings

_warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated",
                         category=FutureWarning)
