"""Bounded loopback load on a GGUF: `llamaflow serve-model` against `python -m llama_cpp.server`
started directly on the same file, in the same run.

    python bench/serve_load.py MODEL.gguf [--requests 32] [--max-tokens 24] [--time-limit 120]

For each server and each concurrency (1, 4, 16 client threads, the official `openai` client),
a fixed number of greedy chat requests, stopped early at the time limit: requests/s, p50/p95/p99
latency, generated tokens/s and errors (must be 0); then a table with the ratio ours/direct.
Each server is stopped by PID (its process group) at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPTS = ["什么是困惑度？", "What is a checksum?", "把下面的句子翻译成英文。\n图书馆九点开门。",
           "Write one sentence about spring."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_models(base: str, proc, timeout=120):
    import requests

    t = time.monotonic() + timeout
    while time.monotonic() < t:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if requests.get(base + "/models", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError("server not ready")


def start_ours(gguf: Path, port: int, threads: int):
    cmd = [sys.executable, "-m", "pipelines.cli", "serve-model", str(gguf), "--port", str(port),
           "--threads", str(threads)]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def start_direct(gguf: Path, port: int, threads: int, template: Path):
    """`python -m llama_cpp.server` itself, with the same settings and the SFT template (the one a
    lifecycle GGUF carries, given explicitly so a GGUF without one is served alike); not through steps.judge's launcher, so llama.cpp's extra CPU buffers keep their
    default (on): the one setting that differs from ours."""
    from steps.sft import chat_template

    template.write_text(json.dumps({"chat_template": chat_template(),
                                    "bos_token": "<s>", "eos_token": "</s>"}))
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", "512", "--n_threads", str(threads),
           "--n_threads_batch", str(threads), "--n_gpu_layers", "0", "--verbose", "false",
           "--interrupt_requests", "false", "--chat_format", "hf-tokenizer-config",
           "--hf_tokenizer_config_path", str(template)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def stop(proc):
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            break
        try:
            os.kill(proc.pid, sig)
            proc.wait(20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def load(base: str, clients: int, n_requests: int, max_tokens: int, time_limit: float) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=base, api_key="none", max_retries=0, timeout=120)
    lat, toks, errors = [], [], []
    lock = threading.Lock()
    counter = iter(range(n_requests))
    stop_at = time.monotonic() + time_limit

    def worker():
        while time.monotonic() < stop_at:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t0 = time.perf_counter()
            try:
                r = client.chat.completions.create(
                    model="x", messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                    temperature=0, max_tokens=max_tokens, extra_body={"repeat_penalty": 1.0})
                dt = time.perf_counter() - t0
                with lock:
                    lat.append(dt)
                    toks.append(r.usage.completion_tokens)
            except Exception as e:  # noqa: BLE001 - any failure is an error to count and report
                with lock:
                    errors.append(repr(e))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        for f in [ex.submit(worker) for _ in range(clients)]:
            f.result()
    wall = time.perf_counter() - t0
    q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else [lat[0] if lat else 0] * 99
    return {"clients": clients, "done": len(lat), "errors": len(errors), "wall_s": wall,
            "rps": len(lat) / wall, "p50": q[49], "p95": q[94], "p99": q[98],
            "tok_s": sum(toks) / wall, "error_samples": errors[:3]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("gguf", type=Path)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--time-limit", type=float, default=120, help="seconds per (server, clients)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--json", type=Path, help="also write the results here")
    a = p.parse_args(argv)
    levels = [int(c) for c in a.clients.split(",")]
    results: dict[str, list[dict]] = {}
    tmp = Path(tempfile.mkdtemp(prefix="serve-load-"))
    for name in ("ours", "direct"):
        port = free_port()
        proc = start_ours(a.gguf.resolve(), port, a.threads) if name == "ours" else \
            start_direct(a.gguf.resolve(), port, a.threads, tmp / "tpl.json")
        try:
            base = f"http://127.0.0.1:{port}/v1"
            wait_models(base, proc)
            load(base, 1, 2, a.max_tokens, 30)   # warm-up
            results[name] = [load(base, c, a.requests, a.max_tokens, a.time_limit)
                             for c in levels]
        finally:
            stop(proc)
    hdr = ("| clients | server | done | errors | req/s | p50 s | p95 s | p99 s | gen tok/s |")
    lines = [hdr, "|" + "---|" * 9]
    for i, c in enumerate(levels):
        o, d = results["ours"][i], results["direct"][i]
        for name, r in (("ours", o), ("direct", d)):
            lines.append(f"| {c} | {name} | {r['done']} | {r['errors']} | {r['rps']:.2f} | "
                         f"{r['p50']:.3f} | {r['p95']:.3f} | {r['p99']:.3f} | {r['tok_s']:.1f} |")
        lines.append(f"| {c} | ours/direct | | | {o['rps'] / d['rps']:.2f} | "
                     f"{o['p50'] / d['p50']:.2f} | {o['p95'] / d['p95']:.2f} | "
                     f"{o['p99'] / d['p99']:.2f} | {o['tok_s'] / max(d['tok_s'], 1e-9):.2f} |")
    print("\n".join(lines))
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    bad = sum(r["errors"] for rs in results.values() for r in rs)
    if bad:
        print(f"errors: {bad}", [r["error_samples"] for rs in results.values() for r in rs],
              file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
