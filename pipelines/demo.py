"""`llamaflow demo`: the whole lifecycle on a CPU in minutes, with no network beyond loopback.

It synthesises a tiny Meta-format checkpoint (2 model-parallel shards, GQA) and a LLaMA-like
tokenizer trained on the English half of the bilingual demo corpus in pipelines/demo_data/,
serves them from a 127.0.0.1 HTTP server in Meta's download layout (with checklist.chk), and runs
the lifecycle on them with recipe=demo: download → convert → vocab (a Chinese tokenizer trained on
the Chinese half) → pretrain → sft → merge → quantize → evaluate.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

DEMO_DATA = Path(__file__).resolve().parent / "demo_data"
DEMO_PORT = 8631  # fixed when free, so the download stage's cache key is stable across demos


def train_base_tokenizer(out_path: Path, vocab_size: int = 512) -> Path:
    """A LLaMA-like SentencePiece model: BPE, byte fallback, digits split, identity normaliser,
    unk/bos/eos = 0/1/2, trained on the English demo corpus (Chinese falls back to bytes, which
    is what the vocab stage then fixes)."""
    import sentencepiece as spm

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        input=str(DEMO_DATA / "corpus_en.txt"), model_prefix=str(out_path.with_suffix("")),
        model_type="bpe", vocab_size=vocab_size, byte_fallback=True, split_digits=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
        num_threads=1,
        minloglevel=2)
    return out_path


def make_demo_source(root: Path, model_cfg: dict, seed: int = 0) -> Path:
    """Meta's download layout under `root`: tokenizer.model + tokenizer_checklist.chk at the top,
    `<meta_dir>/consolidated.NN.pth, params.json, checklist.chk` below."""
    import torch

    from steps.meta import synthesize_checkpoint

    root = Path(root)
    tok = train_base_tokenizer(root / "tokenizer.model")
    md5 = hashlib.md5(tok.read_bytes()).hexdigest()
    (root / "tokenizer_checklist.chk").write_text(f"{md5}  tokenizer.model\n")
    synthesize_checkpoint(root / model_cfg["meta_dir"], dict(model_cfg["params"]), tok,
                          n_shards=model_cfg["n_shards"], seed=seed, dtype=torch.float32)
    for extra in ("tokenizer.model", "tokenizer_checklist.chk"):  # Meta keeps these at the top
        p = root / model_cfg["meta_dir"] / extra
        if p.exists():
            p.unlink()
    return root


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the demo's output readable
        pass


@contextlib.contextmanager
def serve_directory(root: Path):
    """Serve `root` over HTTP on 127.0.0.1; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    try:
        server = ThreadingHTTPServer(("127.0.0.1", DEMO_PORT), handler)
    except OSError:
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def run_demo(workdir: Path, overrides: list[str] = (), from_stage: str | None = None) -> dict:
    from pipelines.config import load_config
    from pipelines.lifecycle import lifecycle

    overrides = ["recipe=demo", f"workdir={workdir}", *overrides]
    model_cfg = load_config(overrides)["model"]
    source = Path(workdir) / "demo-source"
    if not (source / model_cfg["meta_dir"] / "checklist.chk").is_file():
        make_demo_source(source, model_cfg)
    with serve_directory(source) as url:
        print(f"demo: serving the synthetic Meta checkpoint at {url}", flush=True)
        return lifecycle(overrides=[*overrides, f"source.url={url}"], from_stage=from_stage)
