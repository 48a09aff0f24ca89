"""Tests for npo.py. Every expected value comes from an independent oracle: a Python-math formula,
a per-token loop, torch.nn.functional.kl_div, or the plain (B, T, V) autograd path.

Relative errors are norm-wise, ||got - want|| / ||want||. The bf16 checks compare the fused path
with the plain path run on the SAME bf16 inputs (the logits computed in bf16, then upcast, exactly
as a bf16 model's lm_head output would be), so they measure the fused path's error, not bf16's.
The torch.compile test runs only with NPO_TEST_COMPILE=1 (compiling costs 20-40 s on a small CPU).
"""

import copy
import math
import os
import warnings

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
    logp, n = npo.fused_sequence_logprob(hidden, weight, labels, chunk_size=chunk_size, compile=False)
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
    logp, _ = npo.fused_sequence_logprob(hidden, weight, labels, chunk_size=4, compile=False)
    grad_h, grad_w = torch.autograd.grad((logp * upstream).sum(), (hidden, weight))
    assert logp.dtype == torch.float32 and grad_h.dtype == torch.bfloat16 and grad_w.dtype == torch.bfloat16
    assert rel_err(logp, want_logp) < 1e-2
    assert rel_err(grad_h, want_gh) < 1e-2 and rel_err(grad_w, want_gw) < 1e-2


def test_fused_logprob_without_any_label_tokens():
    hidden, weight, _ = random_problem()
    labels = torch.full(hidden.shape[:2], npo.IGNORE_INDEX)
    logp, n = npo.fused_sequence_logprob(hidden, weight, labels, compile=False)
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
    logp_fused, _ = npo.fused_sequence_logprob(hidden_of(weight), weight, labels, chunk_size=5, compile=False)
    (got,) = torch.autograd.grad(logp_fused.sum(), weight)
    assert rel_err(got, want) < 1e-5


def test_compile_failure_falls_back_to_eager(monkeypatch):
    def failing_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C compiler here")
        return run

    monkeypatch.setattr(torch, "compile", failing_compile)
    monkeypatch.setattr(npo, "_KERNELS", npo._ChunkKernels())
    hidden, weight, labels = random_problem()
    want, _ = npo.fused_sequence_logprob(hidden, weight, labels, chunk_size=4, compile=False)
    with pytest.warns(RuntimeWarning, match="no C compiler here"):
        got, _ = npo.fused_sequence_logprob(hidden, weight, labels, chunk_size=4, compile=True)
    assert torch.equal(got, want)
    assert npo._KERNELS.compile_failed


@pytest.mark.skipif(os.environ.get("NPO_TEST_COMPILE") != "1", reason="set NPO_TEST_COMPILE=1 (compiling takes 20-40 s on CPU)")
def test_fused_compiled_equals_plain():
    hidden, weight, labels = random_problem()
    ref = torch.randn(labels.shape[0])
    upstream = torch.linspace(-1.5, 2.0, labels.shape[0])
    want_logp, _, want_gh, want_gw = plain_values_and_grads(hidden, weight, labels, upstream)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # fail if compiling fell back to eager
        logp, _ = npo.fused_sequence_logprob(hidden, weight, labels, chunk_size=7, compile=True)
        grad_h, grad_w = torch.autograd.grad((logp * upstream).sum(), (hidden, weight))
        loss = npo.fused_npo_loss(hidden, weight, labels, ref, 0.7, chunk_size=7, compile=True)
        fused_gh, fused_gw = torch.autograd.grad(loss, (hidden, weight))
    assert rel_err(logp, want_logp) < 1e-5 and rel_err(grad_h, want_gh) < 1e-5 and rel_err(grad_w, want_gw) < 1e-5
    want_loss = npo.npo_loss(npo.sequence_logprob(hidden @ weight.T, labels)[0], ref, 0.7)
    want_gh, want_gw = torch.autograd.grad(want_loss, (hidden, weight))
    assert rel_err(loss, want_loss) < 1e-5 and rel_err(fused_gh, want_gh) < 1e-5 and rel_err(fused_gw, want_gw) < 1e-5


# ---------------------------------------------------------------------------------------------
# Fused losses with gradients formed in forward


@pytest.mark.parametrize("chunk_size", [1, 5, 8, 10_000])  # 1 and 5: sequences longer than a chunk
def test_fused_npo_loss_equals_npo_of_plain_logprob(chunk_size):
    hidden, weight, labels = random_problem()
    logp_ref = torch.randn(labels.shape[0]) * 3 - 20
    beta = 0.7
    want = npo.npo_loss(npo.sequence_logprob(hidden @ weight.T, labels)[0], logp_ref, beta)
    want_gh, want_gw = torch.autograd.grad(want, (hidden, weight))
    loss, logp = npo.fused_npo_loss(hidden, weight, labels, logp_ref, beta, chunk_size=chunk_size, compile=False, return_logp=True)
    grad_h, grad_w = torch.autograd.grad(loss, (hidden, weight))
    assert rel_err(loss, want) < 1e-6
    assert torch.equal(loss, npo.npo_loss(logp, logp_ref, beta))  # the value is npo_loss of the fused logp
    assert rel_err(grad_h, want_gh) < 1e-5 and rel_err(grad_w, want_gw) < 1e-5


def test_fused_loss_scales_with_upstream_gradient_and_refuses_second_backward():
    hidden, weight, labels = random_problem()
    logp_ref = torch.randn(labels.shape[0])
    want = 2.5 * npo.npo_loss(npo.sequence_logprob(hidden @ weight.T, labels)[0], logp_ref, 0.3)
    (want_gw,) = torch.autograd.grad(want, weight)
    loss = npo.fused_npo_loss(hidden, weight, labels, logp_ref, 0.3, chunk_size=6, compile=False)
    (2.5 * loss).backward(retain_graph=True)
    assert rel_err(weight.grad, want_gw) < 1e-5
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss.backward()


def test_fused_sequence_loss_other_separable_losses():
    hidden, weight, labels = random_problem(seed=1)
    for loss_fn in (npo.ga_loss, npo.retain_nll, lambda lp, n: npo.simnpo_loss(lp, n, 2.0, 0.5)):
        logp, n = npo.sequence_logprob(hidden @ weight.T, labels)
        want = loss_fn(logp, n)
        want_gh, want_gw = torch.autograd.grad(want, (hidden, weight))
        got = npo.fused_sequence_loss(hidden, weight, labels, loss_fn, chunk_size=4, compile=False)
        grad_h, grad_w = torch.autograd.grad(got, (hidden, weight))
        assert rel_err(got, want) < 1e-6
        assert rel_err(grad_h, want_gh) < 1e-5 and rel_err(grad_w, want_gw) < 1e-5


def test_fused_npo_loss_bf16_and_no_grad():
    hidden, weight, labels = random_problem(dtype=torch.bfloat16)
    logp_ref = torch.randn(labels.shape[0])
    want = npo.npo_loss(npo.sequence_logprob(hidden @ weight.T, labels)[0], logp_ref, 1.0)
    want_gh, want_gw = torch.autograd.grad(want, (hidden, weight))
    loss = npo.fused_npo_loss(hidden, weight, labels, logp_ref, 1.0, chunk_size=4, compile=False)
    grad_h, grad_w = torch.autograd.grad(loss, (hidden, weight))
    assert rel_err(loss, want) < 1e-2 and rel_err(grad_h, want_gh) < 1e-2 and rel_err(grad_w, want_gw) < 1e-2
    with torch.no_grad():
        assert torch.equal(npo.fused_npo_loss(hidden, weight, labels, logp_ref, 1.0, chunk_size=4, compile=False), loss.detach())


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
    assert npo.idk_loss(logp, n).item() == 1.5


def test_kl_zero_positive_and_equals_kl_div():
    torch.manual_seed(0)
    logits, ref_logits = torch.randn(3, 6, 11), torch.randn(3, 6, 11)
    labels = torch.randint(0, 11, (3, 6))  # every position scored except the last (nothing to predict)
    assert npo.kl_divergence(logits, logits).abs().max().item() < 1e-6
    assert npo.kl_retain(logits, logits, labels).abs().item() < 1e-6
    assert (npo.kl_divergence(logits, ref_logits) > 0).all()
    want = F.kl_div(
        torch.log_softmax(logits[:, :-1], -1), torch.log_softmax(ref_logits[:, :-1], -1), reduction="sum", log_target=True
    ) / (3 * 5)
    assert math.isclose(npo.kl_retain(logits, ref_logits, labels).item(), want.item(), rel_tol=1e-5)


def test_kl_retain_masks_question_and_padding():
    torch.manual_seed(0)
    logits, ref_logits = torch.randn(2, 6, 11), torch.randn(2, 6, 11)
    labels = torch.randint(0, 11, (2, 6))
    labels[:, :2] = npo.IGNORE_INDEX
    labels[1, 4:] = npo.IGNORE_INDEX
    scored = [(0, 1), (0, 2), (0, 3), (0, 4), (1, 1), (1, 2)]  # (b, t) with labels[b, t + 1] scored
    want = sum(npo.kl_divergence(logits[b, t], ref_logits[b, t]) for b, t in scored) / len(scored)
    assert math.isclose(npo.kl_retain(logits, ref_logits, labels).item(), want.item(), rel_tol=1e-6)
    moved = logits.clone()
    moved[:, 0] += 5 * torch.randn(2, 11)  # positions whose target is ignored
    moved[1, 3:] += 5 * torch.randn(3, 11)
    assert npo.kl_retain(moved, ref_logits, labels).item() == npo.kl_retain(logits, ref_logits, labels).item()


# ---------------------------------------------------------------------------------------------
# Methods


def test_methods_table():
    want = {
        "ga": ("ga", None), "ga_rt": ("ga", "nll"), "ga_kl": ("ga", "kl"),
        "npo": ("npo", None), "npo_rt": ("npo", "nll"), "npo_kl": ("npo", "kl"),
        "idk": ("idk", "nll"),
        "dpo": ("dpo", None), "dpo_rt": ("dpo", "nll"), "dpo_kl": ("dpo", "kl"),
        "simnpo": ("simnpo", None), "simnpo_rt": ("simnpo", "nll"),
    }
    assert {k: (m.forget, m.retain) for k, m in npo.METHODS.items()} == want
    assert all(m.forget_coef == 1.0 and m.retain_coef == 1.0 for m in npo.METHODS.values())
    assert npo.get_method("npo_kl").needs_ref_model and npo.get_method("npo_kl").needs_ref_logprobs
    assert not npo.get_method("npo_rt").needs_ref_model and not npo.get_method("simnpo").needs_ref_logprobs
    assert npo.get_method("dpo").needs_idk and npo.get_method("idk").needs_idk and not npo.get_method("ga").needs_idk


def test_unknown_method_lists_valid_names():
    with pytest.raises(ValueError) as err:
        npo.get_method("npo_xx")
    assert "npo_xx" in str(err.value)
    assert all(name in str(err.value) for name in npo.METHODS)
    with pytest.raises(ValueError, match="unknown retain term"):
        npo.Method("npo", "rt")


# ---------------------------------------------------------------------------------------------
# Cached reference log-probs


def tiny_lm(V=23, C=8, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Embedding(V, C), torch.nn.Dropout(0.5), torch.nn.Linear(C, V))


def forget_batches(V=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for B in (3, 2):
        ids = torch.randint(0, V, (B, 7), generator=g)
        labels = ids.clone()
        labels[:, :3] = npo.IGNORE_INDEX
        out.append((ids, labels))
    return out


def test_precompute_ref_logprobs_uses_eval_and_no_grad():
    ref = tiny_lm()
    ref.train()
    batches = forget_batches()
    cached = npo.precompute_ref_logprobs(ref, batches)
    assert ref.training  # mode restored
    assert cached.shape == (5,) and not cached.requires_grad
    ref.eval()
    with torch.no_grad():  # dropout off: the deterministic model
        want = torch.cat([npo.sequence_logprob(ref(ids), labels)[0] for ids, labels in batches])
    assert torch.equal(cached, want)
    with pytest.raises(ValueError, match="no batches"):
        npo.precompute_ref_logprobs(ref, [])


def test_cached_reference_gives_identical_npo_loss_and_gradient():
    ref = tiny_lm()
    policy = copy.deepcopy(ref)
    with torch.no_grad():
        for p in policy.parameters():  # some unlearning has happened
            p.add_(0.1 * torch.randn_like(p))
    policy.eval()
    batches = forget_batches()
    cached = npo.precompute_ref_logprobs(ref, batches)
    start = 0
    for ids, labels in batches:
        logp, _ = npo.sequence_logprob(policy(ids), labels)
        ref.eval()
        with torch.no_grad():
            recomputed = npo.sequence_logprob(ref(ids), labels)[0]
        loss_rec = npo.npo_loss(logp, recomputed, 0.5)
        grads_rec = torch.autograd.grad(loss_rec, list(policy.parameters()), retain_graph=True)
        loss_cached = npo.npo_loss(logp, cached[start:start + len(ids)], 0.5)
        grads_cached = torch.autograd.grad(loss_cached, list(policy.parameters()))
        assert torch.equal(loss_cached, loss_rec)
        assert all(torch.equal(a, b) for a, b in zip(grads_cached, grads_rec))
        start += len(ids)


# ---------------------------------------------------------------------------------------------
# CUDA


@CUDA
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_cuda_fused_equals_plain(dtype, tol):
    hidden, weight, labels = random_problem(B=6, T=40, C=64, V=1000, dtype=dtype, device="cuda")
    upstream = torch.linspace(-1.5, 2.0, labels.shape[0], device="cuda")
    want_logp, _, want_gh, want_gw = plain_values_and_grads(hidden, weight, labels, upstream)
    logp, _ = npo.fused_sequence_logprob(hidden, weight, labels, chunk_size=37, compile=True)
    grad_h, grad_w = torch.autograd.grad((logp * upstream).sum(), (hidden, weight))
    assert rel_err(logp, want_logp) < tol and rel_err(grad_h, want_gh) < tol and rel_err(grad_w, want_gw) < tol
    logp_ref = torch.randn(labels.shape[0], device="cuda")
    want = npo.npo_loss(npo.sequence_logprob(hidden @ weight.T, labels)[0], logp_ref, 0.5)
    want_gh, want_gw = torch.autograd.grad(want, (hidden, weight))
    loss = npo.fused_npo_loss(hidden, weight, labels, logp_ref, 0.5, chunk_size=37, compile=True)
    grad_h, grad_w = torch.autograd.grad(loss, (hidden, weight))
    assert rel_err(loss, want) < tol and rel_err(grad_h, want_gh) < tol and rel_err(grad_w, want_gw) < tol


def test_fused_under_autocast_matches_plain_under_autocast():
    """Under bf16 autocast both paths run the lm_head matmul in bf16 and the softmax in fp32."""
    hidden, weight, labels = random_problem()
    logp_ref = torch.randn(labels.shape[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = npo.npo_loss(npo.sequence_logprob(hidden @ weight.T, labels)[0], logp_ref, 0.5)
    want_gh, want_gw = torch.autograd.grad(want, (hidden, weight))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, _ = npo.fused_sequence_logprob(hidden, weight, labels, chunk_size=4, compile=False)
        got = npo.npo_loss(logp, logp_ref, 0.5)
        fused = npo.fused_npo_loss(hidden, weight, labels, logp_ref, 0.5, chunk_size=4, compile=False)
    assert logp.dtype == torch.float32
    for loss in (got, fused):
        grad_h, grad_w = torch.autograd.grad(loss, (hidden, weight))
        assert grad_h.dtype == torch.float32 and grad_w.dtype == torch.float32
        assert rel_err(loss, want) < 1e-2 and rel_err(grad_h, want_gh) < 1e-2 and rel_err(grad_w, want_gw) < 1e-2
    # and the matmul really ran in bf16: the fp32 result differs by more than fp32 rounding
    exact = npo.npo_loss(npo.sequence_logprob(hidden @ weight.T, labels)[0], logp_ref, 0.5)
    assert rel_err(fused, exact) > 1e-5


def test_fused_fp64_matches_plain_fp64_tightly():
    """In fp64 rounding vanishes, so any algorithmic slip (shift, chunk seams, weights) shows."""
    hidden, weight, labels = random_problem(dtype=torch.float64)
    logp_ref = torch.randn(labels.shape[0], dtype=torch.float64)
    logp_plain = npo.sequence_logprob(hidden @ weight.T, labels)[0]
    want = npo.npo_loss(logp_plain, logp_ref, 0.9)
    want_gh, want_gw = torch.autograd.grad(want, (hidden, weight))
    assert torch.allclose(logp_plain, oracle_sequence_logprob(hidden @ weight.T, labels), rtol=1e-12, atol=1e-10)
    for chunk_size in (1, 6):
        logp, _ = npo.fused_sequence_logprob(hidden, weight, labels, chunk_size=chunk_size, compile=False)
        grad_h, grad_w = torch.autograd.grad(npo.npo_loss(logp, logp_ref, 0.9), (hidden, weight))
        assert rel_err(grad_h, want_gh) < 1e-12 and rel_err(grad_w, want_gw) < 1e-12
        fused = npo.fused_npo_loss(hidden, weight, labels, logp_ref, 0.9, chunk_size=chunk_size, compile=False)
        grad_h, grad_w = torch.autograd.grad(fused, (hidden, weight))
        assert rel_err(fused, want) < 1e-12 and rel_err(grad_h, want_gh) < 1e-12 and rel_err(grad_w, want_gw) < 1e-12
