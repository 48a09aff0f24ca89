"""One NPO+RT unlearning step of this project against the same step written the way peers write
it with transformers, side by side on the same Llama-shaped random model.

    project       model.from_pretrained of the model directory; log pi_ref of the forget batch
                  cached once before training; the fused log-prob
                  path (only answer positions reach lm_head, never the (B, T, V) logits);
                  npo.unlearning_loss("npo_rt")
    transformers  LlamaForCausalLM, as in the NPO authors' TOFU trainer: a second, frozen copy of
                  the model re-run on the forget batch at every step, full logits, per-sequence
                  losses from them (TOFU's get_batch_loss), the retain NLL via labels=

Both take the same batches (TOFU-like question/answer rows, labels -100 on the question and the
padding) and the same AdamW step, with or without gradient checkpointing (--grad-checkpointing:
TOFU's Llama config turns it on); their losses must agree. Time: the median of --steps steps
after one warm-up; the two variants' steps alternate in one process, so that the drifting load of
a shared machine slows both alike. Peak memory: each variant alone in a fresh process. On a CPU,
the peak resident set (getrusage's ru_maxrss) minus the resident set after the imports: weights,
optimizer state, activations and any second model, not the libraries; with
MALLOC_MMAP_THRESHOLD_=131072, because glibc otherwise keeps freed blocks for reuse and the
resident set overstates the live tensors by hundreds of MB (with it, every block above 128 KiB is
mapped on allocation and returned on free). On CUDA: torch.cuda.max_memory_allocated.

    python bench_real_step.py                                      # CPU, fp32: 4 x 512, vocab 32000
    python bench_real_step.py --device cuda --dtype bfloat16 --shape llama-3.2-1b
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F

import model as models
import npo

BETA = 0.1
SHAPES = {  # LlamaConfig fields
    "small": dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048,
                  tie_word_embeddings=False),
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                         rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}


@dataclass
class BenchConfig:
    device: str = "cpu"
    dtype: str = "float32"  # weights (and AdamW's moments, which torch keeps in the same dtype)
    shape: str = "small"  # small | llama-3.2-1b
    batch_size: int = 8  # forget rows, and as many retain rows
    seq_len: int = 128
    steps: int = 5  # timed steps of each variant, after one warm-up step
    grad_checkpointing: bool = False  # in both variants
    lr: float = 1e-5
    threads: int = 2
    seed: int = 0


def qa_batch(cfg: BenchConfig, vocab_size: int, seed: int):
    """Right-padded rows of a question (16-40 tokens) and an answer (20-75 tokens): TOFU's forget10
    has questions of about 25 tokens and answers of about 46 (10-90%: 23-70), at ~4 characters a
    token. Labels -100 on the question and the padding -> (ids, labels, mask)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (cfg.batch_size, cfg.seq_len), generator=g)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for b in range(cfg.batch_size):
        question = int(torch.randint(16, 41, (), generator=g))
        end = min(cfg.seq_len, question + int(torch.randint(20, 76, (), generator=g)))
        labels[b, question:end] = ids[b, question:end]
        mask[b, :end] = 1
    ids[mask == 0] = 0  # the pad id
    return ids.to(cfg.device), labels.to(cfg.device), mask.to(cfg.device)


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def project_step(cfg: BenchConfig, model_dir: str, dtype):
    net = models.from_pretrained(model_dir, dtype=dtype, device=cfg.device)
    net.gradient_checkpointing = cfg.grad_checkpointing
    forget = qa_batch(cfg, net.config.vocab_size, cfg.seed)
    retain = qa_batch(cfg, net.config.vocab_size, cfg.seed + 1)
    with torch.no_grad():
        forget_ref = models.answer_logprob(net.eval(), *forget[:2], fused=True)[0]
    net.train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr)
    method = npo.get_method("npo_rt")

    def step():
        logp, n = models.answer_logprob(net, forget[0], forget[1], fused=True)
        retain_logp, retain_n = models.answer_logprob(net, retain[0], retain[1], fused=True)
        loss, _ = npo.unlearning_loss(method, forget=npo.Scores(logp, n, forget_ref),
                                      retain=npo.Scores(retain_logp, retain_n), beta=BETA)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()
    return step


def transformers_step(cfg: BenchConfig, model_dir: str, dtype):
    from transformers import LlamaForCausalLM

    policy = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).to(cfg.device).train()
    oracle = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype).to(cfg.device).eval()
    if cfg.grad_checkpointing:
        policy.gradient_checkpointing_enable()
    forget = qa_batch(cfg, policy.config.vocab_size, cfg.seed)
    retain = qa_batch(cfg, policy.config.vocab_size, cfg.seed + 1)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr)

    def get_batch_loss(logits, labels):  # TOFU's: per-sequence summed NLL from full logits
        loss = F.cross_entropy(logits[..., :-1, :].transpose(-1, -2), labels[..., 1:], ignore_index=-100,
                               reduction="none")
        return loss.sum(dim=-1)

    def step():
        ids, labels, mask = forget
        outputs = policy(ids, labels=labels, attention_mask=mask)
        forget_loss_current = get_batch_loss(outputs.logits, labels)
        with torch.no_grad():
            forget_loss_oracle = get_batch_loss(oracle(ids, labels=labels, attention_mask=mask).logits, labels)
        neg_log_ratios = forget_loss_current - forget_loss_oracle
        forget_loss = -F.logsigmoid(BETA * neg_log_ratios).mean() * 2 / BETA
        retain_loss = policy(retain[0], labels=retain[1], attention_mask=retain[2]).loss
        loss = forget_loss + retain_loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()
    return step


STEPS = {"project": project_step, "transformers": transformers_step}


def measure(cfg: BenchConfig, variant: str, model_dir: str) -> dict:
    """In this fresh process: "time" runs the two variants' steps alternately, so that the drifting
    load of a shared machine slows both alike (one warm-up step each, then cfg.steps timed);
    "project" or "transformers" runs that variant alone, two steps, for its peak memory."""
    torch.set_num_threads(cfg.threads)
    dtype = getattr(torch, cfg.dtype)
    cuda = cfg.device.startswith("cuda")
    from transformers import LlamaForCausalLM  # noqa: F401  (before the baseline: libraries are not counted)
    baseline = resident_bytes()
    names = list(STEPS) if variant == "time" else [variant]
    steps = {name: STEPS[name](cfg, model_dir, dtype) for name in names}
    losses, seconds = {name: [] for name in names}, {name: [] for name in names}
    for _ in range(cfg.steps + 1 if variant == "time" else 2):
        for name in names:
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            losses[name].append(steps[name]())  # .item() waits for the step to finish
            seconds[name].append(time.perf_counter() - t0)
    if variant == "time":
        return {"losses": losses, "step_seconds": {name: statistics.median(s[1:]) for name, s in seconds.items()}}
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    return {"peak_bytes": peak}


def write_random_model(cfg: BenchConfig, model_dir: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    LlamaForCausalLM(LlamaConfig(**SHAPES[cfg.shape])).to(getattr(torch, cfg.dtype)).save_pretrained(model_dir)


def run_variant(cfg: BenchConfig, variant: str, model_dir: str, env=None) -> dict:
    cmd = [sys.executable, __file__, "--variant", variant, "--model-dir", model_dir]
    for k, v in asdict(cfg).items():
        name = k.replace("_", "-")
        cmd.append(f"--{name}" if v is True else f"--no-{name}" if v is False else f"--{name}={v}")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant}: {proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(BenchConfig):
        name = f"--{f.name.replace('_', '-')}"
        if f.type is bool or isinstance(f.default, bool):
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            parser.add_argument(name, type=type(f.default), default=f.default)
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: time | project | transformers
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = vars(parser.parse_args(argv))
    variant, model_dir = args.pop("variant"), args.pop("model_dir")
    cfg = BenchConfig(**args)
    if cfg.shape not in SHAPES:
        print(f"--shape must be one of {list(SHAPES)}", file=sys.stderr)
        return 2
    if variant:
        print(json.dumps(measure(cfg, variant, model_dir)))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        write_random_model(cfg, tmp)
        with torch.device("meta"):
            n_params = models.GPT(models.load_config(tmp)).num_params()
        timing = run_variant(cfg, "time", tmp)
        memory_env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "131072"}
        peak = {name: run_variant(cfg, name, tmp, memory_env)["peak_bytes"] for name in STEPS}
    seconds, losses = timing["step_seconds"], timing["losses"]
    # what both must hold: the trained model's weights, gradients and AdamW's two moments
    floor = 4 * n_params * torch.empty((), dtype=getattr(torch, cfg.dtype)).element_size()
    print(f"one NPO+RT step, {cfg.shape} Llama-shaped random model, {cfg.device} {cfg.dtype}, "
          f"forget + retain batches of {cfg.batch_size} x {cfg.seq_len}, AdamW, "
          f"gradient checkpointing {'on' if cfg.grad_checkpointing else 'off'}, {cfg.threads} thread(s), "
          f"torch {torch.__version__}")
    print(f"{'variant':<14}{'step (median of ' + str(cfg.steps) + ')':>22}{'peak memory':>16}"
          f"{'above ' + str(floor // 2**20) + ' MiB *':>20}   losses of steps 1..3")
    for name in STEPS:
        print(f"{name:<14}{seconds[name]:>20.3f} s{peak[name] / 2**20:>12.0f} MiB{(peak[name] - floor) / 2**20:>16.0f} MiB   "
              + " ".join(f"{x:.5f}" for x in losses[name][:3]))
    print(f"project vs transformers: {seconds['transformers'] / seconds['project']:.2f}x faster, "
          f"{peak['project'] / peak['transformers']:.2f}x the peak memory "
          f"({(peak['project'] - floor) / (peak['transformers'] - floor):.2f}x above the floor)")
    print(f"* the floor both variants hold: the trained model's weights, gradients and AdamW moments "
          f"({n_params / 1e6:.1f}M parameters x 4 x {floor // (4 * n_params)} bytes)")
    first = abs(losses["project"][0] - losses["transformers"][0]) / abs(losses["transformers"][0])
    if first > (1e-3 if cfg.dtype == "float32" else 3e-2):  # bf16 logits round differently
        print(f"the first-step losses differ by {first:.1e} (relative): not the same computation", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
