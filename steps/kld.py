"""KL divergence of a model's token distributions from a reference model's, as
`llama-perplexity --kl-divergence` computes it (tools/perplexity/perplexity.cpp), on the chunks
and scored positions of the "llama.cpp" perplexity protocol (steps/evaluate.py).

What llama.cpp does, and so what this module does, number for number:
  * The reference's log-probabilities are stored 16-bit: per scored position, with max/min the
    largest/smallest logit, min raised to max-16, lse = log Σ exp(logit - max) (double sum of
    float exps, rounded to float), scale = (max-min)/65535, min_log_prob = min - max - lse, and
    q[i] = round((logit[i] - min)/scale) for logit[i] > min, else 0. The reference log-prob is
    then scale*q[i] + min_log_prob: log-probs below max-16 collapse to min_log_prob. All of the
    reference side (its PPL, the KLD, the argmax, Δp) is computed from this stored form, so the
    statistics are those of the 16-bit reference, not of its float logits. A target below the
    floor gets the floor's log-prob, so PPL(base) can sit well under the reference's own
    perplexity (stories260K, TinyStories sample, n_ctx 128: 6.339 against 6.846, from 11 of
    882 targets) and PPL(Q)/PPL(base) over-states the loss; the models' own "ppl" do not.
  * Per scored token, in float32 where llama.cpp uses float: nll = max + lse - logit[target];
    nll_base = -(scale*q[target] + min_log_prob); KLD = Σ_i p_base,i·(log p_base,i - log p_i)
    over the tokens with log p_base,i > -16 (each term float, the sum double); "same top" when the
    model's first argmax equals the stored reference's; Δp = exp(-nll) - exp(-nll_base).
  * Sums in double (of the float values and float squares, as llama.cpp adds them); the summary
    is llama.cpp's: mean ± sqrt((mean(x²) - mean²)/(n-1)) (0 for n <= 10), covariance of the
    two ln PPLs, and percentiles by linear interpolation between sorted values at
    fraction·(n-1), computed in float. llama.cpp prints no summary under 100 scored tokens;
    `summary()` still returns one.
  * exp in float: llama.cpp calls the C library's expf; we round a double exp to float, which is
    the correctly rounded value. The two can differ by one float ulp in rare cases, far below
    any printed digit.

Streaming: the evaluate stage hands each chunk's logits from its perplexity pass to a
`Comparison`, which keeps at most `batch_size` chunks' logits of the model, then runs the
reference on those chunks and folds both into `KLDStats`; `kl_divergence` does the same in a pass
of its own. So the extra work of KLD is the reference's forward passes plus the statistics.

Memory bound: at most batch_size chunks' logits per model are held (a GGUF model computes one
chunk at a time): n_ctx/2 - 1 rows of n_vocab float32 each (llama-cpp-python itself also keeps
its n_ctx rows per model). `KLDStats.add` works through a chunk ROWS_PER_BLOCK rows at a time,
with temporaries of ~23 bytes per row and vocabulary entry (~47 MB at n_vocab 32000), and keeps
8 bytes per scored token (the KLD and Δp values the percentiles sort) plus the running sums:
1.3 MB for WikiText-2 at n_ctx 512. llama.cpp instead writes every chunk's reference log-probs to
a file first (2·n_vocab bytes per scored token). The cost is the two models loaded together.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

F32 = np.float32
ROWS_PER_BLOCK = 64
_LOG_PROB_FLOOR = F32(-16.0)  # llama.cpp keeps reference log-probs within 16 of the maximum

# the percentiles llama.cpp prints, by the key we store them under
KLD_PERCENTILES = {"p99_9": 0.999, "p99": 0.990, "p95": 0.950, "p90": 0.900, "p10": 0.100,
                   "p5": 0.050, "p1": 0.010, "p0_1": 0.001}
DP_PERCENTILES = {"p99_9": 0.999, "p99": 0.990, "p95": 0.950, "p90": 0.900, "p75": 0.750,
                  "p25": 0.250, "p10": 0.100, "p5": 0.050, "p1": 0.010, "p0_1": 0.001}


def expf(x: np.ndarray) -> np.ndarray:
    """exp of float32 values, correctly rounded to float32."""
    return np.exp(np.asarray(x, dtype=np.float64)).astype(F32)


def _log_sum_exp(logits: np.ndarray, top: np.ndarray) -> np.ndarray:
    """float(log(Σ_i double(expf(logit_i - top)))) per row, as llama.cpp's log_softmax."""
    return np.log(expf(logits - top[:, None]).astype(np.float64).sum(axis=1)).astype(F32)


def quantize_reference(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scale, min_log_prob, q) per row: llama.cpp's 16-bit form of the reference's
    log-probabilities (what --kl-divergence-base writes), from float32 logits (rows, n_vocab)."""
    logits = np.asarray(logits, dtype=F32)
    top = logits.max(axis=1)
    low = np.maximum(logits.min(axis=1), top - F32(16))
    lse = _log_sum_exp(logits, top)
    min_log_prob = (low - top) - lse
    scale = (top - low) / F32(65535)
    with np.errstate(divide="ignore"):
        inv = np.where(scale != 0, F32(1) / scale, F32(0)).astype(F32)
    # llama.cpp's nearest_int: round half to even, as np.rint
    q = np.rint(inv[:, None] * (logits - low[:, None]))
    q = np.where(logits > low[:, None], q, 0).astype(np.uint16)
    return scale.astype(F32), min_log_prob.astype(F32), q


def reference_log_probs(scale: np.ndarray, min_log_prob: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The log-probabilities the stored 16-bit form stands for (float32)."""
    return scale[:, None] * q.astype(F32) + min_log_prob[:, None]


def token_stats(ref: tuple[np.ndarray, np.ndarray, np.ndarray], logits: np.ndarray,
                targets: np.ndarray) -> dict[str, np.ndarray]:
    """Per scored token: nll, nll_base (float32), kld (double), same_top (bool), dp (float32),
    from the reference's 16-bit log-probs and the model's float32 logits (rows, n_vocab)."""
    logits = np.asarray(logits, dtype=F32)
    targets = np.asarray(targets, dtype=np.int64)
    rows = np.arange(len(targets))
    top = logits.max(axis=1)
    lse = _log_sum_exp(logits, top)
    nll = (top + lse) - logits[rows, targets]
    log_p_base = reference_log_probs(*ref)
    nll_base = -log_p_base[rows, targets]
    log_norm = top + lse  # log p_i = logit_i - log_norm
    keep = log_p_base > _LOG_PROB_FLOOR
    terms = expf(log_p_base) * ((log_p_base - logits) + log_norm[:, None])
    kld = np.where(keep, terms, F32(0)).astype(np.float64).sum(axis=1)
    same_top = logits.argmax(axis=1) == log_p_base.argmax(axis=1)
    dp = expf(-nll) - expf(-nll_base)
    return {"nll": nll, "nll_base": nll_base, "kld": kld, "same_top": same_top, "dp": dp}


class KLDStats:
    """Running sums of llama.cpp's kl_divergence_result plus the per-token KLD and Δp values
    its percentiles sort; `add` one chunk at a time."""

    SUMS = ("nll", "nll2", "nll_base", "nll_base2", "nll_nll_base", "kld", "kld2", "dp", "dp2",
            "dp4")

    def __init__(self) -> None:
        self.sums = dict.fromkeys(self.SUMS, 0.0)
        self.count = 0
        self.n_same_top = 0
        self.max_abs_dp = 0.0
        self._kld: list[np.ndarray] = []
        self._dp: list[np.ndarray] = []

    def add(self, ref_logits: np.ndarray, logits: np.ndarray, targets: Sequence[int]) -> None:
        """One chunk: the reference's and the model's float32 logits at the scored positions
        (rows, n_vocab) and the tokens they predict."""
        ref_logits, logits = np.asarray(ref_logits, F32), np.asarray(logits, F32)
        if ref_logits.shape != logits.shape or len(logits) != len(targets):
            raise ValueError(f"reference logits {ref_logits.shape}, model logits {logits.shape} "
                             f"and {len(targets)} targets do not line up")
        targets = np.asarray(targets)
        # a block of rows at a time bounds the temporaries (~23 bytes per row and vocab entry)
        for b in range(0, len(logits), ROWS_PER_BLOCK):
            rows = slice(b, b + ROWS_PER_BLOCK)
            self.add_token_stats(token_stats(quantize_reference(ref_logits[rows]),
                                             logits[rows], targets[rows]))

    def add_token_stats(self, t: dict[str, np.ndarray]) -> None:
        nll, nll_base, dp = t["nll"], t["nll_base"], t["dp"]
        dp2 = (dp * dp).astype(np.float64)  # llama.cpp squares Δp in float, then widens
        add = {"nll": nll, "nll2": nll * nll, "nll_base": nll_base,
               "nll_base2": nll_base * nll_base, "nll_nll_base": nll * nll_base,
               "kld": t["kld"], "kld2": t["kld"] * t["kld"], "dp": dp, "dp2": dp2,
               "dp4": dp2 * dp2}
        for k, v in add.items():
            self.sums[k] += float(np.asarray(v, dtype=np.float64).sum())
        self.count += len(nll)
        self.n_same_top += int(np.count_nonzero(t["same_top"]))
        if len(dp):
            self.max_abs_dp = max(self.max_abs_dp, float(np.abs(dp).max()))
        self._kld.append(t["kld"].astype(F32))  # llama.cpp keeps each token's KLD as float
        self._dp.append(dp.astype(F32))

    def summary(self) -> dict:
        return summarize(self.sums, self.count, self.n_same_top, self.max_abs_dp,
                         np.concatenate(self._kld) if self._kld else np.zeros(0, F32),
                         np.concatenate(self._dp) if self._dp else np.zeros(0, F32))


def mean_and_uncertainty(total: float, total2: float, count: int) -> tuple[float, float]:
    """llama.cpp's: the mean and its standard error, 0 for 10 values or fewer."""
    if count < 1:
        return 0.0, 0.0
    f = total / count
    df = total2 / count - f * f
    return f, math.sqrt(df / (count - 1)) if df > 0 and count > 10 else 0.0


def covariance(a: float, b: float, ab: float, count: int) -> float:
    """llama.cpp's covariance of the two means (0 for fewer than 10 values)."""
    if count < 10:
        return 0.0
    return (ab / count - (a / count) * (b / count)) / (count - 1)


def percentile(values: np.ndarray, fraction: float) -> float:
    """llama.cpp's, on sorted float32 values: linear between the neighbours of fraction·(n-1),
    in float arithmetic."""
    if fraction <= 0:
        return float(values[0])
    if fraction >= 1:
        return float(values[-1])
    p = F32(fraction) * F32(len(values) - 1)
    ip = int(p)
    p = p - F32(ip)
    return float((F32(1) - p) * values[ip] + p * values[min(ip + 1, len(values) - 1)])


def median(values: np.ndarray) -> float:
    n = len(values)
    if n % 2 == 0:
        return float(F32(0.5) * (values[n // 2] + values[n // 2 - 1]))
    return float(values[n // 2])


def _ppl_statistics(s: dict, count: int) -> dict:
    """The "Perplexity statistics" block of llama-perplexity --kl-divergence."""
    ln_q, ln_q_err = mean_and_uncertainty(s["nll"], s["nll2"], count)
    ln_b, ln_b_err = mean_and_uncertainty(s["nll_base"], s["nll_base2"], count)
    cov = covariance(s["nll"], s["nll_base"], s["nll_nll_base"], count)
    ppl_q, ppl_b = math.exp(ln_q), math.exp(ln_b)
    ppl_q_err, ppl_b_err = ppl_q * ln_q_err, ppl_b * ln_b_err
    ln_ratio = ln_q - ln_b
    ln_ratio_err = _sqrt(ln_q_err ** 2 + ln_b_err ** 2 - 2.0 * cov)
    ratio = math.exp(ln_ratio)
    denom = ln_q_err * ln_b_err
    return {
        "ppl": ppl_q, "ppl_err": ppl_q_err, "ppl_base": ppl_b, "ppl_base_err": ppl_b_err,
        "ln_ppl_cor": cov / denom if denom else None,
        "ln_ppl_ratio": ln_ratio, "ln_ppl_ratio_err": ln_ratio_err,
        "ppl_ratio": ratio,
        "ppl_ratio_err": ratio * ln_ratio_err if ln_ratio_err is not None else None,
        "ppl_diff": ppl_q - ppl_b,
        "ppl_diff_err": _sqrt(ppl_q_err ** 2 + ppl_b_err ** 2 - 2.0 * ppl_q * ppl_b * cov),
    }


def _sqrt(x: float) -> float | None:
    # llama.cpp prints C's NaN for the root of a negative (rounding, when the two ln PPLs are
    # almost perfectly correlated); None keeps results.json valid JSON
    return math.sqrt(x) if x >= 0 else None


def summarize(s: dict, count: int, n_same_top: int, max_abs_dp: float, kld: np.ndarray,
              dp: np.ndarray) -> dict:
    """Everything llama-perplexity --kl-divergence prints at the end, as numbers (Δp and the
    same-top-p rate as fractions, where llama.cpp prints percent)."""
    if count < 2:
        raise ValueError(f"{count} scored token(s): KL divergence statistics need at least 2")
    kld, dp = np.sort(kld.astype(F32)), np.sort(dp.astype(F32))
    out = {"n_scored": count} | _ppl_statistics(s, count)
    out["kld_mean"], out["kld_err"] = mean_and_uncertainty(s["kld"], s["kld2"], count)
    out["kld_max"] = float(kld[-1])
    out |= {f"kld_{k}": percentile(kld, f) for k, f in KLD_PERCENTILES.items()}
    out["kld_median"] = median(kld)
    out["kld_min"] = float(kld[0])
    out["dp_mean"], out["dp_err"] = mean_and_uncertainty(s["dp"], s["dp2"], count)
    out["dp_max"] = float(dp[-1])
    out |= {f"dp_{k}": percentile(dp, f) for k, f in DP_PERCENTILES.items()}
    out["dp_median"] = median(dp)
    out["dp_min"] = float(dp[0])
    out["dp_max_abs"] = max_abs_dp
    mse, mse_err = mean_and_uncertainty(s["dp2"], s["dp4"], count)
    out["rms_dp"] = math.sqrt(mse)
    out["rms_dp_err"] = 0.5 / out["rms_dp"] * mse_err if out["rms_dp"] else 0.0
    p = n_same_top / count
    out["same_top_p"], out["same_top_p_err"] = p, math.sqrt(p * (1.0 - p) / (count - 1))
    return out


class Comparison:
    """The KLD statistics of a model's logits, fed window by window as a perplexity pass makes
    them (steps.evaluate's on_logits), against the reference's on the same windows. Holds at
    most `batch_size` windows' logits of the model, then runs the reference on those at once."""

    def __init__(self, reference, batch_size: int = 1):
        self.reference, self.batch_size = reference, max(1, batch_size)
        self.stats = KLDStats()
        self.pending: list[tuple[tuple[list[int], int], np.ndarray]] = []
        self.n_chunks = 0
        self.seconds = 0.0   # spent here: the reference's forward passes and the statistics

    def __call__(self, window: tuple[list[int], int], logits: np.ndarray) -> None:
        self.pending.append((window, np.asarray(logits, dtype=F32)))
        if len(self.pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        t0 = time.perf_counter()
        windows = [w for w, _ in self.pending]
        for ((ids, s), mine), ref in zip(self.pending,
                                         self.reference.window_logits(windows, self.batch_size)):
            self.stats.add(ref, mine, ids[s + 1:])
        self.n_chunks += len(windows)
        self.pending = []
        self.seconds += time.perf_counter() - t0

    def summary(self) -> dict:
        self.flush()
        return self.stats.summary() | {"n_chunks": self.n_chunks,
                                       "reference": _name(self.reference)}


def kl_divergence(model, reference, token_ids: Sequence[int], *, n_ctx: int = 512,
                  max_tokens: int | None = None, batch_size: int = 8,
                  progress: bool = True) -> dict:
    """KLD statistics of `model` against `reference` (both from steps.evaluate.load, same
    tokenizer) on `token_ids` under the "llama.cpp" protocol: the chunks llama-perplexity
    evaluates, its scored positions; see the module docstring."""
    from tqdm.auto import tqdm

    from steps.evaluate import windows_for

    if model.n_vocab != reference.n_vocab:
        raise ValueError(f"{_name(model)} has {model.n_vocab} tokens, the reference "
                         f"{_name(reference)} {reference.n_vocab}: KL divergence needs one "
                         "vocabulary")
    windows = windows_for(token_ids, n_ctx=n_ctx, protocol="llama.cpp", stride=None,
                          bos_id=model.bos_id, max_tokens=max_tokens)
    compare = Comparison(reference, batch_size)
    bar = tqdm(total=len(windows), desc=f"kld {_name(model)} vs {_name(reference)}",
               unit="chunk", disable=not progress, leave=False)
    try:
        for b in range(0, len(windows), batch_size):
            group = windows[b:b + batch_size]
            for window, logits in zip(group, model.window_logits(group, batch_size)):
                compare(window, logits)
            bar.update(len(group))
    finally:
        bar.close()
    return compare.summary() | {"n_ctx": n_ctx}


def _name(m) -> str:
    return Path(str(m.path)).name


def same_tokenizer(model, reference, texts: Iterable[tuple[str, str]],
                   model_ids: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
    """Each (name, text)'s token ids, the same for both models, else a ValueError naming both
    (model_ids: the model's ids of those texts, when already at hand). The reference's BOS must
    be the model's too: every chunk starts with it."""
    a, b = _name(model), _name(reference)
    if model.n_vocab != reference.n_vocab:
        raise ValueError(f"reference {b} has n_vocab {reference.n_vocab}, model {a} "
                         f"{model.n_vocab}: KL divergence needs the same tokenizer")
    if model.bos_id != reference.bos_id:
        raise ValueError(f"reference {b} has BOS id {reference.bos_id}, model {a} "
                         f"{model.bos_id}: KL divergence needs the same tokenizer")
    out = {}
    for name, text in texts:
        ids = model_ids[name] if model_ids is not None else model.tokenize(text)
        ref_ids = reference.tokenize(text)
        if ids != ref_ids:
            first = next((i for i, (x, y) in enumerate(zip(ids, ref_ids)) if x != y),
                         min(len(ids), len(ref_ids)))
            raise ValueError(f"eval set `{name}`: model {a} and reference {b} tokenize it "
                             f"differently ({len(ids)} vs {len(ref_ids)} tokens, first "
                             f"difference at token {first}): KL divergence needs the same "
                             "tokenizer")
        out[name] = ids
    return out


def _pct(x: float | None, fmt: str) -> str:
    return format(100.0 * x if x is not None else float("nan"), fmt)


def _num(x: float | None, fmt: str) -> str:
    return format(x if x is not None else float("nan"), fmt)


def report_lines(s: dict) -> list[str]:
    """The summary as `llama-perplexity --kl-divergence` prints it, line for line, with its
    printf formats: the same digits, so the two can be compared as text."""
    pm = lambda v, e: f"{_num(s[v], '10.6f')} ± {_num(s[e], '10.6f')}"  # noqa: E731
    lines = ["====== Perplexity statistics ======",
             f"Mean PPL(Q)                   : {pm('ppl', 'ppl_err')}",
             f"Mean PPL(base)                : {pm('ppl_base', 'ppl_base_err')}",
             f"Cor(ln(PPL(Q)), ln(PPL(base))): {_pct(s['ln_ppl_cor'], '6.2f')}%",
             f"Mean ln(PPL(Q)/PPL(base))     : {pm('ln_ppl_ratio', 'ln_ppl_ratio_err')}",
             f"Mean PPL(Q)/PPL(base)         : {pm('ppl_ratio', 'ppl_ratio_err')}",
             f"Mean PPL(Q)-PPL(base)         : {pm('ppl_diff', 'ppl_diff_err')}",
             "", "====== KL divergence statistics ======",
             f"Mean    KLD: {pm('kld_mean', 'kld_err')}",
             f"Maximum KLD: {_num(s['kld_max'], '10.6f')}"]
    for k, f in KLD_PERCENTILES.items():  # the median between 90% and 10%, as llama.cpp
        if k == "p10":
            lines.append(f"Median  KLD: {_num(s['kld_median'], '10.6f')}")
        lines.append(f"{100 * f:4.1f}%   KLD: {_num(s[f'kld_{k}'], '10.6f')}")
    lines += [f"Minimum KLD: {_num(s['kld_min'], '10.6f')}", "",
              "====== Token probability statistics ======",
              f"Mean    Δp: {_pct(s['dp_mean'], '6.3f')} ± {_pct(s['dp_err'], '5.3f')} %",
              f"Maximum Δp: {_pct(s['dp_max'], '6.3f')}%"]
    for k, f in DP_PERCENTILES.items():
        if k == "p25":
            lines.append(f"Median  Δp: {_pct(s['dp_median'], '6.3f')}%")
        lines.append(f"{100 * f:4.1f}%   Δp: {_pct(s[f'dp_{k}'], '6.3f')}%")
    lines += [f"Minimum Δp: {_pct(s['dp_min'], '6.3f')}%",
              f"RMS Δp    : {_pct(s['rms_dp'], '6.3f')} ± {_pct(s['rms_dp_err'], '5.3f')} %",
              f"Same top p: {_pct(s['same_top_p'], '6.3f')} ± "
              f"{_pct(s['same_top_p_err'], '5.3f')} %"]
    return lines


def printed_summary(output: str) -> list[str]:
    """The summary lines of a `llama-perplexity --kl-divergence` run's output (stdout and
    stderr together), from its "Perplexity statistics" header to "Same top p", for comparing
    with `report_lines`."""
    lines = output.splitlines()
    try:
        first = lines.index("====== Perplexity statistics ======")
    except ValueError:
        raise ValueError("no KL divergence summary in the output (llama-perplexity prints none "
                         "under 100 scored tokens)") from None
    last = next(i for i in range(first, len(lines)) if lines[i].startswith("Same top p:"))
    return lines[first:last + 1]
