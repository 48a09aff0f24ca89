"""Negative Preference Optimization (NPO) and the baseline unlearning losses.

Zhang, Lin, Bai, Mei (2024), "Negative Preference Optimization: From Catastrophic Collapse to
Effective Unlearning". This file imports only torch, so it can be copied into another project.

Conventions shared by everything below:
- labels are aligned with input_ids (not shifted); IGNORE_INDEX (-100) marks positions that are not
  scored (question, padding). The shift, logits[:, t] predicts labels[:, t + 1], happens only in
  `shift_labels`, which every path uses.
- A sequence's log-prob log pi(y|x) is the SUM of its answer tokens' log-probs, computed in fp32
  (bf16/fp16 inputs are upcast; fp64 stays fp64).
- Every loss is a pure function of per-example log-prob tensors of shape (B,), so it works for any
  model that yields them (the GPT here, or the synthetic K-class classifier where |y| = 1).

Map: the shift (shift_labels), log-probs (sequence_logprob, fused_sequence_logprob), losses (ga_loss, retain_nll, idk_loss,
npo_loss, dpo_loss, simnpo_loss, kl_divergence, kl_retain), fused losses that form their gradients
in forward (fused_sequence_loss, fused_npo_loss), the method table (METHODS, get_method), and the
cached reference (precompute_ref_logprobs).
"""

import functools
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def default_chunk_size(vocab_size: int) -> int:
    """Label tokens per chunk of the fused path: at least 512 rows (smaller matmuls run measurably
    slower on a CPU), and more for small vocabularies, up to 8M logits (32 MB in fp32).
    V = 50257: 512 tokens, a 103 MB fp32 block; V = 4096: 2048 tokens."""
    return max(512, (1 << 23) // vocab_size)


# ----------------------------------------------------------------------------------------------
# Log-probs


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """The one place where predictions and targets are aligned.

    labels: (B, T) token ids aligned with input_ids, IGNORE_INDEX where not scored.
    Returns targets (B, T) aligned with logits: targets[:, t] = labels[:, t + 1], and the last
    position, which predicts nothing, is IGNORE_INDEX.
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must have shape (B, T), got {tuple(labels.shape)}")
    pad = labels.new_full((labels.shape[0], 1), IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1)


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> fp32; fp32 and fp64 unchanged."""
    return x.to(_acc_dtype(x))


def _check_targets(targets: torch.Tensor, vocab_size: int) -> None:
    """targets: label ids that are scored (IGNORE_INDEX already removed)."""
    if targets.numel() and (targets.min() < 0 or targets.max() >= vocab_size):
        bad = targets[(targets < 0) | (targets >= vocab_size)][0].item()
        raise ValueError(
            f"labels must be {IGNORE_INDEX} (ignored) or a token id in [0, {vocab_size}); found {bad}"
        )


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence log-prob log pi(y|x) = sum_t log pi(y_t | x, y_<t): the plain reference path.

    logits: (B, T, V) any float dtype, upcast to fp32.   labels: (B, T), IGNORE_INDEX = not scored.
    Returns logp (B,) fp32 (fp64 for fp64 logits), the sum over label tokens, and n_tokens (B,)
    int64, their count
    (rows without label tokens give logp = 0, n = 0).
    """
    if logits.dim() != 3 or logits.shape[:2] != labels.shape:
        raise ValueError(f"logits (B, T, V) and labels (B, T) disagree: {tuple(logits.shape)} vs {tuple(labels.shape)}")
    targets = shift_labels(labels)  # (B, T)
    mask = targets != IGNORE_INDEX  # (B, T)
    _check_targets(targets[mask], logits.shape[-1])
    logprobs = torch.log_softmax(_upcast(logits), dim=-1)  # (B, T, V)
    token_logp = logprobs.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    logp = torch.where(mask, token_logp, 0.0).sum(dim=1)  # (B,)
    return logp, mask.sum(dim=1)


# The fused path works on the label positions only, chunk by chunk, and never holds more than one
# (chunk, V) block of logits. Per chunk it needs three pieces of elementwise work. The eager
# versions work in place so that a chunk needs a single buffer; the versions handed to
# torch.compile say the same thing functionally, which inductor fuses into one pass per kernel
# that writes back into the same buffer.


def _stats_eager(logits, targets, keep_probs: bool):
    """(n, V) fp32 logits -> lse (n,), label logit (n,). Overwrites logits: with the softmax if
    keep_probs, else with scratch."""
    label = logits.gather(1, targets[:, None]).squeeze(1)
    shift = logits.amax(dim=1, keepdim=True)
    logits.sub_(shift).exp_()
    total = logits.sum(dim=1, keepdim=True)
    if keep_probs:
        logits.div_(total)
    return (shift + total.log()).squeeze(1), label


def _grad_from_probs_eager(probs, targets, g):
    """probs (n, V) -> g * (onehot(targets) - probs), in place: d(g * log p_target)/d logits."""
    probs.mul_(-g[:, None])
    probs.scatter_add_(1, targets[:, None], g[:, None])
    return probs


def _grad_from_logits_eager(logits, lse, targets, g):
    """Same as _grad_from_probs_eager, from logits and their logsumexp (n,)."""
    logits.sub_(lse[:, None]).exp_()
    return _grad_from_probs_eager(logits, targets, g)


def _onehot(targets, vocab_size):
    return torch.arange(vocab_size, device=targets.device)[None, :] == targets[:, None]


def _stats_functional(logits, targets, keep_probs: bool):
    label = logits.gather(1, targets[:, None]).squeeze(1)
    lse = torch.logsumexp(logits, dim=1)
    if keep_probs:
        logits.copy_(torch.exp(logits - lse[:, None]))
    return lse, label


def _grad_from_probs_functional(probs, targets, g):
    return probs.copy_(g[:, None] * (_onehot(targets, probs.shape[1]).to(probs.dtype) - probs))


def _grad_from_logits_functional(logits, lse, targets, g):
    probs = torch.exp(logits - lse[:, None])
    return logits.copy_(g[:, None] * (_onehot(targets, logits.shape[1]).to(probs.dtype) - probs))


class _ChunkKernels:
    """The three chunk kernels, eager or through torch.compile with a fallback to eager."""

    def __init__(self):
        self.compiled = {}  # name -> compiled function, built on first use
        self.compile_failed = False

    def __call__(self, name: str, use_compile: bool, *args):
        if use_compile and not self.compile_failed:
            try:
                if name not in self.compiled:
                    self.compiled[name] = torch.compile(_FUNCTIONAL[name], dynamic=True)
                return self.compiled[name](*args)
            except torch.OutOfMemoryError:
                raise
            except Exception as err:  # no C compiler, unsupported platform, ...: run eager
                self.compile_failed = True
                warnings.warn(
                    f"torch.compile failed ({type(err).__name__}: {str(err)[:200]}); "
                    "the fused log-prob path runs eager from now on",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return _EAGER[name](*args)


_EAGER = {"stats": _stats_eager, "grad_probs": _grad_from_probs_eager, "grad_logits": _grad_from_logits_eager}
_FUNCTIONAL = {
    "stats": _stats_functional,
    "grad_probs": _grad_from_probs_functional,
    "grad_logits": _grad_from_logits_functional,
}
_KERNELS = _ChunkKernels()


def _use_compile(compile: bool | None, device: torch.device) -> bool:
    # None: compile on CUDA only. On a CPU the matmuls dominate, compiling costs tens of seconds
    # per process, and the eager kernels already work in place (see bench_logprob.py).
    return device.type == "cuda" if compile is None else bool(compile)


class _ChunkBuffers:
    """Scratch for (rows, V) logits in fp32 (fp64 for fp64 weights), plus a low-precision copy
    when the weights are bf16/fp16."""

    def __init__(self, rows: int, weight: torch.Tensor):
        acc = _acc_dtype(weight)
        self.logits = torch.empty(rows, weight.shape[0], dtype=acc, device=weight.device)
        low = weight.dtype != acc
        self.low = torch.empty(rows, weight.shape[0], dtype=weight.dtype, device=weight.device) if low else None

    def logits_of(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """h (n, C) -> fp32 logits (n, V): the matmul in the inputs' dtype, then upcast, like the
        plain path's lm_head(...).float()."""
        n = h.shape[0]
        if self.low is None:
            return torch.mm(h, weight.t(), out=self.logits[:n])
        torch.mm(h, weight.t(), out=self.low[:n])
        return self.logits[:n].copy_(self.low[:n])

    def backprop(self, grad_logits, h, weight, grad_h_out, grad_w_acc) -> None:
        """grad_logits (n, V) fp32 -> grad_h_out (n, C) written, grad_w_acc (V, C) fp32 += ."""
        if self.low is not None:
            grad_logits = self.low[: h.shape[0]].copy_(grad_logits)
        if grad_h_out is not None:
            torch.mm(grad_logits, weight, out=grad_h_out)
        if grad_w_acc is not None:
            if self.low is None:
                grad_w_acc.addmm_(grad_logits.t(), h)
            else:
                grad_w_acc.add_(grad_logits.t() @ h)  # accumulate across chunks in fp32


def _autocast_off(method):
    """Run an autograd.Function's forward/backward with autocast off: the chunk loops compute in
    their inputs' dtype (any autocast cast happened before, in _label_positions)."""

    @functools.wraps(method)
    def run(ctx, first, *args):
        with torch.autocast(first.device.type, enabled=False):
            return method(ctx, first, *args)

    return run


class _LinearTokenLogprob(torch.autograd.Function):
    """token_logp[j] = log softmax(h[j] @ weight.T)[target[j]] chunk by chunk, never holding the
    (N, V) logits. Backward recomputes each chunk's logits (8NHV FLOPs in all instead of 6NHV)."""

    @staticmethod
    @_autocast_off
    def forward(ctx, h, weight, targets, chunk_size, use_compile):
        # h: (N, C), weight: (V, C), targets: (N,) ids in [0, V)
        n_tok = h.shape[0]
        lse = torch.empty(n_tok, dtype=_acc_dtype(weight), device=h.device)  # (N,)
        label = torch.empty_like(lse)  # (N,)
        buffers = _ChunkBuffers(min(chunk_size, max(n_tok, 1)), weight)
        for s in range(0, n_tok, chunk_size):
            e = min(s + chunk_size, n_tok)
            logits = buffers.logits_of(h[s:e], weight)  # (n, V) fp32
            lse[s:e], label[s:e] = _KERNELS("stats", use_compile, logits, targets[s:e], False)
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.chunk_size, ctx.use_compile = chunk_size, use_compile
        return label - lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    @_autocast_off
    def backward(ctx, grad_token_logp):
        h, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=_acc_dtype(weight), device=weight.device) if need_w else None
        g = grad_token_logp.to(lse.dtype).contiguous()  # (N,)
        n_tok, chunk = h.shape[0], ctx.chunk_size
        buffers = _ChunkBuffers(min(chunk, max(n_tok, 1)), weight)
        for s in range(0, n_tok, chunk):
            e = min(s + chunk, n_tok)
            logits = buffers.logits_of(h[s:e], weight)  # recomputed, (n, V) fp32
            grad_logits = _KERNELS("grad_logits", ctx.use_compile, logits, lse[s:e], targets[s:e], g[s:e])
            buffers.backprop(grad_logits, h[s:e], weight, grad_h[s:e] if need_h else None, grad_w)
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None, None


def _label_positions(hidden, weight, labels):
    """Select the scored positions. Returns token_hidden (N, C), weight, token_targets (N,) and
    the mask (B, T); tokens come in row-major order, so sequence b owns a contiguous run.
    Under torch.autocast, hidden and weight are cast to its dtype here, as the plain path's
    lm_head would be (differentiably), and the chunk loops then run with autocast off."""
    if hidden.dim() != 3 or hidden.shape[:2] != labels.shape:
        raise ValueError(f"hidden (B, T, C) and labels (B, T) disagree: {tuple(hidden.shape)} vs {tuple(labels.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"weight must be (V, C={hidden.shape[2]}), got {tuple(weight.shape)}")
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    if weight.dtype != hidden.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
    targets = shift_labels(labels)  # (B, T)
    mask = targets != IGNORE_INDEX  # (B, T)
    token_targets = targets[mask]  # (N,)
    _check_targets(token_targets, weight.shape[0])
    return hidden[mask], weight, token_targets, mask


def _check_chunk_size(chunk_size: int | None, weight: torch.Tensor) -> int:
    if chunk_size is None:
        return default_chunk_size(weight.shape[0])
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return chunk_size


def _sum_per_sequence(token_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """token_logp (N,) of the mask's positions (b, T) -> per-sequence sums (b,), summed over T as
    in sequence_logprob (a running index_add in fp32 would lose ~1e-3 on 128 tokens of ~-10)."""
    return token_logp.new_zeros(mask.shape).masked_scatter(mask, token_logp).sum(dim=1)


def fused_sequence_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int | None = None,
    compile: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """sequence_logprob(hidden @ weight.T, labels) without materialising the (B, T, V) logits.

    hidden: (B, T, C) final hidden states (after ln_f).   weight: (V, C) lm_head weight.
    labels: (B, T) as for sequence_logprob.   chunk_size: label tokens per chunk
    (None: default_chunk_size(V)).
    compile: run the chunk kernels through torch.compile (None: on CUDA only); falls back to eager
    with a warning where compiling fails.
    Returns logp (B,) fp32 and n_tokens (B,). Only label positions are computed at all; backward
    recomputes each chunk's logits. For NPO/GA/NLL prefer fused_sequence_loss, which is cheaper.
    """
    token_hidden, weight, token_targets, mask = _label_positions(hidden, weight, labels)
    chunk_size = _check_chunk_size(chunk_size, weight)
    use_compile = _use_compile(compile, hidden.device)
    token_logp = _LinearTokenLogprob.apply(token_hidden, weight, token_targets, chunk_size, use_compile)  # (N,)
    return _sum_per_sequence(token_logp, mask), mask.sum(dim=1)


def _whole_sequence_chunks(counts: list[int], chunk_size: int) -> list[tuple[int, int]]:
    """Consecutive sequence ranges [i, j) holding at most chunk_size label tokens, or a single
    sequence when that one alone is longer."""
    chunks, i = [], 0
    while i < len(counts):
        j, total = i + 1, counts[i]
        while j < len(counts) and total + counts[j] <= chunk_size:
            total += counts[j]
            j += 1
        chunks.append((i, j))
        i = j
    return chunks


class _FusedSequenceLoss(torch.autograd.Function):
    """loss_fn(logp, n_tokens) with logp from hidden @ weight.T, gradients formed in forward.

    Chunks hold whole sequences, so once a chunk's logits give its sequences' log-probs, the
    upstream gradient d loss / d logp_i of those sequences is known (loss_fn is separable), and the
    logit gradients w_i * (onehot - softmax) are formed right there: 6NHV FLOPs, like the plain path.
    """

    @staticmethod
    @_autocast_off
    def forward(ctx, h, weight, targets, mask, loss_fn, chunk_size, use_compile):
        # h: (N, C) label positions, weight: (V, C), targets: (N,), mask: (B, T) label positions
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n_tokens = mask.sum(dim=1)  # (B,)
        counts = n_tokens.tolist()
        starts = [0]
        for c in counts:
            starts.append(starts[-1] + c)
        logp = torch.zeros(len(counts), dtype=_acc_dtype(weight), device=h.device)  # (B,)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=_acc_dtype(weight), device=weight.device) if need_w else None
        chunks = _whole_sequence_chunks(counts, chunk_size)
        rows = max([starts[j] - starts[i] for i, j in chunks] + [1])
        buffers = _ChunkBuffers(rows, weight)
        for i, j in chunks:
            s, e = starts[i], starts[j]
            if s == e:
                continue  # no label tokens: logp = 0 and no gradient
            logits = buffers.logits_of(h[s:e], weight)  # (n, V) fp32
            lse, label = _KERNELS("stats", use_compile, logits, targets[s:e], need_h or need_w)  # logits -> softmax
            logp[i:j] = _sum_per_sequence(label - lse, mask[i:j])
            if need_h or need_w:
                w = _sequence_weights(loss_fn, logp, n_tokens, i, j)  # (j - i,) d loss / d logp
                w_tokens = torch.repeat_interleave(w, n_tokens[i:j])  # (n,) each token its sequence's weight
                grad_logits = _KERNELS("grad_probs", use_compile, logits, targets[s:e], w_tokens)
                buffers.backprop(grad_logits, h[s:e], weight, grad_h[s:e] if need_h else None, grad_w)
        ctx.grads = (grad_h, grad_w.to(weight.dtype) if need_w else None)
        ctx.mark_non_differentiable(logp)
        return loss_fn(logp, n_tokens), logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_logp):
        if ctx.grads is None:
            raise RuntimeError("fused_sequence_loss supports one backward per forward (no retain_graph)")
        grad_h, grad_w = ctx.grads
        ctx.grads = None  # scaled in place below: free them and refuse a second backward
        if grad_h is not None:
            grad_h.mul_(grad_loss.to(grad_h.dtype))
        if grad_w is not None:
            grad_w.mul_(grad_loss.to(grad_w.dtype))
        return grad_h, grad_w, None, None, None, None, None


def _sequence_weights(loss_fn, logp, n_tokens, i, j):
    """d loss_fn / d logp[i:j] (sequences i..j-1 done, later ones still 0). Valid because the
    loss is separable: each term depends on its own sequence's log-prob only."""
    with torch.enable_grad():
        x = logp.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(x, n_tokens), x)
    return grad[i:j]


def fused_sequence_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    chunk_size: int | None = None,
    compile: bool | None = None,
    return_logp: bool = False,
):
    """loss_fn(*fused_sequence_logprob(hidden, weight, labels)) with its gradients formed in forward.

    hidden: (B, T, C), weight: (V, C), labels: (B, T) as for fused_sequence_logprob.
    loss_fn(logp (B,), n_tokens (B,)) -> scalar, and it must be SEPARABLE: a sum or mean of
    per-sequence terms, each depending only on its own logp_i (ga_loss, retain_nll, idk_loss,
    npo_loss, simnpo_loss; not dpo_loss, which couples two sequences). Chunks hold whole sequences
    (a sequence longer than chunk_size becomes a chunk of its own). Backward only scales the stored
    gradients, so one backward per forward.
    Returns the loss (scalar), or (loss, logp (B,) detached) with return_logp.
    """
    token_hidden, weight, token_targets, mask = _label_positions(hidden, weight, labels)
    chunk_size = _check_chunk_size(chunk_size, weight)
    use_compile = _use_compile(compile, hidden.device)
    loss, logp = _FusedSequenceLoss.apply(token_hidden, weight, token_targets, mask, loss_fn, chunk_size, use_compile)
    return (loss, logp) if return_logp else loss


def fused_npo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    logp_ref: torch.Tensor,
    beta: float,
    chunk_size: int | None = None,
    compile: bool | None = None,
    return_logp: bool = False,
):
    """npo_loss(fused_sequence_logprob(hidden, weight, labels)[0], logp_ref, beta), gradients formed
    in forward: per-token logit gradient (2/B) * sigmoid(beta * r_i) * (onehot - softmax).

    hidden: (B, T, C), weight: (V, C), labels: (B, T), logp_ref: (B,) reference log-probs (constant).
    """
    if logp_ref.shape != (labels.shape[0],):
        raise ValueError(f"logp_ref must have shape ({labels.shape[0]},), got {tuple(logp_ref.shape)}")
    logp_ref = logp_ref.detach()
    return fused_sequence_loss(
        hidden, weight, labels, lambda logp, n: npo_loss(logp, logp_ref, beta), chunk_size, compile, return_logp
    )


# ----------------------------------------------------------------------------------------------
# Losses: pure functions of per-example log-probs. logp, logp_ref: (B,) sequence-summed log-probs;
# n_tokens: (B,) answer-token counts.


def ga_loss(logp: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
    """Gradient ascent on the forget set: minus the forget NLL, averaged over the batch's tokens.

        L_GA = sum_i log pi_theta(y_i|x_i) / sum_i |y_i|

    (NPO paper: L_GA = E_forget[log pi_theta(y|x)]; TOFU's GA minimises -NLL per token, as here.)
    logp: (B,), n_tokens: (B,). Pass n_tokens = ones for the paper's sequence-sum form.
    """
    return logp.sum() / n_tokens.sum().clamp_min(1)


def retain_nll(logp: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
    """RT term: NLL of the retain batch, averaged over its answer tokens.

        L_RT = -sum_i log pi_theta(y_i|x_i) / sum_i |y_i|        logp: (B,), n_tokens: (B,)
    """
    return -logp.sum() / n_tokens.sum().clamp_min(1)


def idk_loss(logp_idk: torch.Tensor, n_idk: torch.Tensor) -> torch.Tensor:
    """IDK: NLL of "I don't know"-style answers y_idk to the forget questions (TOFU's idk).

        L_IDK = -sum_i log pi_theta(y_idk_i|x_i) / sum_i |y_idk_i|    logp_idk: (B,), n_idk: (B,)
    """
    return retain_nll(logp_idk, n_idk)


def npo_loss(logp: torch.Tensor, logp_ref: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO (paper eq. 3), on sequence-summed log-probs:

        L_NPO = -(2/beta) * mean_i log sigmoid(-beta * (log pi_theta(y_i|x_i) - log pi_ref(y_i|x_i)))

    logp, logp_ref: (B,). Gradient: dL/dlogp_i = W_i / B with W_i = 2 sigmoid(beta * r_i), i.e.
    GA's gradient reweighted; beta -> 0 recovers GA (sequence-sum form).
    """
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp - logp_ref)).mean()


def dpo_loss(
    logp_idk: torch.Tensor,
    logp_idk_ref: torch.Tensor,
    logp_forget: torch.Tensor,
    logp_forget_ref: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """DPO with the IDK answer preferred over the forget answer, scaled by 2/beta as NPO:

        L_DPO = -(2/beta) * mean_i log sigmoid(beta * [(log pi_theta(y_idk) - log pi_ref(y_idk))
                                                        - (log pi_theta(y_f) - log pi_ref(y_f))])

    All arguments (B,); pair i shares the forget question x_i.
    """
    margin = (logp_idk - logp_idk_ref) - (logp_forget - logp_forget_ref)
    return -(2.0 / beta) * F.logsigmoid(beta * margin).mean()


def simnpo_loss(logp: torch.Tensor, n_tokens: torch.Tensor, beta: float, delta: float = 0.0) -> torch.Tensor:
    """SimNPO (Fan et al. 2024, arXiv 2410.07163), reference-free, length-normalised NPO:

        L_SimNPO = -(2/beta) * mean_i log sigmoid(-(beta / |y_i|) * log pi_theta(y_i|x_i) - delta)

    logp: (B,), n_tokens: (B,) = |y_i| (clamped to >= 1), delta: the reward margin gamma.
    """
    return -(2.0 / beta) * F.logsigmoid(-(beta / n_tokens.clamp_min(1)) * logp - delta).mean()


def kl_divergence(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Per-position KL(pi_ref || pi_theta) = sum_v pi_ref(v) (log pi_ref(v) - log pi_theta(v)), fp32.

    logits, ref_logits: (..., V). Returns (...).
    """
    logq = torch.log_softmax(_upcast(logits), dim=-1)
    logp_ref = torch.log_softmax(_upcast(ref_logits), dim=-1)
    return (logp_ref.exp() * (logp_ref - logq)).sum(dim=-1)


def kl_retain(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """KL term: KL(pi_ref || pi_theta) averaged over the retain batch's ANSWER tokens.

        L_KL = sum_{i,t in answer} KL(pi_ref(.|x_i, y_<t) || pi_theta(.|x_i, y_<t)) / #answer tokens

    logits, ref_logits: (B, T, V); labels: (B, T). Earlier codebases (TOFU, NPO) average over every
    position, padding and question included; here those positions are masked out.
    """
    if logits.shape != ref_logits.shape or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"logits, ref_logits (B, T, V) and labels (B, T) disagree: "
            f"{tuple(logits.shape)}, {tuple(ref_logits.shape)}, {tuple(labels.shape)}"
        )
    mask = shift_labels(labels) != IGNORE_INDEX  # (B, T)
    return kl_divergence(logits[mask], ref_logits[mask]).sum() / mask.sum().clamp_min(1)


# ----------------------------------------------------------------------------------------------
# Methods: which forget and retain terms each method minimises, with a coefficient per term.

FORGET_TERMS = ("ga", "npo", "idk", "dpo", "simnpo")
RETAIN_TERMS = ("nll", "kl")


@dataclass(frozen=True)
class Method:
    """loss = forget_coef * forget term + retain_coef * retain term (if any).

    forget: "ga" (ga_loss), "npo" (npo_loss), "idk" (idk_loss), "dpo" (dpo_loss), "simnpo" (simnpo_loss).
    retain: None, "nll" (retain_nll) or "kl" (kl_retain, needs the reference model on retain batches).
    """

    forget: str
    retain: str | None = None
    forget_coef: float = 1.0
    retain_coef: float = 1.0

    def __post_init__(self):
        if self.forget not in FORGET_TERMS:
            raise ValueError(f"unknown forget term {self.forget!r}; expected one of {FORGET_TERMS}")
        if self.retain is not None and self.retain not in RETAIN_TERMS:
            raise ValueError(f"unknown retain term {self.retain!r}; expected None or one of {RETAIN_TERMS}")

    @property
    def needs_ref_logprobs(self) -> bool:  # pi_ref on fixed sequences: cache with precompute_ref_logprobs
        return self.forget in ("npo", "dpo")

    @property
    def needs_ref_model(self) -> bool:  # pi_ref on retain batches, which change every step
        return self.retain == "kl"

    @property
    def needs_idk(self) -> bool:
        return self.forget in ("idk", "dpo")


METHODS: dict[str, Method] = {
    "ga": Method("ga"),
    "ga_rt": Method("ga", "nll"),
    "ga_kl": Method("ga", "kl"),
    "npo": Method("npo"),
    "npo_rt": Method("npo", "nll"),
    "npo_kl": Method("npo", "kl"),
    "idk": Method("idk", "nll"),  # as TOFU: IDK answers plus the retain NLL
    "dpo": Method("dpo"),
    "dpo_rt": Method("dpo", "nll"),
    "dpo_kl": Method("dpo", "kl"),
    "simnpo": Method("simnpo"),
    "simnpo_rt": Method("simnpo", "nll"),
}


def get_method(name: str) -> Method:
    """METHODS[name], or a ValueError that lists the valid names."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[name]


# ----------------------------------------------------------------------------------------------
# Cached reference log-probs


def precompute_ref_logprobs(
    ref_model: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """log pi_ref(y|x) for a fixed set of sequences, computed once before unlearning.

    NPO and DPO need pi_ref only on the forget (and IDK) sequences, which never change, so the
    frozen model need not run at every step. ref_model(input_ids (B, T)) -> logits (B, T, V);
    batches: iterable of (input_ids, labels), each (B, T). Runs in eval() mode (restored after)
    under torch.no_grad(). Returns (N,) fp32, the batches' log-probs concatenated in order.
    """
    was_training = getattr(ref_model, "training", None)
    if hasattr(ref_model, "eval"):
        ref_model.eval()
    out = []
    try:
        with torch.no_grad():
            for input_ids, labels in batches:
                logp, _ = sequence_logprob(ref_model(input_ids), labels)
                out.append(logp)
    finally:
        if was_training:
            ref_model.train()
    if not out:
        raise ValueError("precompute_ref_logprobs: no batches given")
    return torch.cat(out)
