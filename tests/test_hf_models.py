"""Hugging Face checkpoints against transformers as the oracle (test-only): tiny random models of
each family, saved by transformers (sharded too), read by model.py's own code; logits, left-padded
greedy generation, export back, half-precision files, and the errors on bad directories."""
import copy
import json
import math
import shutil

import pytest
import torch

from model import GPT, GPTConfig, ModelError, from_pretrained, hf_tensor_map, save_pretrained

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

V = 101
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}  # head size 16: all three frequency bands occur
FAMILIES = {
    "llama2": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False)),
    "llama3": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE,
        tie_word_embeddings=True)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=V, hidden_size=32, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)),
    "qwen2_tied": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=V, hidden_size=32, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True)),
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)),
    "phi": lambda: transformers.PhiForCausalLM(transformers.PhiConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, partial_rotary_factor=0.5)),
}


def sharpen(model, seed):
    """Large random weights (see test_model.sharp_model): greedy decoding then depends on content
    and position, so a wrong rotation, mask or name mapping changes the tokens."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() == 2:
                p.copy_(noise * (0.5 if "emb" in name or "wte" in name or "wpe" in name else 2 / math.sqrt(min(p.shape))))
            else:
                p.copy_(0.1 * noise if name.endswith("bias") else 1 + 0.1 * noise)
    return model.eval()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """family -> (directory written by transformers' save_pretrained, the transformers model)."""
    torch.manual_seed(0)
    out = {}
    for i, (name, build) in enumerate(FAMILIES.items()):
        model = sharpen(build(), seed=i)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path, max_shard_size="20KB" if name == "qwen2" else "5GB")
        out[name] = path, model
    return out


def random_ids(shape, seed=0):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


def hf_greedy(model, prompts, max_new_tokens, eos_ids, pad_id=0):
    """transformers' greedy generate on a LEFT-padded batch with its attention mask; each row cut
    at its first end token (finished rows are padded after it)."""
    T = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=sorted(eos_ids), pad_token_id=pad_id)
    rows = out[:, T:].tolist()
    return [row[:min((i for i, t in enumerate(row) if t in eos_ids), default=len(row))] for row in rows]


def test_sharded_directory_has_shards(hf_dirs):
    assert len(list(hf_dirs["qwen2"][0].glob("model-*-of-*.safetensors"))) > 3


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_equal_transformers_and_export_round_trips(hf_dirs, name, tmp_path):
    path, hf = hf_dirs[name]
    ours = from_pretrained(path).eval()
    idx = random_ids((3, 40))
    with torch.no_grad():
        expected = hf(idx).logits
        logits = ours(idx)
        scale = expected.abs().max()
        assert scale > 5  # not a near-zero model where any mapping would pass
        # fp32 rounding grows with the weights' scale: 1e-5 relative to the largest logit
        # (transformers' own fp32 logits differ from its fp64 ones by about that much here)
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5 * scale)
        save_pretrained(ours, tmp_path)
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
        assert type(back) is type(hf)
        torch.testing.assert_close(back(idx).logits, logits, rtol=0, atol=1e-5 * scale)
    assert from_pretrained(tmp_path).config == ours.config  # our writer and reader agree too


def test_llama3_rope_scaling_matters(hf_dirs):
    """The scaled frequencies are exercised: without the scaling the logits differ."""
    path, hf = hf_dirs["llama3"]
    ours = from_pretrained(path).eval()
    ours.config.rope_scaling = None
    with torch.no_grad():
        idx = random_ids((2, 60))
        assert (ours(idx) - hf(idx).logits).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["llama2", "llama3", "qwen2", "gpt2", "phi"])
def test_greedy_generation_equals_transformers_on_left_padded_batch(hf_dirs, name):
    path, hf = hf_dirs[name]
    ours = from_pretrained(path)
    g = torch.Generator().manual_seed(1)
    prompts = [random_ids((int(n),), seed=s).tolist()
               for s, n in enumerate(torch.randint(1, 14, (6,), generator=g))]
    full = ours.generate(prompts, 14, eos_ids=())
    assert len({t for row in full for t in row}) > 15  # not degenerate
    eos = {full[0][3], full[2][5]}  # tokens the model emits mid-sequence: rows stop at different steps
    expected = hf_greedy(hf, prompts, 14, eos)
    assert len({len(row) for row in expected}) > 1
    assert ours.generate(prompts, 14, eos_ids=eos) == expected
    assert ours.generate(prompts, 14, eos_ids=eos, batch_size=4) == expected


def test_from_scratch_gpt_exports_as_gpt2(tmp_path):
    torch.manual_seed(0)
    model = sharpen(GPT(GPTConfig(vocab_size=V, block_size=64, n_layer=2, n_head=2, n_embd=32)), seed=7)
    save_pretrained(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]  # no temp files
    assert json.loads((tmp_path / "config.json").read_text())["activation_function"] == "gelu"  # exact GELU
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf) is transformers.GPT2LMHeadModel
    idx = random_ids((2, 30))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), rtol=1e-5, atol=1e-5)
    with pytest.raises(ModelError, match="cannot be written as a Hugging Face gpt2 model"):
        save_pretrained(GPT(GPTConfig(vocab_size=V, block_size=64, n_layer=1, n_head=2, n_embd=32, bias=False)),
                        tmp_path / "no-bias")


@pytest.mark.parametrize("dtype, tag", [(torch.bfloat16, "BF16"), (torch.float16, "F16")])
def test_half_precision_files_load_bit_exactly(hf_dirs, tmp_path, dtype, tag):
    half = copy.deepcopy(hf_dirs["llama3"][1]).to(dtype)
    half.save_pretrained(tmp_path)
    with open(tmp_path / "model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {tag}
    expected = half.state_dict()
    ours = from_pretrained(tmp_path, dtype=dtype)
    for name, (tensor, _) in hf_tensor_map(ours).items():
        assert tensor.dtype == dtype and torch.equal(tensor, expected[name]), name
    upcast = from_pretrained(tmp_path)  # float32 by default, exactly the half values
    for name, (tensor, _) in hf_tensor_map(upcast).items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, expected[name].float()), name
    save_pretrained(ours, tmp_path / "export")  # and our writer keeps the dtype, bit for bit
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=dtype).state_dict()
    assert all(torch.equal(back[name], tensor) for name, tensor in expected.items())


def test_real_world_file_quirks_load(hf_dirs, tmp_path):
    """OpenAI's GPT-2 file names the trunk's tensors without "transformer." and carries the causal
    mask buffers; Llama-2-era files carry rotary_emb.inv_freq. Both load, the buffers ignored."""
    path, hf = hf_dirs["gpt2"]
    tensors = safetensors_torch.load_file(path / "model.safetensors")
    tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    tensors["h.0.attn.bias"] = torch.ones(1, 1, 64, 64)
    shutil.copy(path / "config.json", tmp_path / "config.json")
    safetensors_torch.save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    idx = random_ids((2, 20))
    with torch.no_grad():
        torch.testing.assert_close(from_pretrained(tmp_path).eval()(idx), hf(idx).logits, rtol=1e-5, atol=1e-5)
    path, _ = hf_dirs["llama2"]
    tensors = safetensors_torch.load_file(path / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    shutil.copy(path / "config.json", tmp_path / "config.json")
    safetensors_torch.save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    from_pretrained(tmp_path)


def test_bad_directories_raise_model_error_naming_the_problem(hf_dirs, tmp_path):
    src = hf_dirs["llama2"][0]

    def variant(name, config=None, tensors=None, raw=None):
        d = tmp_path / name
        shutil.copytree(src, d)
        if config is not None:
            (d / "config.json").write_text(json.dumps(config(json.loads((d / "config.json").read_text()))))
        if tensors is not None:
            safetensors_torch.save_file(tensors(safetensors_torch.load_file(d / "model.safetensors")),
                                        d / "model.safetensors", metadata={"format": "pt"})
        if raw is not None:
            (d / "model.safetensors").write_bytes(raw((d / "model.safetensors").read_bytes()))
        return d

    cases = [
        (variant("mistral", config=lambda c: {**c, "model_type": "mistral"}),
         "config.json: model_type 'mistral' is not supported; expected llama, qwen2, gpt2 or phi"),
        (variant("no_width", config=lambda c: {k: v for k, v in c.items() if k != "hidden_size"}),
         r"config.json: field\(s\) hidden_size missing"),
        (variant("yarn", config=lambda c: {**c, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}),
         "rope_scaling .*'yarn'"),
        (variant("wider", config=lambda c: {**c, "intermediate_size": 57}),
         r"model.safetensors: tensor model.layers.0.mlp.down_proj.weight has shape \[32, 56\]; "
         r"config.json implies \[32, 57\]"),
        (variant("missing", tensors=lambda t: {k: v for k, v in t.items() if k != "model.norm.weight"}),
         "1 tensor.s. missing from the weight files, e.g. model.norm.weight"),
        (variant("extra", tensors=lambda t: {**t, "model.layers.0.mlp.extra.weight": torch.zeros(2)}),
         "unexpected tensor model.layers.0.mlp.extra.weight"),
        (variant("truncated", raw=lambda b: b[:-100]),
         "model.safetensors: tensor .* needs bytes .* the file is truncated or corrupt"),
        (variant("garbage", raw=lambda b: b"\xff" * 64),
         "model.safetensors: not a safetensors file, or truncated"),
    ]
    for d, message in cases:
        with pytest.raises(ModelError, match=message):
            from_pretrained(d)
    (tmp_path / "missing" / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="no model.safetensors or model.safetensors.index.json"):
        from_pretrained(tmp_path / "missing")
    sharded = tmp_path / "sharded"
    shutil.copytree(hf_dirs["qwen2"][0], sharded)
    next(sharded.glob("model-00002-*")).unlink()
    with pytest.raises(ModelError, match="index.json: lists model-00002-of-.*, which does not exist"):
        from_pretrained(sharded)
