"""The checks of `torchrun ... train_tofu.py` that need GPUs: NCCL, DDP, and FSDP2 with bf16 mixed
precision (tests/test_distributed.py makes the same comparisons on CPU with gloo).

    python tools/check_gpu.py --nproc 2                  # a machine with 2 or more GPUs
    python tools/check_gpu.py --nproc 4 --shape 8b       # the memory check on a Llama-3.1-8B shape
    python tools/check_gpu.py --nproc 2 --device cpu     # the script itself, on CPU (gloo)

1. The toy pipeline in one process, then in --nproc processes with DDP and with FSDP on the
   single run's target and retain models: their evaluation logs (DDP: identical to one GPU's;
   FSDP computes from weights gathered in bf16 where one GPU runs autocast, so: how close), the
   unlearning records and the final weights.
2. One unlearning epoch (NPO+RT) of a random Llama-shaped model under FSDP on --nproc GPUs: the
   peak memory train_tofu logs (rank 0), against the estimate of --dry-run.
Prints what it measured; exits 1 when a run fails or DDP's evaluation differs from one GPU's.
"""

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import model as models  # noqa: E402
import train_tofu  # noqa: E402
from tofu_style import write_tofu_style_dataset  # noqa: E402

TOY = ["--n-authors", "10", "--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--vocab-size", "300",
       "--base-epochs", "2", "--finetune-epochs", "2", "--epochs", "2", "--batch-size", "6", "--micro-batch-size", "2",
       "--eval-batch-size", "4", "--ds-size", "8", "--max-new-tokens", "8", "--methods", "npo_rt,ga_kl", "--seeds", "1"]
NAME = "builtin-generated-forget10"
LLAMA = {"model_type": "llama", "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "vocab_size": 128256,
         "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
         "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192}}
SHAPES = {  # Llama-3.2-1B and Llama-3.1-8B, and a small one for --device cpu
    "1b": LLAMA | {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "tie_word_embeddings": True},
    "8b": LLAMA | {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "tie_word_embeddings": False},
    "tiny": LLAMA | {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "vocab_size": 1000, "tie_word_embeddings": False},
}


def train_tofu_command(nproc: int, args: list[str]) -> list[str]:
    launcher = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return launcher + [str(ROOT / "train_tofu.py")] + args


def launch(nproc: int, args: list[str]) -> str:
    result = subprocess.run(train_tofu_command(nproc, args), cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        print(result.stdout[-4000:], result.stderr[-4000:], sep="\n")
        sys.exit(f"failed: {' '.join(train_tofu_command(nproc, args))}")
    return result.stdout


def records(job_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(job_dir.glob("epoch_*.json"))]


def weights(model_dir: Path) -> dict:
    return {name: t.float().clone() for name, t in models.read_safetensors(model_dir / "model.safetensors")}


def compare_logs(a: Path, b: Path) -> tuple[bool, float, float]:
    """(identical, max |difference| of the per-example losses, share of equal generations)."""
    identical, loss_diff, same, total = True, 0.0, 0, 0
    for path in sorted(a.glob("eval_*.json")):
        log_a, log_b = json.loads(path.read_text()), json.loads((b / path.name).read_text())
        identical &= log_a == log_b
        for key in ("avg_gt_loss", "avg_paraphrased_loss"):
            loss_diff = max([loss_diff] + [abs(log_a[key][i] - log_b[key][i]) for i in log_a[key]])
        same += sum(log_a["generated_text"][i][1] == log_b["generated_text"][i][1] for i in log_a["generated_text"])
        total += len(log_a["generated_text"])
    return identical, loss_diff, same / total


def check_toy(nproc: int, device: str, out: Path) -> bool:
    print(f"1. toy pipeline: one process, then {nproc} (device {device})")
    launch(1, TOY + ["--device", device, "--out-dir", str(out / "single")])
    single, ok = out / "single" / NAME, True
    for mode in ("ddp", "fsdp"):
        for part in ("data", "tokenizer", "base", "target", "retain"):
            shutil.copytree(single / part, out / mode / NAME / part)
        launch(nproc, TOY + ["--device", device, "--out-dir", str(out / mode), "--parallel", mode])
        for which in ("target", "retain"):
            identical, loss_diff, same = compare_logs(single / "eval" / which, out / mode / NAME / "eval" / which)
            ok &= identical or mode == "fsdp"
            print(f"  {mode} eval of the {which}: identical {identical}; max |loss diff| {loss_diff:.3g}; "
                  f"equal generations {same:.0%}")
        for job in ("npo_rt/seed0", "ga_kl/seed0"):
            a, b = records(single / "unlearn" / job), records(out / mode / NAME / "unlearn" / job)
            train = max(abs(x[k] - y[k]) / max(1.0, abs(x[k])) for x, y in zip(a, b) for k in x if k.startswith("train_"))
            utility = max(abs(x["Model Utility"] - y["Model Utility"]) for x, y in zip(a, b))
            wa, wb = weights(single / "unlearn" / job / "model"), weights(out / mode / NAME / "unlearn" / job / "model")
            print(f"  {mode} {job}: train stats max rel diff {train:.3g}; Model Utility max diff {utility:.3g}; "
                  f"final weights max |diff| {max((wa[k] - wb[k]).abs().max().item() for k in wa):.3g}")
    return ok


def check_memory(nproc: int, device: str, shape: str, out: Path) -> None:
    print(f"2. memory: one NPO+RT epoch of a random Llama-{shape}-shaped model, FSDP on {nproc} processes")
    data_dir, model_dir = out / "data", out / f"llama-{shape}"
    write_tofu_style_dataset(data_dir, n_authors=20, seed=0)
    torch.manual_seed(0)
    with torch.device(device):  # random weights, initialised where it is fast
        net = models.GPT(models.config_from_hf(SHAPES[shape]))
    models.save_pretrained(net.to(torch.bfloat16), model_dir)
    del net
    data.bpe_tokenizer(data.train_bpe(data.corpus_texts(data_dir), 1000)).save(model_dir)
    args = ["--model", str(model_dir), "--retain-model", str(model_dir), "--data-dir", str(data_dir),
            "--prompt-format", "qa", "--device", device, "--methods", "npo_rt", "--seeds", "1", "--epochs", "1",
            "--batch-size", "32", "--ds-size", "8", "--max-new-tokens", "8", "--grad-checkpointing", "--logprob", "fused"]
    predicted = train_tofu.memory_needed(train_tofu.parse_args(args), nproc)["total"] / 2**30
    log = launch(nproc, args + ["--parallel", "fsdp", "--out-dir", str(out / "memory")])
    peak = re.search(r"\[npo_rt seed 0\] epoch 1/1 .*peak ([\d.]+) GiB", log)
    print(f"  --dry-run's estimate per GPU {predicted:.1f} GiB; measured peak on rank 0: "
          f"{peak.group(1) + ' GiB' if peak else 'none logged (CPU)'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2, help="processes (GPUs)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--shape", default=None, choices=tuple(SHAPES), help="model of the memory check (default: 1b; tiny on CPU)")
    args = parser.parse_args()
    if args.device == "cuda" and torch.cuda.device_count() < args.nproc:
        sys.exit(f"--nproc {args.nproc}: {torch.cuda.device_count()} GPU(s) here")
    with tempfile.TemporaryDirectory() as tmp:
        ok = check_toy(args.nproc, args.device, Path(tmp) / "toy")
        check_memory(args.nproc, args.device, args.shape or ("1b" if args.device == "cuda" else "tiny"), Path(tmp) / "memory")
    print("ok" if ok else "FAILED: DDP's evaluation differs from one process's")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
