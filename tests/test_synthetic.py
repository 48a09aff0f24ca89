"""train_synthetic.py: the released code's first draws, its data generation and fits written out
naively, hand-computed first steps, batched against one-at-a-time runs, NPO's weights, the CLI."""

import json
import math
from dataclasses import fields

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_synthetic as ts

SMALL = dict(d=16, n_features=32, n_retain=150, n_forget=60, n_eval=80)


def small_task(alpha, seeds, fit_steps=300, **sizes):
    return ts.fit(ts.make_task(alpha, seeds, **{**SMALL, **sizes}), steps=fit_steps)


# The first draws of seed 1000 at alpha = 1 (first 3 coordinates, first 10 labels) as the released
# code (licong-lin/negative-preference-optimization, synthetic/) drew and pickled them, printed on the
# line "released code, alpha=1, seed=1000, first draws: ..." of this command, run on this project's
# 2-core CPU machine in a scratch virtual environment (torch 2.13.0+cpu, numpy 2.4.6):
#   python tools/compare_synthetic.py /work/scratch/licong-lin+negative-preference-optimization/synthetic \
#       --python /work/scratch/venv-synth/bin/python --workdir /work/scratch/compare/run1
RELEASED_SEED_1000_ALPHA_1 = {
    "W": [-0.30386153846435787, 0.23181298090556482, 0.12440991194483482],
    "x_retain": [-2.0154252998533453, -0.4639367076012264, -1.8722867205259783],
    "y_retain": [1, 0, 0, 1, 0, 1, 0, 1, 1, 0],
    "x_forget": [1.7118940697102225, 0.7882648657413227, 2.790146945963807],
    "y_forget": [1, 1, 1, 1, 1, 1, 1, 0, 0, 1],
    "y_idk": [1, 0, 0, 0, 1, 1, 0, 0, 1, 0],
    "x_eval_retain": [-2.2344721206009335, -2.828932114636011, -0.7136041865859665],
    "x_eval_forget": [1.0370994407767111, 1.328213524417765, 1.5510732449714713]}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_first_draws_of_seed_1000_are_the_released_codes():
    task = ts.make_task(1.0, [1000])  # the paper's sizes: every draw before the last counts
    ours = {"W": task.W[0, 0], "x_retain": task.x["retain"][0, 0], "y_retain": task.y["retain"][0],
            "x_forget": task.x["forget"][0, 0], "y_forget": task.y["forget"][0], "y_idk": task.y["idk"][0],
            "x_eval_retain": task.x["eval_retain"][0, 0], "x_eval_forget": task.x["eval_forget"][0, 0]}
    for key, released in RELEASED_SEED_1000_ALPHA_1.items():
        assert ours[key][:len(released)].tolist() == released, key  # bit for bit


def released_generate_data(n, mean, theta, bias, prob_list):
    """The released MyDist.generate_data, written out: the oracle for ts.draw."""
    mode_id = torch.multinomial(torch.tensor(prob_list), num_samples=n, replacement=True)
    X, y = torch.zeros(n, len(mean), dtype=torch.float64), torch.zeros(n, 1, dtype=torch.int64)
    for i in range(n):
        assert mode_id[i] == 0
        X[i, :] = torch.distributions.MultivariateNormal(mean, torch.eye(len(mean), dtype=torch.float64)).sample()
        probs = F.softmax((X[i, :] - mean).view(1, -1) @ theta + bias, dim=-1, dtype=torch.float64)
        y[i, 0] = torch.multinomial(probs, num_samples=1)
    return X, y[:, 0]


@pytest.mark.parametrize("which,prob_list", [("retain", [1.0]), ("forget", [1.0, 0.0, 0.0])])
def test_draw_is_the_released_generate_data(which, prob_list):
    law = ts.law(1.0, 16, which)
    torch.manual_seed(7)
    expected = released_generate_data(200, *law, prob_list) + (torch.rand(4),)  # and the RNG left in the same state
    torch.manual_seed(7)
    got = ts.draw(200, *law) + (torch.rand(4),)
    for e, g in zip(expected, got):
        assert torch.equal(e, g)
    sign, label = (-1.0, 0) if which == "retain" else (1.0, 1)
    assert torch.equal(law[0], torch.full((16,), sign)) and law[1][:, label].eq(0.25).all() and law[2][0, label] == 1


def test_fits_are_the_released_gradient_descent():
    """fit (both fits in one product) = the released pretrained_model(): autograd steps on
    -mean(sum(onehot * log_softmax(Z @ [v, 0]))) from v = 0, per seed and per model."""
    task = ts.fit(ts.make_task(1.0, [3, 4], **SMALL), steps=6, lr=0.05)
    n_r = SMALL["n_retain"]
    for s in range(2):
        Z = torch.cat([task.features["retain"][s], task.features["forget"][s]], 1).T                     # (n, N)
        y = torch.cat([task.y["retain"][s], task.y["forget"][s]])
        for rows, fitted in ((slice(None), task.a_finetuned[s]), (slice(0, n_r), task.a_retain[s])):
            v = torch.zeros(Z.shape[1], 1, dtype=torch.float64, requires_grad=True)
            for _ in range(6):
                logits = Z[rows] @ torch.hstack([v, torch.zeros(Z.shape[1], 1, dtype=torch.float64)])
                loss = -torch.mean(torch.sum(F.one_hot(y[rows], 2) * F.log_softmax(logits, dim=-1), dim=-1))
                loss.backward()
                with torch.no_grad():
                    v -= 0.05 * v.grad
                    v.grad.zero_()
            torch.testing.assert_close(fitted, v.detach()[:, 0], rtol=0, atol=1e-14)


def sigmoid(t):
    return 1 / (1 + np.exp(-t))


def test_first_steps_of_ga_and_idk_rt_are_the_hand_computed_ones():
    """K = 2, class 0's logit a.z, class 1's 0: d/da log p(y|z) = z (1{y = 0} - sigmoid(a.z)).
    GA descends on mean_f log p(y|z); the released IDK+RT on -mean_f log p(y_idk|z) - mean_r log p(y|z)."""
    task = small_task(1.0, [3])
    lr = 0.01
    specs = [ts.paper_spec("GA", 1.0, SMALL["n_forget"], SMALL["n_retain"], lr=lr),
             ts.paper_spec("IDK+RT", 1.0, SMALL["n_forget"], SMALL["n_retain"], lr=lr)]
    run = ts.unlearn(task, specs, steps=1, eval_every=1)
    a0 = task.a_finetuned[0].numpy()

    def grad_logp(split, labels):  # mean over samples of d/da log p(labels|z)
        z = task.features[split][0].T.numpy()
        return (z * ((labels == 0) - sigmoid(z @ a0))[:, None]).mean(0)
    ga = grad_logp("forget", task.y["forget"][0].numpy())
    idk_rt = -grad_logp("forget", task.y["idk"][0].numpy()) - grad_logp("retain", task.y["retain"][0].numpy())
    np.testing.assert_allclose(run["a"][0, 0].numpy(), a0 - lr * ga, rtol=0, atol=1e-13)
    np.testing.assert_allclose(run["a"][0, 1].numpy(), a0 - lr * idk_rt, rtol=0, atol=1e-13)


def test_batched_run_equals_one_at_a_time_runs():
    """All seeds x methods in one tensor give what each (seed, method) gives alone."""
    seeds, alpha = [11, 12], 1.0
    task = small_task(alpha, seeds)
    specs = [ts.paper_spec(label, alpha, SMALL["n_forget"], SMALL["n_retain"]) for label in ts.METHOD_KEYS]
    together = ts.unlearn(task, specs, steps=30, eval_every=10)
    alone = [[ts.unlearn(seed_task, [spec], steps=30, eval_every=10) for spec in specs]
             for seed_task in (small_task(alpha, [seed]) for seed in seeds)]
    for m, spec in enumerate(specs):
        for s in range(len(seeds)):
            torch.testing.assert_close(together["a"][s, m], alone[s][m]["a"][0, 0], rtol=1e-12, atol=1e-12)
            for key in ("forget_distance", "retain_distance", "drift"):
                torch.testing.assert_close(together[key][:, s, m], alone[s][m][key][:, 0, 0], rtol=1e-10, atol=1e-13)
        # the weights' statistics pool both seeds' forget samples (the same number from each)
        pooled = {key: torch.stack([alone[s][m][key][:, 0] for s in range(len(seeds))], 1)
                  for key in ("W_mean", "W_min", "W_max")}                               # (E, seeds)
        torch.testing.assert_close(together["W_mean"][:, m], pooled["W_mean"].mean(1), rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(together["W_min"][:, m], pooled["W_min"].amin(1), rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(together["W_max"][:, m], pooled["W_max"].amax(1), rtol=1e-10, atol=1e-13)


def test_npo_starts_as_ga_and_its_weights_fade():
    """At the start r = 0, so W = 2 sigmoid(0) = 1 and NPO's first step is GA's; as the forget labels
    lose probability (r < 0) W falls below 1. GA's weight is 1 throughout."""
    task = small_task(1.0, [1000, 2000])
    specs = [ts.paper_spec("GA", 1.0, 60, 150, lr=5e-3), ts.paper_spec("NPO", 1.0, 60, 150, lr=5e-3, beta=1.0)]
    first = ts.unlearn(task, specs, steps=1, eval_every=1)
    torch.testing.assert_close(first["a"][:, 1], first["a"][:, 0], rtol=0, atol=1e-15)
    run = ts.unlearn(task, specs, steps=300, eval_every=100)
    assert run["W_mean"][0].tolist() == [1.0, 1.0] and run["W_min"][0, 1] == run["W_max"][0, 1] == 1.0
    assert run["W_mean"][:, 0].eq(1.0).all()
    w_npo = run["W_mean"][:, 1]
    assert (w_npo[1:] < w_npo[:-1]).all() and w_npo[-1] < 0.75


def test_growth_fits_recover_hand_made_curves():
    t = torch.arange(100, 1001, 25, dtype=torch.float64)
    linear = ts.fit_growth(t, 3 + 2 * t)
    assert linear["linear"] == pytest.approx((2, 1)) and linear["log"][1] < 0.99
    logarithmic = ts.fit_growth(t, 1 + 0.5 * torch.log(t))
    assert logarithmic["log"] == pytest.approx((0.5, 1)) and logarithmic["linear"][1] < 0.99


def small_argv(out_dir):
    return ["--out-dir", str(out_dir), "--seeds", "1000,2000", "--steps", "40", "--eval-every", "20",
            "--collapse-steps", "40", "--n-features", "32", "--n-retain", "150", "--n-forget", "60",
            "--n-eval", "80", "--fit-steps", "200", "--no-plot"]


def test_short_run_is_deterministic_whatever_the_threads_and_writes_its_outputs(tmp_path, capsys):
    records = []
    for name, threads in (("a", "1"), ("b", "2")):
        assert ts.main(small_argv(tmp_path / name) + ["--threads", threads]) == 0
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["summary.md", "trajectories.json"]
        record = json.loads((tmp_path / name / "trajectories.json").read_text())
        record.pop("config")
        records.append(record)
    assert records[0] == records[1]
    alpha1 = records[0]["alpha=1"]
    assert [m["label"] for m in alpha1["methods"]] == list(ts.FIGURE_METHODS) and alpha1["steps"] == [0, 20, 40]
    assert np.array(alpha1["forget_distance"]).shape == (6, 2, 3) and np.array(alpha1["W_mean"]).shape == (6, 3)
    assert "| NPO+RT |" in capsys.readouterr().out


BAD_VALUES = {"alphas": "0.5", "seeds": "1,1", "methods": "GA,FOO", "steps": "0", "eval_every": "0", "d": "0",
              "n_features": "-1", "n_retain": "0", "n_forget": "0", "n_eval": "0",
              "fit_steps": "0", "fit_lr": "nan", "collapse_steps": "-1", "threads": "0", "sweep_beta": "=maybe",
              "plot": "=no"}


@pytest.mark.parametrize("name", [f.name for f in fields(ts.Config)])
def test_every_option_rejects_a_bad_value_naming_it(name, tmp_path, capsys):
    flag = "--" + name.replace("_", "-")
    if name == "out_dir":
        (tmp_path / "file").write_text("")
        argv = [flag, str(tmp_path / "file")]
    else:
        value = BAD_VALUES[name]
        argv = [flag + value] if value.startswith("=") else [flag, value]
    try:
        code = ts.main(argv + ([] if name == "out_dir" else ["--out-dir", str(tmp_path)]))
    except SystemExit as exit:  # argparse's own errors (bad types, values for flags)
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2 and flag in err and "Traceback" not in err, err


def test_figures_are_written_with_a_diverged_seed_and_with_a_single_seed(tmp_path):
    specs = [ts.paper_spec("GA", 1.0, 60, 150), ts.paper_spec("NPO", 1.0, 60, 150)]
    run = ts.unlearn(small_task(1.0, [1, 2, 3]), specs, steps=20, eval_every=5)
    run["forget_distance"][-2:, 0, 0] = math.nan  # seed 1 of GA diverges near the end
    ts.plot_figure(str(tmp_path / "figure2.png"), {1.0: (specs, run)})  # and alpha = 0 is missing
    one_seed = ts.unlearn(small_task(1.0, [1]), specs, steps=20, eval_every=5)
    ts.plot_growth(str(tmp_path / "collapse.png"), specs, one_seed, "collapse")
    for name in ("figure2.png", "collapse.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["collapse.png", "figure2.png"]  # no temporary left
