"""The report of a train_tofu.py run: metrics.jsonl, summary.md (printed), frontier.png (Forget
Quality against Model Utility, every seed), weights.png (NPO's weights W fading) and samples.md
(generations side by side). Everything here is read back from the run directory, so
`python report.py RUN_DIR` rebuilds it."""

import json
import statistics
import sys
from pathlib import Path

import data
import eval as tofu_eval


def job_records(run_dir: Path, methods: list[str], vocab: set[str]) -> dict:
    """{method: {seed: [epoch records in order]}} of the run's unlearning jobs, methods in order;
    the last record of a job that ended "ok" gains the degeneracy of its final generations."""
    jobs = {}
    for name in methods:
        for job in sorted((run_dir / "unlearn" / name).glob("seed*"), key=lambda p: int(p.name[4:])):
            records = [json.loads(p.read_text()) for p in sorted(job.glob("epoch_*.json"))]
            if not records:
                continue
            if records[-1]["status"] == "ok" and (job / "logs").exists():
                logs = tofu_eval.read_logs(job / "logs", (tofu_eval.FORGET_STEM,))
                records[-1].update(tofu_eval.degeneracy(logs, vocab))
            jobs.setdefault(name, {})[int(job.name[4:])] = records
    return jobs


def mean_sd(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{fmt(statistics.mean(values))} ± {fmt(sd)}"


def fmt(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:.2e}" if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4) else f"{v:.3f}"


def write(run) -> None:
    cfg, run_dir = run.cfg, run.dir
    retain_logs = run.retain_logs()
    vocab = tofu_eval.training_vocabulary(run.data_dir)
    reference = {}
    for which in ("target", "retain"):
        if (run_dir / "eval" / which / "done.json").exists():
            logs = tofu_eval.read_logs(run_dir / "eval" / which)
            reference[which] = {"method": which, "epoch": 0, "status": "ok", **tofu_eval.aggregate(logs, retain_logs),
                                **tofu_eval.degeneracy(logs, vocab)}
    jobs = job_records(run_dir, run.methods, vocab)
    lines = list(reference.values()) + [r for seeds in jobs.values() for records in seeds.values() for r in records]
    data.write_atomic(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in lines))
    summary = summarize(run, reference, jobs)
    data.write_atomic(run_dir / "summary.md", summary)
    print(summary)
    plot_frontier(run_dir / "frontier.png", reference, jobs, cfg.split)
    plot_weights(run_dir / "weights.png", jobs)
    samples(run_dir, jobs, cfg.seed)


def summarize(run, reference: dict, jobs: dict) -> str:
    cfg, target_mu = run.cfg, reference["target"]["Model Utility"]
    n_seeds = max((len(s) for s in jobs.values()), default=0)
    md = [f"# TOFU unlearning, {cfg.split}: {run.dir.name}", "",
          f"Data: {cfg.data_dir or f'built-in TOFU-style data, {cfg.n_authors} authors (seed {cfg.data_seed})'}. "
          f"Model: {cfg.model or cfg.base_model or f'built-in GPT, {cfg.n_layer} x {cfg.n_embd}, vocabulary {cfg.vocab_size}'}. "
          f"Unlearning: {cfg.epochs} epochs, lr {cfg.lr} (one warmup epoch, linear decay to 0), batch {cfg.batch_size}, "
          f"beta {cfg.beta}; seeds {cfg.seed}..{cfg.seed + n_seeds - 1}; {cfg.threads} thread(s) per process.", "",
          "| model | Forget Quality | Model Utility | forget ROUGE | degenerate |", "|---|---|---|---|---|"]
    for which, rec in reference.items():
        md.append(f"| {which} | {fmt(rec['Forget Quality'])} | {fmt(rec['Model Utility'])} | {fmt(rec['Forget ROUGE'])} | "
                  f"{rec['Degenerate Share']:.2f} |")
    md += ["", "Per method, mean ± sd over seeds: the last epoch, and the frontier statistic (the best Forget Quality "
           "among the epochs whose Model Utility is at least 50 / 75 / 90% of the target's; a seed that never keeps that "
           "much utility counts as 0). W = 2 sigmoid(beta r), NPO's weight (1 for GA), in the last epoch.", "",
           "| method | seeds ok | FQ last | MU last | best FQ, MU >= 50% | >= 75% | >= 90% | W last | degenerate |",
           "|---|---|---|---|---|---|---|---|---|"]
    for name, seeds in jobs.items():
        finals = [records[-1] for records in seeds.values() if records[-1]["status"] == "ok"]
        best = [[tofu_eval.best_forget_quality(records, target_mu, f) or 0.0 for records in seeds.values()] for f in tofu_eval.FRONTIER_FRACTIONS]
        md.append(f"| {name} | {len(finals)}/{len(seeds)} | {mean_sd([r['Forget Quality'] for r in finals])} | "
                  f"{mean_sd([r['Model Utility'] for r in finals])} | " + " | ".join(mean_sd(b) for b in best) +
                  f" | {mean_sd([r.get('train_W_mean') for r in finals])} | {mean_sd([r.get('Degenerate Share') for r in finals])} |")
    diverged = [f"{name} seed {seed}: {records[-1]['status']}" for name, seeds in jobs.items()
                for seed, records in seeds.items() if records[-1]["status"] != "ok"]
    if diverged:
        md += ["", "Diverged (recorded, not crashed): " + "; ".join(diverged)]
    return "\n".join(md) + "\n"


def plot_frontier(path: Path, reference: dict, jobs: dict, split: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = 1e-30  # a p-value of 0 has no place on a log axis
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    target = reference["target"]
    for color, (name, seeds) in zip(plt.cm.tab10.colors, jobs.items()):
        for k, records in enumerate(seeds.values()):
            ok = [r for r in records if r["status"] == "ok"]
            xs = [target["Model Utility"]] + [r["Model Utility"] for r in ok]
            ys = [max(target["Forget Quality"], floor)] + [max(r["Forget Quality"], floor) for r in ok]
            ax.plot(xs, ys, "-", color=color, alpha=0.35, lw=1)
            ax.plot(xs[-1], ys[-1], "o" if len(ok) == len(records) else "x", color=color, ms=6,
                    label=name if k == 0 else None)
    ax.plot(target["Model Utility"], max(target["Forget Quality"], floor), "k*", ms=14, label="target (before)")
    if "retain" in reference:
        ax.plot(reference["retain"]["Model Utility"], reference["retain"]["Forget Quality"], "P", color="gold",
                ms=12, markeredgecolor="k", label="retain model")
    ax.set_yscale("log")
    ax.set_xlabel("Model Utility")
    ax.set_ylabel("Forget Quality (KS-test p-value)")
    ax.set_title(f"TOFU {split}: each line one seed, one point per epoch; marker = last epoch (x: diverged)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    data.write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def plot_weights(path: Path, jobs: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for color, (name, seeds) in zip(plt.cm.tab10.colors, jobs.items()):
        for k, records in enumerate(seeds.values()):
            ok = [r for r in records if r["status"] == "ok" and "train_W_mean" in r]
            epochs = [r["epoch"] for r in ok]
            axes[0].plot(epochs, [r["train_W_mean"] for r in ok], "-o", ms=3, color=color, alpha=0.6, label=name if k == 0 else None)
            axes[1].plot(epochs, [r["train_r_mean"] for r in ok], "-o", ms=3, color=color, alpha=0.6)
    axes[0].set_ylabel("mean W = 2 sigmoid(beta r) (GA: 1)")
    axes[1].set_ylabel("mean r = log pi - log pi_ref, forget answers")
    axes[1].set_yscale("symlog")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    data.write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def samples(run_dir: Path, jobs: dict, seed: int, n_questions: int = 5) -> None:
    """The first forget questions: ground truth, the target's answer, each method's (one seed)."""
    answers = {"target": run_dir / "eval" / "target"}
    answers |= {name: run_dir / "unlearn" / name / f"seed{seed}" / "logs" for name in jobs}
    generated = {name: tofu_eval.read_logs(d, (tofu_eval.FORGET_STEM,))[tofu_eval.FORGET_STEM]["generated_text"]
                 for name, d in answers.items() if (d / f"{tofu_eval.FORGET_STEM}.json").exists()}
    md = [f"# Generations on forget questions (seed {seed}, last epoch)", ""]
    for i in map(str, range(n_questions)):
        if i not in generated["target"]:
            break
        question, _, truth = generated["target"][i]
        md += [f"## {question}", "", f"- **ground truth**: {truth}"]
        md += [f"- **{name}**: {gen[i][1]!r}" for name, gen in generated.items()] + [""]
    data.write_atomic(run_dir / "samples.md", "\n".join(md))


if __name__ == "__main__":
    import train_tofu
    run_dir = Path(sys.argv[1])
    cfg = train_tofu.Config(**{k: v for k, v in json.loads((run_dir / "config.json").read_text()).items()
                               if k in train_tofu.Config.__dataclass_fields__})
    write(train_tofu.Run(cfg))
