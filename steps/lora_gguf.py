"""A peft LoRA adapter as a llama.cpp GGUF LoRA adapter, for serving it on its base GGUF without
merging (llama_cpp.server's --lora_path).

The exporter is llama.cpp's own convert_lora_to_gguf.py, from the vendored source of the
installed llama-cpp-python (steps/llamacpp_tools.py `converters`), so the file is what any
llama.cpp client expects.

What it cannot carry: a llama.cpp LoRA adapter holds LoRA A/B pairs (and norms) only. An adapter
that trained modules in full (peft modules_to_save: the recipe's embed_tokens and lm_head, which
the pretrain and SFT stages train over the grown vocabulary) would lose them, so the model served
would not be the one trained; llama.cpp's converter refuses such an adapter itself (it exits on
the first tensor that is not a LoRA pair). `lora_problem` says so before anything is exported, and the fix: serve
the merged model, whose GGUF has them.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ADAPTER_FILE = "adapter_model.safetensors"


def adapter_tensors(adapter: Path) -> list[str]:
    from safetensors import safe_open

    f = Path(adapter) / ADAPTER_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{adapter} has no {ADAPTER_FILE}: give a peft adapter directory "
                                "(a pretrain or sft artifact)")
    with safe_open(str(f), "pt") as st:
        return list(st.keys())


def full_weights(names: list[str]) -> list[str]:
    """The tensors of an adapter that are not LoRA pairs or norms: modules trained in full."""
    # .base_layer. tensors (peft saves them for a LoRA on embed_tokens) are skipped by
    # llama.cpp's converter: the base has them
    return sorted(n for n in names if not any(k in n for k in (
        ".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B", "norm",
        ".base_layer.")))


def lora_problem(adapter: Path) -> str | None:
    """Why `adapter` cannot be a llama.cpp LoRA adapter (with the fix), or None."""
    try:
        full = full_weights(adapter_tensors(adapter))
    except FileNotFoundError as e:
        return str(e)
    if not full:
        return None
    cfg_file = Path(adapter) / "adapter_config.json"
    saved = []
    if cfg_file.is_file():
        saved = json.loads(cfg_file.read_text(encoding="utf-8")).get("modules_to_save") or []
    shown = ", ".join(full[:2]) + (f" and {len(full) - 2} more" if len(full) > 2 else "")
    return (f"{adapter}: the adapter trains {', '.join(saved) or 'modules'} in full "
            f"(modules_to_save: {shown}) besides its LoRA pairs. A llama.cpp LoRA adapter holds "
            "LoRA pairs only, so those weights would be dropped and the model served would not be "
            "the one trained (llama.cpp's convert_lora_to_gguf.py refuses such an adapter for the "
            "same reason). Serve the merged model instead (`llamaflow serve-model f16`), whose "
            "GGUF has them, or train with lora.modules_to_save=[] to serve the adapter alone")


def export_lora(adapter: Path, base_hf: Path, out: Path, outtype: str = "f32") -> Path:
    """`adapter` (LoRA pairs only; see lora_problem) as a GGUF LoRA adapter at `out`, written by
    llama.cpp's converter into a temp file beside it, then renamed. `base_hf`: the HF model dir
    the adapter was trained on (the converter reads its config)."""
    from steps.llamacpp_tools import converters

    problem = lora_problem(adapter)
    if problem:
        raise ValueError(problem)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # a temp name of its own: two exports of one adapter at once each write their own file
    tmp = out.with_name(f"{out.name}.{os.getpid()}.partial")
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    try:
        r = subprocess.run([sys.executable, str(converters() / "convert_lora_to_gguf.py"),
                            str(adapter), "--base", str(base_hf), "--outtype", outtype,
                            "--outfile", str(tmp)],
                           capture_output=True, text=True, env=env, timeout=1800)
    except subprocess.TimeoutExpired:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama.cpp's convert_lora_to_gguf.py took over 30 min on {adapter}")
    if r.returncode or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama.cpp's convert_lora_to_gguf.py failed on {adapter} (exit "
                           f"{r.returncode}):\n{(r.stderr or r.stdout)[-2000:]}")
    tmp.replace(out)
    return out


def export_key(adapter: Path, base_hf: Path, outtype: str) -> str:
    """The cache name of an export: the adapter's files and the base's config by content, and
    the llama.cpp version whose converter writes it."""
    from steps.digests import sha256_files
    from steps.llamacpp_tools import installed_version

    files = [Path(adapter) / ADAPTER_FILE, Path(adapter) / "adapter_config.json",
             Path(base_hf) / "config.json"]
    h = hashlib.sha256(sha256_files([f for f in files if f.is_file()]).encode())
    h.update(f"{outtype} {installed_version()}".encode())
    return h.hexdigest()[:16]
