"""The model without Hugging Face: architecture, KV-cache generation against naive decoding,
gradient checkpointing, the answer log-prob / KL helpers, the memory estimate, npo-gpt-v1 files.
(The Hugging Face families against transformers are in test_hf_models.py.)"""
import math

import pytest
import torch
import torch.nn.functional as F

import npo
from model import (GPT, GPTConfig, ModelError, answer_kl, answer_logprob, load_checkpoint,
                   memory_estimate)

TINY = GPTConfig(vocab_size=97, block_size=64, n_layer=2, n_head=2, n_embd=32)
# Llama-3-like: RMSNorm, SwiGLU, RoPE with llama3 scaling, grouped-query attention, no biases
TINY_LLAMA = GPTConfig(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_embd=32, n_kv_head=2,
                       intermediate_size=48, norm="rmsnorm", activation="silu", gated_mlp=True,
                       pos="rope", rope_theta=500000.0, bias=False, family="llama",
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
# Phi-1.5-like: parallel block, partial rotary, lm_head bias, untied
TINY_PHI = GPTConfig(vocab_size=97, block_size=64, n_layer=2, n_head=2, n_embd=32, activation="gelu_tanh",
                     pos="rope", rotary_fraction=0.5, lm_head_bias=True, parallel_block=True,
                     tie_embeddings=False, family="phi")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")


def sharp_model(seed=0, config=TINY, dtype=torch.float64):
    """A random model with large weights. The standard 0.02 init makes a tiny untrained model
    repeat one or two tokens whatever the context; larger weights make greedy decoding depend
    on content and position, so a cache or position bug changes the tokens."""
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and ("wte" in name or "wpe" in name):
                p.normal_(0.0, 0.5)
            elif p.dim() == 2:
                p.normal_(0.0, 3.0 / math.sqrt(p.size(1)))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model.to(dtype).eval()


def random_prompts(n=8, max_len=16, vocab=TINY.vocab_size, seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for length in lengths]


@torch.no_grad()
def naive_greedy(model, prompt, max_new_tokens, eos_ids=()):
    """Oracle: re-run the full forward pass on the growing sequence, take the last argmax.
    Also returns the smallest gap between the two best logits seen (the decision margin)."""
    seq, new, margin = list(prompt), [], math.inf
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([seq], device=model.lm_head.weight.device))[0, -1]  # (V,)
        top2 = logits.float().topk(2).values
        margin = min(margin, float(top2[0] - top2[1]))
        token = int(logits.argmax())
        if token in eos_ids:
            break
        new.append(token)
        seq.append(token)
    return new, margin


# --------------------------------------------------------------------------- architecture

def hand_param_count(V, block_size, n_layer, C):
    ln = 2 * C  # weight and bias
    attn = (C * 3 * C + 3 * C) + (C * C + C)  # c_attn, c_proj
    mlp = (C * 4 * C + 4 * C) + (4 * C * C + C)  # c_fc, c_proj
    # wte (shared with lm_head), wpe, blocks, ln_f
    return V * C + block_size * C + n_layer * (2 * ln + attn + mlp) + ln


def test_param_count_matches_hand_count():
    assert GPT(TINY).num_params() == hand_param_count(97, 64, 2, 32)
    assert GPT(GPTConfig()).num_params() == hand_param_count(4096, 256, 4, 256) == 4_273_664
    V, C, kv, I = 97, 32, 16, 48  # TINY_LLAMA: k and v have 2 heads of 8
    layer = 2 * C + C * (C + 2 * kv) + C * C + C * 2 * I + I * C  # 2 RMSNorms, q k v, o, gate+up, down
    assert GPT(TINY_LLAMA).num_params() == V * C + 2 * layer + C  # tied, no positions, no biases
    phi_layer = 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C)
    assert GPT(TINY_PHI).num_params() == V * C + 2 * phi_layer + 2 * C + (V * C + V)  # untied head with bias


def test_lm_head_tied_to_token_embedding():
    model = GPT(TINY)
    assert model.lm_head.weight is model.transformer.wte.weight
    # Gradient from the output layer lands in the embedding matrix too.
    idx = torch.randint(0, TINY.vocab_size, (2, 5))
    model(idx).sum().backward()
    assert model.transformer.wte.weight.grad.abs().sum() > 0
    assert GPT(TINY_PHI).lm_head.weight is not GPT(TINY_PHI).transformer.wte.weight


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, block_size=64, n_layer=8, n_head=2, n_embd=128))
    assert model.transformer.h[0].mlp.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(2 * 8), rel=0.05)
    assert model.transformer.h[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)


@pytest.mark.parametrize("config", [TINY, TINY_PHI], ids=["gpt", "phi"])
def test_return_hidden_times_lm_head_gives_logits(config):
    model = sharp_model(config=config, dtype=torch.float32)
    idx = torch.randint(0, config.vocab_size, (3, 11))
    hidden = model(idx, return_hidden=True)
    assert hidden.shape == (3, 11, config.n_embd)
    torch.testing.assert_close(F.linear(hidden, model.lm_head.weight, model.lm_head.bias), model(idx))


@pytest.mark.parametrize("config", [TINY, TINY_LLAMA, TINY_PHI], ids=["gpt", "llama", "phi"])
def test_causal_future_tokens_do_not_change_earlier_logits(config):
    model = sharp_model(config=config)
    idx = torch.randint(0, config.vocab_size, (2, 12))
    changed = idx.clone()
    changed[:, 7] = (changed[:, 7] + 1) % config.vocab_size
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-12)
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-3  # the change is visible from position 7 on


def test_rope_attention_depends_on_relative_position_only():
    # RoPE's defining property: shifting every position by the same offset leaves q.k unchanged
    # (up to the fp32 angles, computed in fp32 as Hugging Face does); stretching them does not.
    model = sharp_model(config=TINY_LLAMA)
    idx = torch.randint(0, 97, (2, 10))
    base = model._hidden(idx, torch.arange(10))
    torch.testing.assert_close(model._hidden(idx, torch.arange(10) + 37), base, rtol=0, atol=1e-4)
    assert (model._hidden(idx, 2 * torch.arange(10)) - base).abs().max() > 0.1


def test_config_rejects_what_it_cannot_build():
    with pytest.raises(ModelError, match="n_head by n_kv_head"):
        GPTConfig(n_head=4, n_kv_head=3)
    with pytest.raises(ModelError, match="norm = 'batchnorm'"):
        GPTConfig(norm="batchnorm")
    with pytest.raises(ModelError, match="rope_scaling .*yarn"):
        GPTConfig(pos="rope", rope_scaling={"rope_type": "yarn", "factor": 4.0})


def test_forward_rejects_sequence_longer_than_block_size():
    with pytest.raises(ValueError, match="exceeds block_size 64"):
        GPT(TINY)(torch.zeros(1, 65, dtype=torch.long))


# --------------------------------------------------------------------------- generation

@pytest.mark.parametrize("config", [TINY, TINY_LLAMA, TINY_PHI], ids=["gpt", "llama", "phi"])
def test_cached_batched_generation_equals_naive_decoding(config):
    model = sharp_model(config=config)
    prompts = random_prompts()
    assert len({len(p) for p in prompts}) > 3  # different lengths: left padding is exercised
    expected = [naive_greedy(model, p, 16)[0] for p in prompts]
    assert len({t for row in expected for t in row}) > 20  # decoding is not degenerate
    assert model.generate(prompts, 16, eos_ids=()) == expected  # one batch
    assert model.generate(prompts, 16, eos_ids=(), batch_size=3) == expected  # several batches


def test_float32_generation_equals_naive_decoding():
    # float32 batched and unbatched matmuls differ in the last bits; with this seed every greedy
    # decision has a logit margin far above that noise, so the tokens must agree exactly.
    model = sharp_model(config=TINY_LLAMA, dtype=torch.float32)
    prompts = random_prompts(n=6, seed=3)
    naive = [naive_greedy(model, p, 12) for p in prompts]
    assert min(m for _, m in naive) > 1e-3
    assert model.generate(prompts, 12, eos_ids=()) == [tokens for tokens, _ in naive]


def test_any_eos_id_stops_its_row_and_is_excluded():
    model = sharp_model(seed=2)
    prompts = random_prompts(seed=4)
    full = model.generate(prompts, 16, eos_ids=())
    eos = {full[0][4], full[1][6]}  # tokens the model does emit, mid-sequence

    def cut(row):
        return row[:min((i for i, t in enumerate(row) if t in eos), default=len(row))]
    expected = [cut(row) for row in full]
    assert len({len(row) for row in expected}) > 2  # rows stop at different steps
    assert any(len(row) == 16 for row in expected)  # and some never stop
    assert model.generate(prompts, 16, eos_ids=eos) == expected
    assert [naive_greedy(model, p, 16, eos)[0] for p in prompts] == expected


def test_generate_uses_eval_mode_and_restores_training_mode():
    cfg = GPTConfig(vocab_size=97, block_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.5)
    model = sharp_model(config=cfg).train()
    prompts = random_prompts(n=4, seed=5)
    out = model.generate(prompts, 10, eos_ids=())
    assert model.training
    model.eval()
    assert out == [naive_greedy(model, p, 10)[0] for p in prompts]  # no dropout while generating


def test_generate_argument_checks():
    model = GPT(TINY)
    with pytest.raises(ValueError, match="prompt 1 has 60 tokens.*block_size 64"):
        model.generate([[1, 2], [3] * 60], max_new_tokens=5, eos_ids=[0])
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        model.generate([[]], max_new_tokens=5, eos_ids=[0])
    with pytest.raises(ValueError, match="outside"):
        model.generate([[97]], max_new_tokens=5, eos_ids=[0])
    assert model.generate([[1], [2, 3]], max_new_tokens=0, eos_ids=[0]) == [[], []]
    assert model.generate([], max_new_tokens=5, eos_ids=[0]) == []
    assert len(model.generate([[1] * 59], max_new_tokens=5, eos_ids=())[0]) == 5  # exactly fits


def test_bf16_autocast_on_cpu():
    model = sharp_model(dtype=torch.float32)
    idx = torch.randint(0, TINY.vocab_size, (2, 16))
    ref = model(idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(idx)
        out = model.generate(random_prompts(n=5), 8, eos_ids=())
    assert logits.dtype == torch.bfloat16
    # bf16 keeps ~3 significant digits; errors add up over the layers
    assert (logits.float() - ref).abs().max() / ref.abs().max() < 0.05
    assert [len(row) for row in out] == [8] * 5


# --------------------------------------------------------------------------- training helpers

def qa_batch(config, B=3, T=14, seed=0):
    """Right-padded question/answer rows: labels IGNORE_INDEX on the question and the padding."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, config.vocab_size, (B, T), generator=g)
    labels = idx.clone()
    for b, (question, length) in enumerate([(4, 14), (6, 10), (3, 8)][:B]):
        labels[b, :question] = npo.IGNORE_INDEX
        labels[b, length:] = npo.IGNORE_INDEX
    return idx, labels


@pytest.mark.parametrize("config", [TINY_LLAMA, TINY_PHI], ids=["llama", "phi"])
def test_gradient_checkpointing_same_gradients_fewer_saved_tensors(config):
    model = sharp_model(config=config).train()
    idx, labels = qa_batch(config)

    def grads_and_saved_bytes():
        model.zero_grad()
        saved = {}
        params = {p.data_ptr() for p in model.parameters()}

        def pack(t):
            if t.data_ptr() not in params:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logp, _ = answer_logprob(model, idx, labels, fused=True)
        logp.sum().backward()
        return [p.grad.clone() for p in model.parameters()], sum(saved.values())

    plain, plain_bytes = grads_and_saved_bytes()
    model.gradient_checkpointing = True
    recomputed, recomputed_bytes = grads_and_saved_bytes()
    for a, b in zip(plain, recomputed):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert recomputed_bytes < plain_bytes / 3


@pytest.mark.parametrize("config", [TINY, TINY_PHI], ids=["gpt", "phi"])
def test_answer_logprob_fused_equals_plain_and_hand_sum(config):
    model = sharp_model(config=config)
    idx, labels = qa_batch(config)
    logp, n = answer_logprob(model, idx, labels, fused=False)
    fused_logp, fused_n = answer_logprob(model, idx, labels, fused=True)
    logprobs = torch.log_softmax(model(idx), dim=-1)  # (B, T, V)
    hand = [sum(logprobs[b, t - 1, labels[b, t]] for t in range(1, idx.shape[1]) if labels[b, t] >= 0)
            for b in range(idx.shape[0])]
    torch.testing.assert_close(logp, torch.stack(hand))
    torch.testing.assert_close(fused_logp, logp)
    assert n.tolist() == fused_n.tolist() == [10, 4, 5]


def test_answer_kl_against_torch_kl_div():
    ref = sharp_model(config=TINY_LLAMA, seed=0)
    model = sharp_model(config=TINY_LLAMA, seed=0)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.mul_(1.5)
    idx, labels = qa_batch(TINY_LLAMA)
    # KL(ref || theta) per position, from torch's own kl_div (target = ref log-probs)
    per_position = F.kl_div(torch.log_softmax(model(idx), -1), torch.log_softmax(ref(idx), -1),
                            reduction="none", log_target=True).sum(-1)  # (B, T)
    answer = npo.shift_labels(labels) != npo.IGNORE_INDEX
    kl, count = answer_kl(model, ref, idx, labels)
    torch.testing.assert_close(kl, (per_position * answer).sum(1))
    assert count.tolist() == [10, 4, 5] and kl.min() > 0
    kl_all, count_all = answer_kl(model, ref, idx, labels, all_positions=True)
    torch.testing.assert_close(kl_all, per_position.sum(1))
    assert count_all.tolist() == [14] * 3
    assert answer_kl(ref, ref, idx, labels)[0].abs().max() < 1e-12


# --------------------------------------------------------------------------- memory estimate

def saved_activation_bytes(model, idx, labels):
    params = {p.data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        answer_logprob(model, idx, labels, fused=True)
    return sum(saved.values())


@pytest.mark.parametrize("config", [TINY, TINY_LLAMA, TINY_PHI], ids=["gpt", "llama", "phi"])
def test_memory_estimate_against_a_real_step(config):
    torch.manual_seed(0)
    config = GPTConfig(**{**config.__dict__, "n_embd": 128, "intermediate_size": None if config is TINY else 344})
    model = GPT(config)
    B, T = 4, 64
    idx = torch.randint(0, config.vocab_size, (B, T))
    labels = idx.clone()
    labels[:, :T // 2] = npo.IGNORE_INDEX
    est = memory_estimate(config, B, T, torch.float32, "adamw")
    n = model.num_params()
    assert est["parameters"] == est["gradients"] == 4 * n
    # the activation formula counts what autograd really saves, roughly (fused path)
    assert 0.85 < est["activations"] / saved_activation_bytes(model, idx, labels) < 1.15
    # optimizer state: exactly what torch's optimizers allocate (step counters aside)
    for name, optimizer in [("adamw", torch.optim.AdamW), ("adafactor", torch.optim.Adafactor)]:
        opt = optimizer(model.parameters(), lr=1e-3)
        answer_logprob(model, idx, labels, fused=True)[0].sum().backward()
        opt.step()
        state = sum(t.numel() * t.element_size() for s in opt.state.values()
                    for key, t in s.items() if key != "step")
        assert memory_estimate(config, B, T, torch.float32, name)["optimizer"] == state
    half = memory_estimate(config, B, T, torch.bfloat16, "adamw", n_shards=2, ref_model_copy=True)
    assert half["parameters"] == half["reference"] == n and half["optimizer"] == 2 * n  # bf16 moments
    assert half["total"] == sum(v for k, v in half.items() if k != "total")
    unfused = memory_estimate(config, B, T, torch.float32, "adamw", fused=False)
    assert unfused["activations"] - est["activations"] == B * T * config.vocab_size * 12
    ckpt = memory_estimate(config, B, T, torch.float32, "adamw", grad_checkpointing=True)
    assert ckpt["activations"] < est["activations"]
    with pytest.raises(ModelError, match="optimizer 'lion'"):
        memory_estimate(config, B, T, torch.float32, "lion")


# --------------------------------------------------------------------------- npo-gpt-v1 files

OLD_CONFIG = dict(vocab_size=97, block_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)


def write_old_checkpoint(path, net, **changes):
    """The single-file format the project wrote before it read Hugging Face models: a config of
    seven fields and a state_dict with nanoGPT's names."""
    ckpt = {"format": "npo-gpt-v1", "model_config": dict(OLD_CONFIG), "model": net.state_dict(),
            "tokenizer": {"name": "npo-bpe"}, "train_config": {"lr": 1e-3}, "step": 7, "extra": {}}
    ckpt.update(changes)
    torch.save(ckpt, path)


def test_old_checkpoint_loads(tmp_path):
    model = sharp_model(dtype=torch.float32)
    write_old_checkpoint(tmp_path / "ckpt.pt", model)
    loaded, ckpt = load_checkpoint(tmp_path / "ckpt.pt")
    assert loaded.config == TINY and ckpt["step"] == 7 and ckpt["tokenizer"] == {"name": "npo-bpe"}
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    idx = torch.randint(0, TINY.vocab_size, (2, 9))
    assert torch.equal(loaded.eval()(idx), model(idx))


def test_checkpoint_missing_foreign_and_mismatched_files(tmp_path):
    with pytest.raises(ModelError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    with pytest.raises(ModelError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(tmp_path / "notes.txt")
    torch.save(GPT(TINY).state_dict(), tmp_path / "bare.pt")
    with pytest.raises(ModelError, match="expected 'npo-gpt-v1'"):
        load_checkpoint(tmp_path / "bare.pt")
    state = GPT(TINY).state_dict()
    state["transformer.wpe.weight"] = torch.zeros(32, 32)  # block_size 32, config says 64
    del state["transformer.ln_f.bias"]
    write_old_checkpoint(tmp_path / "bad.pt", GPT(TINY), model=state)
    with pytest.raises(ModelError) as e:
        load_checkpoint(tmp_path / "bad.pt")
    assert "transformer.wpe.weight: copying a param with shape torch.Size([32, 32])" in str(e.value)
    assert 'Missing key(s) in state_dict: "transformer.ln_f.bias"' in str(e.value)


# --------------------------------------------------------------------------- CUDA

@requires_cuda
def test_cuda_forward_generation_and_bf16_autocast():
    model = sharp_model(config=TINY_LLAMA)
    prompts = random_prompts()
    expected = [naive_greedy(model, p, 16)[0] for p in prompts]  # on the CPU
    idx = torch.randint(0, TINY.vocab_size, (2, 16))
    ref = model(idx)
    model.to("cuda")
    torch.testing.assert_close(model(idx.cuda()).cpu(), ref)
    assert model.generate(prompts, 16, eos_ids=()) == expected
    model.float()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(idx.cuda())
    assert (logits.float().cpu() - ref).abs().max() / ref.abs().max() < 0.05
