"""llama.cpp inference speed of a GGUF, per thread count, measured the way `llama-bench` measures
it (tools/llama-bench/llama-bench.cpp), in this process through llama-cpp-python:

  * pp<N> (prompt processing): the context's memory cleared, N tokens decoded in batches of
    n_batch (BOS first, then random ids), then synchronised; tokens/s = N / seconds;
  * tg<N> (text generation): the memory cleared, N single-token decodes from BOS, each
    synchronised; tokens/s = N / seconds;
  * one warm-up run before each test (the whole prompt; one generated token), then
    `repetitions` timed runs: the mean and the sample standard deviation of their tokens/s,
    as llama-bench prints "avg ± stdev".

The thread count is set on one loaded context before each test (llama_set_n_threads), so a
sweep over thread counts loads the model once. Token ids are random because speed does not
depend on them; a fixed seed keeps runs alike.

As a stage (one run per GGUF, a part of evaluate): out_dir/speed.json holds the rows and the
machine they were measured on. Speed belongs to the machine, not to the file: the numbers are
kept out of the artifact's digest, and a cache hit shows the machine that measured them (force
the stage, `force=[evaluate]`, to measure again here).
"""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Annotated, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from steps import Stage

VERSION = "1"


class FlowKeys(BaseModel):
    """The speed key the flow reads."""
    enabled: bool = Field(True, description=(
        "measure every GGUF the run made (false: the report's speed columns stay empty)"))


# measured for the report, with the evaluations: `stages`, `force` and `--from` say evaluate
STAGE = Stage(part_of="evaluate", flow=FlowKeys)
DATA_FIELDS = ()
SPEED_FILE, SETTINGS_FILE = "speed.json", "speed_settings.json"
# the numbers differ on every run: the digest counts speed.json by name only, and the settings
# file (what was measured: model, thread counts, test sizes, offload) makes it differ when those do
DIGEST_EXCLUDE = (SPEED_FILE,)


class Config(BaseModel):
    """speed stage: llama-bench's prompt-processing and generation tokens/s of one GGUF, per
    thread count, in this process."""
    model_config = ConfigDict(extra="forbid")
    threads: list[Annotated[int, Field(ge=1)]] | None = Field(None, description=(
        "thread counts to measure; null = 1, 2, 4, … below the cores, and the core count"))
    n_prompt: int = Field(512, ge=0, description="pp test: prompt tokens (llama-bench -p; 0: "
                                                 "no pp test)")
    n_gen: int = Field(128, ge=0, description="tg test: generated tokens (llama-bench -n; 0: "
                                              "no tg test)")
    repetitions: int = Field(3, ge=1, description="timed runs per test after a warm-up "
                                                  "(llama-bench -r; its default is 5)")
    flash_attn: bool = Field(False, description="llama.cpp flash attention, as the evaluate "
                                                "stage's flash_attn")
    extra_buffers: bool = Field(False, description="llama.cpp's extra CPU buffer types, as the "
                                                   "evaluate stage's extra_buffers")
    gpu_layers: int = Field(-1, ge=-1, description=(
        "layers offloaded to the GPU where llama.cpp was built with one (llama-bench -ngl; -1: "
        "all, 0: CPU only); a CPU build ignores it"))


def usable_cores() -> int:
    """The CPUs this process may run on (a container's or taskset's limit), not the host's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads(cores: int | None = None) -> list[int]:
    """1, 2, 4, … below the core count, and the core count itself: what users sweep."""
    cores = cores or usable_cores()
    out, t = [], 1
    while t < cores:
        out.append(t)
        t *= 2
    return out + [cores]


class _Bench:
    """A GGUF loaded once with a context of n_prompt + n_gen tokens, as llama-bench sizes it."""

    def __init__(self, gguf: Path, n_ctx: int, n_batch: int, n_ubatch: int, flash_attn: bool,
                 extra_buffers: bool, seed: int, gpu_layers: int = 0):
        import llama_cpp
        from llama_cpp import Llama

        from steps.llamacpp_log import route_llama_cpp_log

        route_llama_cpp_log()
        # llama.cpp uses at most n_ctx of a batch (llama-bench's 2048 against a 640-token
        # context); llama-cpp-python's own buffers must not be sized larger, or decode crashes
        n_batch = min(n_batch, n_ctx)
        n_ubatch = min(n_ubatch, n_batch)
        self.L = llama_cpp
        from steps.evaluate import _model_params

        # the evaluate stage's weights layout (no extra buffer types), so speed is measured on
        # the model the numbers came from; a GGML_NATIVE build dies on repacked Q8_0/Q4_0 here
        with _model_params(use_extra_bufts=extra_buffers):
            self.llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=n_batch,
                             n_ubatch=n_ubatch, flash_attn=flash_attn, logits_all=False,
                             n_gpu_layers=gpu_layers, verbose=False)
        self.ctx = self.llm.ctx
        from llama_cpp._internals import LlamaBatch

        self.batch = LlamaBatch(n_tokens=n_batch, embd=0, n_seq_max=1)
        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self.bos = llama_cpp.llama_vocab_bos(vocab) if llama_cpp.llama_vocab_get_add_bos(vocab) \
            else None
        self.n_batch = n_batch
        self.rng = np.random.default_rng(seed)

    def _first(self) -> int:
        return self.bos if self.bos is not None else int(self.rng.integers(self.n_vocab))

    def _decode(self, tokens: list[int], pos: int) -> None:
        # positions given explicitly, as llama-bench's batches; logits for the last token only
        self.batch.set_batch(tokens, n_past=pos, logits_all=False)
        self.llm._ctx.decode(self.batch)

    def clear(self) -> None:
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), False)

    def prompt(self, n: int) -> None:
        done = 0
        while done < n:
            k = min(n - done, self.n_batch)
            tokens = self.rng.integers(self.n_vocab, size=k).tolist()
            if done == 0:
                tokens[0] = self._first()
            self._decode(tokens, done)
            done += k
        self.L.llama_synchronize(self.ctx)

    def generate(self, n: int) -> None:
        token = self._first()
        for i in range(n):
            self._decode([token], i)
            self.L.llama_synchronize(self.ctx)
            token = int(self.rng.integers(self.n_vocab))

    def positions(self) -> int:
        """Tokens the context's sequence 0 holds (checks that a test decoded what it says)."""
        return self.L.llama_memory_seq_pos_max(self.L.llama_get_memory(self.ctx), 0) + 1

    def close(self) -> None:
        self.llm.close()


def _timed(bench: _Bench, run, n: int, repetitions: int) -> list[float]:
    speeds = []
    for _ in range(repetitions):
        bench.clear()
        t0 = time.perf_counter_ns()
        run(n)
        speeds.append(1e9 * n / (time.perf_counter_ns() - t0))
    return speeds


def measure(gguf: Path, threads: Sequence[int] | None = None, *, n_prompt: int = 512,
            n_gen: int = 128, repetitions: int = 5, n_batch: int = 2048, n_ubatch: int = 512,
            flash_attn: bool = False, extra_buffers: bool = False, seed: int = 0,
            gpu_layers: int = -1) -> list[dict]:
    """pp<n_prompt> and tg<n_gen> tokens/s of `gguf` at each thread count: one row per (test,
    threads) with avg_ts, stdev_ts and the samples (llama-bench's fields). n_prompt or n_gen 0
    leaves that test out."""
    if repetitions < 1:
        raise ValueError(f"repetitions={repetitions}: at least 1")
    threads = list(threads or default_threads())
    if any(t < 1 for t in threads):
        raise ValueError(f"threads={threads}: each at least 1")
    bench = _Bench(Path(gguf), max(n_prompt + n_gen, 1), n_batch, n_ubatch, flash_attn,
                   extra_buffers, seed, gpu_layers)
    rows = []
    try:
        for t in threads:
            bench.L.llama_set_n_threads(bench.ctx, t, t)
            for name, run, n in (("pp", bench.prompt, n_prompt), ("tg", bench.generate, n_gen)):
                if n <= 0:
                    continue
                bench.clear()
                run(n if name == "pp" else 1)  # llama-bench's warm-up
                samples = _timed(bench, run, n, repetitions)
                if bench.positions() != n:
                    raise RuntimeError(f"{name}{n}: the context holds {bench.positions()} tokens")
                rows.append({"test": f"{name}{n}", "threads": t, "n_tokens": n,
                             "avg_ts": statistics.fmean(samples),
                             "stdev_ts": statistics.stdev(samples) if len(samples) > 1 else 0.0,
                             "samples_ts": samples})
    finally:
        bench.close()
    return rows


def best(rows: list[dict], test_prefix: str) -> dict | None:
    """The fastest row of a test kind ("pp" or "tg"): the thread count a user would pick."""
    kind = [r for r in rows if r["test"].startswith(test_prefix)]
    return max(kind, key=lambda r: r["avg_ts"]) if kind else None


def _machine() -> dict:
    """The CPU the numbers belong to (/proc/cpuinfo's model name where there is one)."""
    import platform

    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"host": platform.node(), "cpu": name, "cores": usable_cores()}


def _system_info() -> str:
    """llama.cpp's own account of its backends (CPU features; a GPU where it has one)."""
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode(errors="replace").strip()


def run(config: Config, out_dir: Path, *, on_metrics=None, gguf: Path) -> dict:
    """out_dir/speed.json: the pp/tg rows of the GGUF in `gguf` (artifact dir or file)."""
    import json

    from steps.quantize import find_gguf

    model = find_gguf(Path(gguf))
    t0 = time.time()
    threads = list(config.threads or default_threads())
    settings = config.model_dump() | {"model": model.name, "threads": threads}
    (Path(out_dir) / SETTINGS_FILE).write_text(json.dumps(settings, indent=1) + "\n")
    rows = measure(model, threads, n_prompt=config.n_prompt, n_gen=config.n_gen,
                   repetitions=config.repetitions, flash_attn=config.flash_attn,
                   extra_buffers=config.extra_buffers, gpu_layers=config.gpu_layers)
    (Path(out_dir) / SPEED_FILE).write_text(json.dumps(
        {"model": model.name, "machine": _machine(), "gpu_layers": config.gpu_layers,
         "system_info": _system_info(), "rows": rows}, indent=1) + "\n")
    metrics = {f"{r['test']}_t{r['threads']}_ts": r["avg_ts"] for r in rows}
    for kind in ("pp", "tg"):
        top = best(rows, kind)
        if top is not None:
            metrics[f"{kind}_best_ts"], metrics[f"{kind}_best_threads"] = top["avg_ts"], top["threads"]
    if on_metrics:
        on_metrics(dict(metrics), 0)
    return metrics | {"seconds": time.time() - t0}
