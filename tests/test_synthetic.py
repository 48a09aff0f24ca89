"""train_synthetic.py: data laws against quadrature, exact fits, batched runs against one-at-a-time
runs, the first GD step against a hand-written gradient, NPO's beta -> 0 limit, determinism, CLI."""

import json
import math
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import npo
import train_synthetic as ts

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(d=16, n_features=32, n_classes=2, n_retain=150, n_forget=60, n_eval=80)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """As main() does: tiny tensors run fastest on one thread (and a shared CPU stays usable)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def expected_label_prob(bias: float, n_classes: int) -> float:
    """P(y = the distribution's class) = E[e^(s+b) / (e^(s+b) + K - 1)], s ~ N(0, 1), by Gauss-Hermite."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)  # weight exp(-s^2/2)
    p = np.exp(nodes + bias) / (np.exp(nodes + bias) + n_classes - 1)
    return float((weights * p).sum() / weights.sum())


@pytest.mark.parametrize("which,alpha,n_classes", [("retain", 1.0, 2), ("forget", 1.0, 2),
                                                   ("forget", 0.0, 2), ("retain", 0.5, 3)])
def test_data_has_specified_means_and_label_probabilities(which, alpha, n_classes):
    d, n = 16, 200_000
    gen = torch.Generator().manual_seed(123)
    x, y = ts.sample_split(gen, n, alpha, d, n_classes, which)
    sign, label = (-1.0, 0) if which == "retain" else (1.0, 1)
    # x ~ N(sign * alpha * 1, I): every coordinate's mean within 5 standard errors, variance ~ 1
    assert (x.mean(0) - sign * alpha).abs().max() < 5 / math.sqrt(n)
    assert (x.var(0) - 1).abs().max() < 5 * math.sqrt(2 / n)
    # y | x ~ softmax((x - mu) @ theta + b): the label's logit is s + 1 with s = sum(x - mu) / sqrt(d) ~ N(0, 1)
    s = (x - sign * alpha).sum(1) / math.sqrt(d)
    hit = (y == label).double()
    p_marginal = expected_label_prob(1.0, n_classes)
    assert abs(hit.mean().item() - p_marginal) < 5 * math.sqrt(p_marginal * (1 - p_marginal) / n)
    # the conditional law: residuals of the true conditional probability are uncorrelated with 1 and s
    p_cond = torch.exp(s + 1) / (torch.exp(s + 1) + n_classes - 1)
    for g in (torch.ones_like(s), s):
        resid = (hit - p_cond) * g
        assert abs(resid.mean().item()) < 5 * resid.std().item() / math.sqrt(n)
    # the other classes share the rest uniformly
    for c in range(n_classes):
        if c != label:
            share = (y == c).double().mean().item()
            assert abs(share - (1 - p_marginal) / (n_classes - 1)) < 5 * math.sqrt(0.25 / n)


def test_idk_labels_are_uniform():
    task = ts.make_task(1.0, [1000], **{**SMALL, "n_forget": 4000})
    frac = task.y_idk.double().mean().item()
    assert abs(frac - 0.5) < 5 * math.sqrt(0.25 / 4000)


def autograd_nll_grad(a, zt, y):
    """Gradient of npo.retain_nll (the mean NLL) by autograd, per seed: an oracle for the Newton fit."""
    a = a.clone().requires_grad_(True)
    logp = ts.label_logprob(ts.logits_of(zt, a), y)                                  # (S, n)
    loss = sum(npo.retain_nll(logp[s], torch.ones_like(logp[s])) for s in range(a.shape[0]))
    (grad,) = torch.autograd.grad(loss, a)
    return grad.flatten(1).norm(dim=1), loss


@pytest.mark.parametrize("alpha", [1.0, 0.0])
def test_fitted_models_are_stationary_and_minimal(alpha):
    task = ts.make_task(alpha, [1000, 2000])  # the paper's sizes
    zt_all = torch.cat([task.zt_retain, task.zt_forget], 2)
    y_all = torch.cat([task.y_retain, task.y_forget], 1)
    for a, zt, y in ((task.a_finetuned, zt_all, y_all), (task.a_retain, task.zt_retain, task.y_retain)):
        gnorm, _ = autograd_nll_grad(a, zt, y)
        assert gnorm.max() < 1e-6, gnorm
        # convex objective + stationary point = minimum: random perturbations never lower the loss
        gen = torch.Generator().manual_seed(0)
        base = ts.mean_nll(a, zt, y)
        for _ in range(5):
            v = torch.randn(a.shape, generator=gen, dtype=a.dtype)
            assert (ts.mean_nll(a + 1e-3 * v / v.norm(), zt, y) >= base - 1e-12).all()


def test_fit_with_three_classes_is_stationary():
    task = ts.make_task(1.0, [7], **{**SMALL, "n_classes": 3, "n_retain": 400, "n_forget": 200})
    assert task.a_finetuned.shape == (1, SMALL["n_features"], 2)
    gnorm, _ = autograd_nll_grad(task.a_retain, task.zt_retain, task.y_retain)
    assert gnorm.max() < 1e-6


def test_released_code_gd_fit_matches_its_definition():
    """fit_logistic_gd = plain full-batch GD on the mean NLL: check against autograd steps."""
    task = ts.make_task(0.0, [5], **SMALL)
    a_gd, _ = ts.fit_logistic_gd(task.zt_retain, task.y_retain, 2, steps=5, lr=0.05)
    a = torch.zeros_like(a_gd)
    for _ in range(5):
        a = a.requires_grad_(True)
        (g,) = torch.autograd.grad(ts.mean_nll(a, task.zt_retain, task.y_retain).sum(), a)
        a = (a - 0.05 * g).detach()
    assert torch.allclose(a, a_gd, rtol=0, atol=1e-13)


def test_batched_run_equals_one_at_a_time_runs():
    """All seeds x methods in one tensor give exactly what each (seed, method) gives alone."""
    seeds = [11, 12]
    names = ["GA", "NPO+RT", "DPO+KL", "IDK+RT", "SimNPO", "GA+RT"]
    task = ts.make_task(1.0, seeds, **SMALL)
    methods = [ts.method_spec(n, 1.0) for n in names]
    together = ts.unlearn(task, methods, steps=30, eval_every=10)
    for s, seed in enumerate(seeds):
        alone_task = ts.make_task(1.0, [seed], **SMALL)
        for m, spec in enumerate(methods):
            alone = ts.unlearn(alone_task, [spec], steps=30, eval_every=10)
            # float64 parameters; the KL term and distances go through npo.kl_divergence in fp32
            assert torch.allclose(together["a"][s, m], alone["a"][0, 0], rtol=1e-6, atol=1e-9), spec.label
            for key in ("forget_distance", "retain_distance", "drift", "forget_nll"):
                assert torch.allclose(together[key][:, s, m], alone[key][:, 0, 0], rtol=1e-5, atol=1e-7), key


def test_first_ga_step_matches_hand_gradient():
    """K = 2: d/da mean_i log p(y_i|x_i) = mean_i z_i (1{y_i = 0} - p0_i); GA descends on it."""
    task = ts.make_task(1.0, [3], **SMALL)
    lr = 0.01
    run = ts.unlearn(task, [ts.method_spec("GA", 1.0, lr=lr)], steps=1, eval_every=1)
    z = task.zt_forget[0].T.numpy()                                                  # (n_f, N)
    a0 = task.a_finetuned[0, :, 0].numpy()
    y0 = (task.y_forget[0].numpy() == 0).astype(float)
    p0 = 1 / (1 + np.exp(-(z @ a0)))  # class 0 has logit a.z, class 1 has 0
    grad = (z * (y0 - p0)[:, None]).mean(0)
    np.testing.assert_allclose(run["a"][0, 0, :, 0].numpy(), a0 - lr * grad, rtol=0, atol=1e-12)


def test_npo_first_step_equals_ga_and_tiny_beta_tracks_ga():
    """At theta = theta_ref NPO's weight 2 sigma(0) = 1, so its first step is GA's for any beta; as
    beta -> 0 the whole trajectory tends to GA's (the paper's Proposition)."""
    task = ts.make_task(1.0, [1000, 2000], **SMALL)
    lr = 5e-3
    methods = [ts.method_spec("GA", 1.0, lr=lr), ts.method_spec("NPO", 1.0, lr=lr, beta=1.0),
               ts.method_spec("NPO", 1.0, lr=lr, beta=1e-6, label="tiny"),
               ts.method_spec("NPO", 1.0, lr=lr, beta=1.0, label="one step")]
    one = ts.unlearn(task, methods, steps=1, eval_every=1)
    assert torch.allclose(one["a"][:, 1], one["a"][:, 0], rtol=0, atol=1e-14)
    run = ts.unlearn(task, methods[:3], steps=40, eval_every=10)
    ga, big, tiny = run["a"][:, 0], run["a"][:, 1], run["a"][:, 2]
    a0 = task.a_finetuned
    assert (tiny - ga).norm() < 1e-5 * (ga - a0).norm()
    assert (big - ga).norm() > 1e-3 * (ga - a0).norm()  # beta = 1 does depart from GA


def test_growth_fits_recover_hand_made_curves():
    t = torch.arange(100, 1001, 25, dtype=torch.float64)
    lin = ts.fit_growth(t, 3 + 2 * t)
    assert lin["linear"]["slope"] == pytest.approx(2) and lin["linear"]["r2"] == pytest.approx(1)
    assert lin["log"]["r2"] < 0.99
    log = ts.fit_growth(t, 1 + 0.5 * torch.log(t))
    assert log["log"]["slope"] == pytest.approx(0.5) and log["log"]["r2"] == pytest.approx(1)
    assert log["linear"]["r2"] < 0.99


def test_paper_hyperparameters_and_overrides():
    spec = ts.method_spec("dpo+rt", 0.0)
    assert (spec.label, spec.lr, spec.beta, spec.forget, spec.retain) == ("DPO+RT", 2e-2, 5.0, "dpo", "nll")
    assert ts.method_spec("idk", 1.0).label == "IDK+RT"  # npo.METHODS key accepted
    assert ts.method_spec("GA+KL", 1.0).beta is None
    cfg = ts.resolve(ts.SyntheticConfig(methods=("NPO", "GA"), lr=("NPO@0=0.1", "GA=1e-3"), beta=("NPO=3",)))
    at0, at1 = ts.methods_for(cfg, 0.0), ts.methods_for(cfg, 1.0)
    assert (at0[0].lr, at0[0].beta, at0[1].lr) == (0.1, 3.0, 1e-3)
    assert (at1[0].lr, at1[0].beta, at1[1].lr) == (5e-3, 3.0, 1e-3)


def small_argv(out_dir):
    return ["--out-dir", str(out_dir), "--seeds", "1000,2000", "--steps", "50", "--eval-every", "25",
            "--collapse-steps", "50", "--n-features", "32", "--n-retain", "150", "--n-forget", "60",
            "--n-eval", "80", "--no-plot"]


def test_short_run_is_deterministic_and_writes_outputs(tmp_path, capsys):
    results = []
    for name in ("a", "b"):
        assert ts.main(small_argv(tmp_path / name)) == 0
        files = sorted(p.name for p in (tmp_path / name).iterdir())
        assert files == ["summary.md", "trajectories.json"]  # no .tmp left behind
        record = json.loads((tmp_path / name / "trajectories.json").read_text())
        record.pop("summary_markdown"), record.pop("config")  # wall time and out_dir differ
        results.append(record)
    assert results[0] == results[1]
    rec = results[0]["alpha=1"]
    assert [m["label"] for m in rec["methods"]] == list(ts.FIGURE_METHODS)
    assert rec["steps"] == [0, 25, 50]
    assert len(rec["forget_distance"]) == 6 and len(rec["forget_distance"][0]) == 2
    assert "Paper vs measured" in capsys.readouterr().out


def test_cli_rejects_unknown_method_clearly(monkeypatch, capsys):
    # the script's `if __name__ == "__main__"` path, in-process (a subprocess would re-import torch)
    monkeypatch.setattr(sys, "argv", ["train_synthetic.py", "--methods", "GA,FOO"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(ROOT / "train_synthetic.py"), run_name="__main__")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown method 'FOO'" in err and "NPO+RT" in err and "IDK+RT" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv,needle", [(["--lr", "NPO"], "METHOD=VALUE"), (["--lr", "XYZ=1"], "unknown method"),
                                         (["--beta", "NPO=-1"], "positive"), (["--steps", "0"], "--steps"),
                                         (["--n-retain", "5", "--n-forget", "5", "--seeds", "1"], "separable")])
def test_cli_rejects_bad_values(argv, needle, capsys, tmp_path):
    assert ts.main(argv + ["--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as exc:
        ts.main(["--help"])
    assert exc.value.code == 0
    assert "--sweep-beta" in capsys.readouterr().out


def test_outlier_seed_is_the_one_that_sets_the_spread():
    # seeds 7, 8, 9 at one evaluation: (0, 1, 10). Std over seeds (ddof=1) sqrt(91/3) with all three,
    # sqrt(1/2) without the 10, sqrt(81/2) and sqrt(50) without the others.
    values = torch.tensor([0.0, 1.0, 10.0]).view(1, 3, 1)
    (seed, ratio), = ts.outlier_seeds(values, [7, 8, 9])
    assert seed == 9 and ratio == pytest.approx(math.sqrt(182 / 3))
    assert ts.outlier_seeds(torch.tensor([0.0, 1.0, 2.0]).view(1, 3, 1), [7, 8, 9]) == []  # even spread
    assert ts.outlier_seeds(values[:, :2], [7, 8]) == []  # two seeds: no "rest" to compare with


@pytest.mark.parametrize("seeds", [[1, 2, 3], [1]])
def test_figures_are_written_with_divergence_and_a_single_seed(seeds, tmp_path):
    """Plotting must not crash on a non-finite (diverged) seed, a missing setting or one seed."""
    task = ts.make_task(1.0, seeds, **SMALL)
    methods = [ts.method_spec("GA", 1.0), ts.method_spec("NPO", 1.0)]
    run = ts.unlearn(task, methods, steps=20, eval_every=5)
    run["forget_distance"][-2:, 0, 0] = float("nan")  # seed 0 of GA diverges near the end
    ts.plot_figure(str(tmp_path / "figure2.png"), {1.0: {"run": run, "methods": methods, "seeds": seeds}})
    ts.plot_collapse(str(tmp_path / "collapse.png"), {"run": run, "methods": methods},
                     ts.collapse_rates(run, methods), seeds=seeds)
    ts.plot_sweep(str(tmp_path / "beta_sweep.png"), {"run": run, "methods": methods}, seeds=seeds)
    for name in ("figure2.png", "collapse.png", "beta_sweep.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["beta_sweep.png", "collapse.png", "figure2.png"]
