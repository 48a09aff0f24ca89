import math

import pytest
import torch

from model import CheckpointError, GPT, GPTConfig, load_checkpoint, save_checkpoint

TINY = GPTConfig(vocab_size=97, block_size=64, n_layer=2, n_head=2, n_embd=32)
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


def random_prompts(n=10, max_len=20, vocab=TINY.vocab_size, seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for length in lengths]


@torch.no_grad()
def naive_greedy(model, prompt, max_new_tokens, eos_id=None):
    """Oracle: re-run the full forward pass on the growing sequence, take the last argmax.
    Also returns the smallest gap between the two best logits seen (the decision margin)."""
    seq, new, margin = list(prompt), [], math.inf
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([seq], device=model.lm_head.weight.device))[0, -1]  # (V,)
        top2 = logits.float().topk(2).values
        margin = min(margin, float(top2[0] - top2[1]))
        token = int(logits.argmax())
        if token == eos_id:
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
    assert GPTConfig() == GPTConfig(4096, 256, 4, 4, 256, 0.0, True)  # the defaults
    assert GPT(GPTConfig()).num_params() == hand_param_count(4096, 256, 4, 256) == 4_273_664


def test_lm_head_tied_to_token_embedding():
    model = GPT(TINY)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    # Gradient from the output layer lands in the embedding matrix too.
    idx = torch.randint(0, TINY.vocab_size, (2, 5))
    model(idx).sum().backward()
    assert model.transformer.wte.weight.grad is not None
    assert model.transformer.wte.weight.grad.abs().sum() > 0


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=97, block_size=64, n_layer=8, n_head=2, n_embd=128)
    model = GPT(cfg)
    c_proj = model.transformer.h[0].mlp.c_proj.weight
    c_fc = model.transformer.h[0].mlp.c_fc.weight
    assert c_proj.std().item() == pytest.approx(0.02 / math.sqrt(2 * 8), rel=0.05)
    assert c_fc.std().item() == pytest.approx(0.02, rel=0.05)


def test_return_hidden_times_embedding_gives_logits():
    model = sharp_model(dtype=torch.float32)
    idx = torch.randint(0, TINY.vocab_size, (3, 11))
    logits = model(idx)
    hidden = model(idx, return_hidden=True)
    assert logits.shape == (3, 11, TINY.vocab_size)
    assert hidden.shape == (3, 11, TINY.n_embd)
    torch.testing.assert_close(hidden @ model.transformer.wte.weight.T, logits)


def test_causal_future_tokens_do_not_change_earlier_logits():
    model = sharp_model()
    idx = torch.randint(0, TINY.vocab_size, (2, 12))
    changed = idx.clone()
    changed[:, 7] = (changed[:, 7] + 1) % TINY.vocab_size
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-12)
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-3  # the change is visible from position 7 on


def test_forward_rejects_sequence_longer_than_block_size():
    model = GPT(TINY)
    with pytest.raises(ValueError, match="exceeds block_size 64"):
        model(torch.zeros(1, 65, dtype=torch.long))


# --------------------------------------------------------------------------- generation

def test_cached_batched_generation_equals_naive_decoding():
    model = sharp_model()
    prompts = random_prompts()
    assert len({len(p) for p in prompts}) > 3  # different lengths: left padding is exercised
    expected = [naive_greedy(model, p, 25)[0] for p in prompts]
    assert len({t for row in expected for t in row}) > 20  # decoding is not degenerate
    assert model.generate(prompts, 25, eos_id=None) == expected  # one batch
    assert model.generate(prompts, 25, eos_id=None, batch_size=3) == expected  # several batches


def test_batch_equals_one_prompt_at_a_time():
    model = sharp_model(seed=1)
    prompts = random_prompts(seed=2)
    alone = [model.generate([p], 20, eos_id=None)[0] for p in prompts]
    assert model.generate(prompts, 20, eos_id=None) == alone


def test_float32_generation_equals_naive_decoding():
    # float32 batched and unbatched matmuls differ in the last bits; with this seed every greedy
    # decision has a logit margin far above that noise, so the tokens must agree exactly.
    model = sharp_model(dtype=torch.float32)
    prompts = random_prompts(n=6, seed=3)
    naive = [naive_greedy(model, p, 15) for p in prompts]
    assert min(m for _, m in naive) > 1e-3
    assert model.generate(prompts, 15, eos_id=None) == [tokens for tokens, _ in naive]


def test_eos_stops_each_row_and_is_excluded():
    model = sharp_model(seed=2)
    prompts = random_prompts(n=8, seed=4)
    full = model.generate(prompts, 20, eos_id=None)
    eos = full[0][4]  # a token the model does emit, mid-sequence in row 0
    expected = [row[:row.index(eos)] if eos in row else row for row in full]
    assert len({len(row) for row in expected}) > 1  # rows stop at different steps
    assert any(len(row) == 20 for row in expected)  # and some never stop
    assert model.generate(prompts, 20, eos_id=eos) == expected
    assert [naive_greedy(model, p, 20, eos)[0] for p in prompts] == expected


def test_generate_uses_eval_mode_and_restores_training_mode():
    cfg = GPTConfig(vocab_size=97, block_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.5)
    model = sharp_model(config=cfg).train()
    prompts = random_prompts(n=4, seed=5)
    out = model.generate(prompts, 10, eos_id=None)
    assert model.training
    model.eval()
    assert out == [naive_greedy(model, p, 10)[0] for p in prompts]  # no dropout while generating


def test_generate_argument_checks():
    model = GPT(TINY)
    with pytest.raises(ValueError, match="prompt 1 has 60 tokens.*block_size 64"):
        model.generate([[1, 2], [3] * 60], max_new_tokens=5, eos_id=0)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        model.generate([[]], max_new_tokens=5, eos_id=0)
    with pytest.raises(ValueError, match="outside"):
        model.generate([[97]], max_new_tokens=5, eos_id=0)
    assert model.generate([[1], [2, 3]], max_new_tokens=0, eos_id=0) == [[], []]
    assert model.generate([], max_new_tokens=5, eos_id=0) == []
    assert len(model.generate([[1] * 59], max_new_tokens=5, eos_id=None)[0]) == 5  # exactly fits


# --------------------------------------------------------------------------- bf16 autocast

def test_bf16_autocast_on_cpu():
    model = sharp_model(dtype=torch.float32)
    idx = torch.randint(0, TINY.vocab_size, (2, 16))
    ref = model(idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(idx)
        hidden = model(idx, return_hidden=True)
        out = model.generate(random_prompts(n=5), 8, eos_id=None)
    assert logits.dtype == torch.bfloat16 and hidden.shape == (2, 16, TINY.n_embd)
    # bf16 keeps ~3 significant digits; errors add up over the layers
    err = (logits.float() - ref).abs().max() / ref.abs().max()
    assert err < 0.05
    assert [len(row) for row in out] == [8] * 5
    assert all(0 <= t < TINY.vocab_size for row in out for t in row)


# --------------------------------------------------------------------------- checkpoints

TOKENIZER = {"name": "npo-bpe", "ranks": {b"a": 0, b"b": 1, b"\xc3\xa9": 2}, "eos_id": 96}
TRAIN_CONFIG = {"lr": 1e-3, "method": "npo", "beta": 0.1, "splits": ["forget10"]}


def test_checkpoint_round_trip(tmp_path):
    model = sharp_model(dtype=torch.float32)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model, TOKENIZER, TRAIN_CONFIG, step=123, extra={"loss": 0.5})
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left over
    raw = torch.load(path, weights_only=True)  # plain types only: safe loading works
    assert raw["format"] == "npo-gpt-v1"

    loaded, ckpt = load_checkpoint(path, expected_config=TINY)
    assert loaded.config == TINY
    assert ckpt["tokenizer"] == TOKENIZER and ckpt["train_config"] == TRAIN_CONFIG
    assert ckpt["step"] == 123 and ckpt["extra"] == {"loss": 0.5}
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    idx = torch.randint(0, TINY.vocab_size, (2, 9))
    assert torch.equal(loaded(idx), model(idx))


def test_checkpoint_missing_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(text)
    bare = tmp_path / "bare.pt"
    torch.save(GPT(TINY).state_dict(), bare)
    with pytest.raises(CheckpointError, match="no 'format' field"):
        load_checkpoint(bare)
    other = tmp_path / "other.pt"
    torch.save({"format": "something-else", "model": {}}, other)
    with pytest.raises(CheckpointError, match="format 'something-else', expected 'npo-gpt-v1'"):
        load_checkpoint(other)


def test_checkpoint_mismatched_expected_config_lists_fields(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, GPT(TINY), TOKENIZER, TRAIN_CONFIG, step=0)
    wanted = GPTConfig(vocab_size=97, block_size=64, n_layer=3, n_head=2, n_embd=64, dropout=0.1)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, expected_config=wanted)
    msg = str(e.value)
    assert "n_layer: checkpoint 2, expected 3" in msg
    assert "n_embd: checkpoint 32, expected 64" in msg
    assert "dropout" not in msg  # a training setting, not part of the fit


def test_checkpoint_weights_not_matching_config(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, GPT(TINY), TOKENIZER, TRAIN_CONFIG, step=0)
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"]["transformer.wpe.weight"] = torch.zeros(32, 32)  # block_size 32, config says 64
    del ckpt["model"]["transformer.ln_f.bias"]
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "transformer.wpe.weight: checkpoint shape (32, 32), config expects (64, 32)" in msg
    assert "missing transformer.ln_f.bias" in msg


def test_save_refuses_non_plain_values(tmp_path):
    path = tmp_path / "ckpt.pt"
    with pytest.raises(CheckpointError, match=r"train_config\['out_dir'\] has type PosixPath"):
        save_checkpoint(path, GPT(TINY), TOKENIZER, {"out_dir": tmp_path}, step=0)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- CUDA

@requires_cuda
def test_cuda_forward_and_bf16_autocast():
    model = sharp_model(dtype=torch.float32)
    idx = torch.randint(0, TINY.vocab_size, (2, 16))
    ref = model(idx)
    model.to("cuda")
    torch.testing.assert_close(model(idx.cuda()).cpu(), ref, rtol=1e-4, atol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(idx.cuda())
        out = model.generate(random_prompts(n=5), 8, eos_id=None)
    assert (logits.float().cpu() - ref).abs().max() / ref.abs().max() < 0.05
    assert [len(row) for row in out] == [8] * 5


@requires_cuda
def test_cuda_cached_generation_equals_naive_decoding():
    model = sharp_model()
    prompts = random_prompts()
    expected = [naive_greedy(model, p, 20)[0] for p in prompts]  # on the CPU
    assert model.to("cuda").generate(prompts, 20, eos_id=None) == expected


@requires_cuda
def test_cuda_checkpoint_load(tmp_path):
    model = sharp_model(dtype=torch.float32)
    save_checkpoint(tmp_path / "c.pt", model.cuda(), TOKENIZER, TRAIN_CONFIG, step=1)
    loaded, _ = load_checkpoint(tmp_path / "c.pt", map_location="cuda")
    assert loaded.lm_head.weight.is_cuda and loaded.lm_head.weight is loaded.transformer.wte.weight
    idx = torch.randint(0, TINY.vocab_size, (2, 9), device="cuda")
    assert torch.equal(loaded(idx), model(idx))
