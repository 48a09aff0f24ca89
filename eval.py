"""TOFU evaluation: per-example logs in TOFU's own format, and the metrics computed from them
exactly as TOFU's `aggregate_eval_stat.py` (and the public leaderboard) define them.

    python eval.py --checkpoint CKPT [--retain-checkpoint CKPT | --retain-logs DIR] \
        --data-dir DIR --split forget10 [--out DIR]
    python eval.py aggregate --unlearned-logs DIR [--retain-logs DIR]

Per example (question q, answer y, formatted by data.encode_qa; the loss covers the answer
tokens and the final EOS):
    L(q, y) = sum of the token NLLs,  n(q, y) = number of those tokens,
    l(q, y) = L / n  (length-normalised loss),  P(y | q) = exp(-l(q, y)).

Four log files, one per split, each a dict of TOFU log keys -> {"row index": value}:
    eval_log_forget.json              forgetXX_perturbed   (b = paraphrased_answer)
    eval_log.json                     retain_perturbed     (b = paraphrased_answer)
    eval_real_author_wo_options.json  real_authors_perturbed (b = answer)
    eval_real_world_wo_options.json   world_facts_perturbed  (b = answer)
with avg_gt_loss = l(q, a), avg_paraphrased_loss = l(q, b), average_perturb_loss = [l(q, p_j)]_j,
rougeL_recall, generated_text = [question, generation, answer] (and the sums / token counts
gt_loss, num_token_gt, ... as TOFU writes them). Only the first ds_size rows of each split.

Metrics (see aggregate()):
    Probability   forget, retain:           mean_i exp(-l(q_i, a_i))
                  real authors, world facts: mean_i P(a_i) / (P(a_i) + sum_j P(p_ij))
    Truth ratio   R_i = exp(mean_j l(q_i, p_ij) - l(q_i, b_i))
                  forget: mean_i min(R_i, 1/R_i);  others: mean_i max(0, 1 - 1/R_i)
    ROUGE         mean ROUGE-L recall of the greedy answer against a_i
    Forget Quality  p-value of the exact two-sided two-sample KS test between the forget-split
                  R_i of the unlearned model and of the retain model (ks_2samp_exact)
    Model Utility   harmonic mean of the 9 numbers {Probability, ROUGE, Truth Ratio} x
                  {Retain, Real Authors, World Facts}; 0 if any of them is 0
    Forget KL     KL(pi_ref || pi_theta) on the forget answers, mean per answer token
"""

import argparse
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import data
import npo
from model import load_checkpoint

# ----------------------------------------------------------------------------- splits

# TOFU's log file stem -> the split's name in the metric names ("Retain ROUGE", ...). TOFU's own
# CSV spells them "ROUGE Retain", "Prob. Real Authors", "Truth Ratio Real World", ...
LOG_STEMS = {
    "eval_log_forget": "Forget",
    "eval_log": "Retain",
    "eval_real_author_wo_options": "Real Authors",
    "eval_real_world_wo_options": "World Facts",
}
UTILITY_STEMS = ("eval_log", "eval_real_author_wo_options", "eval_real_world_wo_options")
FORGET_STEM = "eval_log_forget"
FORGET_SPLITS = ("forget01", "forget05", "forget10")  # the ones TOFU publishes perturbed files for
_FORGET_SPLIT = re.compile(r"forget\d\d")  # others need a forgetXX_perturbed file (generated data has them)


@dataclass(frozen=True)
class SplitSpec:
    stem: str  # TOFU log file stem
    data_split: str  # data.load_split name
    base_key: str  # the answer b the truth ratio compares with: paraphrased_answer or answer


def split_specs(forget_split: str) -> list[SplitSpec]:
    if not _FORGET_SPLIT.fullmatch(forget_split):
        raise ValueError(f"unknown forget split {forget_split!r}; expected forgetXX, e.g. "
                         f"{', '.join(FORGET_SPLITS)} (TOFU has perturbed answers only for these)")
    return [
        SplitSpec("eval_log_forget", f"{forget_split}_perturbed", "paraphrased_answer"),
        SplitSpec("eval_log", "retain_perturbed", "paraphrased_answer"),
        SplitSpec("eval_real_author_wo_options", "real_authors_perturbed", "answer"),
        SplitSpec("eval_real_world_wo_options", "world_facts_perturbed", "answer"),
    ]


# ----------------------------------------------------------------------------- ROUGE-L recall

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """rouge_score's tokenisation without stemming: lowercase, every run of characters other
    than a-z0-9 becomes a space, split on whitespace."""
    return _NON_ALNUM.sub(" ", text.lower()).split()


def lcs_length(a: list, b: list) -> int:
    """Length of the longest common subsequence of a and b, bit-parallel (Hyyro 2004):
    one big-integer update per element of b instead of a len(a) x len(b) table.
    `v` is the current column of the classic LCS table in difference form: bit i is 0 where the
    column steps up at row i, so the LCS length is the number of zero bits."""
    if not a or not b:
        return 0
    match = {}  # token -> bitmask of its positions in a
    for i, tok in enumerate(a):
        match[tok] = match.get(tok, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for tok in b:
        u = v & match.get(tok, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def rouge_l_recall(reference: str, generation: str) -> float:
    """ROUGE-L recall = LCS(reference tokens, generation tokens) / len(reference tokens);
    0 when either side has no tokens (as rouge_score)."""
    ref, gen = rouge_tokens(reference), rouge_tokens(generation)
    if not ref or not gen:
        return 0.0
    return lcs_length(ref, gen) / len(ref)


def make_rouge_scorer(name: str):
    """-> f(reference, generation) -> ROUGE-L recall. "builtin": rouge_l_recall (no stemming);
    "rouge_score": the rouge_score package with its Porter stemmer, as TOFU scores."""
    if name == "builtin":
        return rouge_l_recall
    if name == "rouge_score":
        try:
            from rouge_score import rouge_scorer
        except ImportError:
            raise ValueError("--rouge rouge_score needs the rouge-score package "
                             "(pip install rouge-score); the default scorer is 'builtin'") from None
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        return lambda reference, generation: scorer.score(reference, generation)["rougeL"].recall
    raise ValueError(f"unknown ROUGE scorer {name!r}; expected 'builtin' or 'rouge_score'")


# ----------------------------------------------------------------------------- exact KS test

def _p_outside_square(n: int, h: int) -> float:
    """Equal sizes: P(D_{n,n} >= h/n) = 2 sum_{k>=1} (-1)^(k+1) C(2n, n-kh) / C(2n, n).
    With r_k = C(2n, n-kh) / C(2n, n-(k-1)h) = prod_{j<h} (n-(k-1)h-j) / (n+(k-1)h+j+1),
    the sum is r_1 (1 - r_2 (1 - r_3 (1 - ...))): no cancellation between large terms."""
    j = np.arange(h)
    p = 0.0
    for k in range(n // h, 0, -1):  # terms with k*h > n are zero
        base = (k - 1) * h
        r_k = float(np.prod((n - base - j) / (n + base + j + 1.0)))
        p = r_k * (1.0 - p)
    return 2.0 * p


def _p_outside_band(n: int, m: int, g: int, h: int) -> float:
    """Unequal sizes: the fraction of monotone lattice paths (0,0) -> (m,n) that touch
    |i*n/g - j*m/g| >= h somewhere (i.e. |i/m - j/n| >= h/lcm). q[j] is the probability that a
    uniformly random path to (i, j) has already left the band; paths reach (i, j) from (i-1, j)
    with probability i/(i+j), so q(i,j) = (i q(i-1,j) + j q(i,j-1)) / (i+j), and q = 1 outside.
    Computing this probability directly (not 1 minus the inside count) keeps tiny p-values
    accurate (Viehmann 2021, arXiv:2102.08037; Hodges 1958)."""
    if m < n:
        n, m = m, n
    mg, ng = m // g, n // g  # point (i, j) is inside iff |i*ng - j*mg| < h
    q = [0.0 if j * mg < h else 1.0 for j in range(n + 1)]  # column i = 0
    for i in range(1, m + 1):
        lo = max((ng * i - h) // mg + 1, 0)  # first j inside
        hi = min(-((-(ng * i + h)) // mg), n + 1)  # one past the last j inside
        if hi <= lo:
            return 1.0
        new = [1.0] * (n + 1)
        below = 1.0 if lo > 0 else 0.0  # q(i, lo-1): outside (or no such point)
        for j in range(lo, hi):
            below = (i * q[j] + j * below) / (i + j)
            new[j] = below
        q = new
    return q[n]


def ks_2samp_exact(x, y) -> tuple[float, float]:
    """Two-sided two-sample Kolmogorov-Smirnov test with the exact null distribution, as
    scipy.stats.ks_2samp(x, y) computes it by default for samples up to 10,000.

    D = max_t |F_x(t) - F_y(t)| over all pooled points t (ECDFs right-continuous, so ties are
    handled as scipy does). p = P(D_{n,m} >= D) under H0. Returns (D, p); (nan, nan) if any value
    is NaN."""
    x = np.sort(np.asarray(x, dtype=np.float64).ravel())
    y = np.sort(np.asarray(y, dtype=np.float64).ravel())
    n, m = len(x), len(y)
    if n == 0 or m == 0:
        raise ValueError("ks_2samp_exact needs two non-empty samples")
    if np.isnan(x).any() or np.isnan(y).any():
        return float("nan"), float("nan")
    g = math.gcd(n, m)
    lcm = n // g * m
    pooled = np.concatenate([x, y])
    # ECDF difference in integer units of 1/lcm: cx/n - cy/m = (cx*(m/g) - cy*(n/g)) / lcm
    cx = np.searchsorted(x, pooled, side="right")
    cy = np.searchsorted(y, pooled, side="right")
    h = int(np.abs(cx * (m // g) - cy * (n // g)).max())
    if h == 0:
        return 0.0, 1.0
    p = _p_outside_square(n, h) if n == m else _p_outside_band(n, m, g, h)
    return h / lcm, min(max(p, 0.0), 1.0)


# ----------------------------------------------------------------------------- aggregation

class LogError(ValueError):
    """A log file or log dict is malformed; the message names the file and key."""


def _index_order(values, where: str, key: str) -> list:
    """TOFU writes {"0": v0, "1": v1, ...}; plain lists are accepted too. -> values in index order."""
    if isinstance(values, list):
        return values
    if isinstance(values, dict):
        try:
            keys = sorted(values, key=int)
        except (TypeError, ValueError):
            bad = next(k for k in values if not str(k).lstrip("-").isdigit())
            raise LogError(f"{where}: key {key!r} has entry {bad!r}; expected row indices "
                           "like \"0\", \"1\", ...") from None
        return [values[k] for k in keys]
    raise LogError(f"{where}: key {key!r} is a {type(values).__name__}; expected a dict keyed by "
                   "row index (TOFU's format) or a list")


def log_array(log, key: str, where: str, ndim: int = 1) -> np.ndarray:
    """log[key] as a float64 array, (N,) or (N, m), with errors naming `where` and key."""
    if not isinstance(log, dict):
        raise LogError(f"{where}: expected a JSON object of TOFU log keys, got {type(log).__name__}")
    if key not in log:
        raise LogError(f"{where}: missing key {key!r} (have: {', '.join(sorted(log)) or 'none'})")
    values = _index_order(log[key], where, key)
    if len(values) == 0:
        raise LogError(f"{where}: key {key!r} is empty")
    if ndim == 2 and any(not isinstance(v, list) for v in values):
        raise LogError(f"{where}: key {key!r} must hold one list of losses per row")
    if ndim == 2 and len({len(v) for v in values}) != 1:
        raise LogError(f"{where}: key {key!r} has rows of different lengths "
                       f"{sorted({len(v) for v in values})}; expected the same number of "
                       "perturbed answers in every row")
    try:
        arr = np.array(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise LogError(f"{where}: key {key!r} holds non-numeric values") from None
    if arr.ndim != ndim or (ndim == 2 and arr.shape[1] == 0):
        raise LogError(f"{where}: key {key!r} has shape {arr.shape}; expected "
                       f"{'(N,)' if ndim == 1 else '(N, m) with m >= 1'}")
    return arr


def truth_ratios(log, where: str) -> np.ndarray:
    """R_i = exp(mean_j l(q_i, p_ij) - l(q_i, b_i)) from avg_paraphrased_loss (N,) and
    average_perturb_loss (N, m). R > 1: the model prefers b over the perturbed answers."""
    base = log_array(log, "avg_paraphrased_loss", where)
    perturbed = log_array(log, "average_perturb_loss", where, ndim=2)
    if len(base) != len(perturbed):
        raise LogError(f"{where}: avg_paraphrased_loss has {len(base)} rows but "
                       f"average_perturb_loss has {len(perturbed)}")
    with np.errstate(over="ignore", invalid="ignore"):  # divergence is data: inf/nan propagate
        return np.exp(perturbed.mean(axis=1) - base)


def split_metrics(log, stem: str, where: str | None = None) -> dict:
    """Probability, ROUGE, Truth Ratio of one split's log (stem selects the definitions):
        Probability: eval_log*: mean exp(-avg_gt_loss)
                     others:    mean P(a) / (P(a) + sum_j P(p_j)),  P = exp(-loss)
        Truth Ratio: eval_log_forget: mean min(R, 1/R);  others: mean max(0, 1 - 1/R)
        ROUGE:       mean rougeL_recall"""
    where = where or f"{stem}.json"
    gt_loss = log_array(log, "avg_gt_loss", where)
    rouge = log_array(log, "rougeL_recall", where)
    ratio = truth_ratios(log, where)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        p_true = np.exp(-gt_loss)
        if stem.startswith("eval_log"):
            prob = p_true.mean()
        else:
            p_false = np.exp(-log_array(log, "average_perturb_loss", where, ndim=2))  # (N, m)
            if len(p_false) != len(p_true):
                raise LogError(f"{where}: avg_gt_loss has {len(p_true)} rows but "
                               f"average_perturb_loss has {len(p_false)}")
            prob = (p_true / (p_true + p_false.sum(axis=1))).mean()
        if stem == FORGET_STEM:
            tr = np.minimum(ratio, 1.0 / ratio).mean()
        else:
            tr = np.maximum(0.0, 1.0 - 1.0 / ratio).mean()
    return {"Probability": float(prob), "ROUGE": float(rouge.mean()), "Truth Ratio": float(tr)}


def harmonic_mean(values) -> float:
    """n / sum(1/v): the Model Utility average. 0 if any value is 0 (its limit), as scipy's hmean."""
    values = [float(v) for v in values]
    if any(v < 0 for v in values):
        raise ValueError(f"harmonic mean of negative values {values}")
    if any(v == 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def forget_kl(log, where: str) -> float | None:
    """Forget KL = sum_i n_i avg_kl_i / sum_i n_i (mean over all forget answer tokens of
    KL(pi_ref || pi_theta)); None when the log has no avg_kl (no reference model)."""
    if "avg_kl" not in log:
        return None
    kl = log_array(log, "avg_kl", where)
    n = log_array(log, "num_token_gt", where)
    return float((kl * n).sum() / n.sum())


def aggregate(logs: dict, retain_logs: dict | None = None) -> dict:
    """Per-split logs (dict: TOFU file stem -> log dict with TOFU's keys) -> TOFU's metrics.

    logs must hold all four stems (LOG_STEMS); retain_logs, the retain model's logs, needs only
    eval_log_forget. Without retain_logs "Forget Quality" is None (unavailable).
    "Forget Quality" = p-value, "KS Test Forget" = statistic of ks_2samp_exact(R_unlearned, R_retain)
    on the forget split. "Model Utility" = harmonic_mean of the nine utility numbers.
    """
    missing = [s for s in LOG_STEMS if s not in logs]
    if missing:
        raise LogError(f"missing log(s) {', '.join(s + '.json' for s in missing)}")
    per_split = {stem: split_metrics(logs[stem], stem, f"{stem}.json") for stem in LOG_STEMS}

    out = {"Forget Quality": None, "KS Test Forget": None}
    if retain_logs is not None:
        if FORGET_STEM not in retain_logs:
            raise LogError(f"retain model logs: missing {FORGET_STEM}.json")
        stat, p = ks_2samp_exact(truth_ratios(logs[FORGET_STEM], f"{FORGET_STEM}.json"),
                                 truth_ratios(retain_logs[FORGET_STEM],
                                              f"retain model's {FORGET_STEM}.json"))
        out["Forget Quality"], out["KS Test Forget"] = p, stat
    utility = [per_split[s][k] for s in UTILITY_STEMS for k in ("Probability", "ROUGE", "Truth Ratio")]
    out["Model Utility"] = float("nan") if any(math.isnan(v) for v in utility) else harmonic_mean(utility)
    for stem in (*UTILITY_STEMS, FORGET_STEM):
        for k, v in per_split[stem].items():
            out[f"{LOG_STEMS[stem]} {k}"] = v
    out["Forget KL"] = forget_kl(logs[FORGET_STEM], f"{FORGET_STEM}.json")
    scorers = {log.get("rouge_scorer", "unrecorded") for log in logs.values()}
    out["ROUGE Scorer"] = ", ".join(sorted(scorers))
    return out


def format_table(metrics: dict) -> str:
    lines = []
    width = max(len(k) for k in metrics)
    for k, v in metrics.items():
        if v is None:
            text = "unavailable" if k in ("Forget Quality", "KS Test Forget") else "n/a"
        elif isinstance(v, str):
            text = v
        elif k == "Forget Quality":
            text = f"{v:.4e}"
        else:
            text = f"{v:.4f}"
        lines.append(f"{k:<{width}}  {text}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- log files

def read_log_file(path) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise LogError(f"{path}: cannot read ({e.strerror})") from None
    try:
        log = json.loads(text)
    except json.JSONDecodeError as e:
        raise LogError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(log, dict):
        raise LogError(f"{path}: expected a JSON object of TOFU log keys, got {type(log).__name__}")
    return log


def read_logs(path, stems=tuple(LOG_STEMS)) -> dict:
    """A directory holding TOFU's per-split files (eval_log.json, eval_log_forget.json,
    eval_real_author_wo_options.json, eval_real_world_wo_options.json), or TOFU's
    eval_log_aggregated.json ({"eval_log.json": {...}, ...}) -> {stem: log}. Reads only `stems`;
    each must be present."""
    path = Path(path)
    if path.is_file():
        bundle = read_log_file(path)
        logs = {}
        for stem in stems:
            if f"{stem}.json" not in bundle:
                raise LogError(f"{path}: missing key {stem + '.json'!r}")
            logs[stem] = bundle[f"{stem}.json"]
            if not isinstance(logs[stem], dict):
                raise LogError(f"{path}: {stem + '.json'!r} is not a JSON object")
        return logs
    if not path.is_dir():
        raise LogError(f"{path}: no such log directory or file")
    missing = [f"{s}.json" for s in stems if not (path / f"{s}.json").is_file()]
    if missing:
        raise LogError(f"{path}: missing log file(s) {', '.join(missing)}")
    return {s: read_log_file(path / f"{s}.json") for s in stems}


def write_json_atomic(path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_logs(out_dir, logs: dict) -> None:
    for stem, log in logs.items():
        write_json_atomic(Path(out_dir) / f"{stem}.json", log)


# ----------------------------------------------------------------------------- model evaluation

def answer_kl(model, ref_model, input_ids, labels) -> list[float]:
    """Per sequence: mean over its answer tokens of KL(pi_ref || pi_theta) at that position.
    input_ids, labels: (B, T). Both models map idx -> hidden states with return_hidden=True."""
    mask = npo.shift_labels(labels) != npo.IGNORE_INDEX  # (B, T): positions that predict a label
    h = model(input_ids, return_hidden=True)[mask]  # (N, C)
    h_ref = ref_model(input_ids, return_hidden=True)[mask]  # (N, C)
    kl = npo.kl_divergence(model.lm_head(h), ref_model.lm_head(h_ref))  # (N,)
    row = mask.nonzero()[:, 0]  # (N,) the sequence of each position
    total = torch.zeros(len(labels), dtype=torch.float64, device=kl.device).index_add_(0, row, kl.double())
    return (total / mask.sum(dim=1).clamp_min(1)).tolist()


def evaluate_model(model, enc, data_dir, forget_split: str, ds_size: int = 300,
                   batch_size: int = 128, max_new_tokens: int = 128, device=None,
                   rouge: str = "builtin", ref_model=None, stems=None,
                   fused: bool = True, progress: bool = False) -> dict:
    """Evaluate `model` on TOFU's four evaluation splits -> {TOFU file stem: log dict}.

    enc: the model's tiktoken Encoding. data_dir: a directory of TOFU files (data.load_split).
    Scores every (question, answer | paraphrased | each perturbed) pair in length-sorted batches
    of `batch_size` sequences, and greedily generates (batch_size prompts at a time) up to
    max_new_tokens tokens per question, stopping at EOS, for ROUGE. ref_model (optional): the model before unlearning; adds
    avg_kl = mean over answer tokens of KL(pi_ref || pi_theta) to the forget log.
    stems: evaluate only these log stems (default: all four). fused: compute log-probs with
    npo.fused_sequence_logprob on the hidden states (only answer positions reach lm_head) instead
    of npo.sequence_logprob on full logits; both give the same numbers up to float rounding.
    Values are dicts keyed by row index strings, so json.dump writes TOFU's exact format.
    The model's training mode is restored on return. Generation stops earlier than
    max_new_tokens where the longest prompt would otherwise overrun the model's block_size.
    """
    if ds_size < 1:
        raise ValueError(f"ds_size must be >= 1, got {ds_size}")
    score_rouge = make_rouge_scorer(rouge)
    specs = [s for s in split_specs(forget_split) if stems is None or s.stem in stems]
    if device is None:
        device = next(model.parameters()).device
    block_size = model.config.block_size
    t0 = time.time()

    def say(msg):
        if progress:
            print(f"[eval {time.time() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    # 1) every sequence to score: (stem, row, slot) with slot "gt", "base" or perturbed index j
    split_rows, seqs, keys = {}, [], []
    for spec in specs:
        rows = data.load_split(data_dir, spec.data_split)[:ds_size]  # fields checked there
        split_rows[spec.stem] = rows
        for i, row in enumerate(rows):
            answers = [("gt", row["answer"])]
            if spec.base_key != "answer":
                answers.append(("base", row[spec.base_key]))
            answers += list(enumerate(row["perturbed_answer"]))
            for slot, answer in answers:
                ids, labels = data.encode_qa(enc, row["question"], answer)
                if len(ids) > block_size:
                    raise ValueError(f"{data_dir}/{spec.data_split}.json row {i}: question + "
                                     f"answer is {len(ids)} tokens, longer than the model's "
                                     f"block_size {block_size}")
                seqs.append((ids, labels))
                keys.append((spec.stem, i, slot))

    # 2) scoring: batches of similar length waste little compute on padding
    was_training = model.training
    model.eval()
    if ref_model is not None:
        ref_was_training = ref_model.training
        ref_model.eval()
    logp = np.zeros(len(seqs))
    ntok = np.zeros(len(seqs), dtype=np.int64)
    kl = {}  # forget row -> mean KL per answer token
    order = sorted(range(len(seqs)), key=lambda k: len(seqs[k][0]))
    say(f"scoring {len(seqs)} answers")
    try:
        with torch.no_grad():
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                input_ids, labels = data.collate([seqs[k] for k in idx], pad_id=enc.eot_token)
                input_ids, labels = input_ids.to(device), labels.to(device)
                if fused:  # lm_head only at the answer positions, no (B, T, V) logits
                    hidden = model(input_ids, return_hidden=True)  # (B, T, C)
                    lp, n = npo.fused_sequence_logprob(hidden, model.lm_head.weight, labels)  # (B,)
                else:
                    lp, n = npo.sequence_logprob(model(input_ids), labels)  # (B,), (B,)
                logp[idx] = lp.double().cpu().numpy()
                ntok[idx] = n.cpu().numpy()
                kl_rows = [b for b, k in enumerate(idx) if keys[k][0] == FORGET_STEM and keys[k][2] == "gt"]
                if ref_model is not None and kl_rows:
                    sel = torch.tensor(kl_rows, device=device)
                    for b, value in zip(kl_rows, answer_kl(model, ref_model, input_ids[sel], labels[sel])):
                        kl[keys[idx[b]][1]] = value

            # 3) greedy generation for ROUGE, all splits at once
            flat = [(spec.stem, i) for spec in specs for i in range(len(split_rows[spec.stem]))]
            prompts = [data.encode_prompt(enc, split_rows[st][i]["question"]) for st, i in flat]
            longest = max(len(p) for p in prompts)
            new_tokens = min(max_new_tokens, block_size - longest)
            if new_tokens <= 0:
                raise ValueError(f"a prompt of {longest} tokens leaves no room to generate within "
                                 f"block_size {block_size}")
            say(f"generating {len(prompts)} answers (max {new_tokens} new tokens)")
            generated = model.generate(prompts, new_tokens, enc.eot_token, batch_size=batch_size)
    finally:
        model.train(was_training)
        if ref_model is not None:
            ref_model.train(ref_was_training)
    say("scoring ROUGE")

    # 4) assemble the logs in TOFU's layout
    loss = {}
    for k, (stem, i, slot) in enumerate(keys):
        loss[stem, i, slot] = (-logp[k], int(ntok[k]))
    texts = {key: enc.decode(toks).strip() for key, toks in zip(flat, generated)}
    logs = {}
    for spec in specs:
        rows = split_rows[spec.stem]
        log = {name: {} for name in ("avg_gt_loss", "gt_loss", "num_token_gt",
                                     "avg_paraphrased_loss", "paraphrased_loss",
                                     "num_token_paraphrased", "average_perturb_loss",
                                     "perturb_loss", "num_token_perturb", "rougeL_recall",
                                     "generated_text")}
        base_slot = "base" if spec.base_key != "answer" else "gt"
        for i, row in enumerate(rows):
            key = str(i)
            L, n = loss[spec.stem, i, "gt"]
            log["avg_gt_loss"][key], log["gt_loss"][key], log["num_token_gt"][key] = L / n, L, n
            L, n = loss[spec.stem, i, base_slot]
            log["avg_paraphrased_loss"][key] = L / n
            log["paraphrased_loss"][key], log["num_token_paraphrased"][key] = L, n
            pert = [loss[spec.stem, i, j] for j in range(len(row["perturbed_answer"]))]
            log["average_perturb_loss"][key] = [L / n for L, n in pert]
            log["perturb_loss"][key] = [L for L, _ in pert]
            log["num_token_perturb"][key] = [n for _, n in pert]
            gen = texts[spec.stem, i]
            log["rougeL_recall"][key] = score_rouge(row["answer"], gen)
            log["generated_text"][key] = [row["question"], gen, row["answer"]]
        if spec.stem == FORGET_STEM and ref_model is not None:
            log["avg_kl"] = {str(i): kl[i] for i in range(len(rows))}
        log["rouge_scorer"] = rouge
        logs[spec.stem] = log
    say("done")
    return logs


# ----------------------------------------------------------------------------- CLI

@dataclass
class EvalConfig:
    checkpoint: str = ""
    data_dir: str | None = None
    split: str = "forget10"
    retain_checkpoint: str | None = None
    retain_logs: str | None = None
    ref_checkpoint: str | None = None
    out: str | None = None
    ds_size: int = 300
    batch_size: int = 128
    max_new_tokens: int = 128
    rouge: str = "builtin"
    device: str = "cpu"


@dataclass
class AggregateConfig:
    unlearned_logs: str = ""
    retain_logs: str | None = None
    out: str | None = None


def _aggregate_main(argv) -> int:
    p = argparse.ArgumentParser(
        prog="eval.py aggregate",
        description="Compute TOFU's metrics (Forget Quality, Model Utility, ...) from TOFU-format "
                    "eval logs, ours or those written by TOFU's own evaluation code.")
    p.add_argument("--unlearned-logs", required=True,
                   help="directory with eval_log.json, eval_log_forget.json, "
                        "eval_real_author_wo_options.json, eval_real_world_wo_options.json "
                        "(or TOFU's eval_log_aggregated.json)")
    p.add_argument("--retain-logs", help="the retain model's logs (needs eval_log_forget.json); "
                                         "without them Forget Quality is unavailable")
    p.add_argument("--out", help="also write the metrics to this JSON file (atomically)")
    cfg = AggregateConfig(**vars(p.parse_args(argv)))
    logs = read_logs(cfg.unlearned_logs)
    retain = read_logs(cfg.retain_logs, (FORGET_STEM,)) if cfg.retain_logs else None
    metrics = aggregate(logs, retain)
    if cfg.out:
        write_json_atomic(cfg.out, metrics)
    print(format_table(metrics))
    return 0


def _evaluate_main(argv) -> int:
    p = argparse.ArgumentParser(
        prog="eval.py",
        description="Evaluate a checkpoint on TOFU (forget split, retain, real authors, world "
                    "facts); write TOFU-format logs and the aggregated metrics. "
                    "See also: python eval.py aggregate --help",
        epilog="Without --retain-checkpoint or --retain-logs, Forget Quality is unavailable.")
    p.add_argument("--checkpoint", required=True, help="the model to evaluate (model.py format)")
    p.add_argument("--data-dir", help="TOFU files (default: $TOFU_DATA_DIR)")
    p.add_argument("--split", default="forget10", choices=FORGET_SPLITS)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--retain-checkpoint", help="the retain model, evaluated on the forget split")
    g.add_argument("--retain-logs", help="the retain model's logs (eval_log_forget.json)")
    p.add_argument("--ref-checkpoint", help="the model before unlearning, for Forget KL")
    p.add_argument("--out", help="output directory (default: CKPT_DIR/eval_results/ds_sizeN)")
    p.add_argument("--ds-size", type=int, default=300, help="first N rows of each split (TOFU: 300)")
    p.add_argument("--batch-size", type=int, default=128,
                   help="sequences per scoring forward and prompts per generation batch")
    p.add_argument("--max-new-tokens", type=int, default=128,
                   help="generation bound for ROUGE (TOFU: 200 tokens in all, prompt included)")
    p.add_argument("--rouge", default="builtin", choices=("builtin", "rouge_score"),
                   help="builtin: no stemming; rouge_score: the package with the Porter stemmer, "
                        "as TOFU")
    p.add_argument("--device", default="cpu")
    cfg = EvalConfig(**vars(p.parse_args(argv)))
    if cfg.ds_size < 1 or cfg.batch_size < 1 or cfg.max_new_tokens < 1:
        raise ValueError("--ds-size, --batch-size and --max-new-tokens must be >= 1")

    data_dir = data.resolve_data_dir(cfg.data_dir)
    if data_dir is None:
        raise ValueError("no TOFU data: pass --data-dir or set TOFU_DATA_DIR")
    out = Path(cfg.out) if cfg.out else (Path(cfg.checkpoint).parent / "eval_results"
                                         / f"ds_size{cfg.ds_size}")
    retain_logs = read_logs(cfg.retain_logs, (FORGET_STEM,)) if cfg.retain_logs else None

    def load(path):
        model, ckpt = load_checkpoint(path, map_location=cfg.device)
        return model, data.encoding_from_spec(ckpt["tokenizer"])

    kwargs = dict(data_dir=data_dir, forget_split=cfg.split, ds_size=cfg.ds_size,
                  batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
                  device=cfg.device, rouge=cfg.rouge, progress=True)
    model, enc = load(cfg.checkpoint)
    ref_model = load(cfg.ref_checkpoint)[0] if cfg.ref_checkpoint else None
    logs = evaluate_model(model, enc, ref_model=ref_model, **kwargs)
    if cfg.retain_checkpoint:
        retain_model, retain_enc = load(cfg.retain_checkpoint)
        retain_logs = evaluate_model(retain_model, retain_enc, stems=(FORGET_STEM,), **kwargs)
        write_logs(out / "retain_model", retain_logs)
    metrics = aggregate(logs, retain_logs)
    write_logs(out, logs)
    write_json_atomic(out / "aggregate_stat.json", metrics)
    print(format_table(metrics))
    print(f"logs and aggregate_stat.json written to {out}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] == "aggregate":
            return _aggregate_main(argv[1:])
        return _evaluate_main(argv)
    except (ValueError, OSError) as e:  # LogError, DataError, CheckpointError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
