"""Tests for npo.py. Every expected value comes from an independent oracle: a Python-math formula,
a per-token loop, torch.nn.functional.kl_div, or the plain (B, T, V) autograd path.

Relative errors are norm-wise, ||got - want|| / ||want||. The bf16 checks compare the fused path
with the plain path run on the SAME bf16 inputs (the logits computed in bf16, then upcast, exactly
as a bf16 model's lm_head output would be), so they measure the fused path's error, not bf16's.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import npo

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")


def rel_err(got, want):
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def random_problem(B=5, T=11, C=24, V=67, seed=0, dtype=torch.float32, device="cpu"):
    """Hidden states, lm_head weight and labels with question prefixes, padding, an empty row."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, C, generator=g)
    weight = torch.randn(V, C, generator=g) / math.sqrt(C) * 3
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :3] = npo.IGNORE_INDEX  # question
    labels[1, 7:] = npo.IGNORE_INDEX  # padding
    labels[2] = npo.IGNORE_INDEX  # a row with no label tokens
    labels[3, :T - 1] = npo.IGNORE_INDEX  # one label at the very end
    hidden = hidden.to(device=device, dtype=dtype).requires_grad_(True)
    weight = weight.to(device=device, dtype=dtype).requires_grad_(True)
    return hidden, weight, labels.to(device)


def oracle_sequence_logprob(logits, labels):
    """Per-token loop in float64: logits[b, t] predicts labels[b, t + 1]."""
    B, T, _ = logits.shape
    out = []
    for b in range(B):
        total = 0.0
        for t in range(T - 1):
            y = labels[b, t + 1].item()
            if y != -100:
                total += torch.log_softmax(logits[b, t].double(), dim=-1)[y].item()
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# Plain log-probs


def test_sequence_logprob_matches_per_token_loop():
    hidden, weight, labels = random_problem()
    logits = (hidden @ weight.T).detach()
    logp, n = npo.sequence_logprob(logits, labels)
    assert logp.dtype == torch.float32
    assert torch.allclose(logp.double(), oracle_sequence_logprob(logits, labels), rtol=1e-6, atol=1e-5)
    assert n.tolist() == [(labels[b, 1:] != -100).sum().item() for b in range(labels.shape[0])]
    assert logp[2].item() == 0.0 and n[2].item() == 0  # no label tokens


def test_sequence_logprob_upcasts_bf16_logits():
    hidden, weight, labels = random_problem()
    logits = (hidden @ weight.T).detach().bfloat16()
    logp, _ = npo.sequence_logprob(logits, labels)
    assert logp.dtype == torch.float32
    assert torch.allclose(logp.double(), oracle_sequence_logprob(logits.float(), labels), rtol=1e-6, atol=1e-4)


def test_bad_labels_and_shapes_are_clear_errors():
    logits = torch.randn(2, 4, 10)
    with pytest.raises(ValueError, match=r"token id in \[0, 10\); found 10"):
        npo.sequence_logprob(logits, torch.tensor([[0, 1, 10, 2], [0, 1, 2, 3]]))
    with pytest.raises(ValueError, match="found -1"):
        npo.sequence_logprob(logits, torch.tensor([[0, -1, 1, 2], [0, 1, 2, 3]]))
    with pytest.raises(ValueError, match="disagree"):
        npo.sequence_logprob(logits, torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="weight must be"):
        npo.fused_sequence_logprob(torch.randn(2, 4, 8), torch.randn(10, 9), torch.zeros(2, 4, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# Fused log-probs: equal to the plain path


def plain_values_and_grads(hidden, weight, labels, upstream):
    logp, n = npo.sequence_logprob(hidden @ weight.T, labels)
    grad_h, grad_w = torch.autograd.grad((logp * upstream).sum(), (hidden, weight))
    return logp.detach(), n, grad_h, grad_w


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 10_000])  # 3 and 7 do not divide the 23 label tokens
def test_fused_logprob_equals_plain_fp32(chunk_size):
    hidden, weight, labels = random_problem()
    upstream = torch.linspace(-1.5, 2.0, labels.shape[0])  # a non-uniform upstream gradient
    want_logp, want_n, want_gh, want_gw = plain_values_and_grads(hidden, weight, labels, upstream)
    logp, n = npo.fused_sequence_logprob(hidden, weight, labels, chunk_size=chunk_size)
    grad_h, grad_w = torch.autograd.grad((logp * upstream).sum(), (hidden, weight))
    assert logp.dtype == torch.float32 and torch.equal(n, want_n)
    assert rel_err(logp, want_logp) < 1e-5
    assert logp[2].item() == 0.0
    assert rel_err(grad_h, want_gh) < 1e-5 and rel_err(grad_w, want_gw) < 1e-5
    assert grad_h[2].abs().max().item() == 0.0  # the row without labels gets no gradient
    assert grad_h[:, -1].abs().max().item() == 0.0  # the last position predicts nothing


def test_fused_logprob_equals_plain_bf16():
    hidden, weight, labels = random_problem(dtype=torch.bfloat16)
    upstream = torch.linspace(-1.5, 2.0, labels.shape[0])
    want_logp, _, want_gh, want_gw = plain_values_and_grads(hidden, weight, labels, upstream)
    logp, _ = npo.fused_sequence_logprob(hidden, weight, labels, chunk_size=4)
    grad_h, grad_w = torch.autograd.grad((logp * upstream).sum(), (hidden, weight))
    assert logp.dtype == torch.float32 and grad_h.dtype == torch.bfloat16 and grad_w.dtype == torch.bfloat16
    assert rel_err(logp, want_logp) < 1e-2
    assert rel_err(grad_h, want_gh) < 1e-2 and rel_err(grad_w, want_gw) < 1e-2


def test_fused_logprob_without_any_label_tokens():
    hidden, weight, _ = random_problem()
    labels = torch.full(hidden.shape[:2], npo.IGNORE_INDEX)
    logp, n = npo.fused_sequence_logprob(hidden, weight, labels)
    assert torch.equal(logp, torch.zeros(hidden.shape[0])) and n.sum().item() == 0
    grad_h, grad_w = torch.autograd.grad(logp.sum(), (hidden, weight), allow_unused=True)
    assert grad_h.abs().max().item() == 0.0 and grad_w.abs().max().item() == 0.0


def test_fused_logprob_tied_embedding_weight():
    """With the weight shared by embedding and lm_head, both gradient paths add up as in autograd."""
    torch.manual_seed(0)
    V, C = 31, 12
    weight = torch.randn(V, C, requires_grad=True)
    ids = torch.randint(0, V, (3, 9))
    labels = ids.clone()
    labels[:, :2] = npo.IGNORE_INDEX

    def hidden_of(w):
        return torch.tanh(F.embedding(ids, w) @ torch.ones(C, C) * 0.3)

    logp_plain, _ = npo.sequence_logprob(hidden_of(weight) @ weight.T, labels)
    (want,) = torch.autograd.grad(logp_plain.sum(), weight)
    logp_fused, _ = npo.fused_sequence_logprob(hidden_of(weight), weight, labels, chunk_size=5)
    (got,) = torch.autograd.grad(logp_fused.sum(), weight)
    assert rel_err(got, want) < 1e-5


def test_fused_logprob_with_bias_fp64_tightly():
    """In fp64 rounding vanishes, so any slip (shift, chunk seams, the bias gradient) shows."""
    hidden, weight, labels = random_problem(dtype=torch.float64)
    bias = torch.randn(weight.shape[0], dtype=torch.float64, requires_grad=True)
    upstream = torch.linspace(-1.5, 2.0, labels.shape[0], dtype=torch.float64)
    logits = F.linear(hidden, weight, bias)
    want = npo.sequence_logprob(logits, labels)[0]
    assert torch.allclose(want, oracle_sequence_logprob(logits, labels), rtol=1e-12, atol=1e-10)
    want_grads = torch.autograd.grad((want * upstream).sum(), (hidden, weight, bias))
    for chunk_size in (1, 6):
        logp, _ = npo.fused_sequence_logprob(hidden, weight, labels, bias=bias, chunk_size=chunk_size)
        grads = torch.autograd.grad((logp * upstream).sum(), (hidden, weight, bias))
        assert logp.dtype == torch.float64 and rel_err(logp, want) < 1e-12
        assert all(rel_err(g, w) < 1e-12 for g, w in zip(grads, want_grads))


def test_fused_under_autocast_matches_plain_under_autocast():
    """Under bf16 autocast both paths run the lm_head matmul in bf16 and the softmax in fp32."""
    hidden, weight, labels = random_problem()
    upstream = torch.linspace(-1.5, 2.0, labels.shape[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = npo.sequence_logprob(hidden @ weight.T, labels)[0]
        got = npo.fused_sequence_logprob(hidden, weight, labels, chunk_size=4)[0]
    want_grads = torch.autograd.grad((want * upstream).sum(), (hidden, weight))
    grads = torch.autograd.grad((got * upstream).sum(), (hidden, weight))
    assert got.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    assert rel_err(got, want) < 1e-2 and all(rel_err(g, w) < 1e-2 for g, w in zip(grads, want_grads))
    exact = npo.sequence_logprob(hidden @ weight.T, labels)[0]  # the matmul really ran in bf16
    assert rel_err(got, exact) > 1e-5


# ---------------------------------------------------------------------------------------------
# Losses against formulas


def test_npo_loss_equals_formula():
    torch.manual_seed(0)
    logp, logp_ref = torch.randn(7) * 10 - 30, torch.randn(7) * 10 - 30
    for beta in (0.05, 0.5, 3.0):
        want = -(2 / beta) * sum(
            -math.log1p(math.exp(beta * (a - b))) for a, b in zip(logp.tolist(), logp_ref.tolist())
        ) / 7
        assert math.isclose(npo.npo_loss(logp, logp_ref, beta).item(), want, rel_tol=1e-5)


def test_npo_small_beta_gradient_equals_ga():
    torch.manual_seed(0)
    logp = (torch.randn(6) * 5 - 20).requires_grad_(True)
    logp_ref = torch.randn(6) * 5 - 20
    (g_npo,) = torch.autograd.grad(npo.npo_loss(logp, logp_ref, 1e-4), logp)
    (g_ga,) = torch.autograd.grad(npo.ga_loss(logp, torch.ones(6)), logp)  # sequence-sum form: mean_i logp_i
    assert torch.allclose(g_ga, torch.full((6,), 1 / 6))
    assert rel_err(g_npo, g_ga) < 1e-3


def test_npo_gradient_identity():
    torch.manual_seed(1)
    logp = (torch.randn(8) * 4 - 15).requires_grad_(True)
    logp_ref = torch.randn(8) * 4 - 15
    beta = 0.8
    (grad,) = torch.autograd.grad(npo.npo_loss(logp, logp_ref, beta), logp)
    weights = [2 / (1 + math.exp(-beta * (a - b))) for a, b in zip(logp.tolist(), logp_ref.tolist())]  # W_i
    assert torch.allclose(grad, torch.tensor(weights) / 8, rtol=1e-5, atol=0)


@pytest.mark.parametrize("beta", [1e-3, 0.1, 10.0])
def test_losses_finite_for_extreme_log_ratios(beta):
    ratio = torch.tensor([1e4, -1e4, 1e4, -1e4])
    logp = (torch.full((4,), -50.0) + ratio).requires_grad_(True)
    logp_ref = torch.full((4,), -50.0)
    n = torch.tensor([3, 5, 1, 7])
    for loss in (
        npo.npo_loss(logp, logp_ref, beta),
        npo.dpo_loss(logp, logp_ref, logp_ref.flip(0) + ratio, logp_ref, beta),
        npo.simnpo_loss(logp, n, beta),
    ):
        (grad,) = torch.autograd.grad(loss, logp)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_dpo_loss_hand_computed():
    t = lambda *v: torch.tensor(v, dtype=torch.float64)
    # margin 0: -(2/beta) log(1/2) = (2/beta) ln 2
    assert math.isclose(npo.dpo_loss(t(-3.0), t(-4.0), t(-5.0), t(-6.0), 0.5).item(), 4 * math.log(2), rel_tol=1e-12)
    # margin (-2 - -3) - (-1 - -1.5) = 0.5, beta = 0.5: -4 log sigmoid(0.25) = 4 log(1 + e^-0.25)
    got = npo.dpo_loss(t(-2.0, -3.0), t(-3.0, -4.0), t(-1.0, -5.0), t(-1.5, -6.0), 0.5).item()
    assert math.isclose(got, (4 * math.log1p(math.exp(-0.25)) + 4 * math.log(2)) / 2, rel_tol=1e-12)


def test_simnpo_loss_hand_computed():
    t = lambda *v: torch.tensor(v, dtype=torch.float64)
    # -(2/2) log sigmoid(-(2/3)(-6) - 0) = log(1 + e^-4)
    assert math.isclose(npo.simnpo_loss(t(-6.0), t(3), 2.0).item(), math.log1p(math.exp(-4)), rel_tol=1e-12)
    # delta = 1: log(1 + e^-3); second example -(2/2) log sigmoid(-(2/1)(0.5) - 1) = log(1 + e^2)
    got = npo.simnpo_loss(t(-6.0, 0.5), t(3, 1), 2.0, delta=1.0).item()
    assert math.isclose(got, (math.log1p(math.exp(-3)) + math.log1p(math.exp(2))) / 2, rel_tol=1e-12)


def test_token_mean_losses_hand_computed():
    logp, n = torch.tensor([-2.0, -4.0]), torch.tensor([1, 3])
    assert npo.ga_loss(logp, n).item() == -1.5
    assert npo.retain_nll(logp, n).item() == 1.5


def test_kl_zero_positive_and_equals_kl_div():
    torch.manual_seed(0)
    logits, ref_logits = torch.randn(3, 6, 11), torch.randn(3, 6, 11)
    assert npo.kl_divergence(logits, logits).abs().max().item() < 1e-6
    assert (npo.kl_divergence(logits, ref_logits) > 0).all()
    want = F.kl_div(torch.log_softmax(logits, -1), torch.log_softmax(ref_logits, -1), reduction="none", log_target=True).sum(-1)
    assert torch.allclose(npo.kl_divergence(logits, ref_logits), want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Methods: the one entry point


def scores(logp, n, ref=None):
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return npo.Scores(t(logp).requires_grad_(True), torch.tensor(n), None if ref is None else t(ref))


FORGET = scores([-5.0, -3.0], [4, 3], [-4.0, -3.0])  # r = logp - ref = -1, 0
RETAIN = scores([-2.0, -1.0], [2, 2])
IDK = scores([-6.0, -2.0], [3, 1], [-6.5, -2.5])


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("name", list(npo.METHODS))
def test_unlearning_loss_of_every_method_equals_its_formula(name):
    """Each method's loss, written out by hand from the paper's and TOFU's formulas (beta 0.5,
    delta 0.2), with the forget and retain coefficients applied."""
    beta, delta = 0.5, 0.2
    ls = lambda x: -math.log1p(math.exp(-x))  # noqa: E731  log sigmoid
    forget_terms = {
        "ga": (-5 - 3) / 7,
        "npo": -(2 / beta) * (ls(-beta * -1) + ls(-beta * 0)) / 2,
        "simnpo": -(2 / beta) * (ls(-beta * -5 / 4 - delta) + ls(-beta * -3 / 3 - delta)) / 2,
        "dpo": -(2 / beta) * (ls(beta * (0.5 - -1)) + ls(beta * (0.5 - 0))) / 2,
        "idk": (6 + 2) / 4,
    }
    retain_terms = {None: 0.0, "nll": (2 + 1) / 4,
                    "kl": (-2 - 1) / 4}  # for "kl", RETAIN's logp stands for per-sequence KL sums
    method = npo.METHODS[name]
    forget, retain = forget_terms[method.forget], retain_terms[method.retain]
    if name == "idk":  # TOFU: one token-mean over [IDK; retain]: (6 + 2 + 2 + 1) / (4 + 4)
        forget, retain = (6 + 2) / 8, (2 + 1) / 8
    coefs = npo.Method(method.forget, method.retain, forget_coef=0.7, retain_coef=1.9)
    loss, stats = npo.unlearning_loss(coefs, FORGET, RETAIN, IDK, beta=beta, delta=delta)
    assert math.isclose(loss.item(), 0.7 * forget + 1.9 * retain, rel_tol=1e-12)
    assert math.isclose(stats["forget_loss"], forget, rel_tol=1e-12) and math.isclose(stats["retain_loss"], retain, abs_tol=1e-15)


@pytest.mark.parametrize("forget_term,log_ratios", [
    ("npo", [-1.0, 0.0]), ("dpo", [-1.5, -0.5]), ("simnpo", [-5 / 4 + 0.2 / 0.5, -1 + 0.2 / 0.5]), ("ga", [-1.0, 0.0])])
def test_weights_in_the_statistics(forget_term, log_ratios):
    """stats carry W_i = 2 sigmoid(beta r_i) (1 for GA) and r_i: mean, min and max."""
    loss, stats = npo.unlearning_loss(npo.Method(forget_term), FORGET, idk=IDK, beta=0.5, delta=0.2)
    weights = [1.0, 1.0] if forget_term == "ga" else [2 * sigmoid(0.5 * r) for r in log_ratios]
    for key, values in (("W", weights), ("r", log_ratios)):
        assert math.isclose(stats[f"{key}_mean"], sum(values) / 2, rel_tol=1e-12)
        assert math.isclose(stats[f"{key}_min"], min(values), rel_tol=1e-12)
        assert math.isclose(stats[f"{key}_max"], max(values), rel_tol=1e-12)


def test_npo_weights_are_the_gradient_ratio_to_ga():
    """The paper's argument, checked by autograd: NPO's gradient is GA's (sequence-sum form)
    times W_i, the weight that unlearning_loss reports."""
    forget = scores([-30.0, -12.0, -7.0], [5, 3, 2], [-10.0, -11.0, -7.5])
    loss, stats = npo.unlearning_loss(npo.METHODS["npo"], forget, beta=0.1)
    (grad,) = torch.autograd.grad(loss, forget.logp)
    weights = 2 * torch.sigmoid(0.1 * (forget.logp - forget.ref)).detach()
    assert torch.allclose(grad, weights / 3, rtol=1e-12)
    assert math.isclose(stats["W_mean"], weights.mean().item(), rel_tol=1e-12)
    assert stats["W_min"] < 0.3 < 0.9 < stats["W_max"]  # the forgotten answer has faded


def test_idk_weighting_equals_one_token_mean_over_the_concatenated_batch():
    """TOFU's IDK loss = HF's token-mean cross-entropy over the batch [IDK answers; retain answers]."""
    torch.manual_seed(0)
    logits = torch.randn(5, 8, 13, dtype=torch.float64)
    labels = torch.randint(0, 13, (5, 8))
    labels[:, :3] = npo.IGNORE_INDEX
    labels[1, 6:] = npo.IGNORE_INDEX
    want = F.cross_entropy(logits[:, :-1].reshape(-1, 13), labels[:, 1:].reshape(-1), ignore_index=npo.IGNORE_INDEX)
    logp, n = npo.sequence_logprob(logits, labels)
    loss, _ = npo.unlearning_loss(npo.METHODS["idk"], retain=npo.Scores(logp[2:], n[2:]), idk=npo.Scores(logp[:2], n[:2]))
    assert math.isclose(loss.item(), want.item(), rel_tol=1e-12)


def test_unknown_method_lists_valid_names():
    with pytest.raises(ValueError) as err:
        npo.get_method("npo_xx")
    assert "npo_xx" in str(err.value)
    assert all(name in str(err.value) for name in npo.METHODS)
    with pytest.raises(ValueError, match="unknown retain term"):
        npo.Method("npo", "rt")


# ---------------------------------------------------------------------------------------------
# CUDA


@CUDA
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_cuda_fused_equals_plain(dtype, tol):
    hidden, weight, labels = random_problem(B=6, T=40, C=64, V=1000, dtype=dtype, device="cuda")
    upstream = torch.linspace(-1.5, 2.0, labels.shape[0], device="cuda")
    want_logp, _, want_gh, want_gw = plain_values_and_grads(hidden, weight, labels, upstream)
    logp, _ = npo.fused_sequence_logprob(hidden, weight, labels, chunk_size=37)
    grad_h, grad_w = torch.autograd.grad((logp * upstream).sum(), (hidden, weight))
    assert rel_err(logp, want_logp) < tol and rel_err(grad_h, want_gh) < tol and rel_err(grad_w, want_gw) < tol
