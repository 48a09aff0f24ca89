"""eval.py: TOFU metrics against hand-computed values, scipy's exact KS test, rouge_score, and
an end-to-end run on a tiny random model with generated data."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import eval as ev

TOFU_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "tofu"
needs_tofu = pytest.mark.skipif(not TOFU_DIR.exists(), reason="real TOFU files not found at ../shared/tofu")
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


def test_forget_quality_unavailable_without_retain_logs():
    m = ev.aggregate(hand_logs())
    assert m["Forget Quality"] is None
    assert "unavailable" in ev.format_table(m).splitlines()[0]


def test_forget_kl_is_token_weighted():
    logs = hand_logs()
    logs["eval_log_forget"]["avg_kl"] = {"0": 1.0, "1": 4.0}
    logs["eval_log_forget"]["num_token_gt"] = {"0": 3, "1": 1}
    assert ev.aggregate(logs)["Forget KL"] == pytest.approx((3 * 1.0 + 1 * 4.0) / 4)


def test_harmonic_mean_and_zero_case():
    assert ev.harmonic_mean([1, 2, 4]) == pytest.approx(3 / (1 + 1 / 2 + 1 / 4))
    assert ev.harmonic_mean([1, 0, 2]) == 0.0
    logs = hand_logs()
    logs["eval_real_world_wo_options"]["rougeL_recall"] = [0.0]  # one of the nine numbers is 0
    assert ev.aggregate(logs)["Model Utility"] == 0.0


# ----------------------------------------------------------------------------- exact KS test

def test_ks_small_cases_by_hand():
    # n=1, m=2: the x value is first, middle or last with probability 1/3 each; D = 1 when first
    # or last, 1/2 in the middle. Observed x below both y: D = 1, p = P(D >= 1) = 2/3.
    assert ev.ks_2samp_exact([0.0], [1.0, 2.0]) == (1.0, pytest.approx(2 / 3))
    assert ev.ks_2samp_exact([1.5], [1.0, 2.0]) == (0.5, pytest.approx(1.0))
    assert ev.ks_2samp_exact([1.0, 2.0], [1.0, 2.0]) == (0.0, 1.0)  # identical samples
    # ties across samples: x = {1, 1}, y = {1, 2}: ECDFs at 1: 1 vs 1/2, at 2: 1 vs 1 -> D = 1/2
    assert ev.ks_2samp_exact([1.0, 1.0], [1.0, 2.0])[0] == 0.5


def test_ks_matches_scipy_exact():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    pvalues = []
    for n in (40, 200, 300, 400):
        for m in (40, 200, 300, 400):
            for shift in (0.0, 0.4, 1.2, 2.5):
                x, y = rng.normal(size=n), rng.normal(shift, size=m)
                if shift == 0.4:  # ties within and across the samples
                    x, y = np.round(x, 1), np.round(y, 1)
                d, p = ev.ks_2samp_exact(x, y)
                ref = stats.ks_2samp(x, y)  # default: method='auto' -> exact at these sizes
                assert d == pytest.approx(ref.statistic, abs=1e-15), (n, m, shift)
                assert p == pytest.approx(ref.pvalue, rel=1e-6), (n, m, shift)
                pvalues.append(ref.pvalue)
    assert min(pvalues) < 1e-20 and max(pvalues) > 0.1  # the test covers tiny and large p-values


# ----------------------------------------------------------------------------- ROUGE-L

def test_rouge_by_hand_and_lcs_against_dp():
    assert ev.rouge_tokens("The cat's hat, ÉTÉ 2x!") == ["the", "cat", "s", "hat", "t", "2x"]
    assert ev.rouge_l_recall("The cat sat.", "the cat") == pytest.approx(2 / 3)
    assert ev.rouge_l_recall("a b c d", "d c b a") == 0.25
    assert ev.rouge_l_recall("", "x") == 0.0 and ev.rouge_l_recall("x", "...") == 0.0

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


@needs_tofu
def test_rouge_matches_rouge_score_on_tofu_pairs():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    plain = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    stemmed = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    option = ev.make_rouge_scorer("rouge_score")
    rows = [json.loads(line) for line in (TOFU_DIR / "forget10_perturbed.json").read_text().splitlines()]
    pairs = [(r["answer"], r["paraphrased_answer"]) for r in rows]
    assert len(pairs) >= 200
    differ = 0
    for answer, paraphrase in pairs:
        for ref, gen in ((answer, paraphrase), (paraphrase, answer)):
            assert ev.rouge_l_recall(ref, gen) == plain.score(ref, gen)["rougeL"].recall
            assert option(ref, gen) == stemmed.score(ref, gen)["rougeL"].recall
            differ += ev.rouge_l_recall(ref, gen) != option(ref, gen)
    assert differ > 0  # stemming matters on these pairs, so the two checks are distinct


# ----------------------------------------------------------------------------- log files, CLI

def write_log_dir(path: Path, logs: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for stem, log in logs.items():
        (path / f"{stem}.json").write_text(json.dumps(log))
    return path


def test_aggregate_cli_reads_both_forms(tmp_path, capsys):
    unlearned = write_log_dir(tmp_path / "u", hand_logs())
    retain = write_log_dir(tmp_path / "r", retain_model_logs())
    out = tmp_path / "metrics.json"
    assert ev.main(["aggregate", "--unlearned-logs", str(unlearned), "--retain-logs", str(retain),
                    "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "Forget Quality" in table and "3.3333e-01" in table
    assert json.loads(out.read_text())["Forget Quality"] == pytest.approx(1 / 3)
    # TOFU's eval_log_aggregated.json bundle ({"eval_log.json": {...}, ...}) works as well
    bundle = tmp_path / "eval_log_aggregated.json"
    bundle.write_text(json.dumps({f"{s}.json": log for s, log in hand_logs().items()}))
    assert ev.main(["aggregate", "--unlearned-logs", str(bundle)]) == 0
    assert "unavailable" in capsys.readouterr().out


@pytest.mark.parametrize("stem, content, expect", [
    ("eval_log", '{"avg_gt_loss": {"0": 0.1,}', "invalid JSON at line 1"),
    ("eval_log", {"avg_gt_loss": [0.1], "avg_paraphrased_loss": [0.1], "rougeL_recall": [1.0]},
     "missing key 'average_perturb_loss'"),
    ("eval_log_forget", {**hand_logs()["eval_log_forget"],
                         "average_perturb_loss": {"0": [1.0, 2.0], "1": [1.0]}}, "rows of different lengths"),
    ("eval_log_forget", {**hand_logs()["eval_log_forget"], "rougeL_recall": {"0": "high", "1": 0.5}},
     "key 'rougeL_recall' holds non-numeric values"),
    ("eval_log_forget", {**hand_logs()["eval_log_forget"], "avg_gt_loss": {"a": 1.0, "1": 0.5}},
     "expected row indices"),
    ("eval_real_world_wo_options", [1, 2], "expected a JSON object"),
    ("eval_real_author_wo_options", {**hand_logs()["eval_real_author_wo_options"], "avg_gt_loss": [0.1]},
     "avg_gt_loss has 1 rows but average_perturb_loss has 2"),
    ("eval_real_author_wo_options", None, "missing log file(s) eval_real_author_wo_options.json"),
])
def test_malformed_logs_exit_2_naming_file_and_key(tmp_path, capsys, stem, content, expect):
    d = write_log_dir(tmp_path / "u", hand_logs())
    if content is None:
        (d / f"{stem}.json").unlink()
    else:
        (d / f"{stem}.json").write_text(content if isinstance(content, str) else json.dumps(content))
    assert ev.main(["aggregate", "--unlearned-logs", str(d)]) == 2
    err = capsys.readouterr().err
    assert expect in err and f"{stem}.json" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_bad_split_and_missing_dir_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # argparse rejects an unknown split with exit 2
        ev.main(["--checkpoint", "x.pt", "--data-dir", str(tmp_path), "--split", "forget33"])
    assert e.value.code == 2
    assert ev.main(["aggregate", "--unlearned-logs", str(tmp_path / "nope")]) == 2
    assert "no such log directory" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown forget split 'retain90'"):
        ev.split_specs("retain90")
    # forget20 and larger have no perturbed file in TOFU: the loader names the missing file
    import data
    with pytest.raises(data.DataError, match="forget20_perturbed.json"):
        data.load_split(tmp_path, "forget20_perturbed")


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    import data
    from model import GPT, GPTConfig

    root = tmp_path_factory.mktemp("tiny")
    data_dir = data.write_tofu_style_dataset(root / "data", n_authors=10, seed=0)
    enc = data.build_encoding(data.train_bpe(data.corpus_texts(data_dir), 300))
    config = GPTConfig(vocab_size=enc.n_vocab, block_size=160, n_layer=1, n_head=2, n_embd=32)
    torch.manual_seed(0)
    model, ref = GPT(config), GPT(config)
    return root, data_dir, enc, model, ref


def test_evaluate_model_end_to_end(tiny_setup):
    import data

    root, data_dir, enc, model, ref = tiny_setup
    ds_size, max_new = 6, 5
    logs = ev.evaluate_model(model, enc, data_dir, "forget10", ds_size=ds_size, batch_size=7,
                             max_new_tokens=max_new, ref_model=ref)
    assert set(logs) == set(ev.LOG_STEMS)
    specs = {s.stem: s for s in ev.split_specs("forget10")}
    for stem, log in logs.items():
        rows = data.load_split(data_dir, specs[stem].data_split)[:ds_size]
        assert log["rouge_scorer"] == "builtin"
        assert list(log["avg_gt_loss"]) == [str(i) for i in range(ds_size)]
        for i, row in enumerate(rows):
            k = str(i)
            assert len(log["average_perturb_loss"][k]) == len(row["perturbed_answer"])
            assert log["generated_text"][k][0] == row["question"] and log["generated_text"][k][2] == row["answer"]
            assert log["num_token_gt"][k] == len(enc.encode_ordinary(" " + row["answer"])) + 1  # + EOS
            if specs[stem].base_key == "answer":
                assert log["avg_paraphrased_loss"][k] == log["avg_gt_loss"][k]
    assert "avg_kl" in logs["eval_log_forget"] and "avg_kl" not in logs["eval_log"]

    # oracles, independent of npo.py and of batching: one unpadded sequence at a time
    with torch.no_grad():
        for stem in ("eval_log_forget", "eval_real_author_wo_options"):
            rows = data.load_split(data_dir, specs[stem].data_split)[:ds_size]
            for i in (0, ds_size - 1):
                q, a = rows[i]["question"], rows[i]["answer"]
                ids, labels = data.encode_qa(enc, q, a)
                x = torch.tensor([ids])
                logits = model(x)[0, :-1]  # (T-1, V): position t predicts token t+1
                target = torch.tensor(labels[1:])
                nll = F.cross_entropy(logits, target, ignore_index=-100)
                assert logs[stem]["avg_gt_loss"][str(i)] == pytest.approx(nll.item(), rel=1e-4)
                p = torch.tensor(labels[1:]) != -100  # positions that predict an answer token
                pert = rows[i]["perturbed_answer"][-1]
                nll_p = F.cross_entropy(model(torch.tensor([data.encode_qa(enc, q, pert)[0]]))[0, :-1],
                                        torch.tensor(data.encode_qa(enc, q, pert)[1][1:]), ignore_index=-100)
                assert logs[stem]["average_perturb_loss"][str(i)][-1] == pytest.approx(nll_p.item(), rel=1e-4)
                if stem == "eval_log_forget":  # KL(pi_ref || pi_theta) over the answer positions
                    lq = F.log_softmax(logits[p], -1)
                    lr = F.log_softmax(ref(x)[0, :-1][p], -1)
                    kl = (lr.exp() * (lr - lq)).sum(-1).mean()
                    assert logs[stem]["avg_kl"][str(i)] == pytest.approx(kl.item(), rel=1e-4)
                    # greedy generation without a cache
                    seq = data.encode_prompt(enc, q)
                    new = []
                    for _ in range(max_new):
                        nxt = int(model(torch.tensor([seq]))[0, -1].argmax())
                        if nxt == enc.eot_token:
                            break
                        seq.append(nxt)
                        new.append(nxt)
                    assert logs[stem]["generated_text"][str(i)][1] == enc.decode(new).strip()

    # the plain (full-logits) path gives the same numbers as the fused default
    plain = ev.evaluate_model(model, enc, data_dir, "forget10", ds_size=ds_size, batch_size=5,
                              max_new_tokens=1, fused=False, stems=("eval_log_forget",))
    for k, v in plain["eval_log_forget"]["avg_gt_loss"].items():
        assert v == pytest.approx(logs["eval_log_forget"]["avg_gt_loss"][k], rel=1e-5)

    m = ev.aggregate(logs, logs)
    assert m["Forget Quality"] == 1.0  # identical samples: D = 0
    assert m["Forget KL"] > 0
    assert all(isinstance(m[k], float) for k in m if k != "ROUGE Scorer")


def test_evaluate_cli_end_to_end(tiny_setup, capsys):
    import data
    from model import save_checkpoint

    root, data_dir, enc, model, ref = tiny_setup
    spec = data.tokenizer_spec(enc)
    save_checkpoint(root / "u.pt", model, spec, {}, 0)
    save_checkpoint(root / "r.pt", ref, spec, {}, 0)
    out = root / "out"
    args = ["--checkpoint", str(root / "u.pt"), "--retain-checkpoint", str(root / "r.pt"),
            "--data-dir", str(data_dir), "--split", "forget05", "--out", str(out),
            "--ds-size", "4", "--max-new-tokens", "3"]
    assert ev.main(args) == 0
    assert "Forget Quality" in capsys.readouterr().out
    for stem in ev.LOG_STEMS:
        assert len(json.loads((out / f"{stem}.json").read_text())["avg_gt_loss"]) == 4
    metrics = json.loads((out / "aggregate_stat.json").read_text())
    assert 0.0 <= metrics["Forget Quality"] <= 1.0
    # the written logs aggregate to the same numbers through the aggregate CLI
    assert ev.main(["aggregate", "--unlearned-logs", str(out), "--retain-logs", str(out / "retain_model"),
                    "--out", str(root / "again.json")]) == 0
    assert json.loads((root / "again.json").read_text()) == metrics
    # a checkpoint that is not one: exit 2, one line
    (root / "bad.pt").write_text("not a checkpoint")
    assert ev.main(["--checkpoint", str(root / "bad.pt"), "--data-dir", str(data_dir)]) == 2
    err = capsys.readouterr().err
    assert "bad.pt" in err and "Traceback" not in err
