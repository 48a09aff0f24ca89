"""The NPO paper's synthetic experiment (its Figure 2, the collapse rate, the beta sweep), computed as
the authors' released code computes it (licong-lin/negative-preference-optimization, synthetic/).

    model       p(y|x) = softmax([a . relu(W x), 0])_y, K = 2 classes: W (N, d) ~ N(0, 1/d) frozen, only
                a (N,) trained, so p(0|x) = sigmoid(logit) with logit = a . relu(W x)
    retain law  x ~ N(-alpha 1, I), y ~ softmax((x - mean) @ theta_r + b_r), theta_r[:, 0] = 1/sqrt(d), b_r[0] = 1
    forget law  x ~ N(+alpha 1, I), y ~ softmax((x - mean) @ theta_f + b_f), theta_f[:, 1] = 1/sqrt(d), b_f[1] = 1
    fits        the fine-tuned model (retain + forget data) and the retain model (retain data only):
                full-batch gradient descent on the mean NLL from a = 0, lr 0.05, 20,000 steps
    unlearning  2,000 steps of full-batch gradient descent on each method's loss from the fine-tuned
                model, with the learning rate and beta of the released parameter_values.yml
    distances   forget (retain) distance = mean KL(retain model || current model) over 1,000 fresh
                forget (retain) samples

Each seed seeds torch's global RNG and draws W, the retain and forget sets, the IDK labels and the two
evaluation sets call for call as the released code does, so a seed gives the released code's data.
Every loss is npo.unlearning_loss: a sample's answer is its one label (one token). All seeds and
methods run as one tensor a (S, M, N); each method's loss is a mean over the S seeds' samples,
so S times it is the sum of the seeds' own losses and each seed gets its own gradient.

    python train_synthetic.py                # both settings, 5 seeds, the released code's 6 methods
    python train_synthetic.py --sweep-beta   # adds GA and NPO at five betas, one lr, 10,000 steps
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

import data
import npo

# ----------------------------------------------------------------------------- methods

METHOD_KEYS = {"GA": "ga", "GA+KL": "ga_kl", "GA+RT": "ga_rt", "IDK+RT": "idk", "NPO": "npo", "NPO+KL": "npo_kl",
               "NPO+RT": "npo_rt", "DPO": "dpo", "DPO+KL": "dpo_kl", "DPO+RT": "dpo_rt"}  # paper name -> npo.METHODS
FIGURE_METHODS = ("GA", "GA+RT", "IDK+RT", "NPO", "NPO+RT", "DPO+RT")  # the released unlearn.py's list
# (learning rate, beta) per setting alpha: the released parameter_values.yml
PAPER_HPARAMS = {
    1.0: {"GA": (5e-4, None), "GA+KL": (5e-4, None), "GA+RT": (5e-4, None), "IDK+RT": (5e-4, None),
          "NPO": (5e-3, 1.0), "NPO+KL": (5e-3, 1.0), "NPO+RT": (5e-3, 1.0),
          "DPO": (5e-3, 0.1), "DPO+KL": (5e-3, 0.1), "DPO+RT": (5e-3, 0.1)},
    0.0: {"GA": (1e-4, None), "GA+KL": (1e-4, None), "GA+RT": (1e-4, None), "IDK+RT": (1e-4, None),
          "NPO": (5e-2, 10.0), "NPO+KL": (5e-2, 10.0), "NPO+RT": (5e-2, 10.0),
          "DPO": (5e-2, 5.0), "DPO+KL": (5e-2, 5.0), "DPO+RT": (2e-2, 5.0)},
}
W_STATS = ("W_mean", "W_min", "W_max")  # NPO's weights W = 2 sigmoid(beta r) over the forget samples
COLLAPSE_LR, COLLAPSE_BETA = 5e-3, 1.0  # GA and NPO at one learning rate, alpha = 1
# The released code's note on its Proposition 1 plot: one lr for every beta, an evaluation every 5 steps.
SWEEP_BETAS, SWEEP_LR, SWEEP_STEPS, SWEEP_EVAL_EVERY = (0.01, 0.1, 0.2, 0.5, 1.0), 5e-4, 10_000, 5


@dataclass(frozen=True)
class Spec:
    label: str
    method: npo.Method
    lr: float
    beta: float | None = None  # None: the method has no beta


def paper_spec(label: str, alpha: float, n_forget: int, n_retain: int, lr=None, beta=None, name=None) -> Spec:
    """The released setting of a method at alpha (0 or 1), with optional overrides."""
    method = npo.get_method(METHOD_KEYS[label])
    paper_lr, paper_beta = PAPER_HPARAMS[alpha][label]
    if method.forget == "idk" and method.retain:
        # unlearning_loss weighs the IDK and retain means by their shares of the samples (TOFU's one
        # concatenated batch); the released synthetic code adds the two means: undo the shares.
        share = n_forget / (n_forget + n_retain)
        method = dataclasses.replace(method, forget_coef=1 / share, retain_coef=1 / (1 - share))
    return Spec(name or label, method, lr or paper_lr, beta or paper_beta)


# ----------------------------------------------------------------------------- data

def law(alpha: float, d: int, which: str):
    """(mean (d,), theta (d, 2), bias (1, 2)) of the retain or forget distribution."""
    sign, label = (-1.0, 0) if which == "retain" else (1.0, 1)
    theta, bias = torch.zeros(d, 2, dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64)
    theta[:, label], bias[0, label] = 1 / d ** 0.5, 1.0
    return sign * alpha * torch.ones(d, dtype=torch.float64), theta, bias


def draw(n: int, mean: torch.Tensor, theta: torch.Tensor, bias: torch.Tensor):
    """n samples from torch's global RNG as the released MyDist.generate_data draws them: every
    sample's mode at once, then per sample x ~ N(mean, I) and its label. -> x (n, d), y (n,)."""
    # each sample's mode: there is one (the released forget law's two others have probability 0), so
    # the draw only moves the RNG on, as it does there
    torch.multinomial(torch.tensor([1.0]), n, replacement=True)
    xs, ys = [], []
    for _ in range(n):
        xs.append(mean + torch.randn(len(mean), dtype=torch.float64))  # = MultivariateNormal(mean, I).sample()
        ys.append(torch.multinomial(torch.softmax((xs[-1] - mean).view(1, -1) @ theta + bias, dim=-1), 1))
    return torch.stack(xs), torch.cat(ys).view(n)


@dataclass
class Task:
    """One setting alpha for S seeds, stacked on dim 0."""
    alpha: float
    seeds: list[int]
    W: torch.Tensor   # (S, N, d)
    x: dict           # split -> (S, n, d); splits: retain, forget, eval_retain, eval_forget
    y: dict           # split -> (S, n); also "idk", the uniformly drawn IDK labels of the forget inputs
    features: dict    # split -> relu(W x^T) (S, N, n), transposed for the per-step products
    a_finetuned: torch.Tensor = None  # (S, N) fitted on retain + forget: the start and the reference
    a_retain: torch.Tensor = None     # (S, N) fitted on retain only: the target
    fit_grad_norm: dict = None        # {"finetuned", "retain"}: (S,) gradient norms at the end of the fits


def make_task(alpha: float, seeds, d=16, n_features=128, n_retain=1000, n_forget=200, n_eval=1000) -> Task:
    """Per seed, the released finetune.py's draws in its order; fit() adds the two models."""
    retain, forget = law(alpha, d, "retain"), law(alpha, d, "forget")
    draws = []
    for seed in seeds:
        torch.manual_seed(seed)
        W = torch.randn(n_features, d, dtype=torch.float64) / d ** 0.5
        x_r, y_r = draw(n_retain, *retain)
        x_f, y_f = draw(n_forget, *forget)
        y_idk = torch.multinomial(torch.softmax(torch.zeros(n_forget, 2, dtype=torch.float64), -1), 1)
        x_er, y_er = draw(n_eval, *retain)
        x_ef, y_ef = draw(n_eval, *forget)
        draws.append((W, x_r, x_f, x_er, x_ef, y_r, y_f, y_idk.squeeze(1), y_er, y_ef))
    W, *rest = (torch.stack(t) for t in zip(*draws))
    x = dict(zip(("retain", "forget", "eval_retain", "eval_forget"), rest[:4]))
    y = dict(zip(("retain", "forget", "idk", "eval_retain", "eval_forget"), rest[4:]))
    return Task(float(alpha), [int(s) for s in seeds], W, x, y,
                {split: torch.relu(W @ xs.transpose(1, 2)) for split, xs in x.items()})


# ----------------------------------------------------------------------------- model and fits

def label_logprob(logit: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log p(y|x) = log softmax([logit, 0])_y: logit (S, M, n), y (S, n) -> (S, M, n)."""
    return F.logsigmoid((1 - 2 * y).unsqueeze(1) * logit)  # class 0: logsigmoid(logit); class 1: of -logit


def class_logits(logit: torch.Tensor) -> torch.Tensor:
    """logit (...) -> the two classes' logits [logit, 0] (..., 2), the form npo.kl_divergence takes."""
    return F.pad(logit.unsqueeze(-1), (0, 1))


def fit(task: Task, steps: int = 20_000, lr: float = 0.05) -> Task:
    """The released pretrained_model() for both models of every seed at once: gradient descent on the
    mean NLL from a = 0. The fine-tuned model fits the retain and forget samples, the retain model the
    retain samples (the forget ones weigh 0 in its mean), so one product over the features serves both."""
    features = torch.cat([task.features["retain"], task.features["forget"]], 2)  # (S, N, n)
    is_class_0 = (torch.cat([task.y["retain"], task.y["forget"]], 1) == 0).to(features.dtype)  # (S, n)
    (S, N, n), n_retain = features.shape, task.y["retain"].shape[1]
    a = features.new_zeros(S, 2, N)  # fine-tuned, retain
    weight = features.new_zeros(2, n)
    weight[0], weight[1, :n_retain] = 1 / n, 1 / n_retain  # each fit's mean over its own samples
    for step in range(steps + 1):
        # d/da mean_i -log p(y_i|x_i) = mean_i z_i (sigmoid(a . z_i) - 1{y_i = 0}), (S, 2, N)
        grad = ((torch.sigmoid(a @ features) - is_class_0.unsqueeze(1)) * weight) @ features.transpose(1, 2)
        if step < steps:
            a -= lr * grad
    task.a_finetuned, task.a_retain = a[:, 0], a[:, 1]
    grad_norm = grad.norm(dim=-1)                                                      # (S, 2)
    task.fit_grad_norm = {"finetuned": grad_norm[:, 0].tolist(), "retain": grad_norm[:, 1].tolist()}
    return task


# ----------------------------------------------------------------------------- unlearning

def unlearn(task: Task, specs: list[Spec], steps: int, eval_every: int) -> dict:
    """Full-batch gradient descent on every method's loss for all seeds at once, from the fine-tuned
    model, evaluated (with the step's loss statistics) at steps 0, eval_every, ..., and the last.
    Returns {"steps", "a" (S, M, N), forget_distance|retain_distance|drift (||a - a_0||): (E, S, M),
    W_mean|W_min|W_max (NPO's weights): (E, M)}."""
    S, M = len(task.seeds), len(specs)
    a0 = task.a_finetuned.unsqueeze(1)                                                 # (S, 1, N)
    features, y = task.features, task.y
    with torch.no_grad():  # the frozen fine-tuned (reference) and retain (target) models, once
        ref = {"forget": label_logprob(a0 @ features["forget"], y["forget"]).flatten(),  # (S * n_f,)
               "idk": label_logprob(a0 @ features["forget"], y["idk"]).flatten(),
               "retain_logits": class_logits(a0 @ features["retain"])}                 # (S, 1, n_r, 2)
        target = {split: class_logits(task.a_retain.unsqueeze(1) @ features[f"eval_{split}"])
                  for split in ("forget", "retain")}                                   # (S, 1, n_eval, 2)
    ones_forget = torch.ones_like(ref["forget"])                                       # one token per answer
    ones_retain = torch.ones(y["retain"].numel(), dtype=ones_forget.dtype)
    with_retain = [m for m, spec in enumerate(specs) if spec.method.retain]  # the retain set is the big one
    needs_kl = any(spec.method.retain == "kl" for spec in specs)
    lr = torch.tensor([spec.lr for spec in specs], dtype=a0.dtype).view(1, M, 1)
    a = a0.repeat(1, M, 1).requires_grad_(True)                                        # (S, M, N)
    eval_steps, history = [], {key: [] for key in ("forget_distance", "retain_distance", "drift", *W_STATS)}
    for step in range(steps + 1):
        # per method m, (S * n,) scores (unbind: one backward op for all methods, not one per method)
        logit_forget = a @ features["forget"]                                          # (S, M, n_f)
        logp_forget = [t.flatten() for t in label_logprob(logit_forget, y["forget"]).unbind(1)]
        logp_idk = [t.flatten() for t in label_logprob(logit_forget, y["idk"]).unbind(1)]
        retain_terms = {}
        if with_retain:
            logit_retain = a[:, with_retain] @ features["retain"]                      # (S, M_r, n_r)
            retain_terms["nll"] = label_logprob(logit_retain, y["retain"]).unbind(1)
            if needs_kl:
                retain_terms["kl"] = npo.kl_divergence(class_logits(logit_retain), ref["retain_logits"]).unbind(1)
        total, stats = 0.0, []
        for m, spec in enumerate(specs):
            retain = None
            if spec.method.retain:  # "nll": the retain labels' log-probs; "kl": KL(fine-tuned || current)
                retain = npo.Scores(retain_terms[spec.method.retain][with_retain.index(m)].flatten(), ones_retain)
            loss, step_stats = npo.unlearning_loss(
                spec.method, forget=npo.Scores(logp_forget[m], ones_forget, ref["forget"]), retain=retain,
                idk=npo.Scores(logp_idk[m], ones_forget, ref["idk"]), beta=spec.beta or 1.0)  # GA, IDK: no beta
            total = total + S * loss
            stats.append(step_stats)
        if step % eval_every == 0 or step == steps:
            eval_steps.append(step)
            with torch.no_grad():
                for split in ("forget", "retain"):
                    logits = class_logits(a @ features[f"eval_{split}"])
                    history[f"{split}_distance"].append(npo.kl_divergence(logits, target[split]).mean(-1))
                history["drift"].append((a - a0).norm(dim=-1))
            for key in W_STATS:
                history[key].append(torch.tensor([s.get(key, math.nan) for s in stats], dtype=torch.float64))
        if step == steps:
            break
        (grad,) = torch.autograd.grad(total, a)
        with torch.no_grad():
            a -= lr * grad
    return {"steps": eval_steps, "a": a.detach()} | {key: torch.stack(values) for key, values in history.items()}


# ----------------------------------------------------------------------------- analysis

def mean_std(values: torch.Tensor, digits: int = 4) -> str:
    """'mean ± std' (sample std) over seeds of the finite entries (a diverged seed is data, not a crash)."""
    v = values[torch.isfinite(values)].double()
    mean, std = (v.mean().item() if v.numel() else math.nan), (v.std().item() if v.numel() > 1 else 0.0)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def fit_growth(t: torch.Tensor, y: torch.Tensor) -> dict:
    """Least-squares fits y = c0 + c1 t and y = c0 + c1 log t: {"linear"|"log": (slope c1, R^2)}."""
    out = {}
    for name, x in (("linear", t), ("log", torch.log(t))):
        x, y_c = x - x.mean(), y - y.mean()
        covariance, variance_x, variance_y = (x * y_c).sum(), (x * x).sum(), (y_c * y_c).sum()
        out[name] = ((covariance / variance_x).item(), (covariance ** 2 / (variance_x * variance_y)).item())
    return out


def collapse_rates(specs: list[Spec], run: dict) -> dict:
    """Per method, the seed mean of ||a_t - a_0|| fitted against t and against log t over t in
    [T / 10, T]: {label: {"linear"|"log": (slope, R^2)}}."""
    steps = torch.tensor(run["steps"], dtype=torch.float64)
    keep = steps >= max(0.1 * steps[-1].item(), 1.0)
    return {spec.label: fit_growth(steps[keep], run["drift"][keep, :, m].mean(1)) for m, spec in enumerate(specs)}


def summary_table(specs: list[Spec], run: dict) -> list[str]:
    """Per method, mean ± std over seeds: start, minimum (each seed's) and end of both distances."""
    lines = ["| method | lr | beta | start forget | start retain | min forget | step of min | end forget "
             "| end retain | NPO weight W at end: mean (min) |", "|---|---|---|---|---|---|---|---|---|---|"]
    steps = torch.tensor(run["steps"], dtype=torch.float64)
    for m, spec in enumerate(specs):
        forget, retain = run["forget_distance"][:, :, m], run["retain_distance"][:, :, m]  # (E, S)
        at_min = torch.nan_to_num(forget, nan=math.inf).argmin(0)                      # (S,)
        lines.append(f"| {spec.label} | {spec.lr:g} | {'-' if spec.beta is None else f'{spec.beta:g}'} "
                     f"| {mean_std(forget[0])} | {mean_std(retain[0])} | {mean_std(forget[at_min, range(len(at_min))])}"
                     f" | {mean_std(steps[at_min], 0)} | {mean_std(forget[-1])} | {mean_std(retain[-1])} "
                     f"| {run['W_mean'][-1, m]:.3g} ({run['W_min'][-1, m]:.3g}) |")
    return lines


def run_record(task: Task, specs: list[Spec], run: dict) -> dict:
    """JSON record of a run: per-seed metrics [method][seed][evaluation], W statistics [method][evaluation]."""
    return {"alpha": task.alpha, "seeds": task.seeds, "steps": run["steps"], "fit_grad_norm": task.fit_grad_norm,
            "methods": [{"label": s.label, "lr": s.lr, "beta": s.beta} for s in specs],
            **{key: run[key].permute(2, 1, 0).tolist() for key in ("forget_distance", "retain_distance", "drift")},
            **{key: run[key].T.tolist() for key in W_STATS}}


def strict_json(x):
    """Non-finite floats -> None: strict JSON."""
    if isinstance(x, dict):
        return {k: strict_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [strict_json(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


# ----------------------------------------------------------------------------- figures

def seed_band(ax, x, values: torch.Tensor, label: str, color) -> None:
    """Seed mean of values (E, S) as a line, ±1 std over seeds as a light band."""
    mean = values.mean(1)
    ax.plot(x, mean, color=color, label=label, lw=1.6)
    if values.shape[1] > 1:
        ax.fill_between(x, mean - values.std(1), mean + values.std(1), color=color, alpha=0.08, lw=0)


def plot_figure(path: str, runs: dict) -> None:
    """The paper's Figure 2 panels and NPO's mean weight W, seed means with a ±1 std band over seeds.
    runs: {alpha: (specs, run)}. Distance axes stop at 1.5x the starting forget distance and at the
    largest seed-mean retain distance: one diverging method would otherwise flatten every curve."""
    fig = Figure(figsize=(16, 9.5))  # no pyplot: nothing global to close
    axes = fig.subplots(2, 3)
    panels = [(1.0, "forget_distance", "(a1) forget distance, alpha = 1"),
              (1.0, "retain_distance", "(a2) retain distance, alpha = 1"),
              (1.0, "retain_vs_forget", "(a3) retain vs forget distance, alpha = 1"),
              (0.0, "forget_distance", "(b) forget distance, alpha = 0"),
              (1.0, "W_mean", "(c) NPO's weight W = 2 sigmoid(beta r), alpha = 1")]
    for ax, (alpha, metric, title) in zip(axes.flat, panels):
        ax.set_title(title, fontsize=10.5)
        ax.grid(alpha=0.3)
        if alpha not in runs:
            ax.text(0.5, 0.5, f"alpha = {alpha:g} not run", ha="center", transform=ax.transAxes)
            continue
        specs, run = runs[alpha]
        forget, retain = run["forget_distance"], run["retain_distance"]               # (E, S, M)
        top = {"forget_distance": 1.5 * forget[0].mean(0).max().item(), "W_mean": 1.05,
               "retain_distance": 1.1 * torch.nan_to_num(retain.mean(1), nan=0.0).max().item()}
        for m, spec in enumerate(specs):
            if metric == "retain_vs_forget":
                ax.plot(forget[:, :, m].mean(1), retain[:, :, m].mean(1), color=f"C{m}", lw=1.6)
            elif metric == "W_mean":  # 1 throughout for GA and IDK
                ax.plot(run["steps"], run["W_mean"][:, m], color=f"C{m}", lw=1.6)
            else:
                seed_band(ax, run["steps"], run[metric][:, :, m], spec.label, f"C{m}")
        if metric == "retain_vs_forget":
            ax.plot(forget[0].mean(), retain[0].mean(), "k*", ms=11)  # the start
            ax.set(xlabel="forget distance", ylabel="retain distance", xlim=(0, top["forget_distance"]),
                   ylim=(0, top["retain_distance"]))
        else:
            ylabel = "mean W over the forget samples" if metric == "W_mean" else metric.replace("_", " ")
            ax.set(xlabel="step", ylabel=ylabel, xlim=(0, run["steps"][-1]), ylim=(0, top[metric]))
    handles = {label: h for ax in axes.flat for h, label in zip(*ax.get_legend_handles_labels())}
    axes[1, 2].axis("off")
    axes[1, 2].legend(handles.values(), handles.keys(), loc="center", fontsize=12, frameon=False)
    fig.suptitle("NPO paper Figure 2 with the released code's data, fits and settings: seed means, band ±1 std "
                 "over seeds (axes clipped; trajectories.json has every seed)")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    data.write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def plot_growth(path: str, specs: list[Spec], run: dict, title: str) -> None:
    """||a_t - a_0|| against t and, as a fraction of its last value, against log t (the collapse rate);
    retain vs forget distance."""
    fig = Figure(figsize=(17, 5))
    axes = fig.subplots(1, 3)
    steps = torch.tensor(run["steps"][1:], dtype=torch.float64)
    for m, spec in enumerate(specs):
        drift = run["drift"][1:, :, m]                                                 # (E - 1, S)
        seed_band(axes[0], steps, drift, spec.label, f"C{m}")
        seed_band(axes[1], steps, drift / drift[-1], spec.label, f"C{m}")
        axes[2].plot(run["forget_distance"][:, :, m].mean(1), run["retain_distance"][:, :, m].mean(1),
                     color=f"C{m}", label=spec.label)
    axes[0].set(xlabel="step", ylabel="||a_t - a_0||", title="against t: GA's straight line is linear growth")
    axes[1].set(xlabel="step (log scale)", ylabel="||a_t - a_0|| / ||a_T - a_0||", xscale="log",
                title="against log t: a straight line is logarithmic growth")
    axes[2].set(xlabel="forget distance", ylabel="retain distance", xscale="log", yscale="log",
                title="retain vs forget distance (seed means)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    data.write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


# ----------------------------------------------------------------------------- CLI

def option(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    out_dir: str = option("out/synthetic", "output directory")
    alphas: tuple = option((1.0, 0.0), "settings (mean gap alpha): 1 and/or 0, the two the paper ran")
    seeds: tuple = option((1000, 2000, 3000, 4000, 5000), "seeds; each draws W and all the data")
    methods: tuple = option(FIGURE_METHODS, f"methods, from {', '.join(METHOD_KEYS)}")
    steps: int = option(2000, "unlearning steps")
    eval_every: int = option(25, "evaluate every this many steps (and at the last)")
    d: int = option(16, "input dimension")
    n_features: int = option(128, "random ReLU features N")
    n_retain: int = option(1000, "retain training samples")
    n_forget: int = option(200, "forget training samples")
    n_eval: int = option(1000, "evaluation samples per distribution")
    fit_steps: int = option(20_000, "gradient-descent steps of the fine-tuned and retain fits")
    fit_lr: float = option(0.05, "learning rate of the fits")
    collapse_steps: int = option(4000, f"steps of GA and NPO (beta {COLLAPSE_BETA:g}) at lr {COLLAPSE_LR:g}, "
                                       "alpha = 1, for the collapse rate; 0 skips it")
    sweep_beta: bool = option(False, f"also run GA and NPO at beta in {SWEEP_BETAS}, lr {SWEEP_LR:g}, "
                                     f"{SWEEP_STEPS} steps, alpha = 1")
    threads: int = option(2, "threads running the settings (and the collapse and sweep runs) side by side")
    plot: bool = option(True, "write the PNG figures")


def csv_of(kind):
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(v.strip()) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}")
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.splitlines()[:2]),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(Config):
        flag, kind = "--" + f.name.replace("_", "-"), type(f.default)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            parse = csv_of(type(f.default[0])) if kind is tuple else kind
            parser.add_argument(flag, type=parse, default=f.default, help=f.metadata["help"])
    return parser


def validate(cfg: Config) -> list[str]:
    """Every option in its range and the output directory writable (created) before any work starts;
    -> every problem found (empty: valid)."""
    problems, lowest = [], {"collapse_steps": 0}
    for name, value in vars(cfg).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, tuple) and not value:
            problems.append(f"{flag} is empty")
        elif type(value) is int and value < lowest.get(name, 1):
            problems.append(f"{flag} must be >= {lowest.get(name, 1)}, got {value}")
        elif type(value) is float and not (math.isfinite(value) and value > 0):
            problems.append(f"{flag} must be a positive finite number, got {value}")
    if any(a not in PAPER_HPARAMS for a in cfg.alphas) or len(set(cfg.alphas)) < len(cfg.alphas):
        problems.append(f"--alphas must be 1 and/or 0 (the released code's settings), got {cfg.alphas}")
    if any(not 0 <= s < 2 ** 63 for s in cfg.seeds) or len(set(cfg.seeds)) < len(cfg.seeds):
        problems.append(f"--seeds must be distinct integers in [0, 2^63), got {cfg.seeds}")
    unknown = [m for m in cfg.methods if m not in METHOD_KEYS]
    if unknown or len(set(cfg.methods)) < len(cfg.methods):
        problems.append(f"--methods: unknown or repeated {', '.join(unknown) or 'method'}; "
                        f"valid methods: {', '.join(METHOD_KEYS)}")
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
        if not os.access(cfg.out_dir, os.W_OK):
            raise PermissionError(13, "not writable")
    except OSError as e:
        problems.append(f"--out-dir {cfg.out_dir}: cannot write there ({e.strerror})")
    return problems


def main(argv=None) -> int:
    cfg = Config(**vars(build_parser().parse_args(argv)))
    if problems := validate(cfg):
        print(f"train_synthetic.py: error: {'; '.join(problems)}", file=sys.stderr)
        return 2
    try:
        run_experiment(cfg, argv)
    except KeyboardInterrupt:  # the worker threads cannot be interrupted: leave without waiting for them
        print("\ntrain_synthetic.py: interrupted", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)
    return 0


def run_experiment(cfg: Config, argv=None) -> None:
    """Both settings, the collapse run, the optional beta sweep; writes JSON, markdown and figures.
    Independent runs go to cfg.threads Python threads (torch releases the GIL in its kernels); each
    runs single-threaded, so the numbers do not depend on the thread count."""
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    spec = lambda label, alpha, **kw: paper_spec(label, alpha, cfg.n_forget, cfg.n_retain, **kw)  # noqa: E731
    alphas = {*cfg.alphas, 1.0} if cfg.collapse_steps or cfg.sweep_beta else set(cfg.alphas)  # both at alpha 1
    # the draws come from torch's global RNG, one seed after the other: not in threads
    tasks = {alpha: make_task(alpha, cfg.seeds, cfg.d, cfg.n_features, cfg.n_retain, cfg.n_forget, cfg.n_eval)
             for alpha in sorted(alphas)}
    print(f"data drawn at {time.perf_counter() - t_start:.1f} s", flush=True)
    jobs = {f"alpha={alpha:g}": (tasks[alpha], [spec(label, alpha) for label in cfg.methods], cfg.steps, cfg.eval_every)
            for alpha in cfg.alphas}
    if cfg.collapse_steps:
        collapse = [spec("GA", 1.0, lr=COLLAPSE_LR), spec("NPO", 1.0, lr=COLLAPSE_LR, beta=COLLAPSE_BETA)]
        jobs["collapse"] = (tasks[1.0], collapse, cfg.collapse_steps, cfg.eval_every)
    if cfg.sweep_beta:
        sweep = [spec("NPO", 1.0, lr=SWEEP_LR, beta=b, name=f"NPO beta={b:g}") for b in SWEEP_BETAS]
        jobs["beta_sweep"] = (tasks[1.0], [spec("GA", 1.0, lr=SWEEP_LR)] + sweep, SWEEP_STEPS, SWEEP_EVAL_EVERY)
    pool = ThreadPoolExecutor(cfg.threads)
    try:
        list(pool.map(lambda task: fit(task, cfg.fit_steps, cfg.fit_lr), tasks.values()))
        print(f"models fitted at {time.perf_counter() - t_start:.1f} s", flush=True)
        futures = {name: pool.submit(unlearn, *job) for name, job in jobs.items()}
        runs = {name: (jobs[name][1], future.result()) for name, future in futures.items()}
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    elapsed = time.perf_counter() - t_start
    records = {"config": dataclasses.asdict(cfg)} | {name: run_record(jobs[name][0], *runs[name]) for name in runs}
    if "collapse" in runs:
        records["collapse"]["fits"] = collapse_rates(*runs["collapse"])

    command = " ".join(["python train_synthetic.py", *(sys.argv[1:] if argv is None else argv)])
    lines = ["# Synthetic experiment (NPO paper, Figure 2)", "", f"`{command}`: {elapsed:.1f} s (figures "
             f"excluded), {cfg.threads} thread(s), torch {torch.__version__}, float64. Seeds "
             f"{', '.join(map(str, cfg.seeds))}. Distances: mean KL(retain model || current model) on the "
             "forget / retain evaluation sets; mean ± std (ddof=1) over seeds; 'min forget' is each seed's "
             f"minimum over the evaluations (every {cfg.eval_every} steps).", ""]
    for alpha in cfg.alphas:
        grads = tasks[alpha].fit_grad_norm
        lines += [f"## alpha = {alpha:g}", "", f"Fits ({cfg.fit_steps} gradient-descent steps, lr {cfg.fit_lr:g}): "
                  f"final gradient norm of the fine-tuned model {max(grads['finetuned']):.1e}, of the retain "
                  f"model {max(grads['retain']):.1e} (largest over seeds).", ""]
        lines += summary_table(*runs[f"alpha={alpha:g}"]) + [""]
    if "collapse" in runs:
        lines += [f"## Collapse rate (alpha = 1, lr {COLLAPSE_LR:g}, {cfg.collapse_steps} steps)", "",
                  f"The seed mean of ||a_t - a_0|| fitted against t and against log t over steps "
                  f"{cfg.collapse_steps // 10}-{cfg.collapse_steps}. Linear growth: R^2 ~ 1 against t; logarithmic "
                  "growth: R^2 ~ 1 against log t.", "",
                  "| method | slope vs t | R^2 vs t | slope vs log t | R^2 vs log t |", "|---|---|---|---|---|"]
        lines += [f"| {label} | {fits['linear'][0]:.3e} | {fits['linear'][1]:.4f} | {fits['log'][0]:.4f} "
                  f"| {fits['log'][1]:.4f} |" for label, fits in records["collapse"]["fits"].items()] + [""]
    if "beta_sweep" in runs:
        lines += [f"## Beta sweep (alpha = 1, lr {SWEEP_LR:g}, {SWEEP_STEPS} steps)", ""]
        lines += summary_table(*runs["beta_sweep"]) + [""]
    summary = "\n".join(lines)
    data.write_atomic(os.path.join(cfg.out_dir, "trajectories.json"), json.dumps(strict_json(records)))
    data.write_atomic(os.path.join(cfg.out_dir, "summary.md"), summary + "\n")
    written = ["trajectories.json", "summary.md"]
    if cfg.plot:
        plot_figure(os.path.join(cfg.out_dir, "figure2.png"), {alpha: runs[f"alpha={alpha:g}"] for alpha in cfg.alphas})
        written.append("figure2.png")
        for name, lr in (("collapse", COLLAPSE_LR), ("beta_sweep", SWEEP_LR)):
            if name in runs:
                plot_growth(os.path.join(cfg.out_dir, f"{name}.png"), *runs[name], f"{name.replace('_', ' ')}, "
                            f"alpha = 1, lr {lr:g}: mean over {len(cfg.seeds)} seeds")
                written.append(f"{name}.png")
    print(summary)
    print(f"wrote {', '.join(os.path.join(cfg.out_dir, w) for w in written)}; "
          f"total {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
