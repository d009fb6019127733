"""Multiple-choice benchmarks (C-Eval, CMMLU, or a user's set in their layout): accuracy of one
model, HF or GGUF, with the same prompts and the same scoring on both runtimes.

Layouts, as the benchmarks are downloaded (nothing is fetched at run time):
  * ceval: `<root>/{dev,val,test}/<subject>_{split}.csv` with columns id, question, A, B, C, D,
    answer (dev adds explanation). Its test split ships without answers (it is scored on the
    benchmark's site): asking for it is refused.
  * cmmlu: `<root>/{dev,test}/<subject>.csv` with columns (an unnamed row index), Question, A,
    B, C, D, Answer.
  * jsonl: one file of {"subject", "question", "A", "B", "C", "D", "answer"} records; records
    with "split": "dev" are the few-shot examples of their subject, the others are scored.
    Optional "subject_name" (the name the prompt uses) and "category".

The prompt, for k shots (the first k dev questions of the subject, in file order):
  * style "recipe" (the recipe's scripts/ceval and scripts/cmmlu, C-Eval's own):
    `以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\\n\\n` + k × (question +
    `\\nA. …\\nB. …\\nC. …\\nD. …\\n答案：X\\n\\n`) + the question with `\\n答案：`; a choice's
    continuation is its letter;
  * style "lm-eval" (lm-evaluation-harness' ceval-valid and cmmlu tasks, so the two can be run
    side by side): each task's own description, examples joined by a blank line, the question
    stripped, and " X" (a space, its target delimiter) as the continuation.

Scoring, from the log-softmax of the model's logits (float64): the context and the continuation
are tokenized as lm-evaluation-harness does (the whole text at once; the continuation's tokens
are what follows the context's own tokens), with BOS first as every runtime here feeds a prompt.
  * "letter": each choice's score is the log-probability of its continuation's first token at
    the position after the prompt (the recipe's and C-Eval's "which letter comes next");
  * "continuation": the summed log-probability of the whole continuation (lm-eval's `acc`).
The two agree whenever every continuation is one token, the usual case; the pick is the
highest score, the first of equal ones. Accuracy is reported per subject, per category (STEM,
Social Science, Humanities, Other: all questions of the category's subjects) and over all
questions, each with its number of questions, plus the mean of the subjects' accuracies.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from steps.mc_subjects import CATEGORIES, CEVAL, CMMLU

LETTERS = ("A", "B", "C", "D")
LAYOUTS = ("ceval", "cmmlu", "jsonl")
STYLES = ("recipe", "lm-eval")
SCORINGS = ("letter", "continuation")
# the split each layout scores by default: C-Eval's val (its test has no answers), CMMLU's test
DEFAULT_SPLIT = {"ceval": "val", "cmmlu": "test", "jsonl": None}


class McSet(BaseModel):
    """One multiple-choice set (evaluate.mc_sets.<name>)."""
    model_config = ConfigDict(extra="forbid")
    path: str = Field(description=(
        "ceval/cmmlu: the folder holding dev/ and val/ or test/ as released; jsonl: the file"))
    layout: Literal["ceval", "cmmlu", "jsonl"] = Field(description=(
        "ceval: <split>/<subject>_<split>.csv; cmmlu: <split>/<subject>.csv; jsonl: one file of "
        "records, those with split dev being the few-shot examples"))
    split: str | None = Field(None, description=(
        "the split scored: null = ceval's val, cmmlu's test (the splits with answers); "
        "the few-shot examples always come from dev"))
    subjects: list[str] | None = Field(None, description=(
        "the subjects scored (file names without _<split>.csv); null = every subject found"))
    max_questions: int | None = Field(None, ge=1, description=(
        "at most this many questions per subject, the first in file order; null = all"))


@dataclass(frozen=True)
class Question:
    subject: str
    id: str
    question: str
    choices: tuple[str, str, str, str]
    answer: str | None         # the right letter; None where the split ships without answers


@dataclass
class Subject:
    name: str
    title: str                 # the subject's name in the prompt (Chinese for C-Eval/CMMLU)
    category: str
    questions: list[Question]
    dev: list[Question]


def _row_question(path: Path, row: dict, line: int, subject: str, qkey: str, akey: str,
                  need_answer: bool) -> Question:
    missing = [k for k in (qkey, *LETTERS) if k not in row]
    if missing:
        raise ValueError(f"{path}: no column {', '.join(missing)} (the header has "
                         f"{', '.join(k for k in row if k)}); expected the released layout")
    answer = (row.get(akey) or "").strip()
    if not answer and need_answer:
        raise ValueError(f"{path} line {line}: no answer in column {akey!r}")
    if answer and answer not in LETTERS:
        raise ValueError(f"{path} line {line}: answer {answer!r} is not one of A, B, C, D")
    return Question(subject, str(row.get("id") or row.get("") or line - 2), row[qkey],
                    tuple(str(row[k]) for k in LETTERS), answer or None)


def _read_csv(path: Path, subject: str, qkey: str, akey: str, need_answer: bool) -> list[Question]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path}: empty (no question rows under the header)")
    return [_row_question(path, r, i + 2, subject, qkey, akey, need_answer)
            for i, r in enumerate(rows)]


def _subject_info(layout: str, name: str, record: dict | None = None) -> tuple[str, str]:
    """(title, category) of a subject: a jsonl record's own subject_name/category, else the
    benchmarks' tables (C-Eval's, then CMMLU's, for a jsonl set); a subject nobody lists (a
    user's own) is titled by its name, category Other."""
    record = record or {}
    tables = {"ceval": (CEVAL,), "cmmlu": (CMMLU,), "jsonl": (CEVAL, CMMLU)}[layout]
    known = next((t[name] for t in tables if name in t), None)
    title = record.get("subject_name") or (known[0] if known else name.replace("_", " "))
    return title, record.get("category") or (known[1] if known else "Other")


def read_set(s: McSet) -> dict[str, Subject]:
    """The set's subjects, each with its scored questions and its dev examples; every problem
    (a missing file or column, an answer not in A-D, an empty file, a split without answers) a
    ValueError/FileNotFoundError naming the file."""
    root = Path(s.path)
    split = s.split or DEFAULT_SPLIT[s.layout]
    if s.layout == "jsonl":
        return _read_jsonl(root, s)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder; layout {s.layout} reads "
                                f"{root}/{split}/ and {root}/dev/ as released")
    if s.layout == "ceval" and split not in ("dev", "val", "test"):
        raise ValueError(f"split {split!r}: C-Eval has dev, val and test")
    if s.layout == "cmmlu" and split not in ("dev", "test"):
        raise ValueError(f"split {split!r}: CMMLU has dev and test")
    suffix = f"_{split}.csv" if s.layout == "ceval" else ".csv"
    folder = root / split
    found = sorted(p.name[:-len(suffix)] for p in folder.glob(f"*{suffix}")) if folder.is_dir() else []
    if not found:
        raise FileNotFoundError(f"{folder}: no *{suffix} files; expected the {s.layout} layout "
                                f"({split}/<subject>{suffix})")
    names = s.subjects or found
    unknown = [n for n in names if n not in found]
    if unknown:
        raise ValueError(f"subjects {unknown} not in {folder} (it has {found})")
    qkey, akey = ("question", "answer") if s.layout == "ceval" else ("Question", "Answer")
    dev_suffix = "_dev.csv" if s.layout == "ceval" else ".csv"
    out = {}
    for name in names:
        questions = _read_csv(folder / f"{name}{suffix}", name, qkey, akey, need_answer=False)
        if all(q.answer is None for q in questions):
            hint = (" (C-Eval's test answers are not released: score split val)"
                    if s.layout == "ceval" and split == "test" else "")
            raise ValueError(f"{folder / (name + suffix)}: the split has no answers to score "
                             f"against{hint}")
        no_answer = [q.id for q in questions if q.answer is None]
        if no_answer:
            raise ValueError(f"{folder / (name + suffix)}: questions {no_answer[:5]} have no answer")
        dev_path = root / "dev" / f"{name}{dev_suffix}"
        dev = _read_csv(dev_path, name, qkey, akey, need_answer=True) if dev_path.is_file() else []
        title, category = _subject_info(s.layout, name)
        out[name] = Subject(name, title, category, questions[:s.max_questions], dev)
    return out


def _read_jsonl(path: Path, s: McSet) -> dict[str, Subject]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (layout jsonl reads one file of records)")
    subjects: dict[str, Subject] = {}
    n = 0
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {line_no}: not JSON ({e})") from None
            name = str(rec.get("subject") or path.stem)
            q = _row_question(path, rec, line_no, name, "question", "answer", need_answer=True)
            if name not in subjects:
                subjects[name] = Subject(name, *_subject_info("jsonl", name, rec), [], [])
            elif rec.get("subject_name") or rec.get("category"):   # named on a later record
                subjects[name].title, subjects[name].category = _subject_info("jsonl", name, rec)
            (subjects[name].dev if rec.get("split") == "dev" else subjects[name].questions).append(q)
            n += 1
    if not n:
        raise ValueError(f"{path}: empty (no question records)")
    if s.subjects:
        unknown = [x for x in s.subjects if x not in subjects]
        if unknown:
            raise ValueError(f"subjects {unknown} not in {path} (it has {sorted(subjects)})")
        subjects = {k: subjects[k] for k in s.subjects}
    for sub in subjects.values():
        if not sub.questions:
            raise ValueError(f"{path}: subject {sub.name} has only dev records, nothing to score")
        sub.questions = sub.questions[:s.max_questions]
    return dict(sorted(subjects.items()))


def check_shots(name: str, subjects: dict[str, Subject], shots: Sequence[int]) -> None:
    """Every subject has the dev examples the largest shot count asks for."""
    k = max(shots, default=0)
    short = [f"{s.name} ({len(s.dev)})" for s in subjects.values() if len(s.dev) < k]
    if short:
        raise ValueError(f"mc set `{name}`: {k}-shot needs {k} dev examples per subject; "
                         f"{', '.join(short)} have fewer: add dev rows or lower evaluate.mc_shots")


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------

def _body(q: Question, strip: bool) -> str:
    text = q.question.strip() if strip else q.question
    return text + "".join(f"\n{letter}. {c}" for letter, c in zip(LETTERS, q.choices)) + "\n答案："


def header(layout: str, title: str, style: str) -> str:
    if style == "recipe":
        return f"以下是中国关于{title}考试的单项选择题，请选出其中的正确答案。\n\n"
    if layout == "cmmlu":
        return f"以下是关于{title}的单项选择题，请直接给出正确答案的选项。\n\n"
    return f"以下是中国关于{title}的单项选择题，请选出其中的正确答案。\n\n"


def prompt(layout: str, subject: Subject, q: Question, shots: int, style: str) -> tuple[str, str]:
    """(context, delimiter): the text before the answer, and what precedes the letter in the
    continuation ("" for the recipe's style, " " for lm-eval's)."""
    if style not in STYLES:
        raise ValueError(f"prompt style {style!r}; choose one of {STYLES}")
    examples = subject.dev[:shots]
    if style == "recipe":
        return (header(layout, subject.title, style)
                + "".join(_body(e, False) + e.answer + "\n\n" for e in examples)
                + _body(q, False)), ""
    shots_text = "".join(_body(e, True) + " " + e.answer + "\n\n" for e in examples)
    return header(layout, subject.title, style) + shots_text + _body(q, True), " "


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------

def encode_pair(tokenize, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness splits them: trailing spaces of
    the context move to the continuation; the whole text is tokenized at once and the
    continuation is what follows the context's own token count."""
    n_space = len(context) - len(context.rstrip(" "))
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    whole = tokenize(context + continuation)
    ctx = tokenize(context)
    return ctx, whole[len(ctx):]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - (np.log(np.exp(x - m).sum(axis=-1, keepdims=True)) + m)


def score_question(m, context: str, delimiter: str, scoring: str, max_len: int | None = None
                   ) -> tuple[list[float], int]:
    """Each choice's score under `scoring` and the prompt's token count. One forward pass
    serves every choice whose continuation is one token (its log-probability sits in the row
    after the context); a longer continuation gets its own pass."""
    if scoring not in SCORINGS:
        raise ValueError(f"scoring {scoring!r}; choose one of {SCORINGS}")
    pairs = [encode_pair(m.tokenize, context, delimiter + letter) for letter in LETTERS]
    ctx = pairs[0][0]
    for c, cont in pairs:
        if not cont:
            raise ValueError("a choice's continuation tokenized to nothing")
        if c != ctx:
            raise ValueError("the context tokenized differently per choice")
        if max_len is not None and len(c) + len(cont) > max_len:
            raise ValueError(f"a prompt of {len(c) + len(cont)} tokens is longer than the "
                             f"{max_len}-token context the model was opened with: raise "
                             "evaluate.mc_n_ctx or use fewer shots (evaluate.mc_shots)")
    s = len(ctx) - 1
    # the row after the context: the first continuation token of every choice is scored there
    first = _log_softmax(next(m.window_logits([(ctx + pairs[0][1][:1], s)], 1))[0])
    scores = []
    for _, cont in pairs:
        if scoring == "letter" or len(cont) == 1:
            scores.append(float(first[cont[0]]))
        else:
            rows = _log_softmax(next(m.window_logits([(ctx + cont, s)], 1)))
            scores.append(float(sum(rows[i, t] for i, t in enumerate(cont))))
    return scores, len(ctx)


def evaluate_set(m, name: str, s: McSet, subjects: dict[str, Subject], shots: Sequence[int],
                 *, style: str = "recipe", scoring: str = "letter", max_len: int | None = None,
                 progress: bool = True) -> tuple[dict, list[dict]]:
    """Accuracy of model `m` (evaluate.load's HF or GGUF model) on one set, per shot count:
    ({"<k>shot": summary}, per-question records)."""
    from tqdm.auto import tqdm

    check_shots(name, subjects, shots)
    total = sum(len(sub.questions) for sub in subjects.values()) * len(shots)
    bar = tqdm(total=total, desc=f"mc {name}", unit="q", disable=not progress, leave=False)
    summary, records = {}, []
    try:
        for k in shots:
            picks = []
            for sub in subjects.values():
                for q in sub.questions:
                    context, delim = prompt(s.layout, sub, q, k, style)
                    scores, n_tokens = score_question(m, context, delim, scoring, max_len)
                    pick = LETTERS[int(np.argmax(scores))]
                    picks.append((sub, q, pick))
                    records.append({"set": name, "shots": k, "subject": sub.name, "id": q.id,
                                    "answer": q.answer, "pick": pick,
                                    "correct": pick == q.answer, "scores": scores,
                                    "n_prompt_tokens": n_tokens})
                    bar.update(1)
            summary[f"{k}shot"] = _accuracy(picks)
    finally:
        bar.close()
    return summary, records


def _accuracy(picks: list[tuple[Subject, Question, str]]) -> dict:
    def acc(items):
        n = len(items)
        return {"acc": sum(p == q.answer for _, q, p in items) / n if n else None, "n": n}

    by_subject, by_category = {}, {}
    for item in picks:
        by_subject.setdefault(item[0].name, []).append(item)
        by_category.setdefault(item[0].category, []).append(item)
    subjects = {k: acc(v) | {"category": v[0][0].category, "title": v[0][0].title}
                for k, v in by_subject.items()}
    order = [c for c in CATEGORIES if c in by_category] + sorted(set(by_category) - set(CATEGORIES))
    return acc(picks) | {
        "subject_mean": float(np.mean([v["acc"] for v in subjects.values()])),
        "categories": {c: acc(by_category[c]) for c in order},
        "subjects": subjects}
