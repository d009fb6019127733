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
import math
from pathlib import Path

from pydantic import Field

from steps import MetricsCallback
from steps.training import (LearningRate, TrainConfig, WarmupRatio, WeightDecay,
                            cache_key, dataset_dir, data_files, execute,
                            run_training, save_splits, sha256_files, tokenizer_digest,
                            with_data, worker_main)

VERSION = "3"
PREP_VERSION = "pt-1"            # bump when the preprocessing below changes its output
SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
LOADERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
GROUP_BATCH = 1000               # lines per group_texts batch, as HF's run_clm default

log = logging.getLogger(__name__)


class Config(TrainConfig):
    """Defaults = Chinese-LLaMA-Alpaca run_pt.sh (lr 2e-4, cosine, warmup 0.05, wd 0.01,
    r 8 / alpha 32 / dropout 0.05 on the 7 projections, embed_tokens+lm_head saved, block 512,
    batch 1 x accumulation 8, 1 epoch, validation fraction 0.001)."""
    data: list[str] = Field(default_factory=list)   # files/dirs of .txt/.jsonl/.json/.parquet
    text_column: str = "text"                       # column read from .jsonl/.json/.parquet
    block_size: int = Field(512, ge=8)
    learning_rate: LearningRate = 2e-4
    warmup_ratio: WarmupRatio = 0.05
    weight_decay: WeightDecay = 0.01


DATA_FIELDS = ("data",)
# Checkpointing and the launcher timeout change neither the adapter nor its log (resume is
# bitwise exact), so a longer timeout resumes the same run instead of starting a new key.
CACHE_EXCLUDE = ("save_every", "save_total_limit", "launcher.timeout_s")
DIGEST_EXCLUDE = ("trainer_log.jsonl",)   # its tokens_per_s differ run to run; the adapter doesn't


def _group(batch: dict, block_size: int) -> dict:
    ids = [t for seq in batch["input_ids"] for t in seq]
    n = (len(ids) // block_size) * block_size
    return {"input_ids": [ids[i:i + block_size] for i in range(0, n, block_size)]}


def build_blocks(files: list[Path], tokenizer, block_size: int, text_column: str, work: Path):
    """Tokenize every file (BOS per line) and cut each into block_size blocks (datasets Arrow,
    on disk under `work`, never a Python list of the corpus)."""
    import datasets
    from datasets import concatenate_datasets, load_dataset

    datasets.disable_progress_bars()
    parts = []
    for f in files:
        ds = load_dataset(LOADERS[f.suffix], data_files=str(f), split="train",
                          cache_dir=str(work / "hf"))
        if text_column not in ds.column_names:
            raise ValueError(f"{f}: no {text_column!r} column (columns: {ds.column_names}); set "
                             "pretrain.text_column to the column holding the text")
        ds = ds.map(lambda b: {"input_ids": tokenizer(b[text_column])["input_ids"]},
                    batched=True, remove_columns=ds.column_names, desc=f"tokenize {f.name}")
        ds = ds.map(_group, batched=True, batch_size=GROUP_BATCH, fn_kwargs={"block_size": block_size},
                    remove_columns=ds.column_names, desc=f"group {f.name}")
        log.info("%s: %d blocks of %d tokens", f, len(ds), block_size)
        parts.append(ds)
    blocks = concatenate_datasets(parts)
    if len(blocks) == 0:
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
    from transformers import AutoTokenizer

    from steps.checks import check_model

    datasets.disable_progress_bars()
    config = Config.model_validate(config) if not isinstance(config, Config) else config
    out_dir, model = Path(out_dir), Path(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = check_model(model)                      # before any tokenization
    key, files = data_key(config, model)
    with dataset_dir(Path(data_cache_dir) if data_cache_dir else None, key) as (ddir, hit):
        if hit:
            log.info("tokenized data: cache hit %s", ddir)
        else:
            import tempfile
            tokenizer = AutoTokenizer.from_pretrained(model)
            with tempfile.TemporaryDirectory(prefix="llamaflow-pt-") as work:
                blocks = build_blocks(files, tokenizer, config.block_size, config.text_column,
                                      Path(work))
                splits = {"train": blocks, "eval": None}
                n_eval = math.ceil(config.validation_split * len(blocks))
                if config.validation_split > 0 and 1 <= n_eval < len(blocks):
                    s = blocks.train_test_split(test_size=n_eval, seed=config.seed, shuffle=True)
                    splits = {"train": s["train"], "eval": s["test"]}
                save_splits(splits, ddir, {"files": [str(f) for f in files],
                                           "block_size": config.block_size})
        from datasets import load_from_disk
        n_train = len(load_from_disk(str(ddir / "train")))
        n_eval = len(load_from_disk(str(ddir / "eval"))) if (ddir / "eval").is_dir() else 0
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
