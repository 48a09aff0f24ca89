"""Negative Preference Optimization (NPO) and the baseline unlearning losses.

Zhang, Lin, Bai, Mei (2024), "Negative Preference Optimization: From Catastrophic Collapse to
Effective Unlearning". This file imports only torch, so it can be copied into another project.

Conventions:
- labels are aligned with input_ids; IGNORE_INDEX (-100) marks positions that are not scored
  (question, padding). logits[:, t] predicts labels[:, t + 1]: that shift happens in
  `shift_labels` and nowhere else.
- A sequence's log-prob log pi(y|x) is the SUM of its answer tokens' log-probs, in fp32.
- Every loss is a pure function of per-example tensors of shape (B,), so it serves any model that
  yields them: a language model (y = an answer) or the synthetic classifier (y = one label).
"""

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> fp32; fp32 and fp64 unchanged."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_targets(targets: torch.Tensor, vocab_size: int) -> None:
    if targets.numel() and (targets.min() < 0 or targets.max() >= vocab_size):
        bad = targets[(targets < 0) | (targets >= vocab_size)][0].item()
        raise ValueError(f"labels must be {IGNORE_INDEX} (not scored) or a token id in [0, {vocab_size}); found {bad}")


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """labels (B, T) -> targets (B, T) aligned with logits: targets[:, t] = labels[:, t + 1]."""
    pad = labels.new_full((labels.shape[0], 1), IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1)


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(y|x) = sum_t log pi(y_t | x, y_<t) per sequence, and the number of answer tokens.

    logits: (B, T, V) any float dtype (upcast to fp32).  labels: (B, T), IGNORE_INDEX = not scored.
    Returns logp (B,) and n_tokens (B,) int64.
    """
    if logits.dim() != 3 or logits.shape[:2] != labels.shape:
        raise ValueError(f"logits (B, T, V) and labels (B, T) disagree: {tuple(logits.shape)} vs {tuple(labels.shape)}")
    targets = shift_labels(labels)  # (B, T)
    mask = targets != IGNORE_INDEX  # (B, T)
    _check_targets(targets[mask], logits.shape[-1])
    logprobs = torch.log_softmax(_upcast(logits), dim=-1)  # (B, T, V)
    token_logp = logprobs.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    return torch.where(mask, token_logp, 0.0).sum(dim=1), mask.sum(dim=1)


# ----------------------------------------------------------------------------------------------
# Losses. logp, logp_ref: (B,) sequence log-probs under pi_theta and pi_ref; n_tokens: (B,).
# Each returns a scalar, the mean over the batch (of sequences, or of tokens where stated).


def npo_loss(logp: torch.Tensor, logp_ref: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO (paper eq. 3):

        L_NPO = -(2/beta) * mean_i log sigmoid(-beta * (log pi_theta(y_i|x_i) - log pi_ref(y_i|x_i)))

    Its gradient is GA's reweighted: dL/dlogp_i = W_i / B with W_i = 2 sigmoid(beta * r_i),
    r_i = logp_i - logp_ref_i (see `npo_weights`). W_i = 1 at the start (r = 0), and it fades to
    0 as y_i is forgotten (r -> -inf), which is what slows the collapse; beta -> 0 gives GA.
    """
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp - logp_ref)).mean()


def npo_weights(log_ratio: torch.Tensor, beta: float) -> torch.Tensor:
    """W_i = 2 sigmoid(beta * r_i): the factor by which NPO (and DPO, SimNPO, with their own r_i)
    scales GA's per-example gradient. log_ratio: (B,) -> (B,)."""
    return 2.0 * torch.sigmoid(beta * log_ratio)


def ga_loss(logp: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
    """Gradient ascent on the forget answers: minus their NLL, averaged over the batch's tokens
    (TOFU's and the NPO authors' GA; the paper writes L_GA = E_forget[log pi_theta(y|x)]):

        L_GA = sum_i log pi_theta(y_i|x_i) / sum_i |y_i|
    """
    return logp.sum() / n_tokens.sum().clamp_min(1)


def retain_nll(logp: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
    """The RT term: NLL of the retain answers, averaged over their tokens.

        L_RT = -sum_i log pi_theta(y_i|x_i) / sum_i |y_i|
    """
    return -logp.sum() / n_tokens.sum().clamp_min(1)


def dpo_loss(logp_idk, logp_idk_ref, logp_forget, logp_forget_ref, beta: float) -> torch.Tensor:
    """DPO with the "I don't know" answer y_idk preferred to the forget answer y_f (same x_i),
    scaled by 2/beta like NPO:

        L_DPO = -(2/beta) * mean_i log sigmoid(beta * [(log pi_theta(y_idk) - log pi_ref(y_idk))
                                                        - (log pi_theta(y_f) - log pi_ref(y_f))])
    All arguments (B,).
    """
    margin = (logp_idk - logp_idk_ref) - (logp_forget - logp_forget_ref)
    return -(2.0 / beta) * F.logsigmoid(beta * margin).mean()


def simnpo_loss(logp: torch.Tensor, n_tokens: torch.Tensor, beta: float, delta: float = 0.0) -> torch.Tensor:
    """SimNPO (Fan et al. 2024), reference-free and length-normalised:

        L_SimNPO = -(2/beta) * mean_i log sigmoid(-(beta / |y_i|) * log pi_theta(y_i|x_i) - delta)
    """
    return -(2.0 / beta) * F.logsigmoid(-beta * logp / n_tokens.clamp_min(1) - delta).mean()


def kl_divergence(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """KL(pi_ref || pi_theta) = sum_v pi_ref(v) (log pi_ref(v) - log pi_theta(v)) per position.

    logits, ref_logits: (..., V) -> (...), fp32. The KL term is its mean over retain positions.
    """
    logq = torch.log_softmax(_upcast(logits), dim=-1)
    logq_ref = torch.log_softmax(_upcast(ref_logits), dim=-1)
    return (logq_ref.exp() * (logq_ref - logq)).sum(dim=-1)


# ----------------------------------------------------------------------------------------------
# Methods: loss = forget_coef * forget term + retain_coef * retain term.


@dataclass(frozen=True)
class Method:
    """forget: "ga" | "npo" | "idk" | "dpo" | "simnpo";  retain: None | "nll" (+RT) | "kl" (+KL)."""

    forget: str
    retain: str | None = None
    forget_coef: float = 1.0
    retain_coef: float = 1.0

    def __post_init__(self):
        if self.forget not in FORGET_TERMS:
            raise ValueError(f"unknown forget term {self.forget!r}; expected one of {', '.join(FORGET_TERMS)}")
        if self.retain not in (None, "nll", "kl"):
            raise ValueError(f"unknown retain term {self.retain!r}; expected None, 'nll' or 'kl'")

    @property
    def needs_forget(self) -> bool:  # IDK trains on refusals only
        return self.forget != "idk"

    @property
    def needs_idk(self) -> bool:
        return self.forget in ("idk", "dpo")

    @property
    def needs_ref_model(self) -> bool:  # pi_ref on retain batches, which change every step
        return self.retain == "kl"


class Scores(NamedTuple):
    """Per-example quantities of one batch, each (B,)."""

    logp: torch.Tensor  # sum of answer-token log-probs under pi_theta (for "kl": sum of per-position KL)
    n_tokens: torch.Tensor  # answer tokens (for "kl": positions summed)
    ref: torch.Tensor | None = None  # logp under pi_ref


# Each forget term: (forget, idk, beta, delta) -> (loss, r), r the log-ratio whose W = 2 sigmoid(beta r)
# scales GA's gradient (None where no such weight exists).
FORGET_TERMS: dict[str, Callable] = {
    "ga": lambda f, idk, beta, delta: (ga_loss(f.logp, f.n_tokens), None),
    "npo": lambda f, idk, beta, delta: (npo_loss(f.logp, f.ref, beta), f.logp - f.ref),
    "simnpo": lambda f, idk, beta, delta: (simnpo_loss(f.logp, f.n_tokens, beta, delta),
                                           f.logp / f.n_tokens.clamp_min(1) + delta / beta),
    "dpo": lambda f, idk, beta, delta: (dpo_loss(idk.logp, idk.ref, f.logp, f.ref, beta),
                                        (f.logp - f.ref) - (idk.logp - idk.ref)),
    "idk": lambda f, idk, beta, delta: (retain_nll(idk.logp, idk.n_tokens), None),
}

METHODS: dict[str, Method] = {
    "ga": Method("ga"),
    "ga_rt": Method("ga", "nll"),  # GradDiff
    "ga_kl": Method("ga", "kl"),
    "npo": Method("npo"),
    "npo_rt": Method("npo", "nll"),
    "npo_kl": Method("npo", "kl"),
    "idk": Method("idk", "nll"),  # TOFU's IDK: refusals plus the retain NLL
    "dpo": Method("dpo"),
    "dpo_rt": Method("dpo", "nll"),
    "dpo_kl": Method("dpo", "kl"),
    "simnpo": Method("simnpo"),
    "simnpo_rt": Method("simnpo", "nll"),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[name]


def unlearning_loss(method: Method, forget: Scores | None = None, retain: Scores | None = None,
                    idk: Scores | None = None, beta: float = 0.1, delta: float = 0.0):
    """The loss of one unlearning step for any method, and the statistics worth logging.

    forget: the forget answers (ref = cached log pi_ref, for npo and dpo).  idk: "I don't know"
    answers to the same questions (idk, dpo).  retain: for retain == "nll" the retain answers; for
    "kl" Scores(per-sequence sums of KL(pi_ref || pi_theta), positions summed).
    Returns (loss, stats): stats holds the terms and, for npo, dpo and simnpo, the mean, min and
    max of W_i = 2 sigmoid(beta r_i) and of r_i (GA's effective weight is 1; for GA the log-ratio
    r_i = logp_i - logp_ref_i is reported where forget.ref is given).
    """
    forget_loss, r = FORGET_TERMS[method.forget](forget, idk, beta, delta)
    weights = None if r is None else npo_weights(r.detach(), beta)
    retain_loss = torch.zeros((), device=forget_loss.device)
    if method.retain is not None:
        retain_loss = retain_nll(retain.logp, retain.n_tokens) if method.retain == "nll" else (
            retain.logp.sum() / retain.n_tokens.sum().clamp_min(1))
        if method.forget == "idk":
            # TOFU's IDK takes ONE token-mean over the concatenated [IDK; retain] batch, so each
            # part weighs its share of the tokens instead of both weighing 1.
            n_idk, n_retain = idk.n_tokens.sum().to(idk.logp.dtype), retain.n_tokens.sum().to(idk.logp.dtype)
            share = n_idk / (n_idk + n_retain).clamp_min(1)
            forget_loss, retain_loss = forget_loss * share, retain_loss * (1 - share)
    loss = method.forget_coef * forget_loss + method.retain_coef * retain_loss
    stats = {"loss": loss.item(), "forget_loss": forget_loss.item(), "retain_loss": retain_loss.item()}
    if r is None and forget is not None and forget.ref is not None:
        r, weights = (forget.logp - forget.ref).detach(), torch.ones_like(forget.logp)
    if r is not None:
        for name, values in (("W", weights), ("r", r.detach())):
            stats |= {f"{name}_mean": values.mean().item(), f"{name}_min": values.min().item(),
                      f"{name}_max": values.max().item()}
    return loss, stats


# ----------------------------------------------------------------------------------------------
# The fused log-prob path: hidden states and the lm_head weight in, per-sequence log-probs out,
# without the (B, T, V) logits. Only answer positions reach lm_head (a QA batch is about half
# question and padding), chunk by chunk, so at most one (chunk, V) block of logits exists at a
# time; backward recomputes each chunk instead of storing it. With V = 128k (Llama-3) the plain
# path's fp32 logits of one 8 x 512 batch take 2 GB, this path a few hundred MB.


def default_chunk_size(vocab_size: int) -> int:
    """Label tokens per chunk: 8M logits (32 MB in fp32), at least 512 rows (smaller matmuls run
    measurably slower on a CPU)."""
    return max(512, (1 << 23) // vocab_size)


class _LinearLogprob(torch.autograd.Function):
    """token_logp[j] = log_softmax(h[j] @ weight.T + bias)[target[j]], chunk by chunk. Each chunk's
    matmul runs in the weights' dtype, then upcasts, like the plain path's lm_head(h) and log-prob."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk_size):
        # h: (N, C), weight: (V, C), bias: (V,) or None, targets: (N,)
        lse = torch.empty(h.shape[0], dtype=torch.promote_types(weight.dtype, torch.float32), device=h.device)  # (N,)
        label = torch.empty_like(lse)  # (N,)
        for s in range(0, h.shape[0], chunk_size):
            logits = _upcast(F.linear(h[s:s + chunk_size], weight, bias))  # (n, V)
            label[s:s + chunk_size] = logits.gather(1, targets[s:s + chunk_size, None]).squeeze(1)
            shift = logits.amax(dim=1)  # logsumexp in place: one (n, V) block at a time
            lse[s:s + chunk_size] = shift + logits.sub_(shift[:, None]).exp_().sum(dim=1).log_()
            del logits
        ctx.save_for_backward(h, weight, bias, targets, lse)
        ctx.chunk_size = chunk_size
        return label - lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        h, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = lse.new_zeros(weight.shape) if need_w else None  # accumulated in fp32
        grad_b = lse.new_zeros(weight.shape[0]) if need_b else None
        g = grad_out.to(lse.dtype)  # (N,)
        with torch.autocast(h.device.type, enabled=False):  # dtypes are handled explicitly here
            for s in range(0, h.shape[0], ctx.chunk_size):
                e = min(s + ctx.chunk_size, h.shape[0])
                # d(g * log_softmax[target]) / d logits = g * (onehot(target) - softmax), in place
                grad_logits = _upcast(F.linear(h[s:e], weight, bias)).sub_(lse[s:e, None]).exp_().mul_(-g[s:e, None])
                grad_logits.scatter_add_(1, targets[s:e, None], g[s:e, None])  # (n, V)
                if need_h:
                    grad_h[s:e] = grad_logits.to(weight.dtype) @ weight
                if need_w:
                    grad_w.addmm_(grad_logits.t(), h[s:e].to(lse.dtype))
                if need_b:
                    grad_b += grad_logits.sum(dim=0)
                del grad_logits  # before the next chunk's block is allocated
        return (grad_h, grad_w.to(weight.dtype) if need_w else None,
                grad_b.to(bias.dtype) if need_b else None, None, None)


def fused_sequence_logprob(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                           bias: torch.Tensor | None = None, chunk_size: int | None = None):
    """sequence_logprob(hidden @ weight.T + bias, labels), never building the (B, T, V) logits.

    hidden: (B, T, C) final hidden states (after the last norm).  weight: (V, C) lm_head weight.
    bias: (V,) or None (Phi-1.5's lm_head has one).  labels: (B, T) as for sequence_logprob.
    Returns logp (B,) fp32 and n_tokens (B,). Under torch.autocast the inputs are cast to its
    dtype first, as the plain path's lm_head would be; the chunks then run with autocast off.
    """
    if hidden.dim() != 3 or hidden.shape[:2] != labels.shape:
        raise ValueError(f"hidden (B, T, C) and labels (B, T) disagree: {tuple(hidden.shape)} vs {tuple(labels.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"weight must be (V, C={hidden.shape[2]}), got {tuple(weight.shape)}")
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    targets = shift_labels(labels)  # (B, T)
    mask = targets != IGNORE_INDEX  # (B, T)
    token_targets = targets[mask]  # (N,) in row-major order: sequence b owns a contiguous run
    _check_targets(token_targets, weight.shape[0])
    with torch.autocast(device, enabled=False):
        token_logp = _LinearLogprob.apply(hidden[mask], weight, bias, token_targets,
                                          chunk_size or default_chunk_size(weight.shape[0]))  # (N,)
    # scatter back to (B, T) and sum per row, the same summation order as sequence_logprob
    logp = token_logp.new_zeros(mask.shape).masked_scatter(mask, token_logp).sum(dim=1)
    return logp, mask.sum(dim=1)
