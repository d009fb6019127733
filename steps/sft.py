"""sft stage: LoRA instruction tuning on Alpaca-format data (Chinese-LLaMA-Alpaca
`run_clm_sft_with_peft.py` / `build_dataset.py` / `run_sft.sh`).

Trains on top of the base-zh model with the pre-training adapter(s) folded in first (the recipe's
order: the final merge applies base-zh + [pt, sft]). Each record {instruction, input, output}:

    source = PROMPT_TEMPLATE.format(instruction=instruction + ("\\n" + input if input else ""))
    target = output + EOS          (EOS: sft.eos_token, else the tokenizer's; Llama 3: <|eot_id|>)
    input_ids = (tok(source) + tok(target, no specials))[:max_seq_length]      (BOS on the source)
    labels    = ([-100] * len(source ids) + target ids)[:max_seq_length]

Batches are right-padded with the pad token and −100 labels. Like v1, a `[PAD]` token is added
when the tokenizer has none (49953 → 49954 rows; the adapter carries the resized embed_tokens and
lm_head and the tokenizer with [PAD]). Bad records (missing instruction/output, empty output,
empty instruction) are counted per reason, logged with file and index, and returned, and so are
records whose prompt fills max_seq_length (no supervised token left); more than
max_bad_fraction of either aborts before training.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from pydantic import Field

from steps import MetricsCallback, Stage
from steps.digests import sha256_files, tokenizer_digest
from steps.files import data_files
from steps.tokenizer import tokenizer_source
from steps.train import run_training
from steps.train.config import (OMIT_AT_DEFAULT, RESULT_NEUTRAL, LearningRate, TrainConfig,
                                ValidationSplit, WarmupRatio, WeightDecay, stage_default,
                                with_data)
from steps.train.data import cache_key, prepared, save_splits, split, split_sizes
from steps.train.launch import execute, worker_main

VERSION = "4"   # 4: the adapter's tokenizer carries the prompt template as its chat template
# checkpoints in scratch (a rerun resumes), tokenized data in the workspace's data cache
STAGE = Stage(gpu=True, resumable=True, data_cache=True)
PREP_VERSION = "sft-1"
SUFFIXES = (".json", ".jsonl")
IGNORE_INDEX = -100

# Chinese-LLaMA-Alpaca v1 build_dataset.py PROMPT_TEMPLATE, exactly (note the space at the end).
ALPACA_ZH_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response: ")
# Chinese-LLaMA-Alpaca-3 build_dataset.py: system_format with DEFAULT_SYSTEM_PROMPT + user_format,
# exactly. <|begin_of_text|> is not in the text: the tokenizer prepends it, as Meta's
# ChatFormat.encode_dialog_prompt does (upstream tokenizes without specials, so its rows start
# without it while its inference, via the chat template, starts with it).
LLAMA3_CHAT_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant. 你是一个乐于助人的助手。"
    "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{instruction}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n")

log = logging.getLogger(__name__)


class Config(TrainConfig):
    """sft stage: LoRA instruction tuning on top of base-zh with the pretrain adapter folded in.
    Defaults = Chinese-LLaMA-Alpaca v1 run_sft.sh (lr 1e-4, cosine, warmup 0.03, wd 0,
    r 8 / alpha 32 / dropout 0.05 on the 7 projections, embed_tokens+lm_head saved,
    max_seq_length 512, batch 1 x accumulation 8, 1 epoch, eval every 100 steps).
    Plus / LLaMA-2 preset: lora.r=64, lora.alpha=128; the LLaMA-2 chat template is
    prompt_template in conf/recipe/chinese-llama2-alpaca2.yaml."""
    data: list[str] = Field(default_factory=list, description=(
        "Alpaca-format files or dirs (.json array or JSON Lines; instruction, input, output). "
        "Hashed into the cache key, as is validation_data."))
    validation_data: list[str] = Field(default_factory=list, description=(
        "separate eval files (the recipe's --validation_file); else a split:"))
    validation_split: ValidationSplit = stage_default(
        "validation_split", 0.01, "fraction of examples held out when validation_data is empty")
    prompt_template: str = Field(ALPACA_ZH_TEMPLATE, description=(
        'Chinese-Alpaca v1 template, exactly; note the space after "### Response:". '
        '{instruction} is instruction + "\\n" + input when input is non-empty. Must contain '
        '"{instruction}".'))
    max_seq_length: int = Field(512, ge=8, description="prompt + output + EOS truncated to this "
                                                       "many tokens")
    packing: bool = Field(False, description="concatenate examples into max_seq_length rows (no "
                                             "padding), each example attending only to itself "
                                             "(position ids restart per example)")
    pad_token: str | None = Field("[PAD]", description="added when the tokenizer has none (v1: "
                                                       "49953 -> 49954 rows)")
    eos_token: str | None = Field(None, description=(
        "the token appended after each output and supervised; null: the tokenizer's EOS "
        "(LLaMA-1/2 </s>). Llama 3 chat data ends its turn with <|eot_id|>"))
    max_bad_fraction: float = Field(0.1, ge=0, le=1, description=(
        "abort if more records than this are bad (they are counted and logged)"))
    learning_rate: LearningRate = stage_default("learning_rate", 1e-4)
    warmup_ratio: WarmupRatio = stage_default("warmup_ratio", 0.03)
    weight_decay: WeightDecay = stage_default("weight_decay", 0.0)


DATA_FIELDS = ("data", "validation_data")
CACHE_EXCLUDE = RESULT_NEUTRAL          # checkpointing and the launcher timeout
CACHE_OMIT_AT_DEFAULT = OMIT_AT_DEFAULT  # new knobs at their old behaviour keep the key
DIGEST_EXCLUDE = ("trainer_log.jsonl",)   # its tokens_per_s differ run to run; the adapter doesn't


# ----------------------------------------------------------------------------- data

def load_tokenizer(model: Path, adapters: list[Path], pad_token: str | None):
    """The tokenizer SFT trains with: the last adapter's (when it carries one) or the model's,
    plus pad_token when it has none."""
    from transformers import AutoTokenizer

    src = tokenizer_source(model, adapters)
    tok = AutoTokenizer.from_pretrained(src)
    if tok.pad_token is None:
        if pad_token is None:
            raise ValueError(f"{src}: the tokenizer has no pad token and sft.pad_token is null; "
                             "set sft.pad_token (the recipe adds '[PAD]')")
        tok.add_special_tokens({"pad_token": pad_token})
    return tok, src


def record_problem(rec: dict) -> str:
    """'' for a usable record, else the reason it is bad."""
    for k in ("instruction", "output"):
        if rec.get(k) is None:
            return f"missing_{k}"
        if not isinstance(rec[k], str):
            return f"non_string_{k}"
    if rec.get("input") is not None and not isinstance(rec["input"], str):
        return "non_string_input"
    if not rec["output"].strip():
        return "empty_output"
    if not rec["instruction"].strip() and not (rec.get("input") or "").strip():
        return "empty_instruction"
    return ""


def eos_id(tokenizer, eos_token: str | None) -> int:
    """The id appended after each output: eos_token's (one token of the tokenizer) or, for
    None, the tokenizer's EOS."""
    if eos_token is None:
        return tokenizer.eos_token_id
    tid = tokenizer.convert_tokens_to_ids(eos_token)
    if tid is None or (tid == tokenizer.unk_token_id and eos_token != tokenizer.unk_token):
        raise ValueError(f"sft.eos_token {eos_token!r} is not a token of the tokenizer (a Llama 3 "
                         "tokenizer has <|eot_id|>; null uses the tokenizer's EOS)")
    return tid


def format_prompt(instruction: str, input: str | None = "",
                  template: str = ALPACA_ZH_TEMPLATE) -> str:
    """The prompt text for one record; SFT trains on it and evaluate generates from it.
    build_dataset.py: a non-empty input is appended to the instruction after a newline."""
    return template.format(instruction=f"{instruction}\n{input}" if input else instruction)


def _bos_in_text(text: str, tokenizer) -> bool:
    """Whether `text` starts with the BOS token's text (Meta's chat format writes
    <|begin_of_text|>): the tokenizer must then not add a second one."""
    return bool(tokenizer.bos_token) and text.startswith(tokenizer.bos_token)


def chat_template(template: str = ALPACA_ZH_TEMPLATE, *, bos: bool = True) -> str:
    """The SFT prompt `template` as a Jinja chat template: the (last) user message in place of
    {instruction}, BOS first (unless the template's own text starts with it), as training
    tokenized it. SFT saves it with its tokenizer (tokenizer_config / chat_template.jinja), so the
    merged model and every GGUF exported from it carry the template the model was tuned on, and
    a chat client builds the same prompt the evaluate stage generates from."""
    prefix, sep, suffix = template.partition("{instruction}")
    if not sep:
        raise ValueError("the SFT prompt template has no {instruction}")
    # the fixed texts as Jinja string literals: no block tag trims their newlines
    # UTF-8 as is (ensure_ascii off): llama.cpp's own Jinja engine need not decode \uXXXX
    return (("{{ bos_token }}" if bos else "") + "{{ " + json.dumps(prefix, ensure_ascii=False) +
            " }}{{ (messages | selectattr('role', 'equalto', 'user') | list | last)['content'] }}"
            "{{ " + json.dumps(suffix, ensure_ascii=False) + " }}")


def encode(rec: dict, tokenizer, template: str, max_len: int, eos: int | None = None) -> dict:
    """input_ids / labels for one good record (see the module docstring); eos: the id appended
    after the output (None: the tokenizer's EOS)."""
    prompt = format_prompt(rec["instruction"], rec.get("input"), template)
    source = tokenizer(prompt, add_special_tokens=not _bos_in_text(prompt, tokenizer))["input_ids"]
    # EOS appended as an id (equal to tokenizing output + "</s>" as the recipe does, without
    # depending on how a tokenizer version parses special-token text inside a string)
    target = tokenizer(rec["output"], add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id if eos is None else eos]
    return {"input_ids": (source + target)[:max_len],
            "labels": ([IGNORE_INDEX] * len(source) + target)[:max_len]}


def _pack(batch: dict, max_len: int) -> dict:
    """Examples concatenated into rows of at most max_len tokens, each with position ids that
    start again at 0 where an example starts: given position ids, no attention mask and no KV
    cache (training: use_cache is off), transformers makes each example attend only to itself (a block-diagonal causal mask;
    FlashAttention-2 runs them as variable-length sequences), so a packed example is computed as
    it would be alone. Its first label is -100 (its BOS is never predicted from the example
    before it)."""
    rows_ids, rows_lab, rows_pos, ids, lab, pos = [], [], [], [], [], []
    for i, l in zip(batch["input_ids"], batch["labels"]):
        if ids and len(ids) + len(i) > max_len:
            rows_ids.append(ids), rows_lab.append(lab), rows_pos.append(pos)
            ids, lab, pos = [], [], []
        ids, lab, pos = ids + i, lab + [IGNORE_INDEX] + l[1:], pos + list(range(len(i)))
    if ids:
        rows_ids.append(ids), rows_lab.append(lab), rows_pos.append(pos)
    return {"input_ids": rows_ids, "labels": rows_lab, "position_ids": rows_pos}


def build_examples(files: list[Path], tokenizer, cfg: Config, work: Path, field: str):
    """Tokenized examples (datasets Arrow) and the bad-record counts of `files`."""
    from collections import Counter

    import datasets
    from datasets import concatenate_datasets, load_dataset

    datasets.disable_progress_bars()
    parts, counts, n_records = [], Counter(), 0
    for f in files:
        try:
            ds = load_dataset("json", data_files=str(f), split="train", cache_dir=str(work / "hf"))
        except Exception as e:   # datasets wraps JSON/Arrow errors in several exception types
            raise ValueError(f"{field}: {f} is not Alpaca JSON / JSON Lines ({type(e).__name__}: "
                             f"{str(e)[:300]})") from e
        n_records += len(ds)
        ds = ds.map(lambda r: {"_problem": record_problem(r)}, desc=f"check {f.name}")
        problems = ds["_problem"]
        bad = [(i, p) for i, p in enumerate(problems) if p]
        counts.update(p for _, p in bad)
        for i, p in bad[:5]:
            log.warning("%s record %d: %s (skipped)", f, i, p)
        if len(bad) > 5:
            log.warning("%s: %d more bad records", f, len(bad) - 5)
        ds = ds.filter(lambda r: not r["_problem"], desc=f"drop bad {f.name}")
        ds = ds.map(encode, fn_kwargs={"tokenizer": tokenizer, "template": cfg.prompt_template,
                                       "max_len": cfg.max_seq_length,
                                       "eos": eos_id(tokenizer, cfg.eos_token)},
                    remove_columns=ds.column_names, desc=f"tokenize {f.name}")
        n = len(ds)
        ds = ds.filter(lambda r: any(x != IGNORE_INDEX for x in r["labels"][1:]))
        counts["no_target_after_truncation"] += n - len(ds)
        parts.append(ds)
    bad_total = sum(v for k, v in counts.items() if k != "no_target_after_truncation")
    for what, n in (("bad", bad_total), ("prompt-only (truncated)", counts["no_target_after_truncation"])):
        if n_records and n / n_records > cfg.max_bad_fraction:
            raise ValueError(f"{field} ({', '.join(map(str, files))}): {n} of {n_records} records are {what} "
                             f"({dict(counts)}); more than max_bad_fraction={cfg.max_bad_fraction}. "
                             "Fix the data (or raise max_seq_length / max_bad_fraction)")
    examples = concatenate_datasets(parts)
    if len(examples) == 0:
        raise ValueError(f"{field}: no usable record in {', '.join(map(str, files))} ({dict(counts)})")
    if cfg.packing:
        examples = examples.map(_pack, batched=True, batch_size=1000,
                                fn_kwargs={"max_len": cfg.max_seq_length}, desc="pack")
    return examples, n_records, dict(counts)


def make_collate(pad_id: int):
    """Rows right-padded with pad_id (labels -100) and an attention mask. Packed rows (with
    position_ids) become one row: the micro-batch's rows end to end, with their position ids and
    no attention mask, so every example attends only to itself on every attention kernel
    (FlashAttention-2 takes variable-length sequences from the position ids of a one-row batch
    only) and no padding is computed. The loss is the same mean over the supervised tokens: each
    example's first label is -100, so nothing is learnt across a row boundary."""
    def collate(rows: list[dict]) -> dict:
        import torch
        if "position_ids" in rows[0]:
            return {k: torch.tensor([[t for r in rows for t in r[k]]], dtype=torch.long)
                    for k in ("input_ids", "labels", "position_ids")}
        n = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for j, r in enumerate(rows):
            k = len(r["input_ids"])
            ids[j, :k] = torch.tensor(r["input_ids"])
            labels[j, :k] = torch.tensor(r["labels"])
            mask[j, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
    return collate


# ----------------------------------------------------------------------------- stage

def _prepare_model(pad_token: str | None, template: str):
    def prepare(model, tokenizer):
        # saved with the adapter's tokenizer: the template the model is tuned on
        tokenizer.chat_template = chat_template(template, bos=not _bos_in_text(template, tokenizer))
        if tokenizer.pad_token is None:
            tokenizer.add_special_tokens({"pad_token": pad_token})
        rows = model.get_input_embeddings().weight.shape[0]
        if len(tokenizer) > rows:
            model.resize_token_embeddings(len(tokenizer))
            model.config.pad_token_id = tokenizer.pad_token_id
            log.info("added %s: embeddings resized %d -> %d rows", tokenizer.pad_token, rows,
                     len(tokenizer))
        return model, tokenizer
    return prepare


def _worker(cfg: Config, out_dir: Path, *, on_metrics=None, model: str, adapters: list[str],
            dataset: str, pad_id: int, resume_dir: str | None, info: dict) -> dict:
    return run_training("sft", cfg, out_dir, model_dir=Path(model),
                        adapters=[Path(a) for a in adapters], dataset_dir=Path(dataset),
                        collate=make_collate(pad_id),
                        prepare_model=_prepare_model(cfg.pad_token, cfg.prompt_template),
                        resume_dir=resume_dir, on_metrics=on_metrics, extra_info=info)


def data_key(config: Config, files: list[Path], val_files: list[Path], tokenizer,
             tokenizer_dir: Path) -> str:
    """The data cache key: data files and tokenizer by content, and every setting the
    tokenized examples depend on."""
    return "sft-" + cache_key({
        "v": PREP_VERSION, "files": [sha256_files([f]) for f in files],
        "val": [sha256_files([f]) for f in val_files], "tokenizer": tokenizer_digest(tokenizer_dir),
        "pad": tokenizer.pad_token, "template": config.prompt_template,
        "max_len": config.max_seq_length, "packing": config.packing,
        # packed rows carry position ids (examples kept apart): not the rows packed before
        **({"pack_boundaries": True} if config.packing else {}),
        "split": config.validation_split, "seed": config.seed,
        "max_bad": config.max_bad_fraction,
        # only when set: the keys of runs with the tokenizer's EOS stay what they were
        **({"eos": config.eos_token} if config.eos_token is not None else {}),
        # such a template once gave two BOS: rows cached then are not these
        **({"bos_in_text": True} if _bos_in_text(config.prompt_template, tokenizer) else {})})


def _builder(config: Config, files: list[Path], val_files: list[Path], tokenizer):
    """build(dir) for data.prepared: the examples of `files` (eval: val_files, else a split),
    saved with their record and bad-record counts as meta."""
    def build(ddir: Path) -> dict:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="llamaflow-sft-") as work:
            train_ds, n_records, counts = build_examples(files, tokenizer, config, Path(work),
                                                         "sft.data")
            if val_files:
                eval_ds, _, _ = build_examples(val_files, tokenizer, config, Path(work),
                                               "sft.validation_data")
            else:
                train_ds, eval_ds = split(train_ds, config.validation_split, config.seed)
            meta = {"records": n_records, "bad": counts}
            save_splits({"train": train_ds, "eval": eval_ds}, ddir, meta)
        return meta
    return build


def run(config: Config, out_dir: Path, *, on_metrics: MetricsCallback | None = None,
        model: Path, adapters: list[Path] | tuple = (), resume_dir: Path | None = None,
        data_cache_dir: Path | None = None) -> dict:
    """Fold `adapters` (the pretrain stage's outputs, in order) into `model` (base-zh), add a
    fresh LoRA and tune it on config.data; write the adapter to out_dir (as pretrain.run does)
    and return summary metrics, including the bad-record counts.

    resume_dir: stable scratch dir for checkpoints; rerunning into it resumes exactly.
    data_cache_dir: where tokenized examples are kept between runs; None: a temp dir.
    """
    import datasets
    from steps.checks import check_adapter, check_model

    datasets.disable_progress_bars()
    config = Config.model_validate(config) if not isinstance(config, Config) else config
    out_dir, model, adapters = Path(out_dir), Path(model), [Path(a) for a in adapters]
    out_dir.mkdir(parents=True, exist_ok=True)
    if "{instruction}" not in config.prompt_template:
        raise ValueError("sft.prompt_template must contain '{instruction}'")
    sizes = check_model(model)
    for a in adapters:
        check_adapter(a, sizes.embed_rows)
    files = data_files(config.data, SUFFIXES, "sft.data")
    val_files = data_files(config.validation_data, SUFFIXES, "sft.validation_data") \
        if config.validation_data else []
    tokenizer, tok_src = load_tokenizer(model, adapters, config.pad_token)
    eos_id(tokenizer, config.eos_token)     # a wrong eos_token fails before any data is read
    key = data_key(config, files, val_files, tokenizer, tok_src)
    build = _builder(config, files, val_files, tokenizer)
    with prepared(data_cache_dir, key, build) as (ddir, meta, hit):
        n_train, n_eval = split_sizes(ddir)
        counts = meta["bad"]
        bad_total = sum(v for k, v in counts.items() if k != "no_target_after_truncation")
        log.info("sft data: %d records, %d bad %s, %d train / %d eval examples", meta["records"],
                 bad_total, counts, n_train, n_eval)
        info = {"data_digest": key, "prompt_template": config.prompt_template,
                "max_seq_length": config.max_seq_length,
                # only when set, so the adapters of runs with the tokenizer's EOS stay as they were
                **({"eos_token": config.eos_token} if config.eos_token is not None else {})}
        summary = execute("steps.sft", _worker, config, out_dir, on_metrics=on_metrics,
                          model=str(model), adapters=[str(a) for a in adapters], dataset=str(ddir),
                          pad_id=tokenizer.pad_token_id,
                          resume_dir=str(resume_dir) if resume_dir else None, info=info)
    summary.update({"records": meta["records"], "bad_records": bad_total,
                    "train_examples": n_train, "eval_examples": n_eval, "data_cache_hit": int(hit),
                    **{f"bad_{k}": v for k, v in counts.items()}})
    return summary


def train(cfg: Config | dict, model_dir: Path, data: list[Path] | Path | None, out_dir: Path,
          base_adapters: list[Path] | tuple = (), **kwargs) -> Path:
    """Plain entry point: tune on `data` (overrides cfg.data) and return the adapter dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run(with_data(Config, cfg, data), out_dir, model=Path(model_dir), adapters=list(base_adapters),
        **kwargs)
    return out_dir


if __name__ == "__main__":
    worker_main(Config, _worker)
