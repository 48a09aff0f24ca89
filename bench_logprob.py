"""Benchmark: lm_head + per-sequence log-probs + NPO loss, forward and backward, four ways; and one
NPO training step with a cached versus a recomputed reference model.

    python bench_logprob.py --threads 1 --vocab-sizes 50257 --tokens 8192 --repeats 2

Each variant computes L = npo.npo_loss(logp, logp_ref, beta) from hidden (B, T, C), the lm_head
weight (V, C) and labels, then L.backward():
    plain      logits = hidden @ weight.T, npo.sequence_logprob: (B, T, V) fp32 logits and more
    fused      npo.fused_sequence_logprob: (chunk, V) logits at a time, recomputed in backward
    fused-npo  FusedNPOLoss below, a benchmark variant (not used by training): the gradients are
               formed during forward, so no logits are recomputed
    torch-lce  torch's F.linear_cross_entropy(reduction="none"), chunked like ours, summed per sequence
Every position but the first holds a label token (128 per sequence), so the fused paths' skipping
of question and padding positions saves nothing here: the table compares the kernels alone.

Method: every (variant, V, tokens) measurement runs in a fresh process, which first checks the
variant's loss and gradients against plain on a 256-token problem ("check": the largest norm-wise
relative error), then times one forward + backward: wall time, and the process's CPU time, which
other programs' load inflates far less (with --threads 1 it equals the wall time on an idle machine).
"peak MB" is the most resident memory the step adds above its inputs (the gradients it returns
included): VmHWM after the step minus VmRSS before it, with the peak counter reset and freed heap
returned to the OS first. Each of --repeats rounds runs every variant once, so load from other
programs hits all of them alike; the table shows minima. The reference step trains model.py's GPT
with logp_ref either recomputed by the frozen model every step or cached once before it.
"""

import argparse
import copy
import ctypes
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import npo

VARIANTS = ("plain", "fused", "fused-npo", "torch-lce")
TOKENS_PER_SEQUENCE = 128
BETA = 0.1


@dataclass
class BenchConfig:
    vocab_sizes: list[int] = field(default_factory=lambda: [4096, 50257])
    tokens: list[int] = field(default_factory=lambda: [8192])  # label tokens per step
    hidden: int = 768
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    chunk_size: int | None = None  # label tokens per chunk (None: npo.default_chunk_size(V))
    repeats: int = 1  # rounds, each running every variant once in a fresh process
    ref_step_repeats: int = 5  # timed steps per mode of the reference-step benchmark (0: skip it)
    threads: int = 0  # torch threads (0: torch's default)


class FusedNPOLoss(torch.autograd.Function):
    """npo_loss(logp, logp_ref, beta) with logp from hidden @ weight.T, gradients formed in forward.

    A benchmark variant, kept here to measure what forming the gradients early buys. Chunks hold
    whole sequences, so once a chunk's softmax gives its sequences' logp_i, dL/dlogp_i =
    W_i / B = 2 sigmoid(beta r_i) / B is known, and the logit gradients W_i / B (onehot - softmax)
    are formed in the softmax's buffer and multiplied out at once: 6NCV FLOPs, as the plain path,
    where the fused path recomputes the logits in backward (8NCV). Backward only scales the stored
    gradients: one backward per forward, no graph through logp_ref. fp32 inputs.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, logp_ref, beta, chunk_size):
        # hidden: (B, T, C), weight: (V, C), labels: (B, T), logp_ref: (B,)
        targets = npo.shift_labels(labels)  # (B, T)
        mask = targets != npo.IGNORE_INDEX  # (B, T)
        B = labels.shape[0]
        per_chunk = max(1, chunk_size * B // max(1, int(mask.sum())))  # whole sequences per chunk
        logp = hidden.new_zeros(B)  # (B,)
        grad_hidden, grad_weight = torch.zeros_like(hidden), torch.zeros_like(weight)
        for s in range(0, B, per_chunk):
            m = mask[s:s + per_chunk]  # (b, T)
            h, t = hidden[s:s + per_chunk][m], targets[s:s + per_chunk][m]  # (n, C), (n,)
            probs = h @ weight.t()  # (n, V) logits, turned into the softmax in place
            label = probs.gather(1, t[:, None]).squeeze(1)  # (n,)
            shift = probs.amax(dim=1, keepdim=True)  # (n, 1)
            total = probs.sub_(shift).exp_().sum(dim=1, keepdim=True)  # (n, 1)
            token_logp = label - (shift + total.log()).squeeze(1)  # (n,)
            logp[s:s + per_chunk] = token_logp.new_zeros(m.shape).masked_scatter(m, token_logp).sum(dim=1)
            w = npo.npo_weights(logp[s:s + per_chunk] - logp_ref[s:s + per_chunk], beta) / B  # (b,)
            w_tokens = w[:, None].expand_as(m)[m, None]  # (n, 1): each token its sequence's dL/dlogp
            grad_logits = probs.mul_(-w_tokens / total).scatter_add_(1, t[:, None], w_tokens)  # (n, V)
            grad_hidden[s:s + per_chunk][m] = grad_logits @ weight
            grad_weight.addmm_(grad_logits.t(), h)
            del probs, grad_logits  # free this chunk's buffer before the next one is allocated
        ctx.grads = grad_hidden, grad_weight
        return npo.npo_loss(logp, logp_ref, beta)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.grads
        del ctx.grads
        return grad_hidden.mul_(grad_loss), grad_weight.mul_(grad_loss), None, None, None, None


def make_inputs(V: int, n_tokens: int, C: int, seed: int = 0):
    """hidden (B, T, C), weight (V, C), labels (B, T) with n_tokens label tokens (rounded down to whole
    sequences), logp_ref (B,)."""
    g = torch.Generator().manual_seed(seed)
    B, T = n_tokens // TOKENS_PER_SEQUENCE, TOKENS_PER_SEQUENCE + 1  # labels[:, 0] is never predicted
    hidden = torch.randn(B, T, C, generator=g).requires_grad_(True)
    weight = (torch.randn(V, C, generator=g) * 0.05).requires_grad_(True)
    labels = torch.randint(0, V, (B, T), generator=g)
    # Near the policy's own log-prob (per token about -(ln V + var(logit) / 2)), so that the NPO
    # weights 2 sigmoid(beta r) are O(1) as early in unlearning, not 1e-30 (denormal arithmetic).
    logp_ref = -TOKENS_PER_SEQUENCE * (math.log(V) + 0.05**2 * C / 2) + 5 * torch.randn(B, generator=g)
    return hidden, weight, labels, logp_ref


def npo_step(variant: str, hidden, weight, labels, logp_ref, chunk_size: int) -> torch.Tensor:
    """Forward + backward of the NPO loss one way; returns the loss."""
    if variant == "plain":
        loss = npo.npo_loss(npo.sequence_logprob(F.linear(hidden, weight), labels)[0], logp_ref, BETA)
    elif variant == "fused":
        logp, _ = npo.fused_sequence_logprob(hidden, weight, labels, chunk_size=chunk_size)
        loss = npo.npo_loss(logp, logp_ref, BETA)
    elif variant == "fused-npo":
        loss = FusedNPOLoss.apply(hidden, weight, labels, logp_ref, BETA, chunk_size)
    else:  # torch-lce in chunks like ours: its "auto" ones (16 rows) took 1.5x longer at V = 50257, 1 thread
        B, T, C = hidden.shape
        options = torch.nn.LinearCrossEntropyOptions(chunking_method=None, batch_chunk_size=chunk_size)
        nll = F.linear_cross_entropy(hidden.reshape(B * T, C), weight, npo.shift_labels(labels).reshape(B * T),
                                     reduction="none", options=options)  # (B * T,), 0 where ignored
        loss = npo.npo_loss(-nll.view(B, T).sum(dim=1), logp_ref, BETA)
    loss.backward()
    return loss.detach()


def _status_kb(name: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(name + ":"))


def measure(variant: str, V: int, n_tokens: int, C: int, chunk_size: int | None) -> dict:
    """In a fresh process: the check against plain, then one timed step and its peak memory."""
    chunk_size = chunk_size or npo.default_chunk_size(V)
    outputs = []
    for name in ("plain", variant):
        hidden, weight, labels, logp_ref = make_inputs(V, 2 * TOKENS_PER_SEQUENCE, C, seed=1)
        outputs.append((npo_step(name, hidden, weight, labels, logp_ref, chunk_size), hidden.grad, weight.grad))
    check = max(((a - b).double().norm() / b.double().norm()).item() for a, b in zip(outputs[1], outputs[0]))
    del outputs, hidden, weight
    inputs = make_inputs(V, n_tokens, C)
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the OS, so reusing it counts again
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    baseline_kb = _status_kb("VmRSS")
    start, start_cpu = time.perf_counter(), time.process_time()
    npo_step(variant, *inputs, chunk_size)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_mb": (_status_kb("VmHWM") - baseline_kb) / 1024,
            "check": check}


def reference_step_times(repeats: int) -> dict[str, list[tuple[float, float]]]:
    """One NPO step of model.py's default GPT (forward, backward, AdamW) on 8 x 128 tokens, with
    logp_ref recomputed by the frozen model every step or cached once; the modes interleaved."""
    from model import GPT, GPTConfig

    torch.manual_seed(0)
    policy = GPT(GPTConfig())
    ref_model = copy.deepcopy(policy).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    ids = torch.randint(0, policy.config.vocab_size, (8, 128))
    labels = ids.clone()
    labels[:, :32] = npo.IGNORE_INDEX  # the question
    with torch.no_grad():
        cached = npo.sequence_logprob(ref_model(ids), labels)[0]
    times = {"recomputed": [], "cached": []}  # (wall, CPU) seconds
    for i in range(repeats + 1):  # the first round warms up
        for mode in times:
            start, start_cpu = time.perf_counter(), time.process_time()
            with torch.no_grad():
                logp_ref = npo.sequence_logprob(ref_model(ids), labels)[0] if mode == "recomputed" else cached
            loss = npo.npo_loss(npo.sequence_logprob(policy(ids), labels)[0], logp_ref, BETA)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if i:
                times[mode].append((time.perf_counter() - start, time.process_time() - start_cpu))
    return times


def at_least(minimum: int):
    def parse(text: str) -> int:
        if not text.lstrip("-").isdigit() or int(text) < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return int(text)
    return parse


def run_in_fresh_process(cfg: BenchConfig, variant: str, V: int, n_tokens: int) -> dict:
    spec = {"variant": variant, "V": V, "n_tokens": n_tokens, "C": cfg.hidden, "chunk_size": cfg.chunk_size}
    proc = subprocess.run([sys.executable, __file__, "--threads", str(cfg.threads), "--measure", json.dumps(spec)],
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{variant} at V={V}, {n_tokens} tokens failed:\n{proc.stderr}")
    print(f"  {variant} V={V} tokens={n_tokens}: {proc.stdout.strip()}", file=sys.stderr, flush=True)
    return json.loads(proc.stdout)


def main(argv=None) -> int:
    d = BenchConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab-sizes", type=at_least(2), nargs="+", default=d.vocab_sizes)
    p.add_argument("--tokens", type=at_least(TOKENS_PER_SEQUENCE), nargs="+", default=d.tokens,
                   help=f"label tokens per step, in sequences of {TOKENS_PER_SEQUENCE}")
    p.add_argument("--hidden", type=at_least(1), default=d.hidden)
    p.add_argument("--variants", nargs="+", default=d.variants, choices=VARIANTS)
    p.add_argument("--chunk-size", type=at_least(1), default=d.chunk_size, help="default: npo.default_chunk_size(V)")
    p.add_argument("--repeats", type=at_least(1), default=d.repeats, help="rounds of fresh processes, one per variant")
    p.add_argument("--ref-step-repeats", type=at_least(0), default=d.ref_step_repeats,
                   help="0: skip the reference step")
    p.add_argument("--threads", type=at_least(0), default=d.threads, help="torch threads (0: torch's default)")
    p.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one measurement, in this fresh process
    args = vars(p.parse_args(argv))
    measure_spec = args.pop("measure")
    cfg = BenchConfig(**args)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if measure_spec:
        print(json.dumps(measure(**json.loads(measure_spec))))
        return 0

    print(f"# NPO loss forward + backward: C = {cfg.hidden}, fp32, CPU, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, chunk size {cfg.chunk_size or 'npo.default_chunk_size(V)'}\n\n"
          f"`python bench_logprob.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n\n"
          "| variant | V | label tokens | wall min (s) | CPU min (s) | wall / plain | CPU / plain | peak MB above "
          "inputs | memory / plain | check |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    for V in cfg.vocab_sizes:
        for n_tokens in cfg.tokens:
            runs = {variant: [] for variant in cfg.variants}
            for _ in range(cfg.repeats):
                for variant in cfg.variants:
                    runs[variant].append(run_in_fresh_process(cfg, variant, V, n_tokens))
            best = {variant: (min(r["seconds"] for r in results), min(r["cpu_seconds"] for r in results),
                              max(r["peak_mb"] for r in results), max(r["check"] for r in results))
                    for variant, results in runs.items()}
            plain = best.get("plain")
            for variant, (wall, cpu, peak_mb, check) in best.items():
                ratios = (f"{wall / plain[0]:.2f} | {cpu / plain[1]:.2f} | {peak_mb:.0f} | {peak_mb / plain[2]:.3f}"
                          if plain else f"- | - | {peak_mb:.0f} | -")
                print(f"| {variant} | {V} | {n_tokens} | {wall:.2f} | {cpu:.2f} | {ratios} | {check:.1e} |", flush=True)

    if cfg.ref_step_repeats:
        times = {mode: [min(column) for column in zip(*steps)] for mode, steps in
                 reference_step_times(cfg.ref_step_repeats).items()}  # mode -> [wall min, CPU min]
        print(f"\nOne NPO step of model.py's GPTConfig() model (forward, backward, AdamW), 8 x 128 tokens, "
              f"{cfg.ref_step_repeats} interleaved repeats:\n\n"
              "| reference log-probs | wall min (s) | CPU min (s) |\n|---|---:|---:|")
        for mode, label in (("recomputed", "recomputed every step"), ("cached", "cached once")):
            print(f"| {label} | {times[mode][0]:.3f} | {times[mode][1]:.3f} |")
        print(f"\nrecomputed / cached: {times['recomputed'][0] / times['cached'][0]:.2f}x (wall), "
              f"{times['recomputed'][1] / times['cached'][1]:.2f}x (CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
