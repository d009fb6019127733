"""pretrain stage: LoRA continued pre-training on plain text (Chinese-LLaMA-Alpaca
`run_clm_pt_with_peft.py` / `run_pt.sh`).

Data: .txt (one example per line), .jsonl/.json or .parquet (a `text_column`) files or
directories. Each line is tokenized with the model's tokenizer (BOS prepended, no EOS, as the
LLaMA tokenizer does), concatenated per map batch of 1,000 lines and cut into block_size blocks
(`group_texts`); `labels = input_ids`. The processed dataset is saved with `save_to_disk` under
`data_cache_dir` keyed on the data files' sha256, the tokenizer files' sha256, block_size and the
split, so a rerun does not re-tokenize (the recipe's v1 cache ignored tokenizer and block size).

Deviation from the recipe: a map batch's tail shorter than block_size is dropped, never kept as
one short block (the recipe's collator then silently repeats the first example).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from pydantic import Field

from steps import MetricsCallback, Stage
from steps.digests import sha256_files, tokenizer_digest
from steps.files import data_files
from steps.train import run_training
from steps.train.config import OMIT_AT_DEFAULT, RESULT_NEUTRAL, TrainConfig, with_data
from steps.train.data import cache_key, prepared, save_splits, split, split_sizes
from steps.train.launch import execute, worker_main

VERSION = "3"
# checkpoints in scratch (a rerun resumes), tokenized data in the workspace's data cache
STAGE = Stage(gpu=True, resumable=True, data_cache=True)
PREP_VERSION = "pt-2"            # bump when the preprocessing below changes its output
# (pt-2: the same blocks as pt-1, stored as int32 in one tokenize-and-cut pass)
SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
LOADERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
GROUP_BATCH = 1000               # lines per group_texts batch, as HF's run_clm default

log = logging.getLogger(__name__)


class Config(TrainConfig):
    """pretrain stage: LoRA continued pre-training on plain text.
    Defaults = Chinese-LLaMA-Alpaca run_pt.sh (lr 2e-4, cosine, warmup 0.05, wd 0.01,
    r 8 / alpha 32 / dropout 0.05 on the 7 projections, embed_tokens+lm_head saved, block 512,
    batch 1 x accumulation 8, 1 epoch, validation fraction 0.001).
    Plus / LLaMA-2 preset: lora.r=64, lora.alpha=128 (everything else the same), e.g. in
    conf/recipe/<name>.yaml:
      pretrain: {lora: {r: 64, alpha: 128}}"""
    # run_pt.sh's optimizer settings are TrainConfig's defaults: only the data fields are new
    data: list[str] = Field(default_factory=list, description=(
        "Text files or directories: .txt (one example per line), .jsonl/.json/.parquet "
        "(text_column). Hashed into the cache key (DATA_FIELDS). The recipe sets it; the demo "
        "uses its own corpus."))
    text_column: str = Field("text", description="column read from .jsonl/.json/.parquet files")
    block_size: int = Field(512, ge=8, description="tokens per training block (lines get BOS, "
                                                   "are concatenated, then cut)")
    data_workers: int | None = Field(None, ge=1, description=(
        "processes tokenizing the data; null: one per core the stage is given. The blocks do "
        "not depend on it (left out of the cache key)"))


DATA_FIELDS = ("data",)
CACHE_EXCLUDE = RESULT_NEUTRAL          # checkpointing, the launcher timeout, tokenizer processes
CACHE_OMIT_AT_DEFAULT = OMIT_AT_DEFAULT  # new knobs at their old behaviour keep the key
DIGEST_EXCLUDE = ("trainer_log.jsonl",)   # its tokens_per_s differ run to run; the adapter doesn't


def _tokenize_and_cut(batch: dict, tokenizer, text_column: str, block_size: int) -> dict:
    """One GROUP_BATCH of lines: tokenized (BOS each), concatenated and cut into blocks, the
    remainder dropped, as the recipe's group_texts does per batch, in numpy rather than
    Python lists."""
    import itertools

    import numpy as np

    ids = tokenizer(batch[text_column], return_attention_mask=False)["input_ids"]
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32)
    n = (len(flat) // block_size) * block_size
    return {"input_ids": flat[:n].reshape(-1, block_size)}


def _blocks_of_rows(job):
    ds, start, stop, tokenizer, text_column, block_size = job
    return ds.select(range(start, stop)).map(
        _tokenize_and_cut, batched=True, batch_size=GROUP_BATCH, remove_columns=ds.column_names,
        fn_kwargs={"tokenizer": tokenizer, "text_column": text_column, "block_size": block_size})


def build_blocks(files: list[Path], tokenizer, block_size: int, text_column: str, work: Path,
                 num_proc: int | None = None):
    """Tokenize every file (BOS per line) and cut each into block_size blocks (datasets Arrow,
    on disk under `work`, never a Python list of the corpus).

    num_proc worker processes (None: one per core this process may use) each take a run of
    whole GROUP_BATCH batches, so the blocks are the same whatever the number of workers."""
    import datasets
    from datasets import concatenate_datasets, load_dataset

    datasets.disable_progress_bars()
    workers = num_proc or len(os.sched_getaffinity(0))
    parts = []
    for f in files:
        ds = load_dataset(LOADERS[f.suffix], data_files=str(f), split="train",
                          cache_dir=str(work / "hf"))
        if text_column not in ds.column_names:
            raise ValueError(f"{f}: no {text_column!r} column (columns: {ds.column_names}); set "
                             "pretrain.text_column to the column holding the text")
        n = len(ds)
        per = max(1, -(-n // workers // GROUP_BATCH)) * GROUP_BATCH
        jobs = [(ds, a, min(a + per, n), tokenizer, text_column, block_size)
                for a in range(0, n, per)]
        if not jobs:
            continue
        if len(jobs) == 1:
            shards = [_blocks_of_rows(job) for job in jobs]
        else:
            import multiprocess

            with multiprocess.get_context("fork").Pool(len(jobs)) as pool:
                shards = pool.map(_blocks_of_rows, jobs)
        ds = concatenate_datasets(shards)
        log.info("%s: %d blocks of %d tokens (%d tokenizer process(es))", f, len(ds), block_size,
                 len(jobs))
        parts.append(ds)
    blocks = concatenate_datasets(parts) if parts else None
    if blocks is None or len(blocks) == 0:
        raise ValueError(f"the data ({', '.join(map(str, files))}) gives no full block of "
                         f"{block_size} tokens; add text or lower pretrain.block_size")
    return blocks


def data_key(cfg: Config, tokenizer_dir: Path) -> tuple[str, list[Path]]:
    """The data cache key (data files, tokenizer, block size, split) and the expanded files."""
    files = data_files(cfg.data, SUFFIXES, "pretrain.data")
    key = "pt-" + cache_key({"v": PREP_VERSION, "files": [sha256_files([f]) for f in files],
                             "tokenizer": tokenizer_digest(tokenizer_dir),
                             "block_size": cfg.block_size, "text_column": cfg.text_column,
                             "validation_split": cfg.validation_split, "seed": cfg.seed})
    return key, files


def collate(rows: list[dict]) -> dict:
    import torch
    ids = torch.tensor([r["input_ids"] for r in rows], dtype=torch.long)
    return {"input_ids": ids, "labels": ids.clone()}


def _worker(cfg: Config, out_dir: Path, *, on_metrics=None, model: str, dataset: str,
            resume_dir: str | None, info: dict) -> dict:
    return run_training("pretrain", cfg, out_dir, model_dir=Path(model), adapters=[],
                        dataset_dir=Path(dataset), collate=collate, resume_dir=resume_dir,
                        on_metrics=on_metrics, extra_info=info)


def _builder(config: Config, files: list[Path], model: Path):
    """build(dir) for data.prepared: the blocks of `files`, split and saved."""
    def build(ddir: Path) -> dict:
        import tempfile

        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model)
        with tempfile.TemporaryDirectory(prefix="llamaflow-pt-") as work:
            blocks = build_blocks(files, tokenizer, config.block_size, config.text_column,
                                  Path(work), num_proc=config.data_workers)
            train, held_out = split(blocks, config.validation_split, config.seed)
            meta = {"files": [str(f) for f in files], "block_size": config.block_size}
            save_splits({"train": train, "eval": held_out}, ddir, meta)
        return meta
    return build


def run(config: Config, out_dir: Path, *, on_metrics: MetricsCallback | None = None,
        model: Path, resume_dir: Path | None = None, data_cache_dir: Path | None = None) -> dict:
    """Train a LoRA adapter on `model` (an HF model dir, e.g. the vocab stage's hf-zh/) with
    config.data; write it to out_dir (adapter files at the top, best/ by eval loss,
    trainer_log.jsonl, training_summary.json) and return summary metrics.

    resume_dir: a stable scratch dir for checkpoints (pipelines passes one per cache key). A run
        into the same resume_dir continues from its newest complete checkpoint (exactly: the
        adapter, optimizer, scheduler, RNG and data position are restored). None: no
        checkpoints survive the run.
    data_cache_dir: where tokenized datasets are kept (keyed on data, tokenizer, block size and
        split), so a rerun does not re-tokenize. None: a temp dir, removed afterwards.
    on_metrics(values, step): loss, lr, grad_norm, tokens_per_s, epoch every log_every steps;
        eval_loss, eval_ppl every eval_every steps and at the end.
    """
    import datasets

    from steps.checks import check_model

    datasets.disable_progress_bars()
    config = Config.model_validate(config) if not isinstance(config, Config) else config
    out_dir, model = Path(out_dir), Path(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = check_model(model)                      # before any tokenization
    key, files = data_key(config, model)
    with prepared(data_cache_dir, key, _builder(config, files, model)) as (ddir, _, hit):
        n_train, n_eval = split_sizes(ddir)
        log.info("pretrain data: %d train / %d eval blocks of %d tokens (vocab %d)", n_train,
                 n_eval, config.block_size, sizes.tokenizer)
        info = {"data_digest": key, "block_size": config.block_size}
        summary = execute("steps.pretrain", _worker, config, out_dir, on_metrics=on_metrics,
                          model=str(model), dataset=str(ddir),
                          resume_dir=str(resume_dir) if resume_dir else None, info=info)
    summary.update({"train_blocks": n_train, "eval_blocks": n_eval,
                    "train_tokens_per_epoch": n_train * config.block_size,
                    "data_cache_hit": int(hit)})
    return summary


def train(cfg: Config | dict, model_dir: Path, data: list[Path] | Path | None, out_dir: Path,
          **kwargs) -> Path:
    """Plain entry point: train on `data` (overrides cfg.data) and return the adapter dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run(with_data(Config, cfg, data), out_dir, model=Path(model_dir), **kwargs)
    return out_dir


if __name__ == "__main__":
    worker_main(Config, _worker)
