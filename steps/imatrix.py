"""imatrix stage: an importance matrix of the f16 GGUF on calibration text, made by llama.cpp's own
`llama-imatrix`, for the quantize types that ask for one (`q4_k_m@imatrix`; the IQ types always).

The matrix weighs each weight column by how strongly the calibration text activates it, and
llama-quantize spends its rounding error where that weight is small. Whether it helps depends on
the type and the language (on Chinese text it helped Q4_K and hurt Q2_K in Chinese-LLaMA-2's own
measurements), so the lifecycle makes a type with and without it when both are listed, and the
report shows the two side by side.

Calibration text: the run's pre-training corpus by default (what the model is meant to read),
never an eval set (the matrix would then be tuned on the text it is scored on; refused at flow
start). Its lines are joined into calibration.txt, cut to what `max_chunks` chunks of `n_ctx`
tokens can use, and llama-imatrix reads it from the artifact directory under that relative
name, so the GGUF metadata that records the dataset names no workspace path.

Outputs: imatrix.gguf (llama.cpp's GGUF imatrix format), calibration.txt, imatrix_info.json.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from steps import Stage

VERSION = "1"
# made for the quantize stage: `stages=[quantize]`, `force` and `--from quantize` include it
STAGE = Stage(part_of="quantize")
DATA_FIELDS = ("data",)
CACHE_EXCLUDE = ("nthread",)   # threads change the speed, not the matrix
IMATRIX_FILE, CALIBRATION_FILE = "imatrix.gguf", "calibration.txt"
# A token stands for at most this many UTF-8 bytes of text (SentencePiece's default longest
# piece is 16 characters): enough bytes for every chunk, and no more, are kept.
_MAX_BYTES_PER_TOKEN = 64


class Config(BaseModel):
    """imatrix stage: llama.cpp's importance matrix of the f16 GGUF on calibration text, for the
    quantize types that use one."""
    model_config = ConfigDict(extra="forbid")
    data: list[Path] = Field(default_factory=list, description=(
        "calibration text: files or directories of .txt (one text per line) and .jsonl (a "
        "`text` field per line). The lifecycle's: the pre-training corpus; an eval set's file "
        "is refused (the matrix would be fitted to the text it is scored on)"),
        json_schema_extra={"conf": "${pretrain.data}"})
    n_ctx: int = Field(512, ge=8, description=(
        "tokens per chunk (llama-imatrix -c); 512 is llama.cpp's usual setting. The text must "
        "hold at least 2 chunks"))
    max_chunks: int | None = Field(100, ge=1, description=(
        "chunks of calibration at most (llama-imatrix --chunks); null = the whole text"))
    process_output: bool = Field(False, description=(
        "also collect the output (lm_head) tensor (llama-imatrix --process-output); llama.cpp's "
        "default leaves it out"))
    nthread: int = Field(0, description="llama-imatrix threads; 0 = all cores")


def calibration_text(config: Config) -> str:
    """The calibration files' texts, one a line, cut to what max_chunks chunks can use."""
    from steps.vocab import iter_corpus

    if not config.data:
        raise ValueError("imatrix.data: no calibration text (set it to files or directories of "
                         ".txt/.jsonl; the lifecycle's default is pretrain.data)")
    limit = None if config.max_chunks is None else \
        config.max_chunks * config.n_ctx * _MAX_BYTES_PER_TOKEN
    lines, size = [], 0
    for text in iter_corpus(list(config.data)):
        lines.append(text.replace("\r", " ").replace("\n", " "))
        size += len(lines[-1].encode("utf-8")) + 1
        if limit is not None and size >= limit:
            break
    return "\n".join(lines) + "\n"


def _count_tokens(model: Path, text: str) -> int:
    """Tokens of `text` with the GGUF's vocabulary (BOS included), as llama-imatrix counts."""
    from llama_cpp import Llama

    from steps.llamacpp_log import route_llama_cpp_log

    route_llama_cpp_log()
    vocab = Llama(model_path=str(model), vocab_only=True, verbose=False)
    try:
        return len(vocab.tokenize(text.encode("utf-8"), add_bos=True, special=False))
    finally:
        vocab.close()


def _imatrix_meta(path: Path) -> dict:
    """What llama-imatrix recorded in its GGUF: chunks, chunk size, datasets, entries."""
    import gguf

    r = gguf.GGUFReader(path)
    meta = {}
    for key in ("imatrix.chunk_count", "imatrix.chunk_size"):
        if key in r.fields:
            meta[key.split(".", 1)[1]] = int(r.fields[key].contents())
    if "imatrix.datasets" in r.fields:
        meta["datasets"] = list(r.fields["imatrix.datasets"].contents())
    # two tensors per entry: the sums of squared activations and their counts
    meta["entries"] = len({t.name.rsplit(".", 1)[0] for t in r.tensors})
    return meta


def run(config: Config, out_dir: Path, *, on_metrics=None, gguf: Path) -> dict:
    """out_dir/imatrix.gguf from llama-imatrix on the f16 GGUF `gguf` (artifact dir or file)."""
    from steps import llamacpp_tools
    from steps.quantize import find_gguf
    from steps.speed import usable_cores

    out_dir = Path(out_dir)
    model = find_gguf(Path(gguf))
    text = calibration_text(config)
    # llama-imatrix says this itself, but through an asynchronous log that can lose the line
    # when it exits at once: counted here, with the model's own tokenizer, for a clear error
    n_tokens = _count_tokens(model, text)
    if n_tokens < 2 * config.n_ctx:
        raise ValueError(f"imatrix.data: the calibration text is {n_tokens} tokens; llama-imatrix "
                         f"needs at least {2 * config.n_ctx} (2 chunks of imatrix.n_ctx="
                         f"{config.n_ctx}): give imatrix.data more text or a smaller "
                         "imatrix.n_ctx")
    (out_dir / CALIBRATION_FILE).write_text(text, encoding="utf-8")
    cmd = [str(llamacpp_tools.tool("llama-imatrix")), "-m", str(model), "-f", CALIBRATION_FILE,
           "-o", IMATRIX_FILE, "-c", str(config.n_ctx), "--no-ppl",
           "-t", str(config.nthread or usable_cores())]
    if config.max_chunks is not None:
        cmd += ["--chunks", str(config.max_chunks)]
    if config.process_output:
        cmd.append("--process-output")
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=out_dir, env=llamacpp_tools.env(), capture_output=True,
                          text=True)
    if proc.returncode != 0 or not (out_dir / IMATRIX_FILE).is_file():
        need = re.search(r"you need at least \d+ tokens[^\n]*", proc.stdout + proc.stderr)
        why = need.group(0) if need else (proc.stdout + proc.stderr).strip()[-2000:]
        raise RuntimeError(f"llama-imatrix on {model.name} failed (exit {proc.returncode}): {why}"
                           f"{'; give imatrix.data more text or a smaller imatrix.n_ctx' if need else ''}")
    meta = _imatrix_meta(out_dir / IMATRIX_FILE)
    info = {"model": model.name, "n_ctx": config.n_ctx, "max_chunks": config.max_chunks,
            "calibration_bytes": len(text.encode("utf-8")),
            "calibration_lines": text.count("\n"), **meta}
    (out_dir / "imatrix_info.json").write_text(json.dumps(info, indent=1) + "\n")
    metrics = {"chunks": meta.get("chunk_count", 0), "entries": meta["entries"],
               "calibration_bytes": info["calibration_bytes"], "seconds": time.time() - t0}
    if on_metrics:
        on_metrics({k: v for k, v in metrics.items() if k != "seconds"}, 0)
    return metrics
