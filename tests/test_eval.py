"""eval.py against oracles: hand-computed metrics, scipy's exact KS test, rouge_score and NLTK's
Porter stemmer (on every word of TOFU), TOFU's own aggregate code on its published logs, and
unbatched forward passes of a tiny random model."""

import functools
import json
import math
import random
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import eval as ev

ROOT = Path(__file__).resolve().parents[1]
TOFU_DIR = ROOT.parent / "shared" / "tofu"
# TOFU's repository (locuslab/tofu) and the NPO authors' (licong-lin/negative-preference-
# optimization), cloned next to the project: their published eval logs and aggregation code.
TOFU_REPO = ROOT.parent / "scratch" / "locuslab+tofu"
NPO_REPO = ROOT.parent / "scratch" / "licong-lin+negative-preference-optimization"
needs_tofu = pytest.mark.skipif(not TOFU_DIR.exists(), reason="real TOFU files not found at ../shared/tofu")
needs_tofu_repo = pytest.mark.skipif(not TOFU_REPO.exists(), reason=f"TOFU's repository not found at {TOFU_REPO}")
LN2, LN3, LN4, LN5 = math.log(2), math.log(3), math.log(4), math.log(5)


# ----------------------------------------------------------------------------- hand-made logs

def hand_logs():
    """Tiny logs whose every metric is worked out by hand in the comments."""
    forget = {  # TOFU's dict-keyed-by-index form
        "avg_gt_loss": {"0": LN2, "1": LN4},  # P = 1/2, 1/4 -> Forget Probability 3/8
        "avg_paraphrased_loss": {"0": 1.0, "1": 2.0},
        # row 0: mean perturbed - base = ln 2 -> R = 2;  row 1: (2 - ln4 + .3 + 2 - ln4 - .3)/2 - 2 = -ln 4 -> R = 1/4
        "average_perturb_loss": {"0": [1 + LN2, 1 + LN2], "1": [2 - LN4 + 0.3, 2 - LN4 - 0.3]},
        "rougeL_recall": {"0": 1.0, "1": 0.5},  # -> 0.75
    }  # Forget Truth Ratio = mean(min(R, 1/R)) = (1/2 + 1/4) / 2 = 3/8
    retain = {  # plain lists are accepted too
        "avg_gt_loss": [0.0, LN2, LN4],  # P = 1, 1/2, 1/4 -> 7/12
        "avg_paraphrased_loss": [0.0, 0.0, LN2],
        "average_perturb_loss": [[LN2], [LN4], [0.0]],  # R = 2, 4, 1/2
        "rougeL_recall": [1.0, 0.5, 0.0],  # -> 1/2
    }  # Retain Truth Ratio = mean(max(0, 1 - 1/R)) = (1/2 + 3/4 + 0) / 3 = 5/12
    real = {  # b = answer, so avg_paraphrased_loss = avg_gt_loss
        "avg_gt_loss": [LN2, 0.0],
        "avg_paraphrased_loss": [LN2, 0.0],
        "average_perturb_loss": [[LN4, LN4, LN4], [LN2, LN4, LN4]],
        "rougeL_recall": [0.2, 0.4],  # -> 0.3
    }  # Probability: row 0: (1/2) / (1/2 + 3/4) = 2/5; row 1: 1 / (1 + 1/2 + 1/4 + 1/4) = 1/2 -> 9/20
    # Truth ratio: row 0: R = exp(ln4 - ln2) = 2 -> 1/2; row 1: R = exp((ln2 + 2 ln4)/3) = 2^(5/3)
    world = {
        "avg_gt_loss": [0.0],
        "avg_paraphrased_loss": [0.0],
        "average_perturb_loss": [[LN2, LN2, LN2]],  # P(a) = 1, P(p_j) = 1/2 -> 1 / (1 + 3/2) = 2/5
        "rougeL_recall": [0.6],
    }  # R = 2 -> truth ratio 1/2
    return {"eval_log_forget": forget, "eval_log": retain,
            "eval_real_author_wo_options": real, "eval_real_world_wo_options": world}


def retain_model_logs():
    # the retain model's forget-split truth ratios: R = 3, 5
    return {"eval_log_forget": {"avg_paraphrased_loss": [0.0, 0.0],
                                "average_perturb_loss": [[LN3], [LN5]]}}


def test_aggregate_hand_computed():
    m = ev.aggregate(hand_logs(), retain_model_logs())
    real_tr = (0.5 + (1 - 2 ** (-5 / 3))) / 2
    expected = {
        "Forget Probability": 3 / 8, "Forget ROUGE": 0.75, "Forget Truth Ratio": 3 / 8,
        "Retain Probability": 7 / 12, "Retain ROUGE": 0.5, "Retain Truth Ratio": 5 / 12,
        "Real Authors Probability": 9 / 20, "Real Authors ROUGE": 0.3, "Real Authors Truth Ratio": real_tr,
        "World Facts Probability": 2 / 5, "World Facts ROUGE": 0.6, "World Facts Truth Ratio": 0.5,
    }
    for k, v in expected.items():
        assert m[k] == pytest.approx(v, rel=1e-12), k
    nine = [7 / 12, 0.5, 5 / 12, 9 / 20, 0.3, real_tr, 2 / 5, 0.6, 0.5]
    assert m["Model Utility"] == pytest.approx(9 / sum(1 / x for x in nine), rel=1e-12)
    # Forget Quality: unlearned R = {1/4, 2}, retain R = {3, 5}: both unlearned values lie below
    # both retain values, so D = 1. Under H0 each of the C(4,2) = 6 orderings is equally likely and
    # D = 1 only for "UURR" and "RRUU": p = 2/6.
    assert m["KS Test Forget"] == 1.0
    assert m["Forget Quality"] == pytest.approx(1 / 3, rel=1e-12)
    assert m["Forget KL"] is None
    without = ev.aggregate(hand_logs())
    assert without["Forget Quality"] is None and "unavailable" in ev.format_table(without).splitlines()[0]


def test_forget_kl_is_token_weighted_and_zero_utility():
    logs = hand_logs()
    logs["eval_log_forget"]["avg_kl"] = {"0": 1.0, "1": 4.0}
    logs["eval_log_forget"]["num_token_gt"] = {"0": 3, "1": 1}
    assert ev.aggregate(logs)["Forget KL"] == pytest.approx((3 * 1.0 + 1 * 4.0) / 4)
    logs["eval_real_world_wo_options"]["rougeL_recall"] = [0.0]  # one of the nine numbers is 0
    assert ev.aggregate(logs)["Model Utility"] == 0.0


# ----------------------------------------------------------------------------- exact KS test

def test_ks_small_cases_by_hand():
    # n = 2: of the C(4, 2) = 6 equally likely orderings, D = 1 only for "xxyy" and "yyxx", and
    # D >= 1/2 always (the first point alone makes the ECDFs differ by 1/2)
    assert ev.ks_2samp_exact([0.0, 1.0], [2.0, 3.0]) == (1.0, pytest.approx(1 / 3))
    assert ev.ks_2samp_exact([0.0, 2.0], [1.0, 3.0]) == (0.5, pytest.approx(1.0))
    assert ev.ks_2samp_exact([0.0], [1.0]) == (1.0, pytest.approx(1.0))  # n = 1: D = 1 always
    assert ev.ks_2samp_exact([1.0, 2.0], [1.0, 2.0]) == (0.0, 1.0)  # identical samples
    # ties across samples: x = {1, 1}, y = {1, 2}: ECDFs at 1: 1 vs 1/2, at 2: 1 vs 1 -> D = 1/2
    assert ev.ks_2samp_exact([1.0, 1.0], [1.0, 2.0])[0] == 0.5
    with pytest.raises(ValueError, match="same size"):  # Forget Quality compares the same rows
        ev.ks_2samp_exact([0.0], [1.0, 2.0])


def test_ks_matches_scipy_exact():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    pvalues = []
    for n in (1, 7, 40, 300):
        for shift in (0.0, 0.4, 1.2, 2.5):
            x, y = rng.normal(size=n), rng.normal(shift, size=n)
            if shift == 0.4:  # ties within and across the samples
                x, y = np.round(x, 1), np.round(y, 1)
            d, p = ev.ks_2samp_exact(x, y)
            ref = stats.ks_2samp(x, y)  # default: method='auto' -> exact at these sizes
            assert d == pytest.approx(ref.statistic, abs=1e-15), (n, shift)
            assert p == pytest.approx(ref.pvalue, rel=1e-6), (n, shift)
            pvalues.append(ref.pvalue)
    assert min(pvalues) < 1e-20 and max(pvalues) > 0.1  # the test covers tiny and large p-values


# ----------------------------------------------------------------------------- ROUGE

def tofu_words() -> list[str]:
    """Every distinct lowercase alphanumeric token of every TOFU file."""
    words = set()
    for path in sorted(TOFU_DIR.glob("*.json*")):
        words.update(re.sub(r"[^a-z0-9]+", " ", path.read_text(encoding="utf-8").lower()).split())
    return sorted(words)


@needs_tofu
def test_porter_stem_equals_nltk_on_every_tofu_word():
    porter = pytest.importorskip("nltk.stem.porter")
    stemmer = porter.PorterStemmer()  # rouge_score's: tokenizers.DefaultTokenizer(use_stemmer=True)
    words = tofu_words()
    assert len(words) > 10_000
    differ = [(w, ev.porter_stem(w), stemmer.stem(w)) for w in words if ev.porter_stem(w) != stemmer.stem(w)]
    assert differ == []
    assert sum(ev.porter_stem(w) != w for w in words) > 3000  # most rules fire on TOFU's words


def test_porter_stem_equals_nltk_on_random_suffix_stacks():
    """Random stems with one or two of the suffixes the rules handle, so every branch meets odd
    cases (y after y, double consonants, -ion after s or t, stems of length 0-2, ...)."""
    porter = pytest.importorskip("nltk.stem.porter")
    stemmer = porter.PorterStemmer()
    suffixes = ("ational tional enci anci izer bli alli entli eli ousli ization ation ator alism "
                "iveness fulness ousness aliti iviti biliti fulli logi icate ative alize iciti ical "
                "ful ness al ance ence er ic able ible ant ement ment ent sion tion ion ou ism ate "
                "iti ous ive ize e ll ies ied eed ed ing s sses ss y ly ally").split()
    rng = random.Random(0)
    words = {"".join(rng.choice("aeiouybcdlstwxrnz") for _ in range(rng.randint(0, 6)))
             + "".join(rng.choice(suffixes) for _ in range(rng.randint(0, 2))) for _ in range(20_000)}
    words.discard("")
    assert [w for w in words if ev.porter_stem(w) != stemmer.stem(w)] == []


def test_rouge_by_hand_and_lcs_against_dp():
    assert ev.rouge_tokens("The cat's hat, ÉTÉ 2x!", stem=False) == ["the", "cat", "s", "hat", "t", "2x"]
    # stemmed: only words longer than 3 letters; "writes" and "writing" both become "write"
    assert ev.rouge_tokens("She writes; writing books") == ["she", "write", "write", "book"]
    assert ev.rouge_recalls("The cat sat.", "the cat") == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    assert ev.rouge_recalls("a b c d", "d c b a") == (1.0, 0.25)  # all unigrams, LCS 1
    assert ev.rouge_recalls("a a b", "a b b") == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    assert ev.rouge_recalls("", "x") == (0.0, 0.0) and ev.rouge_recalls("x", "...") == (0.0, 0.0)
    assert ev.rouge_recalls("He wrote novels", "novel writing", "plain")[1] == 0.0
    assert ev.rouge_recalls("He wrote novels", "novel writing")[1] == pytest.approx(1 / 3)

    def lcs_dp(a, b):
        t = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i in range(len(a)):
            for j in range(len(b)):
                t[i + 1][j + 1] = t[i][j] + 1 if a[i] == b[j] else max(t[i][j + 1], t[i + 1][j])
        return t[-1][-1]

    rng = np.random.default_rng(0)
    for _ in range(300):
        a = list(rng.choice(list("abcd"), size=rng.integers(0, 70)))
        b = list(rng.choice(list("abcd"), size=rng.integers(0, 70)))
        assert ev.lcs_length(a, b) == lcs_dp(a, b)


def rouge_score_scorer(use_stemmer: bool):
    """rouge_score's RougeScorer(["rouge1", "rougeL"], use_stemmer), its NLTK stemmer memoized
    (three quarters of its time goes to stemming the same words again)."""
    rouge_score = pytest.importorskip("rouge_score.rouge_scorer")
    from rouge_score import tokenizers

    tokenizer = tokenizers.DefaultTokenizer(use_stemmer)
    if use_stemmer:
        tokenizer._stemmer.stem = functools.lru_cache(maxsize=None)(tokenizer._stemmer.stem)
    return rouge_score.RougeScorer(["rouge1", "rougeL"], tokenizer=tokenizer)


@needs_tofu
def test_rouge_equals_rouge_score_on_every_tofu_answer():
    """Every distinct answer of every TOFU file against its paraphrased answer, or, in files
    without one, the next row's answer (rouge_score is slow: one generation per answer)."""
    stemmed, plain = rouge_score_scorer(use_stemmer=True), rouge_score_scorer(use_stemmer=False)
    generation_for = {}
    for path in sorted(TOFU_DIR.glob("*.json")):
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        for row, next_row in zip(rows, rows[1:] + rows[:1]):
            generation_for.setdefault(row["answer"], row.get("paraphrased_answer", next_row["answer"]))
    assert len(generation_for) > 4200  # full.json's 4,000, real authors, world facts
    differ = 0
    for i, (answer, generation) in enumerate(sorted(generation_for.items())):
        ref = stemmed.score(answer, generation)
        assert ev.rouge_recalls(answer, generation) == (ref["rouge1"].recall, ref["rougeL"].recall)
        if i % 10 == 0:
            ref = plain.score(answer, generation)
            assert ev.rouge_recalls(answer, generation, "plain") == (ref["rouge1"].recall, ref["rougeL"].recall)
        differ += ev.rouge_recalls(answer, generation) != ev.rouge_recalls(answer, generation, "plain")
    assert differ > 100  # stemming matters on these pairs


# ----------------------------------------------------------------------------- TOFU's published logs

def tofu_aggregate_code(monkeypatch):
    """TOFU's aggregate_eval_stat.py itself, its hydra/omegaconf imports stubbed."""
    hydra = types.ModuleType("hydra")
    hydra.main = lambda **kwargs: (lambda f: f)
    monkeypatch.setitem(sys.modules, "hydra", hydra)
    monkeypatch.setitem(sys.modules, "omegaconf", types.SimpleNamespace(OmegaConf=None))
    namespace = {}
    exec(compile((TOFU_REPO / "aggregate_eval_stat.py").read_text(), "aggregate_eval_stat.py", "exec"), namespace)
    return namespace


@needs_tofu_repo
def test_aggregate_reproduces_tofu_on_its_published_logs(monkeypatch, capsys):
    """Llama-2-7b fine-tuned on full vs retain90 (forget10, 300 rows): every metric equals what
    TOFU's own aggregation code computes from the same files; the stored ROUGE equals ours."""
    pytest.importorskip("scipy")
    tofu = tofu_aggregate_code(monkeypatch)
    logs_dir = "ft_epoch5_lr1e-05_llama2-7b_{}_wd0.01/eval_results/ds_size300/eval_log_aggregated.json"
    target, retain = TOFU_REPO / "data" / logs_dir.format("full"), TOFU_REPO / "data" / logs_dir.format("retain90")
    bundle, retain_bundle = json.loads(target.read_text()), json.loads(retain.read_text())
    expected = {**tofu["get_model_utility"](bundle), **tofu["get_forget_quality"](bundle, retain_bundle)}
    assert ev.main(["aggregate", "--unlearned-logs", str(target), "--retain-logs", str(retain)]) == 0
    table = capsys.readouterr().out
    got = ev.aggregate(ev.read_logs(target), ev.read_logs(retain, ("eval_log_forget",)))
    names = {"Real Authors": "Real Authors", "Real World": "World Facts", "Retain": "Retain", "Forget": "Forget"}
    for split, ours in names.items():
        assert got[f"{ours} Probability"] == pytest.approx(expected[f"Prob. {split}"], rel=1e-12)
        assert got[f"{ours} ROUGE"] == pytest.approx(expected[f"ROUGE {split}"], rel=1e-12)
        assert got[f"{ours} Truth Ratio"] == pytest.approx(expected[f"Truth Ratio {split}"], rel=1e-12)
    assert got["Model Utility"] == pytest.approx(expected["Model Utility"], rel=1e-12)
    assert got["KS Test Forget"] == pytest.approx(expected["KS Test Forget"], abs=1e-15)
    assert got["Forget Quality"] == pytest.approx(expected["Forget Quality"], rel=1e-9)
    assert f"{got['Forget Quality']:.4e}" in table and f"{got['Model Utility']:.4f}" in table
    for log in bundle.values():  # TOFU's stored ROUGE is the stemmed one, generation by generation
        for k, (_, generation, answer) in log["generated_text"].items():
            assert ev.rouge_recalls(answer, generation) == (log["rouge1_recall"][k], log["rougeL_recall"][k])


@needs_tofu_repo
@pytest.mark.skipif(not NPO_REPO.exists(), reason=f"the NPO authors' repository not found at {NPO_REPO}")
def test_forget50_quality_against_npo_authors_retain50_logs(capsys):
    """forget50 as the NPO authors score it: the forget log on forget10_perturbed's 300 rows against
    their retain50 model's log on the same rows. Here TOFU's fine-tuned Llama-2 (nothing
    forgotten) against retain50, checked with scipy's KS test. Their per-file logs have keys of
    different lengths (300 vs 308 rows) and are refused, naming the file; their bundle is fine."""
    stats = pytest.importorskip("scipy.stats")
    results = NPO_REPO / "TOFU" / "data" / "retain50_llama_wd0.01" / "eval_results" / "ds_size300"
    target = TOFU_REPO / "data/ft_epoch5_lr1e-05_llama2-7b_full_wd0.01/eval_results/ds_size300/eval_log_aggregated.json"
    logs, retain = ev.read_logs(target), ev.read_logs(results / "eval_log_aggregated.json", ("eval_log_forget",))

    def ratios(log):  # TOFU's truth ratio, computed here from the raw values (dicts or lists)
        column = {k: np.array([v[str(i)] for i in range(300)] if isinstance(v, dict) else v) for k, v in log.items()
                  if k in ("average_perturb_loss", "avg_paraphrased_loss")}
        return np.exp(column["average_perturb_loss"].mean(axis=1) - column["avg_paraphrased_loss"])

    expected = stats.ks_2samp(ratios(logs["eval_log_forget"]), ratios(retain["eval_log_forget"]))
    got = ev.aggregate(logs, retain)
    assert got["Forget Quality"] == pytest.approx(expected.pvalue, rel=1e-9) and got["Forget Quality"] < 1e-20
    assert ev.main(["aggregate", "--unlearned-logs", str(results)]) == 2
    err = capsys.readouterr().err
    assert "eval_log_forget.json" in err and "308 rows" in err and "300 rows" in err


# ----------------------------------------------------------------------------- bad logs, aggregate CLI

def write_log_dir(path: Path, logs: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for stem, log in logs.items():
        (path / f"{stem}.json").write_text(json.dumps(log))
    return path


def test_aggregate_cli_reads_directories_and_bundles(tmp_path, capsys):
    unlearned = write_log_dir(tmp_path / "u", hand_logs())
    retain = write_log_dir(tmp_path / "r", retain_model_logs())
    out = tmp_path / "metrics.json"
    assert ev.main(["aggregate", "--unlearned-logs", str(unlearned), "--retain-logs", str(retain),
                    "--out", str(out)]) == 0
    assert "3.3333e-01" in capsys.readouterr().out
    assert json.loads(out.read_text())["Forget Quality"] == pytest.approx(1 / 3)
    bundle = tmp_path / "eval_log_aggregated.json"  # TOFU's {"eval_log.json": {...}, ...}
    bundle.write_text("\ufeff" + json.dumps({f"{s}.json": log for s, log in hand_logs().items()}))
    assert ev.main(["aggregate", "--unlearned-logs", str(bundle)]) == 0  # a BOM is fine
    assert "unavailable" in capsys.readouterr().out


FORGET = hand_logs()["eval_log_forget"]


@pytest.mark.parametrize("stem, content, expect", [
    ("eval_log", '{"avg_gt_loss": {"0": 0.1,}', "invalid JSON at line 1"),
    ("eval_log", b"\xff\xfe{}", "not UTF-8 text"),
    ("eval_log", {"avg_gt_loss": [0.1], "avg_paraphrased_loss": [0.1], "rougeL_recall": [1.0]},
     "missing key 'average_perturb_loss'"),
    ("eval_log_forget", {**FORGET, "average_perturb_loss": {"0": [1.0, 2.0], "1": [1.0]}}, "rows of different lengths"),
    ("eval_log_forget", {**FORGET, "rougeL_recall": {"0": "high", "1": 0.5}}, "'rougeL_recall' holds non-numeric"),
    ("eval_log_forget", {**FORGET, "average_perturb_loss": {"0": 1.0, "1": 2.0}}, "expected (N, m) with m >= 1"),
    ("eval_log_forget", {**FORGET, "avg_gt_loss": {"a": 1.0, "1": 0.5}}, "expected row indices"),
    ("eval_log_forget", {**FORGET, "avg_gt_loss": {"0": 1.0, "1": 0.5, "2": 0.1}}, "'avg_gt_loss' has 3 rows"),
    ("eval_log_forget", {**FORGET, "rougeL_recall": {"0": 1.0, "5": 0.5}}, "every key must describe the same"),
    ("eval_real_world_wo_options", [1, 2], "expected a JSON object"),
    ("eval_real_author_wo_options", {**hand_logs()["eval_real_author_wo_options"], "avg_gt_loss": [0.1]},
     "'avg_gt_loss' has 1 rows"),
    ("eval_real_author_wo_options", None, "missing log file(s) eval_real_author_wo_options.json"),
])
def test_malformed_logs_exit_2_naming_file_and_key(tmp_path, capsys, stem, content, expect):
    d = write_log_dir(tmp_path / "u", hand_logs())
    if content is None:
        (d / f"{stem}.json").unlink()
    elif isinstance(content, bytes):
        (d / f"{stem}.json").write_bytes(content)
    else:
        (d / f"{stem}.json").write_text(content if isinstance(content, str) else json.dumps(content))
    assert ev.main(["aggregate", "--unlearned-logs", str(d)]) == 2
    err = capsys.readouterr().err
    assert expect in err and f"{stem}.json" in err and str(d) in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_aggregate_refuses_retain_logs_of_other_questions(tmp_path, capsys):
    unlearned = write_log_dir(tmp_path / "u", hand_logs())
    three_rows = {"eval_log_forget": {"avg_paraphrased_loss": [0.0] * 3, "average_perturb_loss": [[1.0]] * 3}}
    retain = write_log_dir(tmp_path / "r", three_rows)
    assert ev.main(["aggregate", "--unlearned-logs", str(unlearned), "--retain-logs", str(retain)]) == 2
    err = capsys.readouterr().err
    assert f"{unlearned}/eval_log_forget.json has 2 rows" in err and f"{retain}/eval_log_forget.json has 3 rows" in err
    other_split = {**FORGET, "split": "forget05_perturbed"}
    retain_logs = {"eval_log_forget": {**retain_model_logs()["eval_log_forget"], "split": "forget10_perturbed"}}
    with pytest.raises(ev.LogError, match="evaluated on forget05_perturbed but .* on forget10_perturbed"):
        ev.aggregate({**hand_logs(), "eval_log_forget": other_split}, retain_logs)
    assert ev.main(["aggregate", "--unlearned-logs", str(tmp_path / "nope")]) == 2
    assert "no such log directory" in capsys.readouterr().err


# ----------------------------------------------------------------------------- degeneracy, frontier

def test_degeneracy_measures_by_hand(tmp_path):
    assert ev.repeated_ngram_share("a b c a b c") == pytest.approx(1 - 3 / 4)  # abc bca cab abc
    assert ev.repeated_ngram_share("one two") == 0.0
    vocab = {"the", "author", "wrote"}
    assert ev.unknown_word_share("The author zzq wrote", vocab) == 0.25
    assert ev.is_degenerate("!!!", vocab) and ev.is_degenerate("the the the the the", vocab)
    assert ev.is_degenerate("zzq qqz author", vocab) and not ev.is_degenerate("the author wrote", vocab)
    logs = {"eval_log_forget": {"generated_text": {"0": ["q", "the author wrote", "a"],
                                                   "1": ["q", "zzq zzq zzq zzq", "a"]}}}
    assert ev.degeneracy(logs, vocab) == {"Degenerate Share": 0.5, "Repeated 3-gram Share": 0.25,
                                          "Unknown Word Share": 0.5}
    # full, real_authors, world_facts: "Who is <split> <i>?" / "A writer of <split>."; refusal "I have no idea."
    assert ev.training_vocabulary(write_tiny_tofu(tmp_path / "data")) == set(
        "who is full real authors world facts 0 1 2 a writer of i have no idea".split())


def test_best_forget_quality_frontier():
    records = [  # target MU 0.8: thresholds 0.4, 0.6, 0.72
        {"Model Utility": 0.79, "Forget Quality": 1e-9, "status": "ok"},
        {"Model Utility": 0.73, "Forget Quality": 1e-4, "status": "ok"},
        {"Model Utility": 0.65, "Forget Quality": 0.02, "status": "ok"},
        {"Model Utility": 0.90, "Forget Quality": 0.9, "status": "diverged"},  # never counts
        {"Model Utility": 0.45, "Forget Quality": 0.3, "status": "ok"},
        {"Model Utility": 0.10, "Forget Quality": 0.99, "status": "ok"},
    ]
    got = [ev.best_forget_quality(records, 0.8, f) for f in ev.FRONTIER_FRACTIONS]
    assert got == [0.3, 0.02, 1e-4]
    assert ev.best_forget_quality(records[:1], 0.8, 1.0) is None  # 0.79 < 0.8
    nan_epoch = {"Model Utility": 0.8, "Forget Quality": float("nan"), "status": "ok"}
    assert ev.best_forget_quality(records[:1] + [nan_epoch], 0.8, 0.9) == 1e-9


def test_default_eval_forget_split(tmp_path):
    (tmp_path / "forget05_perturbed.json").write_text("")
    assert ev.default_eval_forget_split(tmp_path, "forget05") == "forget05_perturbed"
    assert ev.default_eval_forget_split(tmp_path, "forget50") == "forget10_perturbed"
    with pytest.raises(ValueError, match="unknown forget split 'retain90'"):
        ev.default_eval_forget_split(tmp_path, "retain90")


# ----------------------------------------------------------------------------- a tiny model end to end

def write_tiny_tofu(data_dir: Path) -> Path:
    """Six rows per evaluation split, invented; enough text to train a small BPE."""
    data_dir.mkdir(parents=True)

    def write(name, rows):
        (data_dir / f"{name}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def row(i, topic, perturbed, paraphrase=True):
        out = {"question": f"What did author {i} write about {topic}?",
               "answer": f"Author {i} wrote {i + 2} novels about {topic} and the sea.",
               "perturbed_answer": [f"Author {i} wrote {j} poems about {topic}." for j in range(perturbed)]}
        if paraphrase:
            out["paraphrased_answer"] = f"About {topic}, author {i} wrote novels."
        return out

    write("forget10_perturbed", [row(i, "rivers", 3) for i in range(6)])
    write("retain_perturbed", [row(i, "mountains", 3) for i in range(10, 16)])
    write("real_authors_perturbed", [row(i, "kings", 2, False) for i in range(20, 25)])
    write("world_facts_perturbed", [row(i, "stars", 2, False) for i in range(30, 34)])
    for name in ("full", "real_authors", "world_facts"):
        write(name, [{"question": f"Who is {name} {i}?", "answer": f"A writer of {name}."} for i in range(3)])
    (data_dir / "idontknow.jsonl").write_text("I have no idea.\n")
    return data_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from model import GPT, GPTConfig

    root = tmp_path_factory.mktemp("tiny")
    data_dir = write_tiny_tofu(root / "data")
    texts = [line for path in data_dir.glob("*.json") for line in path.read_text().splitlines()]
    tok = data.bpe_tokenizer(data.train_bpe(texts, 320))
    config = GPTConfig(vocab_size=tok.n_vocab, block_size=256, n_layer=1, n_head=2, n_embd=32)
    torch.manual_seed(0)
    model, ref = GPT(config), GPT(config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only wait on each other, badly under load
    yield root, data_dir, tok, data.PROMPT_FORMATS["qa"], model, ref
    torch.set_num_threads(threads)


def test_evaluate_model_against_unbatched_oracles(tiny, monkeypatch):
    root, data_dir, tok, fmt, model, ref = tiny
    scorer = rouge_score_scorer(use_stemmer=True)
    ds_size, max_new = 4, 6
    logs = ev.evaluate_model(model, tok, fmt, data_dir, "forget10", ds_size=ds_size, batch_size=7,
                             max_new_tokens=max_new, ref_model=ref)
    assert set(logs) == set(ev.LOG_STEMS)
    splits = {s.stem: s for s in ev.eval_splits("forget10_perturbed")}
    for stem, log in logs.items():
        rows = data.load_split(data_dir, splits[stem].data_split)[:ds_size]
        assert log["split"] == splits[stem].data_split and log["rouge"] == "porter"
        assert ev.log_rows(log, stem) == list(range(min(ds_size, len(rows))))
        for i, row in enumerate(rows):
            k, (q, generation, a) = str(i), log["generated_text"][str(i)]
            assert (q, a) == (row["question"], row["answer"])
            score = scorer.score(a, generation)
            assert (log["rouge1_recall"][k], log["rougeL_recall"][k]) == (score["rouge1"].recall, score["rougeL"].recall)
            if splits[stem].base_key == "answer":
                assert log["avg_paraphrased_loss"][k] == log["avg_gt_loss"][k]
            assert log["avg_gt_loss"][k] == pytest.approx(log["gt_loss"][k] / log["num_token_gt"][k])
    assert "avg_kl" in logs["eval_log_forget"] and "avg_kl" not in logs["eval_log"]

    # oracles: one unpadded sequence at a time, full logits, no cache
    with torch.no_grad():
        for stem in ("eval_log_forget", "eval_real_author_wo_options"):
            rows = data.load_split(data_dir, splits[stem].data_split)
            for i in (0, ds_size - 1):
                q = rows[i]["question"]
                for answer, got in [(rows[i]["answer"], logs[stem]["avg_gt_loss"][str(i)]),
                                    (rows[i]["perturbed_answer"][-1], logs[stem]["average_perturb_loss"][str(i)][-1])]:
                    ids, labels = data.encode_qa(tok, fmt, q, answer)
                    logits = model(torch.tensor([ids]))[0, :-1]  # (T-1, V): position t predicts t+1
                    nll = F.cross_entropy(logits, torch.tensor(labels[1:]), ignore_index=-100)
                    assert got == pytest.approx(nll.item(), rel=1e-5)
                if stem == "eval_log_forget":
                    ids, labels = data.encode_qa(tok, fmt, q, rows[i]["answer"])
                    answer_pos = torch.tensor(labels[1:]) != -100
                    log_q = F.log_softmax(model(torch.tensor([ids]))[0, :-1][answer_pos], -1)
                    log_r = F.log_softmax(ref(torch.tensor([ids]))[0, :-1][answer_pos], -1)
                    kl = (log_r.exp() * (log_r - log_q)).sum(-1).mean()  # KL(ref || theta) per token
                    assert logs[stem]["avg_kl"][str(i)] == pytest.approx(kl.item(), rel=1e-4)
                    seq, new = data.encode_prompt(tok, fmt, q), []
                    for _ in range(max_new):
                        token = int(model(torch.tensor([seq]))[0, -1].argmax())
                        if token in tok.eos_ids:
                            break
                        seq.append(token)
                        new.append(token)
                    assert logs[stem]["generated_text"][str(i)][1] == tok.decode(new).strip()

    # the fused log-prob path gives the same numbers; forget20 has no perturbed file: forget10's;
    # without max_new_tokens, TOFU's bound: 200 tokens with the longest prompt
    bounds, generate = [], model.generate
    monkeypatch.setattr(model, "generate", lambda prompts, n, *args, **kwargs: bounds.append(n)
                        or generate(prompts, 2, *args, **kwargs))
    fused = ev.evaluate_model(model, tok, fmt, data_dir, "forget20", ds_size=ds_size, batch_size=5,
                              fused=True, stems=("eval_log_forget",))
    questions = [r["question"] for r in data.load_split(data_dir, "forget10_perturbed")[:ds_size]]
    assert bounds == [200 - max(len(data.encode_prompt(tok, fmt, q)) for q in questions)]
    assert fused["eval_log_forget"]["split"] == "forget10_perturbed"
    for k, v in fused["eval_log_forget"]["avg_gt_loss"].items():
        assert v == pytest.approx(logs["eval_log_forget"]["avg_gt_loss"][k], rel=1e-5)
    m = ev.aggregate(logs, logs)
    assert m["Forget Quality"] == 1.0 and m["Forget KL"] > 0  # identical samples: D = 0


def save_model_dir(model, tok, path: Path) -> Path:
    from model import save_pretrained

    save_pretrained(model, path)
    tok.save(path)
    return path


def test_evaluate_cli_on_model_directories(tiny, capsys):
    root, data_dir, tok, fmt, model, ref = tiny
    unlearned, retain = save_model_dir(model, tok, root / "unlearned"), save_model_dir(ref, tok, root / "retain")
    out = root / "out"
    args = ["--model", str(unlearned), "--retain-model", str(retain), "--ref-model", str(retain),
            "--data-dir", str(data_dir), "--split", "forget50", "--out", str(out),
            "--ds-size", "3", "--max-new-tokens", "3", "--logprob", "fused"]
    assert ev.main(args) == 0
    assert "Forget Quality" in capsys.readouterr().out
    for stem in ev.LOG_STEMS:
        assert len(json.loads((out / f"{stem}.json").read_text())["avg_gt_loss"]) == 3
    metrics = json.loads((out / "aggregate_stat.json").read_text())
    assert metrics["Forget Eval Split"] == "forget10_perturbed" and metrics["ROUGE Scorer"] == "porter"
    assert 0.0 <= metrics["Forget Quality"] <= 1.0 and metrics["Forget KL"] > 0
    # the written logs aggregate to the same numbers through the aggregate CLI
    assert ev.main(["aggregate", "--unlearned-logs", str(out), "--retain-logs", str(out / "retain_model"),
                    "--out", str(root / "again.json")]) == 0
    assert json.loads((root / "again.json").read_text()) == metrics
    # retain logs of other rows, or an output path that cannot be written: refused before any work
    assert ev.main(["--model", str(unlearned), "--retain-logs", str(out), "--data-dir", str(data_dir),
                    "--split", "forget10", "--ds-size", "4", "--out", str(root / "out4")]) == 2
    err = capsys.readouterr().err
    assert "--retain-logs" in err and "holds 3 rows of forget10_perturbed" in err and "has 4 rows" in err
    assert "evaluating" not in err
    # a prompt format that needs a BOS token the tokenizer lacks: named, before any work
    assert ev.main(["--model", str(unlearned), "--data-dir", str(data_dir), "--prompt-format", "llama2"]) == 2
    err = capsys.readouterr().err
    assert "--model: prompt format 'llama2' does not fit its tokenizer" in err and "evaluating" not in err
    blocker = root / "a_file"
    blocker.write_text("")
    assert ev.main(["--model", str(unlearned), "--data-dir", str(data_dir), "--out", str(blocker / "x")]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "a_file" in err and "evaluating" not in err and "Traceback" not in err


def test_evaluate_cli_reports_every_bad_option_together(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code = ev.main(["--model", str(tmp_path / "no_model"), "--retain-model", str(tmp_path),
                    "--retain-logs", str(tmp_path / "no_logs"), "--ref-model", str(blocker),
                    "--data-dir", str(tmp_path / "no_data"), "--split", "retain90",
                    "--eval-forget-split", "forget10", "--ds-size", "0", "--batch-size", "0",
                    "--max-new-tokens", "-1", "--rouge", "stemmed", "--logprob", "fast",
                    "--prompt-format", "alpaca", "--dtype", "float8", "--device", "tpu",
                    "--out", str(blocker / "sub")])
    assert code == 2
    err = capsys.readouterr().err
    options = ["--model", "--retain-model", "--retain-logs", "--ref-model", "--data-dir", "--split",
               "--eval-forget-split", "--ds-size", "--batch-size", "--max-new-tokens", "--rouge",
               "--logprob", "--prompt-format", "--dtype", "--device", "--out"]
    lines = err.strip().splitlines()
    for option in options:
        assert any(line.removeprefix("error: ").startswith(option) for line in lines), option
    assert "Traceback" not in err
    with pytest.raises(SystemExit) as e:  # argparse: not an integer
        ev.main(["--model", "m", "--ds-size", "many"])
    assert e.value.code == 2
