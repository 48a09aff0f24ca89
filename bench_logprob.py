"""Benchmark: the lm_head + per-sequence log-prob + NPO loss, forward and backward, and one NPO
training step with a cached versus a recomputed reference model.

    python bench_logprob.py --out bench_logprob.md     # full grid, one round (~9 min on 2 busy cores)
    python bench_logprob.py --quick                    # V in {4096, 50257}, 2048 tokens only

Variants, each computing L = npo_loss(logp, logp_ref, beta) from hidden (B, T, H), the lm_head
weight (V, H) and labels, then L.backward():
    plain           logits = hidden @ W.T; npo.sequence_logprob (materialises (B, T, V) in fp32)
    fused-eager     npo.fused_sequence_logprob, eager chunk kernels, backward recomputes logits
    fused-compiled  the same with the chunk kernels through torch.compile (compile time excluded)
    fused-npo       npo.fused_npo_loss: chunks of whole sequences, gradients formed in forward
    torch-lce       torch's F.linear_cross_entropy(..., reduction='none') per-token NLL, chunked
                    (LinearCrossEntropyOptions(batch_chunk_size=chunk_size)), summed per sequence
All tokens after the first of each sequence are label tokens (128 per sequence), so the label-
position selection of the fused paths saves nothing here: the table compares the kernels.

Method. Every (variant, V, N) runs in a fresh Python process. It first runs the variant on a small
problem (same V and H, 256 tokens) to warm up (and compile), checking there its loss and gradients
against the plain path (column "check": largest norm-wise relative error). Then it allocates the
inputs, and before each timed step frees the previous step's gradients, returns freed heap to the
OS (malloc_trim), resets the kernel's peak-RSS counter (writes 5 to /proc/self/clear_refs) and reads
VmRSS as the baseline; after the step it reads VmHWM. "peak MB" = VmHWM - baseline, the most
resident memory the step added above its inputs (the gradients it returns included), the largest
over the repeats. Time: wall time of one forward+backward, min and median over the repeats.
--repeats rounds are run, each running every variant once (one timed step per process), so that
a burst of load from other programs hits all variants alike; on a shared machine use
--repeats 3 (or more) and read the minimum.

The reference-step benchmark trains model.py's GPT (one process, the two modes interleaved):
    recomputed: logp_ref = sequence_logprob(ref_model(x)) under no_grad, then the policy step
    cached:     logp_ref from npo.precompute_ref_logprobs, computed once before the loop
"""

import argparse
import copy
import ctypes
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import npo

VARIANTS = ("plain", "fused-eager", "fused-compiled", "fused-npo", "torch-lce")
TOKENS_PER_SEQUENCE = 128
BETA = 0.1


@dataclass
class BenchConfig:
    vocab_sizes: list[int] = field(default_factory=lambda: [4096, 50257])
    tokens: list[int] = field(default_factory=lambda: [2048, 8192])  # label tokens per step
    hidden: int = 768
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    chunk_size: int | None = None  # None: npo.default_chunk_size(V)
    repeats: int = 1  # rounds; each runs every variant once in a fresh process
    ref_step: bool = True
    ref_step_repeats: int = 5
    threads: int = 0  # torch threads in the workers; 0 = torch's default
    quick: bool = False
    out: str | None = None


# ----------------------------------------------------------------------------------------------
# Worker: one variant, one size, in its own process


def _read_status_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not found in /proc/self/status")


def _trim_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def make_inputs(V: int, n_tokens: int, H: int, seed: int = 0):
    """hidden (B, T, H), weight (V, H), labels (B, T) with n_tokens label tokens, logp_ref (B,)."""
    g = torch.Generator().manual_seed(seed)
    B, T = max(1, n_tokens // TOKENS_PER_SEQUENCE), TOKENS_PER_SEQUENCE + 1  # labels[:, 0] has no prediction
    hidden = torch.randn(B, T, H, generator=g).requires_grad_(True)
    weight = (torch.randn(V, H, generator=g) * 0.05).requires_grad_(True)
    labels = torch.randint(0, V, (B, T), generator=g)
    # Near the policy's own log-prob (per token about -(ln V + var(logit) / 2)), so that the NPO
    # weights sigmoid(beta * r) are O(1), as early in unlearning, not 1e-30 (denormal territory).
    logit_var = (0.05**2) * H
    logp_ref = -TOKENS_PER_SEQUENCE * (math.log(V) + logit_var / 2) + 5 * torch.randn(B, generator=g)
    return hidden, weight, labels, logp_ref


def run_variant(variant: str, hidden, weight, labels, logp_ref, chunk_size: int) -> torch.Tensor:
    """Forward + backward of the NPO loss; returns the loss."""
    if variant == "plain":
        logp, _ = npo.sequence_logprob(F.linear(hidden, weight), labels)
        loss = npo.npo_loss(logp, logp_ref, BETA)
    elif variant in ("fused-eager", "fused-compiled"):
        logp, _ = npo.fused_sequence_logprob(
            hidden, weight, labels, chunk_size=chunk_size, compile=variant == "fused-compiled"
        )
        loss = npo.npo_loss(logp, logp_ref, BETA)
    elif variant == "fused-npo":
        loss = npo.fused_npo_loss(hidden, weight, labels, logp_ref, BETA, chunk_size=chunk_size, compile=False)
    elif variant == "torch-lce":
        B, T, H = hidden.shape
        targets = npo.shift_labels(labels)  # (B, T)
        # Chunked like ours: the "auto" chunking picks 16-32-row chunks here, ~8x slower on a CPU.
        options = torch.nn.LinearCrossEntropyOptions(chunking_method=None, batch_chunk_size=chunk_size)
        nll = F.linear_cross_entropy(
            hidden.reshape(B * T, H), weight, targets.reshape(B * T), reduction="none", options=options
        )  # (B * T,), 0 where ignored
        loss = npo.npo_loss(-nll.view(B, T).sum(dim=1), logp_ref, BETA)
    else:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    loss.backward()
    return loss.detach()


def _check_against_plain(variant: str, V: int, H: int, chunk_size: int) -> float:
    """Warm-up run on a small problem; largest relative error of loss and grads vs the plain path."""
    results = []
    for name in ("plain", variant):
        hidden, weight, labels, logp_ref = make_inputs(V, 2 * TOKENS_PER_SEQUENCE, H, seed=1)
        loss = run_variant(name, hidden, weight, labels, logp_ref, chunk_size)
        results.append((loss, hidden.grad, weight.grad))
    return max(
        ((a.double() - b.double()).norm() / b.double().norm()).item() for a, b in zip(results[1], results[0])
    )


def worker(spec: dict) -> dict:
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    V, N, H, variant = spec["V"], spec["N"], spec["H"], spec["variant"]
    chunk = spec["chunk_size"] or npo.default_chunk_size(V)
    t0 = time.perf_counter()
    check = _check_against_plain(variant, V, H, chunk)
    warmup_s = time.perf_counter() - t0
    hidden, weight, labels, logp_ref = make_inputs(V, N, H)
    times, peaks_kb = [], []
    for _ in range(spec["repeats"]):
        hidden.grad = weight.grad = None
        _trim_heap()  # freed heap back to the OS, so that reusing it shows up in the RSS again
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        baseline_kb = _read_status_kb("VmRSS")
        t = time.perf_counter()
        run_variant(variant, hidden, weight, labels, logp_ref, chunk)
        times.append(time.perf_counter() - t)
        peaks_kb.append(_read_status_kb("VmHWM") - baseline_kb)
    peak_kb = max(peaks_kb)
    return {
        "variant": variant, "V": V, "N": N, "H": H, "times": times, "peak_mb": peak_kb / 1024,
        "check": check, "warmup_s": warmup_s, "threads": torch.get_num_threads(),
    }


def ref_step_worker(spec: dict) -> dict:
    """One NPO step (forward, backward, AdamW) with cached vs recomputed reference log-probs."""
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    from model import GPT, GPTConfig  # the project's model

    torch.manual_seed(0)
    config = GPTConfig()  # vocab 4096, 4 layers, 256 wide, block 256
    B, T = 8, 128
    policy = GPT(config)
    ref_model = copy.deepcopy(policy).eval()
    for p in ref_model.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    ids = torch.randint(0, config.vocab_size, (B, T))
    labels = ids.clone()
    labels[:, : T // 4] = npo.IGNORE_INDEX  # question tokens
    cached = npo.precompute_ref_logprobs(ref_model, [(ids, labels)])

    def step(mode: str) -> float:
        t = time.perf_counter()
        if mode == "recomputed":
            with torch.no_grad():
                logp_ref, _ = npo.sequence_logprob(ref_model(ids), labels)
        else:
            logp_ref = cached
        logp, _ = npo.sequence_logprob(policy(ids), labels)
        loss = npo.npo_loss(logp, logp_ref, BETA)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - t

    for mode in ("cached", "recomputed"):  # warm-up
        step(mode)
    times = {"cached": [], "recomputed": []}
    for _ in range(spec["repeats"]):
        for mode in ("cached", "recomputed"):  # interleaved: both see the same machine load
            times[mode].append(step(mode))
    return {"times": times, "B": B, "T": T, "config": vars(config), "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------------------------
# Driver


def _run_subprocess(kind: str, spec: dict) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), f"--{kind}", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["exit code %d" % proc.returncode])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def format_table(rows: list[dict]) -> str:
    lines = [
        "| variant | V | label tokens | time min (s) | time median (s) | time / plain | peak MB above inputs | memory / plain | check |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    plain = {(r["V"], r["N"]): r for r in rows if r.get("variant") == "plain" and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['V']} | {r['N']} | error: {r['error']} | | | | | |")
            continue
        base = plain.get((r["V"], r["N"]))
        t_min, t_med = min(r["times"]), statistics.median(r["times"])
        t_ratio = f"{t_min / min(base['times']):.2f}" if base else "-"
        m_ratio = f"{r['peak_mb'] / base['peak_mb']:.3f}" if base and base["peak_mb"] > 0 else "-"
        lines.append(
            f"| {r['variant']} | {r['V']} | {r['N']} | {t_min:.2f} | {t_med:.2f} | {t_ratio} | "
            f"{r['peak_mb']:.0f} | {m_ratio} | {r['check']:.1e} |"
        )
    return "\n".join(lines)


def format_ref_step(res: dict) -> str:
    if "error" in res:
        return f"cached vs recomputed reference NPO step: error: {res['error']}"
    c, r = res["times"]["cached"], res["times"]["recomputed"]
    cfg = res["config"]
    return (
        f"One NPO training step (model.py GPT: {cfg['n_layer']} layers, width {cfg['n_embd']}, vocab "
        f"{cfg['vocab_size']}; batch {res['B']} x {res['T']} tokens; forward, backward, AdamW), "
        f"{len(c)} interleaved repeats:\n\n"
        "| reference | time median (s) | time min (s) |\n|---|---:|---:|\n"
        f"| recomputed every step | {statistics.median(r):.3f} | {min(r):.3f} |\n"
        f"| cached (precompute_ref_logprobs) | {statistics.median(c):.3f} | {min(c):.3f} |\n\n"
        f"recomputed / cached = {statistics.median(r) / statistics.median(c):.2f}x (medians), "
        f"{min(r) / min(c):.2f}x (minima)"
    )


def _write_atomic(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".bench_logprob.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--worker"]:  # internal: one measurement in this fresh process
        print(json.dumps(worker(json.loads(argv[1]))))
        return 0
    if argv[:1] == ["--ref-step-worker"]:
        print(json.dumps(ref_step_worker(json.loads(argv[1]))))
        return 0

    d = BenchConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab-sizes", type=int, nargs="+", default=d.vocab_sizes)
    p.add_argument("--tokens", type=int, nargs="+", default=d.tokens, help="label tokens per step")
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--variants", nargs="+", default=d.variants, choices=VARIANTS)
    p.add_argument("--chunk-size", type=int, default=d.chunk_size, help="label tokens per chunk (default: npo.default_chunk_size(V))")
    p.add_argument("--repeats", type=int, default=d.repeats, help="rounds: fresh processes (timed steps) per variant")
    p.add_argument("--no-ref-step", dest="ref_step", action="store_false", help="skip the cached-vs-recomputed step")
    p.add_argument("--ref-step-repeats", type=int, default=d.ref_step_repeats)
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="2048 tokens only, one round")
    p.add_argument("--out", default=d.out, help="also write the markdown report to this file")
    try:
        cfg = BenchConfig(**vars(p.parse_args(argv)))
    except SystemExit as e:
        return int(e.code or 0)
    if cfg.quick:
        cfg.tokens, cfg.repeats, cfg.ref_step_repeats = [2048], 1, 3

    rows, start = [], time.perf_counter()
    for V in cfg.vocab_sizes:
        for N in cfg.tokens:
            merged = {v: {"variant": v, "V": V, "N": N, "times": [], "peak_mb": 0.0, "check": 0.0} for v in cfg.variants}
            for round_ in range(cfg.repeats):
                for variant in cfg.variants:
                    spec = {"variant": variant, "V": V, "N": N, "H": cfg.hidden, "chunk_size": cfg.chunk_size,
                            "repeats": 1, "threads": cfg.threads}
                    res, m = _run_subprocess("worker", spec), merged[variant]
                    if "error" in res:
                        m["error"] = res["error"]
                    else:
                        m["times"] += res["times"]
                        m["peak_mb"] = max(m["peak_mb"], res["peak_mb"])
                        m["check"] = max(m["check"], res["check"])
                        m["threads"] = res["threads"]
                    status = res.get("error") or f"{res['times'][0]:.2f}s, peak {res['peak_mb']:.0f} MB"
                    print(f"[{time.perf_counter() - start:6.0f}s] round {round_ + 1}/{cfg.repeats} {variant:15s} "
                          f"V={V:6d} N={N:5d}: {status}", file=sys.stderr, flush=True)
            rows += merged.values()

    threads = next((r["threads"] for r in rows if "threads" in r), torch.get_num_threads())
    report = [
        f"# bench_logprob: NPO loss forward+backward, H = {cfg.hidden}, fp32, CPU, {threads} threads, "
        f"torch {torch.__version__}, chunk_size = "
        + (str(cfg.chunk_size) if cfg.chunk_size else "npo.default_chunk_size(V) (2048 at V = 4096, 512 at V = 50257)"),
        "",
        "Command: `python bench_logprob.py " + " ".join(argv) + "`",
        "",
        format_table(rows),
    ]
    if cfg.ref_step:
        print("[ref-step] cached vs recomputed reference ...", file=sys.stderr, flush=True)
        res = _run_subprocess("ref-step-worker", {"repeats": cfg.ref_step_repeats, "threads": cfg.threads})
        report += ["", format_ref_step(res)]
    text = "\n".join(report) + "\n"
    print(text)
    if cfg.out:
        _write_atomic(cfg.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
