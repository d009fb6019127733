"""`llamaflow demo`: the whole lifecycle on a CPU in minutes, offline.

It synthesises a tiny Meta-format checkpoint (2 model-parallel shards, GQA) and a LLaMA-like
tokenizer trained on the English half of the bilingual demo corpus in pipelines/demo_data/, into
the workspace (`<workdir>/demo-source`, Meta's download layout with checklist.chk), and runs the
lifecycle on it with recipe=demo: download → convert → vocab (a Chinese tokenizer trained on
the Chinese half) → pretrain → sft → merge → quantize → evaluate.

The checkpoint stays in the workspace and the demo recipe reads it as a local source
(conf/source/demo.yaml), so later `llamaflow run recipe=demo ...` commands and the shipped
deployments in that workspace start from it and hit the demo's cache. With `http=True`
(`llamaflow demo --http`) the same folder is served from a 127.0.0.1 HTTP server and downloaded
as a url source, the code path of Meta's presigned URLs (another download cache key, the same
bytes: the stages after download hit either way).

`llamaflow demo --recipe demo-llama3` does the same on a Llama 3 vocabulary: a Llama-3.1-shaped
checkpoint (2 shards, GQA, scaled rope) with the real Llama 3 tokenizer from the `llama-models`
package, in `<workdir>/demo-llama3-source`, run with recipe=demo-llama3.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import shutil
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
    out_path.with_suffix(".vocab").unlink(missing_ok=True)
    # The trainer records where it read and wrote (input, model_prefix): keep the names only,
    # so the synthetic source has the same bytes (and the download stage the same key) whatever
    # folder it is built in (ensure_demo_source builds it in a temporary one).
    from steps.tokenizer import load_sp_proto

    proto = load_sp_proto(out_path)
    proto.trainer_spec.model_prefix = out_path.stem
    proto.trainer_spec.input[:] = [Path(p).name for p in proto.trainer_spec.input]
    out_path.write_bytes(proto.SerializeToString())
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


def llama3_tokenizer() -> Path:
    """The real Llama 3 tiktoken tokenizer.model (128,000 ranks), as Meta ships it inside the
    `llama-models` package."""
    try:
        import llama_models
    except ImportError:
        raise RuntimeError("recipe=demo-llama3 takes the real Llama 3 tokenizer.model from the "
                           "`llama-models` package: pip install llama-models") from None
    return Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"


def make_demo_llama3_source(root: Path, model_cfg: dict, seed: int = 0) -> Path:
    """Meta's download layout under `root` for a random Llama 3.x checkpoint with the real
    tiktoken tokenizer: tokenizer.model + tokenizer_checklist.chk at the top,
    `<meta_dir>/consolidated.NN.pth, params.json, checklist.chk` below. Weights N(0, 0.02), norms
    1, as synthesize_checkpoint makes them for the LLaMA demo."""
    import torch

    from steps.llama3 import N_SPECIAL, Llama3Params, read_ranks, shard_dim
    from steps.meta import write_checklist

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tok = root / "tokenizer.model"
    shutil.copyfile(llama3_tokenizer(), tok)
    (root / "tokenizer_checklist.chk").write_text(
        f"{hashlib.md5(tok.read_bytes()).hexdigest()}  tokenizer.model\n")
    params = Llama3Params.from_dict(dict(model_cfg["params"]))
    vocab = len(read_ranks(tok)) + N_SPECIAL
    g = torch.Generator().manual_seed(seed)
    state = {name: torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.02
             for name, shape in params.shapes(vocab).items()}
    # Llama 3 splits the embedding over the vocabulary (rows), not over the width as LLaMA-2's
    # ParallelEmbedding does: steps.llama3.shard_dim, not the LLaMA-2 split of save_meta_checkpoint
    out, n = root / model_cfg["meta_dir"], model_cfg["n_shards"]
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for r in range(n):
        part = {name: t if shard_dim(name) is None else t.chunk(n, shard_dim(name))[r].clone()
                for name, t in state.items()}
        names.append(f"consolidated.{r:02d}.pth")
        torch.save(part, out / names[-1])
    (out / "params.json").write_text(json.dumps(params.to_json()))
    write_checklist(out, names + ["params.json"])
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


DEMO_SOURCE = "demo-source"   # the folder under the workdir (conf/source/demo.yaml)
# Per demo recipe: the folder under the workdir its conf/source/ option reads, and its maker.
DEMO_SOURCES = {"demo": (DEMO_SOURCE, make_demo_source),
                "demo-llama3": ("demo-llama3-source", make_demo_llama3_source)}


def ensure_demo_source(workdir: Path, model_cfg: dict | None = None,
                       recipe: str = "demo") -> Path:
    """`<workdir>/demo-source` (demo-llama3: `demo-llama3-source`), synthesised unless a complete
    one is there. Built beside it and renamed into place, so an interrupted demo never leaves a
    half-written checkpoint that a later run would take for the demo's."""
    import tempfile

    if model_cfg is None:
        from pipelines.config import load_config

        model_cfg = load_config([f"recipe={recipe}", f"workdir={workdir}"])["model"]
    name, make = DEMO_SOURCES[recipe]
    source = Path(workdir) / name
    if (source / model_cfg["meta_dir"] / "checklist.chk").is_file():
        return source
    source.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=source.parent))
    try:
        make(tmp, model_cfg)
        if source.exists():   # an incomplete one from an interrupted demo
            shutil.rmtree(source)
        tmp.rename(source)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return source


def demo_overrides(workdir: Path, overrides=(), url: str | None = None,
                   recipe: str = "demo") -> list[str]:
    """The lifecycle overrides of a demo run: `recipe` (demo, demo-llama3) in `workdir`, from
    the local demo source, or from `url` (the loopback server of serve_directory) as a url
    source."""
    via = ["source=url", f"source.url={url}"] if url else []
    return [f"recipe={recipe}", f"workdir={workdir}", *via, *overrides]


def run_demo(workdir: Path, overrides: list[str] = (), from_stage: str | None = None,
             http: bool = False) -> dict:
    from pipelines.lifecycle import lifecycle

    source = ensure_demo_source(workdir)
    if not http:
        return lifecycle(overrides=demo_overrides(workdir, overrides), from_stage=from_stage)
    with serve_directory(source) as url:
        print(f"demo: serving the synthetic Meta checkpoint at {url}", flush=True)
        return lifecycle(overrides=demo_overrides(workdir, overrides, url), from_stage=from_stage)
