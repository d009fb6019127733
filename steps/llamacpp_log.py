"""llama.cpp's own log, through Python logging: quiet unless asked for.

llama.cpp prints every model load (a line per GGUF key, per tensor type, ...) and every quantized
tensor. llama-cpp-python routes that log through a callback, but its level table predates ggml's
current numbering (NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5: see ggml.h), so INFO lines
count as warnings and reach stderr whatever the level: most of a demo run's console was loader
dumps. Here each line goes to the logger `steps.llama_cpp` at its real level (the runner forwards
`steps.*` into the Prefect run log); it shows warnings and errors only, unless
LLAMAFLOW_LLAMA_CPP_LOG=info (or debug) asks for more.
"""
from __future__ import annotations

import ctypes
import logging
import os
import re

log = logging.getLogger("steps.llama_cpp")
LEVEL_ENV = "LLAMAFLOW_LLAMA_CPP_LOG"
_GGML_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_GGML_CONT = 5
_state = {"callback": None, "level": logging.INFO, "buffer": ""}
# The quantizer warns once per tensor whose row length a type cannot hold (every tensor of a tiny
# model), then once in total ("N of M tensor(s) required fallback quantization"): the per-tensor
# lines count as detail (INFO), the total stays a warning.
_FALLBACK_TENSOR = re.compile(r"^warning: \S+\s+- ncols\s+\d+ not divisible")


def route_llama_cpp_log() -> None:
    """Install the callback (once per process) and set the logger's level from LEVEL_ENV."""
    wanted = os.environ.get(LEVEL_ENV, "warning").strip().upper()
    log.setLevel(getattr(logging, wanted, logging.WARNING))
    if _state["callback"] is not None:
        return
    import llama_cpp

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data) -> None:
        if level != _GGML_CONT:  # a continuation keeps the level of the line it continues
            _state["level"] = _GGML_LEVELS.get(level, logging.INFO)
        # llama.cpp sends pieces of lines; log whole lines
        _state["buffer"] += text.decode("utf-8", errors="replace")
        *lines, _state["buffer"] = _state["buffer"].split("\n")
        for line in lines:
            if line.strip():
                log.log(_FALLBACK_TENSOR.match(line) and logging.INFO or _state["level"], line)

    _state["callback"] = callback  # ctypes must keep the function object alive
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
