"""train_synthetic.py against the NPO authors' released synthetic code, seed for seed.

    python tools/compare_synthetic.py PATH/TO/negative-preference-optimization/synthetic \\
        --python PATH/TO/VENV/bin/python

Runs the released finetune.py and unlearn.py as they are, except for the lines that set alpha, the
seed list and the configurations (taken from the released parameter_values.yml for that alpha),
in a scratch directory under --python: an interpreter with the released code's requirements (torch,
numpy, scipy, scikit-learn, pyyaml, tqdm, matplotlib), never the project's. Then runs
train_synthetic.py's procedure here and prints, per setting, seed and method, the largest absolute
difference of the forget and retain distance trajectories over the released code's evaluations
(steps 0, 25, ..., 1975), after the first draws and the fitted models. Takes minutes (about 20 here
for the default methods): not part of CI. Rerun with the same --workdir, it reuses the released
models and trajectories it finds there.
"""
import argparse
import ast
import json
import os
import pickle
import re
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path

# The released configuration names -> train_synthetic.py's labels.
RELEASED_NAMES = {"GA": "GA", "KL": "GA+KL", "GDiff": "GA+RT", "idk": "IDK+RT", "NPO": "NPO", "NPO_KL": "NPO+KL",
                  "NPO_GDiff": "NPO+RT", "dpo": "DPO", "dpo_KL": "DPO+KL", "dpo_GDiff": "DPO+RT"}
FIRST = 3  # first draws shown per split


def released_configurations(yml_text: str, alpha: int, names) -> list:
    """The (name, config) entries that parameter_values.yml lists, commented out, for this alpha."""
    section = yml_text.split(f"## gap alpha = {alpha}")[1].split("## gap alpha")[0]
    found = [(name, ast.literal_eval(config))
             for name, config in re.findall(r"\('(\w+)',\s*(\{[^}]*\})\)", section)]
    return [(name, config) for name, config in found if name in names]


def patched(source: str, **assignments) -> str:
    """The script with each top-level `name = ...` line (or `configurations = [...]` block) replaced."""
    for name, value in assignments.items():
        pattern = r"^configurations = \[.*?^\]" if name == "configurations" else rf"^{name} = [^\n]*"
        source, count = re.subn(pattern, f"{name} = {value!r}", source, count=1, flags=re.M | re.S)
        if count != 1:
            raise SystemExit(f"compare_synthetic.py: no top-level `{name} = ...` in the released script")
    return source


def drive_released(released: Path, alpha: int, seeds: list, names: list, out_json: Path) -> None:
    """Runs inside --python: the released scripts in the current (scratch) directory, then their pickles
    -> out_json. Prints the first draws of each seed, the numbers tests/test_synthetic.py checks."""
    sys.path.insert(0, str(released))
    configurations = released_configurations((released / "parameter_values.yml").read_text(), alpha, names)
    folder = Path(f"record/record_d16_N128_K_2_nf200_nr_1000_alpha_{alpha}")
    fitted = all((folder / f"finetuned_seed_{seed}.pkl").exists() for seed in seeds)
    for script, extra in (("finetune.py", {}), ("unlearn.py", {"configurations": configurations}))[fitted:]:
        text = patched((released / script).read_text(), alpha=alpha, seed_list=seeds, **extra)
        Path(script).write_text(text)
        runpy.run_path(script, run_name="__main__")  # finetune.py only where no earlier run left its models
    result = {}
    for seed in seeds:
        with open(folder / f"finetuned_seed_{seed}.pkl", "rb") as f:
            (retain_model, finetuned_model), (retain_set, forget_set, y_idk), *_ = pickle.load(f)
        with open(folder / f"record_seed_{seed}_1.pkl", "rb") as f:
            records, _, _ = pickle.load(f)
        first = {"W": finetuned_model.W[0], "x_retain": retain_set[0][0], "y_retain": retain_set[1][:, 0],
                 "x_forget": forget_set[0][0], "y_forget": forget_set[1][:, 0], "y_idk": y_idk[:, 0],
                 "x_eval_retain": finetuned_model.X_eval_r_dataset[0],
                 "x_eval_forget": finetuned_model.X_eval_f_dataset[0]}
        first = {key: value[:FIRST].tolist() if key.startswith(("W", "x")) else value[:10].tolist()
                 for key, value in first.items()}
        print(f"released code, alpha={alpha}, seed={seed}, first draws: {json.dumps(first)}", flush=True)
        result[seed] = {"first": first, "a_finetuned": finetuned_model.a[:, 0].tolist(),
                        "a_retain": retain_model.a[:, 0].tolist(),
                        "trajectories": {RELEASED_NAMES[name]: {
                            key: [float(v) for v in records[f"record_{name}"][0][f"{key}_quality"]]
                            for key in ("forget", "retain")} for name, _ in configurations}}
    out_json.write_text(json.dumps(result))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("released", type=Path, help="the released code's synthetic/ folder")
    parser.add_argument("--python", default=sys.executable, help="interpreter with the released code's requirements")
    parser.add_argument("--alphas", default="1,0", help="settings, comma-separated: 1 and/or 0")
    parser.add_argument("--seeds", default="1000,2000,3000,4000,5000", help="seeds, comma-separated")
    parser.add_argument("--methods", default="GA,GDiff,idk,NPO,NPO_GDiff,dpo_GDiff",
                        help=f"released configuration names, from {', '.join(RELEASED_NAMES)}")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--drive", action="store_true", help=argparse.SUPPRESS)  # the --python side
    parser.add_argument("--out-json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    alphas, seeds = [int(a) for a in args.alphas.split(",")], [int(s) for s in args.seeds.split(",")]
    names = args.methods.split(",")
    if args.drive:
        drive_released(args.released.resolve(), alphas[0], seeds, names, args.out_json)
        return 0
    if not (args.released / "unlearn.py").is_file() or any(n not in RELEASED_NAMES for n in names):
        parser.error(f"expected the released synthetic/ folder and methods from {', '.join(RELEASED_NAMES)}")

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch
    import train_synthetic as ts
    torch.set_num_threads(1)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="npo-synthetic-"))
    for alpha in alphas:
        run_dir = workdir / f"alpha_{alpha}"
        run_dir.mkdir(parents=True, exist_ok=True)
        out_json = run_dir / f"released-{args.methods.replace(',', '-')}.json"
        if not (out_json.exists() and set(map(str, seeds)) <= set(json.loads(out_json.read_text()))):  # reuse
            with open(run_dir / "released.log", "a") as log:
                subprocess.run([args.python, os.path.abspath(__file__), str(args.released.resolve()), "--drive",
                                "--alphas", str(alpha), "--seeds", args.seeds, "--methods", args.methods,
                                "--out-json", str(out_json.resolve())], cwd=run_dir, stdout=log,
                               stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
        printed = [line for line in open(run_dir / "released.log") if line.startswith("released code,")]
        print("".join(dict.fromkeys(printed)), end="")  # once each, though the log grows over reruns
        released = {int(seed): value for seed, value in json.loads(out_json.read_text()).items()}
        labels = [RELEASED_NAMES[name] for name in names]
        task = ts.fit(ts.make_task(float(alpha), seeds))
        specs = [ts.paper_spec(label, float(alpha), 200, 1000) for label in labels]
        run = ts.unlearn(task, specs, steps=2000, eval_every=25)
        starts = {"forget": [], "retain": []}
        for s, seed in enumerate(seeds):
            theirs = released[seed]
            ours = {"W": task.W[s, 0], "x_retain": task.x["retain"][s, 0], "y_retain": task.y["retain"][s],
                    "x_forget": task.x["forget"][s, 0], "y_forget": task.y["forget"][s], "y_idk": task.y["idk"][s],
                    "x_eval_retain": task.x["eval_retain"][s, 0], "x_eval_forget": task.x["eval_forget"][s, 0]}
            same = all(ours[key][:len(value)].tolist() == value for key, value in theirs["first"].items())
            fit_diff = {key: (getattr(task, key)[s] - torch.tensor(theirs[key], dtype=torch.float64)).abs().max().item()
                        for key in ("a_finetuned", "a_retain")}
            print(f"alpha={alpha} seed={seed}: first draws {'identical' if same else 'DIFFER'}; fitted a, max |diff|: "
                  f"fine-tuned {fit_diff['a_finetuned']:.1e}, retain {fit_diff['a_retain']:.1e} "
                  f"(|a| up to {task.a_retain[s].abs().max().item():.1f})")
            print(f"  {'method':8s} {'max|d forget|':>14s} {'max|d retain|':>14s}   released start forget / retain")
            for m, label in enumerate(labels):
                curves = theirs["trajectories"][label]
                theirs_curves = {key: torch.tensor(curves[key], dtype=torch.float64) for key in ("forget", "retain")}
                diffs = [(run[f"{key}_distance"][:len(values), s, m] - values).abs().max().item()
                         for key, values in theirs_curves.items()]
                print(f"  {label:8s} {diffs[0]:14.2e} {diffs[1]:14.2e}   "
                      f"{curves['forget'][0]:.4f} / {curves['retain'][0]:.4f}")
            starts["forget"].append(theirs["trajectories"][labels[0]]["forget"][0])
            starts["retain"].append(theirs["trajectories"][labels[0]]["retain"][0])
        print(f"alpha={alpha}: released seed-mean start: forget distance {sum(starts['forget']) / len(seeds):.4f}, "
              f"retain distance {sum(starts['retain']) / len(seeds):.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
