"""TOFU evaluation: per-example logs in TOFU's own format, and the metrics computed from them
exactly as TOFU's `aggregate_eval_stat.py` (and its leaderboard) define them.

    python eval.py --model DIR [--retain-model DIR | --retain-logs DIR] [--ref-model DIR] \
        --data-dir DIR --split forget10 [--out DIR]
    python eval.py aggregate --unlearned-logs DIR [--retain-logs DIR] [--out FILE]

Per example (question q, answer y, formatted by data.encode_qa in the model's prompt format; the
loss covers the answer tokens and the end token):
    L(q, y) = sum of the token NLLs,  n(q, y) = number of those tokens,
    l(q, y) = L / n  (length-normalised loss),  P(y | q) = exp(-l(q, y)).

Four log files, one per split, each a dict of TOFU log keys -> {"row index": value}:
    eval_log_forget.json              forgetXX_perturbed     (b = paraphrased_answer)
    eval_log.json                     retain_perturbed       (b = paraphrased_answer)
    eval_real_author_wo_options.json  real_authors_perturbed (b = answer)
    eval_real_world_wo_options.json   world_facts_perturbed  (b = answer)
with avg_gt_loss = l(q, a), avg_paraphrased_loss = l(q, b), average_perturb_loss = [l(q, p_j)]_j,
rouge1_recall, rougeL_recall, generated_text = [question, generation, answer], the sums and token
counts (gt_loss, num_token_gt, ...), and avg_kl where a reference model is given. Only the first
ds_size rows of each split. Forget splits without a perturbed file (TOFU's forget20/30/50/90) are
evaluated on forget10_perturbed, as the NPO authors do (eval_forget_split; the logs record it).

Metrics (aggregate):
    Probability   forget, retain:            mean_i exp(-l(q_i, a_i))
                  real authors, world facts: mean_i P(a_i) / (P(a_i) + sum_j P(p_ij))
    Truth ratio   R_i = exp(mean_j l(q_i, p_ij) - l(q_i, b_i))
                  forget: mean_i min(R_i, 1/R_i);  others: mean_i max(0, 1 - 1/R_i)
    ROUGE         mean ROUGE-L recall = LCS(a, g) / |a| over rouge_score's tokens of the answer a
                  and the greedy generation g, words longer than 3 letters Porter-stemmed (TOFU's
                  RougeScorer(['rouge1', 'rougeL'], use_stemmer=True))
    Forget Quality  p-value of the exact two-sided two-sample KS test between the forget-split
                  R_i of the unlearned model and of the retain model, on the same rows
    Model Utility   harmonic mean of the 9 numbers {Probability, ROUGE, Truth Ratio} x
                  {Retain, Real Authors, World Facts}; 0 if any of them is 0
    Forget KL     KL(pi_ref || pi_theta) on the forget answers, mean per answer token

Generation: greedy, at most max_new_tokens new tokens. TOFU bounds the whole left-padded batch
instead (max_length 200 tokens, prompt included); max_new_tokens=None (the CLI's default) does
the same with the longest prompt of all questions, which makes every answer's room independent
of how the questions are batched.
"""

import argparse
import functools
import json
import math
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import data
import distributed
from model import answer_kl, answer_logprob, from_pretrained, load_config

# ----------------------------------------------------------------------------- splits

FORGET_STEM = "eval_log_forget"
UTILITY_STEMS = ("eval_log", "eval_real_author_wo_options", "eval_real_world_wo_options")
LOG_STEMS = (FORGET_STEM, *UTILITY_STEMS)
TOFU_MAX_LENGTH = 200  # TOFU's generation bound: prompt and answer tokens together
SPLIT_NAMES = {"eval_log_forget": "Forget", "eval_log": "Retain",  # as in the metric names
               "eval_real_author_wo_options": "Real Authors", "eval_real_world_wo_options": "World Facts"}


@dataclass(frozen=True)
class EvalSplit:
    stem: str  # TOFU's log file stem
    data_split: str  # data.load_split name
    base_key: str  # the answer b of the truth ratio: paraphrased_answer or answer


def default_eval_forget_split(data_dir, forget_split: str) -> str:
    """forgetXX_perturbed where the data has it, else forget10_perturbed (the NPO authors'
    forget.py evaluates forget20-90 there, against the retainYY model)."""
    if not re.fullmatch(r"forget\d\d", forget_split):
        raise ValueError(f"unknown forget split {forget_split!r}; expected forgetXX, e.g. forget10")
    own = f"{forget_split}_perturbed"
    return own if (Path(data_dir) / f"{own}.json").is_file() else "forget10_perturbed"


def eval_splits(eval_forget_split: str) -> list[EvalSplit]:
    return [EvalSplit(FORGET_STEM, eval_forget_split, "paraphrased_answer"),
            EvalSplit("eval_log", "retain_perturbed", "paraphrased_answer"),
            EvalSplit("eval_real_author_wo_options", "real_authors_perturbed", "answer"),
            EvalSplit("eval_real_world_wo_options", "world_facts_perturbed", "answer")]


# ----------------------------------------------------------------------------- ROUGE

# The Porter stemmer as NLTK's PorterStemmer() (mode NLTK_EXTENSIONS) applies it, which is what
# rouge_score calls: Porter (1980) with Martin Porter's later changes and NLTK's own.
_IRREGULAR = dict(pair.split(">") for pair in (  # NLTK's table, looked up before any rule
    "skies>sky sky>sky dying>die lying>lie tying>tie news>news innings>inning inning>inning "
    "outings>outing outing>outing cannings>canning canning>canning howe>howe proceed>proceed "
    "exceed>exceed succeed>succeed").split())
_STEP2 = [rule.split(">") for rule in (  # suffix>replacement, if the stem has m > 0
    "ational>ate tional>tion enci>ence anci>ance izer>ize bli>ble entli>ent eli>e ousli>ous "
    "ization>ize ation>ate ator>ate alism>al iveness>ive fulness>ful ousness>ous aliti>al "
    "iviti>ive biliti>ble fulli>ful").split()]
_STEP3 = [rule.split(">") for rule in "icate>ic ative> alize>al iciti>ic ical>ic ful> ness>".split()]
_STEP4 = [(suffix, "") for suffix in "al ance ence er ic able ible ant ement ment ent ion ou ism "
          "ate iti ous ive ize".split()]


def _consonant_flags(word: str) -> list[bool]:
    """Porter's consonants: letters other than a e i o u, and y only after a vowel or first."""
    flags = []
    for ch in word:
        flags.append(ch not in "aeiou" and (ch != "y" or not flags or not flags[-1]))
    return flags


def _measure(stem: str) -> int:
    """m of the form [C](VC)^m[V]: the number of vowel -> consonant transitions."""
    flags = _consonant_flags(stem)
    return sum(not a and b for a, b in zip(flags, flags[1:]))


def _ends_cvc(stem: str) -> bool:
    """*o: ends consonant-vowel-consonant, the last not w, x, y (NLTK: or is vowel-consonant)."""
    f = _consonant_flags(stem)
    if len(stem) == 2:
        return not f[0] and f[1]
    return len(stem) >= 3 and f[-3] and not f[-2] and f[-1] and stem[-1] not in "wxy"


def _replace_suffix(word: str, rules, condition) -> str:
    """The first rule whose suffix ends `word` decides: applied if condition(stem, suffix)."""
    for suffix, replacement in rules:
        if word.endswith(suffix):
            stem = word[:len(word) - len(suffix)]
            return stem + replacement if condition(stem, suffix) else word
    return word


@functools.lru_cache(maxsize=1 << 16)
def porter_stem(word: str) -> str:
    """Porter stem of a lowercase word, equal to nltk's PorterStemmer().stem(word)."""
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if len(word) <= 2:
        return word
    # 1a: plurals; a four-letter -ies keeps its e (dies -> die, but ponies -> poni)
    if word.endswith("ies") and len(word) == 4:
        word = word[:-1]
    else:
        word = _replace_suffix(word, [("sses", "ss"), ("ies", "i"), ("ss", "ss"), ("s", "")],
                               lambda stem, suffix: True)
    # 1b: -ied (died -> die, spied -> spi), -eed, then -ed / -ing after a vowel, tidied up
    if word.endswith("ied"):
        word = word[:-3] + ("ie" if len(word) == 4 else "i")
    elif word.endswith("eed"):
        word = word[:-1] if _measure(word[:-3]) > 0 else word
    else:
        for suffix in ("ed", "ing"):
            stem = word[:-len(suffix)]
            if word.endswith(suffix) and not all(_consonant_flags(stem)):
                if stem.endswith(("at", "bl", "iz")):
                    word = stem + "e"  # conflat(ed) -> conflate
                elif len(stem) >= 2 and stem[-1] == stem[-2] and _consonant_flags(stem)[-1]:
                    word = stem if stem[-1] in "lsz" else stem[:-1]  # hopp(ing) -> hop
                else:
                    word = stem + "e" if _measure(stem) == 1 and _ends_cvc(stem) else stem
                break
    # 1c: y -> i after a consonant that is not the first letter (happy -> happi, enjoy stays)
    if word.endswith("y") and len(word) > 2 and _consonant_flags(word[:-1])[-1]:
        word = word[:-1] + "i"
    # 2: -alli -> -al first, so that step 2 then sees -tional (emotionally -> emotion); -logi
    # -> -log when the stem with its l has m > 0
    if word.endswith("alli") and _measure(word[:-4]) > 0:
        word = word[:-2]
    if word.endswith("logi"):
        word = word[:-1] if _measure(word[:-3]) > 0 else word
    else:
        word = _replace_suffix(word, _STEP2, lambda stem, suffix: _measure(stem) > 0)
    word = _replace_suffix(word, _STEP3, lambda stem, suffix: _measure(stem) > 0)
    word = _replace_suffix(word, _STEP4, lambda stem, suffix: _measure(stem) > 1
                           and (suffix != "ion" or stem[-1] in "st"))
    # 5: a final e goes unless the stem is short and ends cvc (rate stays); -ll -> -l
    if word.endswith("e"):
        m = _measure(word[:-1])
        if m > 1 or (m == 1 and not _ends_cvc(word[:-1])):
            word = word[:-1]
    if word.endswith("ll") and _measure(word[:-1]) > 1:
        word = word[:-1]
    return word


ROUGE_MODES = ("porter", "plain")  # porter: TOFU's (use_stemmer=True); plain: no stemming
_WORD = re.compile(r"[a-z0-9]+")  # a word, for ROUGE and the degeneracy figures


def rouge_tokens(text: str, stem: bool = True) -> list[str]:
    """rouge_score's tokens: lowercase, every run of characters other than a-z0-9 a space, split;
    with stem, words longer than 3 characters Porter-stemmed."""
    words = _WORD.findall(text.lower())  # = replacing each other run by a space, then split()
    return [porter_stem(w) if stem and len(w) > 3 else w for w in words]


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


def rouge_recalls(reference: str, generation: str, rouge: str = "porter") -> tuple[float, float]:
    """(ROUGE-1 recall, ROUGE-L recall) of generation against reference: clipped unigram overlap
    / |ref| and LCS / |ref|; 0 when either side has no tokens (as rouge_score)."""
    if rouge not in ROUGE_MODES:
        raise ValueError(f"unknown ROUGE mode {rouge!r}; expected one of {', '.join(ROUGE_MODES)}")
    ref, gen = rouge_tokens(reference, rouge == "porter"), rouge_tokens(generation, rouge == "porter")
    if not ref or not gen:
        return 0.0, 0.0
    overlap = sum((Counter(ref) & Counter(gen)).values())
    return overlap / len(ref), lcs_length(ref, gen) / len(ref)


# ----------------------------------------------------------------------------- exact KS test

def _ks_pvalue_equal_sizes(n: int, h: int) -> float:
    """P(D_{n,n} >= h/n) = 2 sum_{k>=1} (-1)^(k+1) C(2n, n-kh) / C(2n, n).
    With r_k = C(2n, n-kh) / C(2n, n-(k-1)h) = prod_{j<h} (n-(k-1)h-j) / (n+(k-1)h+j+1),
    the sum is r_1 (1 - r_2 (1 - r_3 (1 - ...))): no cancellation between large terms."""
    j = np.arange(h)
    p = 0.0
    for k in range(n // h, 0, -1):  # terms with k*h > n are zero
        base = (k - 1) * h
        r_k = float(np.prod((n - base - j) / (n + base + j + 1.0)))
        p = r_k * (1.0 - p)
    return 2.0 * p


def ks_2samp_exact(x, y) -> tuple[float, float]:
    """Two-sided two-sample Kolmogorov-Smirnov test with the exact null distribution, as
    scipy.stats.ks_2samp(x, y) computes it by default for samples up to 10,000; here for two
    samples of the same size n, as Forget Quality compares the same rows.

    D = max_t |F_x(t) - F_y(t)| over all pooled points t (ECDFs right-continuous, so ties are
    handled as scipy does). p = P(D_{n,n} >= D) under H0. Returns (D, p); (nan, nan) if any value
    is NaN."""
    x = np.sort(np.asarray(x, dtype=np.float64).ravel())
    y = np.sort(np.asarray(y, dtype=np.float64).ravel())
    n = len(x)
    if n == 0 or len(y) != n:
        raise ValueError(f"ks_2samp_exact needs two non-empty samples of the same size, got {n} and {len(y)}")
    if np.isnan(x).any() or np.isnan(y).any():
        return float("nan"), float("nan")
    pooled = np.concatenate([x, y])
    cx = np.searchsorted(x, pooled, side="right")  # n F_x at each pooled point
    cy = np.searchsorted(y, pooled, side="right")
    h = int(np.abs(cx - cy).max())  # D in integer units of 1/n
    if h == 0:
        return 0.0, 1.0
    return h / n, min(max(_ks_pvalue_equal_sizes(n, h), 0.0), 1.0)


# ----------------------------------------------------------------------------- logs -> metrics

class LogError(ValueError):
    """A log file or log dict is malformed or does not match another; the message names the file."""


def log_rows(log, where: str) -> list[int]:
    """The row indices of a TOFU log, which every per-row key (a dict keyed by row index, as TOFU
    writes, or a list) must share; other values (the "split" and "rouge" notes) are skipped."""
    if not isinstance(log, dict):
        raise LogError(f"{where}: expected a JSON object of TOFU log keys, got {type(log).__name__}")
    rows, first = None, None
    for key, values in log.items():
        if isinstance(values, dict):
            try:
                indices = sorted(int(k) for k in values)
            except ValueError:
                bad = next(k for k in values if not k.lstrip("-").isdigit())
                raise LogError(f"{where}: key {key!r} has entry {bad!r}; expected row indices "
                               "like \"0\", \"1\", ...") from None
        elif isinstance(values, list):
            indices = list(range(len(values)))
        else:
            continue
        if rows is None:
            rows, first = indices, key
        elif indices != rows:
            raise LogError(f"{where}: key {key!r} has {len(indices)} rows {_span(indices)} but "
                           f"{first!r} has {len(rows)} rows {_span(rows)}; every key must describe "
                           "the same questions")
    if not rows:
        raise LogError(f"{where}: no rows; expected TOFU log keys holding one value per question")
    return rows


def retain_rows_mismatch(retain: dict, rows: list, path, data_dir, split: str, ds_size: int) -> str | None:
    """Forget Quality compares the same questions: why the retain model's forget log (retain, whose
    row ids are rows, read from path) is not about the first ds_size rows of split; None if it is."""
    n = len(data.load_split(data_dir, split)[:ds_size])
    if rows != list(range(n)) or retain.get("split", split) != split:
        return (f"{path} holds {len(rows)} rows of {retain.get('split', 'an unrecorded split')}; "
                f"this evaluation has {n} rows of {split} (--ds-size {ds_size})")
    return None


def _span(indices: list[int]) -> str:
    return f"({indices[0]}..{indices[-1]})" if indices else "()"


def log_array(log: dict, key: str, where: str, ndim: int = 1) -> np.ndarray:
    """log[key] in row order as a float64 array: (N,), or (N, m) with m >= 1 for ndim=2."""
    if key not in log:
        raise LogError(f"{where}: missing key {key!r} (have: {', '.join(sorted(log)) or 'none'})")
    values = log[key]
    if isinstance(values, dict):
        values = [values[k] for k in sorted(values, key=int)]
    try:
        array = np.array(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise LogError(f"{where}: key {key!r} holds non-numeric values or rows of different "
                       "lengths; expected one number (or one list of m numbers) per row") from None
    if array.ndim != ndim or array.shape[-1] == 0:
        raise LogError(f"{where}: key {key!r} has shape {array.shape}; expected "
                       f"{'(N,)' if ndim == 1 else '(N, m) with m >= 1'}")
    return array


def truth_ratios(log: dict, where: str) -> np.ndarray:
    """R_i = exp(mean_j l(q_i, p_ij) - l(q_i, b_i)): > 1 where the model prefers b to the p_ij."""
    base = log_array(log, "avg_paraphrased_loss", where)
    perturbed = log_array(log, "average_perturb_loss", where, ndim=2)
    with np.errstate(over="ignore", invalid="ignore"):  # divergence is data: inf/nan propagate
        return np.exp(perturbed.mean(axis=1) - base)


def split_metrics(log: dict, stem: str, where: str) -> dict:
    """Probability, ROUGE, Truth Ratio of one split's log (the module docstring's formulas)."""
    log_rows(log, where)
    p_true = np.exp(-log_array(log, "avg_gt_loss", where))
    ratio = truth_ratios(log, where)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if stem in (FORGET_STEM, "eval_log"):
            prob = p_true.mean()
        else:
            p_false = np.exp(-log_array(log, "average_perturb_loss", where, ndim=2))  # (N, m)
            prob = (p_true / (p_true + p_false.sum(axis=1))).mean()
        if stem == FORGET_STEM:
            truth = np.minimum(ratio, 1.0 / ratio).mean()
        else:
            truth = np.maximum(0.0, 1.0 - 1.0 / ratio).mean()
    rouge = log_array(log, "rougeL_recall", where).mean()
    return {"Probability": float(prob), "ROUGE": float(rouge), "Truth Ratio": float(truth)}


def aggregate(logs: dict, retain_logs: dict | None = None, *, where: str = "",
              retain_where: str = "retain model") -> dict:
    """TOFU's metrics from the four logs {stem: log} and, for Forget Quality, the retain model's
    eval_log_forget on the same rows (else Forget Quality is None). `where`, `retain_where`: the
    directories (or bundle files) the logs came from, named in errors."""
    def label(source, stem):
        return f"{source}/{stem}.json" if source else f"{stem}.json"

    per_split = {stem: split_metrics(logs[stem], stem, label(where, stem)) for stem in LOG_STEMS}
    forget, mine = logs[FORGET_STEM], label(where, FORGET_STEM)
    out = {"Forget Quality": None, "KS Test Forget": None}
    if retain_logs is not None:
        retain, theirs = retain_logs[FORGET_STEM], label(retain_where, FORGET_STEM)
        rows, retain_rows = log_rows(forget, mine), log_rows(retain, theirs)
        if rows != retain_rows:
            raise LogError(f"{mine} has {len(rows)} rows {_span(rows)} but {theirs} has "
                           f"{len(retain_rows)} rows {_span(retain_rows)}; Forget Quality compares "
                           "the same questions (evaluate both with the same split and ds_size)")
        split, retain_split = forget.get("split"), retain.get("split")
        if split and retain_split and split != retain_split:
            raise LogError(f"{mine} was evaluated on {split} but {theirs} on {retain_split}")
        stat, p = ks_2samp_exact(truth_ratios(forget, mine), truth_ratios(retain, theirs))
        out["Forget Quality"], out["KS Test Forget"] = p, stat
    utility = [per_split[s][k] for s in UTILITY_STEMS for k in ("Probability", "ROUGE", "Truth Ratio")]
    out["Model Utility"] = float(statistics.harmonic_mean(utility))  # 0 if any is 0, as scipy's hmean
    for stem in (*UTILITY_STEMS, FORGET_STEM):
        for k, v in per_split[stem].items():
            out[f"{SPLIT_NAMES[stem]} {k}"] = v
    out["Forget KL"] = None
    if "avg_kl" in forget:  # token-weighted: the mean over all forget answer tokens
        kl, n = log_array(forget, "avg_kl", mine), log_array(forget, "num_token_gt", mine)
        out["Forget KL"] = float((kl * n).sum() / n.sum())
    out["Forget Eval Split"] = forget.get("split", "unrecorded")
    out["ROUGE Scorer"] = ", ".join(sorted({str(log.get("rouge", "unrecorded")) for log in logs.values()}))
    return out


def format_table(metrics: dict) -> str:
    def text(k, v):
        if v is None:
            return "unavailable" if k in ("Forget Quality", "KS Test Forget") else "n/a"
        return v if isinstance(v, str) else f"{v:.4e}" if k == "Forget Quality" else f"{v:.4f}"

    width = max(map(len, metrics))
    return "\n".join(f"{k:<{width}}  {text(k, v)}" for k, v in metrics.items())


# ----------------------------------------------------------------------------- log files

def read_log_file(path) -> dict:
    path = Path(path)
    try:
        log = json.loads(path.read_bytes().decode("utf-8-sig"))  # a byte-order mark from a Windows editor is fine
    except OSError as e:
        raise LogError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise LogError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); expected a JSON log") from None
    except json.JSONDecodeError as e:
        raise LogError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(log, dict):
        raise LogError(f"{path}: expected a JSON object of TOFU log keys, got {type(log).__name__}")
    return log


def read_logs(path, stems=LOG_STEMS) -> dict:
    """{stem: log} from a directory of TOFU's per-split files (eval_log.json, ...) or from TOFU's
    eval_log_aggregated.json ({"eval_log.json": {...}, ...}). Reads only `stems`; each must exist."""
    path = Path(path)
    if path.is_file():
        bundle = read_log_file(path)
        missing = [f"{s}.json" for s in stems if f"{s}.json" not in bundle]
        if missing:
            raise LogError(f"{path}: missing key(s) {', '.join(map(repr, missing))}")
        return {s: bundle[f"{s}.json"] for s in stems}
    if not path.is_dir():
        raise LogError(f"{path}: no such log directory or file")
    missing = [f"{s}.json" for s in stems if not (path / f"{s}.json").is_file()]
    if missing:
        raise LogError(f"{path}: missing log file(s) {', '.join(missing)}")
    return {s: read_log_file(path / f"{s}.json") for s in stems}


def write_logs(out_dir, logs: dict) -> None:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for stem, log in logs.items():
        data.write_atomic(Path(out_dir) / f"{stem}.json", json.dumps(log, indent=2))


# ----------------------------------------------------------------------------- degeneracy, frontier

FRONTIER_FRACTIONS = (0.5, 0.75, 0.9)  # Model Utility kept, as a share of the target's, for the frontier statistic


def repeated_ngram_share(text: str, n: int = 3) -> float:
    """Share of a generation's word n-grams that repeat an earlier n-gram of it (0 = none)."""
    words = _WORD.findall(text.lower())
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def unknown_word_share(text: str, vocab: set[str]) -> float:
    """Share of a generation's words that never occur in the training text (gibberish)."""
    words = _WORD.findall(text.lower())
    return sum(w not in vocab for w in words) / len(words) if words else 0.0


def is_degenerate(text: str, vocab: set[str]) -> bool:
    """No word at all, at least half of its word 3-grams repeated, or at least half of its words
    unknown to the training text."""
    return (not _WORD.search(text.lower()) or repeated_ngram_share(text) >= 0.5
            or unknown_word_share(text, vocab) >= 0.5)


def training_vocabulary(data_dir) -> set[str]:
    """Every word of the fine-tuning text (full, real_authors, world_facts, refusals)."""
    rows = [r for split in ("full", "real_authors", "world_facts") for r in data.load_split(data_dir, split)]
    texts = [r[k] for r in rows for k in ("question", "answer")] + data.load_idk(data_dir)
    return {w for t in texts for w in _WORD.findall(t.lower())}


def degeneracy(logs: dict, vocab: set[str]) -> dict:
    """Degeneracy figures of the forget-question generations (generated_text[i][1]) in `logs`."""
    texts = logs[FORGET_STEM]["generated_text"]
    generations = [t[1] for t in (texts.values() if isinstance(texts, dict) else texts)]
    n = max(len(generations), 1)
    return {"Degenerate Share": sum(is_degenerate(g, vocab) for g in generations) / n,
            "Repeated 3-gram Share": sum(repeated_ngram_share(g) for g in generations) / n,
            "Unknown Word Share": sum(unknown_word_share(g, vocab) for g in generations) / n}


def best_forget_quality(records: list[dict], target_mu: float, fraction: float) -> float | None:
    """The frontier statistic of one method's per-epoch records: the best Forget Quality among the
    epochs with status "ok" whose Model Utility is at least fraction x target_mu (the target
    model's); None when no epoch keeps that much utility."""
    ok = [r["Forget Quality"] for r in records if r.get("status") == "ok" and r.get("Forget Quality")
          is not None and not math.isnan(r["Forget Quality"]) and r["Model Utility"] >= fraction * target_mu]
    return max(ok) if ok else None


# ----------------------------------------------------------------------------- model evaluation

def evaluate_model(model, tok, fmt, data_dir, forget_split: str, *, eval_forget_split=None,
                   ds_size: int = 300, batch_size: int = 32, max_new_tokens: int | None = None,
                   fused: bool = False, rouge: str = "porter", ref_model=None, stems=None,
                   progress: bool = False) -> dict:
    """Evaluate `model` on TOFU's four evaluation splits -> {log stem: TOFU-format log dict}.

    tok: data.Tokenizer; fmt: data.PromptFormat. eval_forget_split: the forget log's split
    (default: default_eval_forget_split). Every (question, answer | paraphrased | perturbed) pair
    is scored by answer_logprob(..., fused), as in training, batch_size sequences at a time; every
    question gets a greedy generation of at most max_new_tokens tokens (None: TOFU's bound, 200
    tokens with the longest prompt), stopping at tok.eos_ids. ref_model: adds avg_kl, the mean
    KL(pi_ref || pi_theta) per answer token, to the forget log. stems: only these logs.
    The callers (this CLI, train_tofu.py) have checked the sizes and the ROUGE mode."""
    eval_forget_split = eval_forget_split or default_eval_forget_split(data_dir, forget_split)
    splits = [s for s in eval_splits(eval_forget_split) if stems is None or s.stem in stems]
    device, block_size, start = next(model.parameters()).device, model.config.block_size, time.time()

    def say(msg):
        if progress:
            print(f"[eval {time.time() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    # 1) every answer to score, keyed (stem, row, slot): slot "gt", "base" or perturbed index j
    rows, pairs, keys = {}, [], []
    for split in splits:
        rows[split.stem] = data.load_split(data_dir, split.data_split)[:ds_size]
        for i, row in enumerate(rows[split.stem]):
            answers = [("gt", row["answer"])] + list(enumerate(row["perturbed_answer"]))
            if split.base_key != "answer":
                answers.append(("base", row[split.base_key]))
            for slot, answer in answers:
                pairs.append(data.encode_qa(tok, fmt, row["question"], answer))
                keys.append((split.stem, i, slot))
                if len(pairs[-1][0]) > block_size:
                    raise ValueError(f"{data_dir}/{split.data_split}.json row {i}: question and answer "
                                     f"take {len(pairs[-1][0])} tokens, more than the model's "
                                     f"block_size {block_size}")
    questions = [(split.stem, i) for split in splits for i in range(len(rows[split.stem]))]
    prompts = [data.encode_prompt(tok, fmt, rows[stem][i]["question"]) for stem, i in questions]
    longest = max(map(len, prompts))
    new_tokens = min(max_new_tokens or TOFU_MAX_LENGTH - longest, block_size - longest)
    if new_tokens < 1:
        raise ValueError(f"a prompt of {longest} tokens leaves no room to generate (block_size "
                         f"{block_size}{'' if max_new_tokens else f', TOFU max_length {TOFU_MAX_LENGTH}'})")

    # 2) scores, in batches of similar length (little compute lost to padding), and generations.
    # Several processes (torchrun) take a share of the same batches each and gather the results.
    losses, kl = {}, {}  # key -> (sum of NLLs, tokens); forget row -> mean KL per answer token
    order = sorted(range(len(pairs)), key=lambda k: len(pairs[k][0]))
    generation_order = sorted(range(len(prompts)), key=lambda q: len(prompts[q]))
    modes = {m: m.training for m in (model, ref_model) if m is not None}
    say(f"scoring {len(pairs)} answers")
    try:
        for m in modes:
            m.eval()
        with torch.no_grad():
            for batch, mine in distributed.rank_share([order[s:s + batch_size] for s in range(0, len(order), batch_size)]):
                ids, labels = (t.to(device) for t in data.collate([pairs[k] for k in batch], tok.pad_id))
                logp, n_tokens = answer_logprob(model, ids, labels, fused)  # (B,), (B,)
                forget = [b for b, k in enumerate(batch) if keys[k][0] == FORGET_STEM and keys[k][2] == "gt"]
                if ref_model is not None and (forget or dist.is_initialized()):  # FSDP: same calls everywhere
                    pick = torch.tensor(forget or [0], device=device)
                    kl_sum, count = answer_kl(model, ref_model, ids[pick], labels[pick])  # (b,), (b,)
                if not mine:  # a stand-in batch
                    continue
                for k, lp, n in zip(batch, logp.tolist(), n_tokens.tolist()):
                    losses[keys[k]] = (-lp, int(n))
                if ref_model is not None and forget:
                    for b, total, c in zip(forget, kl_sum.tolist(), count.tolist()):
                        kl[keys[batch[b]][1]] = total / c
            say(f"generating {len(prompts)} answers (at most {new_tokens} new tokens)")
            generated = {}
            for batch, mine in distributed.rank_share([generation_order[s:s + batch_size]
                                           for s in range(0, len(prompts), batch_size)]):
                new = model.generate([prompts[q] for q in batch], new_tokens, tok.eos_ids, batch_size=len(batch),
                                     all_done=distributed.all_done if dist.is_initialized() else bool)
                if mine:
                    generated.update(zip(batch, new))
    finally:
        for m, training in modes.items():
            m.train(training)
    losses, kl, generated = distributed.gathered(losses), distributed.gathered(kl), distributed.gathered(generated)
    texts = {question: tok.decode(generated[q]).strip() for q, question in enumerate(questions)}

    # 3) the logs, in TOFU's layout
    logs = {}
    for split in splits:
        log = {}
        for i, row in enumerate(rows[split.stem]):
            gt = losses[split.stem, i, "gt"]
            base = losses[split.stem, i, "gt" if split.base_key == "answer" else "base"]
            perturbed = [losses[split.stem, i, j] for j in range(len(row["perturbed_answer"]))]
            rouge1, rouge_l = rouge_recalls(row["answer"], texts[split.stem, i], rouge)
            values = {"avg_gt_loss": gt[0] / gt[1], "gt_loss": gt[0], "num_token_gt": gt[1],
                      "avg_paraphrased_loss": base[0] / base[1], "paraphrased_loss": base[0],
                      "num_token_paraphrased": base[1], "average_perturb_loss": [L / n for L, n in perturbed],
                      "perturb_loss": [L for L, _ in perturbed], "num_token_perturb": [n for _, n in perturbed],
                      "rouge1_recall": rouge1, "rougeL_recall": rouge_l,
                      "generated_text": [row["question"], texts[split.stem, i], row["answer"]]}
            if split.stem == FORGET_STEM and ref_model is not None:
                values["avg_kl"] = kl[i]
            for key, value in values.items():
                log.setdefault(key, {})[str(i)] = value
        log["split"], log["rouge"] = split.data_split, rouge
        logs[split.stem] = log
    say("done")
    return logs


# ----------------------------------------------------------------------------- CLI

def option(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class EvalConfig:
    model: str = option("", "the model: a Hugging Face directory (config.json, model.safetensors, tokenizer)")
    data_dir: str = option("", "TOFU's files (default: $TOFU_DATA_DIR)")
    split: str = option("forget10", "the forget split forgetXX that was unlearned")
    eval_forget_split: str = option("", "the forget log's split (default: SPLIT_perturbed where it "
                                    "exists, else forget10_perturbed, as the NPO authors)")
    prompt_format: str = option("", f"{', '.join(data.PROMPT_FORMATS)} (default: TOFU's for the model family)")
    retain_model: str = option("", "the retain model, evaluated on the forget split for Forget Quality")
    retain_logs: str = option("", "or its logs: a directory with eval_log_forget.json, or TOFU's "
                              "eval_log_aggregated.json")
    ref_model: str = option("", "the model before unlearning, for Forget KL")
    out: str = option("", "output directory (default: MODEL/eval_results/ds_sizeN, as TOFU)")
    ds_size: int = option(300, "the first N rows of each split, as TOFU")
    batch_size: int = option(32, "sequences per scoring forward, prompts per generation batch")
    max_new_tokens: int = option(0, "generation bound for ROUGE (0: TOFU's, 200 tokens with the prompt)")
    rouge: str = option("porter", "porter: TOFU's stemmed ROUGE; plain: without stemming")
    logprob: str = option("plain", "plain (full logits) or fused (lm_head at answer positions only)")
    dtype: str = option("float32", "float32, bfloat16 or float16")
    device: str = option("cpu", "cpu, cuda, cuda:N, mps")


@dataclass
class AggregateConfig:
    unlearned_logs: str = option("", "a directory with the four logs (eval_log.json, eval_log_forget.json, "
                                 "eval_real_author_wo_options.json, eval_real_world_wo_options.json), "
                                 "or TOFU's eval_log_aggregated.json")
    retain_logs: str = option("", "the retain model's logs (eval_log_forget.json on the same rows); "
                              "without them Forget Quality is unavailable")
    out: str = option("", "also write the metrics to this JSON file")


CHOICES = {"rouge": ROUGE_MODES, "logprob": ("plain", "fused"), "dtype": ("float32", "bfloat16", "float16")}


def parse_config(cls, argv, prog: str, description: str):
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for f in fields(cls):
        parser.add_argument("--" + f.name.replace("_", "-"), type=f.type, default=f.default,
                            help=f.metadata["help"] + (f" (default: {f.default})" if f.default else ""))
    return cls(**vars(parser.parse_args(argv)))


def writable_dir_problem(path: Path) -> str | None:
    """None if files can be created in `path` (made if missing), else why not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        return f"cannot write to {path} ({e.strerror})"
    return None


def check_eval_config(cfg: EvalConfig) -> list[str]:
    """Every problem with the options, found before any work, each naming its option."""
    problems = [f"--{name.replace('_', '-')} must be >= {low}, got {getattr(cfg, name)}"
                for name, low in (("ds_size", 1), ("batch_size", 1), ("max_new_tokens", 0))
                if getattr(cfg, name) < low]
    for name, allowed in {**CHOICES, "prompt_format": tuple(data.PROMPT_FORMATS)}.items():
        if getattr(cfg, name) and getattr(cfg, name) not in allowed:
            problems.append(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                            f"got {getattr(cfg, name)!r}")
    split_ok = re.fullmatch(data.FORGET_SPLIT, cfg.split)
    if not split_ok:
        problems.append(f"--split must be a forget split forgetXX, e.g. forget10, got {cfg.split!r}")
    if cfg.eval_forget_split and not re.fullmatch(data.FORGET_SPLIT + "_perturbed", cfg.eval_forget_split):
        problems.append(f"--eval-forget-split must be forgetXX_perturbed, got {cfg.eval_forget_split!r}")
    vocab_sizes = {}  # of the model directories whose config reads
    for name in ("model", "retain_model", "ref_model"):
        if not (path := getattr(cfg, name)):
            continue
        try:
            if not (Path(path) / "config.json").is_file():
                raise ValueError(f"{path!r} is not a model directory (no config.json)")
            vocab_sizes[name] = load_config(path).vocab_size  # ModelError, naming the file
            if name != "ref_model" and cfg.prompt_format in ("", *data.PROMPT_FORMATS):
                tok = data.load_tokenizer(path)  # must read, and encode a QA pair in the prompt format
                fmt = cfg.prompt_format or data.default_prompt_format(path, tok)
                try:
                    data.encode_qa(tok, data.PROMPT_FORMATS[fmt], "Who?", "Me.")
                except ValueError as e:
                    raise ValueError(f"prompt format {fmt!r} does not fit its tokenizer ({e}); "
                                     "choose one with --prompt-format") from None
        except ValueError as e:
            problems.append(f"--{name.replace('_', '-')}: {e}")
    if vocab_sizes.get("ref_model") and vocab_sizes.get("model") not in (None, vocab_sizes["ref_model"]):
        problems.append(f"--ref-model has a vocabulary of {vocab_sizes['ref_model']} tokens, --model one of "
                        f"{vocab_sizes['model']}; the KL needs the same")
    if not cfg.model:
        problems.append("--model is required")
    if cfg.retain_model and cfg.retain_logs:
        problems.append("--retain-model and --retain-logs: give one of them, not both")
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", cfg.device):
        problems.append(f"--device must be cpu, cuda, cuda:N or mps, got {cfg.device!r}")
    elif cfg.device.startswith("cuda") and int(cfg.device.partition(":")[2] or 0) >= torch.cuda.device_count():
        problems.append(f"--device {cfg.device}: no such CUDA device here ({torch.cuda.device_count()} found)")
    elif cfg.device == "mps" and not torch.backends.mps.is_available():
        problems.append("--device mps: MPS is not available here")
    try:
        data_dir = data.resolve_data_dir(cfg.data_dir or None)
        if data_dir is None:
            problems.append("--data-dir: no TOFU data; pass --data-dir or set TOFU_DATA_DIR")
    except ValueError as e:
        data_dir = None
        problems.append(f"--data-dir: {e}")
    if data_dir is not None and split_ok:  # every split the evaluation reads
        forget_log_split = cfg.eval_forget_split or default_eval_forget_split(data_dir, cfg.split)
        missing = [f"{s.data_split}.json" for s in eval_splits(forget_log_split) if not (data_dir / f"{s.data_split}.json").is_file()]
        if missing:
            which = "--eval-forget-split" if f"{cfg.eval_forget_split}.json" in missing else "--data-dir"
            problems.append(f"{which}: {data_dir} has no {', '.join(missing)}")
    if cfg.retain_logs:  # must describe the rows about to be evaluated
        try:
            retain = read_logs(cfg.retain_logs, (FORGET_STEM,))[FORGET_STEM]
            rows = log_rows(retain, cfg.retain_logs)
            if not problems:  # so data_dir and forget_log_split are known
                if why := retain_rows_mismatch(retain, rows, cfg.retain_logs, data_dir, forget_log_split, cfg.ds_size):
                    problems.append(f"--retain-logs: {why}")
        except ValueError as e:
            problems.append(f"--retain-logs: {e}")
    if cfg.out or (Path(cfg.model) / "config.json").is_file():  # the default lies in the model's
        if (why := writable_dir_problem(output_dir(cfg))) is not None:
            problems.append(f"--out: {why}")
    return problems


def output_dir(cfg: EvalConfig) -> Path:
    return Path(cfg.out) if cfg.out else Path(cfg.model) / "eval_results" / f"ds_size{cfg.ds_size}"


def evaluate_main(argv) -> int:
    cfg = parse_config(EvalConfig, argv, "eval.py", "Evaluate a model on TOFU's four splits; write "
                       "TOFU-format logs and aggregate_stat.json. See also: eval.py aggregate --help")
    if problems := check_eval_config(cfg):
        raise ValueError("\n".join(problems))
    data_dir, out = data.resolve_data_dir(cfg.data_dir or None), output_dir(cfg)
    forget_log_split = cfg.eval_forget_split or default_eval_forget_split(data_dir, cfg.split)

    def evaluate_dir(model_dir, ref_model=None, stems=None):
        model = from_pretrained(model_dir, dtype=getattr(torch, cfg.dtype), device=cfg.device)  # vocabularies checked
        tok = data.load_tokenizer(model_dir)
        fmt = cfg.prompt_format or data.default_prompt_format(model_dir, tok)
        print(f"evaluating {model_dir}: prompt format {fmt}, forget log on {forget_log_split}", file=sys.stderr)
        return evaluate_model(model, tok, data.PROMPT_FORMATS[fmt], data_dir, cfg.split,
                              eval_forget_split=forget_log_split, ds_size=cfg.ds_size, batch_size=cfg.batch_size,
                              max_new_tokens=cfg.max_new_tokens or None, fused=cfg.logprob == "fused",
                              rouge=cfg.rouge, ref_model=ref_model, stems=stems, progress=True)

    ref_model = from_pretrained(cfg.ref_model, getattr(torch, cfg.dtype), cfg.device) if cfg.ref_model else None
    logs = evaluate_dir(cfg.model, ref_model=ref_model)
    write_logs(out, logs)
    del ref_model
    retain_where = cfg.retain_logs or str(out / "retain_model")
    if cfg.retain_model:
        write_logs(retain_where, evaluate_dir(cfg.retain_model, stems=(FORGET_STEM,)))
    retain_logs = read_logs(retain_where, (FORGET_STEM,)) if cfg.retain_model or cfg.retain_logs else None
    metrics = aggregate(logs, retain_logs, where=str(out), retain_where=retain_where)
    data.write_atomic(out / "aggregate_stat.json", json.dumps(metrics, indent=2))
    print(format_table(metrics))
    print(f"logs and aggregate_stat.json written to {out}", file=sys.stderr)
    return 0


def aggregate_main(argv) -> int:
    cfg = parse_config(AggregateConfig, argv, "eval.py aggregate", "TOFU's metrics (Forget Quality, "
                       "Model Utility, ...) from TOFU-format logs, this project's or TOFU's own.")
    problems, logs, retain = [], None, None
    if not cfg.unlearned_logs:
        problems.append("--unlearned-logs is required")
    else:
        try:  # the unlearned logs read and aggregate alone
            logs = read_logs(cfg.unlearned_logs)
            metrics = aggregate(logs, where=cfg.unlearned_logs)
        except LogError as e:
            problems.append(f"--unlearned-logs: {e}")
    try:
        retain = read_logs(cfg.retain_logs, (FORGET_STEM,)) if cfg.retain_logs else None
    except LogError as e:
        problems.append(f"--retain-logs: {e}")
    if cfg.out and Path(cfg.out).is_dir():
        problems.append(f"--out: {cfg.out} is a directory; expected the path of a JSON file")
    elif cfg.out and (why := writable_dir_problem(Path(cfg.out).parent)) is not None:
        problems.append(f"--out: {why}")
    if retain is not None and not problems:
        try:  # the unlearned logs are sound: what fails is the retain logs, or their rows
            metrics = aggregate(logs, retain, where=cfg.unlearned_logs, retain_where=cfg.retain_logs)
        except LogError as e:
            problems.append(f"--retain-logs: {e}")
    if problems:
        raise ValueError("\n".join(problems))
    if cfg.out:
        data.write_atomic(cfg.out, json.dumps(metrics, indent=2))
    print(format_table(metrics))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return aggregate_main(argv[1:]) if argv[:1] == ["aggregate"] else evaluate_main(argv)
    except (ValueError, OSError) as e:  # LogError, DataError, ModelError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
