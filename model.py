"""A compact GPT in the style of nanoGPT that also reads and writes the Hugging Face checkpoints of
the model families unlearning research uses: Llama 2 and 3.x, Qwen2/2.5, GPT-2 and Phi-1.5.

One model class covers them all through config fields (norm, positions, MLP, attention heads,
biases, block layout); the defaults are the project's from-scratch GPT.

    GPTConfig, GPT            the model: forward() -> logits or final hidden states; generate()
    answer_logprob, answer_kl per-sequence answer log-probs and KL(ref || theta), through npo
    from_pretrained           a Hugging Face model directory (config.json + safetensors) -> GPT
    save_pretrained           GPT -> a directory that transformers' AutoModelForCausalLM loads
    load_checkpoint           the from-scratch GPT's earlier single-file format (npo-gpt-v1)
    memory_estimate           bytes for weights, gradients, optimizer state, activations
"""

import json
import math
import mmap
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import npo
from data import write_atomic


class ModelError(ValueError):
    """A model directory, checkpoint or config that cannot be read or does not fit the model."""


@dataclass
class GPTConfig:
    vocab_size: int = 4096
    block_size: int = 256  # longest sequence (the position table; max_position_embeddings)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and LayerNorms
    n_kv_head: int | None = None  # key/value heads, grouped-query attention (None: n_head)
    intermediate_size: int | None = None  # MLP width (None: 4 * n_embd)
    norm: str = "layernorm"  # or "rmsnorm"
    norm_eps: float = 1e-5
    activation: str = "gelu"  # exact GELU; "gelu_tanh" (GPT-2, Phi); "silu"
    gated_mlp: bool = False  # SwiGLU, c_proj(act(gate) * up) (Llama, Qwen2)
    pos: str = "learned"  # learned position embeddings, or "rope"
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama-3's {"rope_type": "llama3", "factor": ...}
    rotary_fraction: float = 1.0  # share of each head's features that RoPE rotates (Phi: 0.5)
    qkv_bias: bool | None = None  # biases of q, k, v alone (None: = bias; Qwen2: True)
    lm_head_bias: bool = False  # Phi
    parallel_block: bool = False  # Phi: x + attn(ln(x)) + mlp(ln(x)), one LayerNorm per block
    tie_embeddings: bool = True  # lm_head.weight is the token embedding matrix
    family: str = "gpt"  # how names and config.json map to Hugging Face: gpt|gpt2|llama|qwen2|phi

    def __post_init__(self):
        self.n_kv_head = self.n_kv_head or self.n_head
        self.intermediate_size = self.intermediate_size or 4 * self.n_embd
        self.qkv_bias = self.bias if self.qkv_bias is None else self.qkv_bias
        choices = {"norm": ("layernorm", "rmsnorm"), "activation": ("gelu", "gelu_tanh", "silu"),
                   "pos": ("learned", "rope"), "family": ("gpt", "gpt2", "llama", "qwen2", "phi")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ModelError(f"{name} = {getattr(self, name)!r}; expected one of {allowed}")
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise ModelError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}), "
                             f"and n_head by n_kv_head ({self.n_kv_head})")
        if self.rope_scaling is not None:
            keys = {"rope_type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
            if self.rope_scaling.get("rope_type") != "llama3" or not keys <= set(self.rope_scaling):
                raise ModelError(f"rope_scaling {self.rope_scaling} is not supported; expected "
                                 f"rope_type 'llama3' with {sorted(keys - {'rope_type'})}")


def rope_inv_freq(config: GPTConfig, device=None) -> torch.Tensor:
    """Rotation frequency of each rotated feature pair (rot / 2,), fp32, as Hugging Face's
    default RoPE, with Llama-3's rescaling: long wavelengths slowed down by `factor`, short ones
    kept, a smooth blend between (rope_type "llama3")."""
    rot = int(config.n_embd // config.n_head * config.rotary_fraction)
    exponents = torch.arange(0, rot, 2, dtype=torch.int64, device=device).float() / rot
    inv_freq = 1.0 / config.rope_theta ** exponents  # (rot / 2,)
    if config.rope_scaling:
        s = config.rope_scaling
        old_len, factor = s["original_max_position_embeddings"], s["factor"]
        low, high = s["low_freq_factor"], s["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)  # 0 at the long end, 1 at the short end
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_len / low, inv_freq / factor,
                               torch.where(wavelen < old_len / high, inv_freq, blended))
    return inv_freq


def apply_rope(x, cos, sin):
    """x (B, nh, T, hs); cos, sin (T, rot) or (B, T, rot). Rotates the first `rot` features of
    each head, pairing feature i with i + rot/2 ("rotate half", Hugging Face's convention for
    Llama, Qwen2 and Phi); Phi's remaining features pass through."""
    rot = cos.size(-1)
    cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)  # broadcast over heads
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    x_rot = x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return x_rot if rot == x.size(-1) else torch.cat((x_rot, x_pass), dim=-1)  # (B, nh, T, hs)


class KVCache:
    """Keys and values of one attention layer, preallocated for the whole decode."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.k = self.v = None  # (B, n_kv, max_len, hs) each, allocated on first use

    def update(self, k, v, start: int):
        # k, v: (B, n_kv, T, hs) for cache columns [start, start + T)
        if self.k is None:  # allocated lazily so the cache takes k's dtype (bf16 under autocast) and device
            shape = (*k.shape[:2], self.max_len, k.shape[3])  # (B, n_kv, max_len, hs)
            self.k, self.v = k.new_empty(shape), v.new_empty(shape)
        end = start + k.size(2)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]  # (B, n_kv, end, hs)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_size = config.n_embd // config.n_head
        self.dropout = config.dropout
        # q, k, v projections in one matrix; with grouped-query attention k and v have fewer heads
        self.qkv_sizes = [config.n_embd, self.n_kv_head * self.head_size, self.n_kv_head * self.head_size]
        self.c_attn = nn.Linear(config.n_embd, sum(self.qkv_sizes), bias=config.qkv_bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope=None, attn_mask=None, cache: KVCache | None = None, cache_start=0):
        """rope: (cos, sin) or None. attn_mask: None for plain causal attention, else a boolean
        mask broadcastable to (B, nh, T, T_keys), True = may attend (used with the KV cache)."""
        B, T, C = x.size()
        qkv = self.c_attn(x).split(self.qkv_sizes, dim=2)  # q (B, T, C), k and v (B, T, n_kv * hs)
        q, k, v = (t.view(B, T, -1, self.head_size).transpose(1, 2) for t in qkv)  # (B, nh or n_kv, T, hs)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v, cache_start)  # (B, n_kv, cache_start + T, hs)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=attn_mask is None, enable_gqa=self.n_kv_head != self.n_head)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        width = config.intermediate_size
        self.gated = config.gated_mlp
        # gated: the gate and up projections in one matrix, gate first
        self.c_fc = nn.Linear(config.n_embd, 2 * width if self.gated else width, bias=config.bias)
        self.act = {"gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"),
                    "silu": nn.SiLU()}[config.activation]
        self.c_proj = nn.Linear(width, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)  # (B, T, I), or (B, T, 2I) when gated
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up  # (B, T, I)
        else:
            h = self.act(h)
        return self.dropout(self.c_proj(h))  # (B, T, C)


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


class Block(nn.Module):
    """Pre-norm transformer block; Phi-1.5's parallel variant feeds one norm to both halves."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = None if config.parallel_block else make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, attn_mask=None, cache=None, cache_start=0):
        if self.ln_2 is None:
            h = self.ln_1(x)  # (B, T, C)
            return x + self.attn(h, rope, attn_mask, cache, cache_start) + self.mlp(h)
        x = x + self.attn(self.ln_1(x), rope, attn_mask, cache, cache_start)  # (B, T, C)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False  # recompute each block in backward: less memory
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.pos == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.transformer = nn.ModuleDict(dict(
            **modules, drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=config.lm_head_bias)
        self.tie_weights()

        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer), since each block adds two
        # of them to the residual stream.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def tie_weights(self):
        if self.config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # one (V, C) matrix

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        """Number of parameters, a tied embedding / lm_head matrix counted once."""
        return sum(p.numel() for p in self.parameters())

    def _hidden(self, idx, pos, attn_mask=None, caches=None, cache_start=0):
        """Transformer trunk. idx (B, T), pos (T,) or (B, T) -> hidden after ln_f (B, T, C)."""
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if self.config.pos == "learned":
            x = x + self.transformer.wpe(pos)
        else:  # cos and sin computed in fp32, as Hugging Face does, once for all layers
            freqs = pos[..., None].float() * rope_inv_freq(self.config, idx.device)  # (.., T, rot/2)
            angles = torch.cat((freqs, freqs), dim=-1)  # (.., T, rot)
            rope = (angles.cos().to(x.dtype), angles.sin().to(x.dtype))
        x = self.transformer.drop(x)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.transformer.h):
            if recompute and caches is None:
                x = checkpoint(block, x, rope, attn_mask, use_reentrant=False)
            else:
                x = block(x, rope, attn_mask, None if caches is None else caches[i], cache_start)
        return self.transformer.ln_f(x)  # (B, T, C)

    def forward(self, idx, return_hidden: bool = False):
        """idx (B, T) token ids -> logits (B, T, V), or with return_hidden=True the final
        hidden states after ln_f (B, T, C), so that a fused log-prob computation can multiply
        by lm_head.weight in chunks without ever building the (B, T, V) logits. Right-padded
        batches need no attention mask: no real token attends to the padding after it."""
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)  # (T,)
        h = self._hidden(idx, pos)  # (B, T, C)
        return h if return_hidden else self.lm_head(h)  # (B, T, C) or (B, T, V)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, eos_ids,
                 batch_size: int = 128, all_done=bool) -> list[list[int]]:
        """Greedy decoding with a KV cache, `batch_size` prompts at a time.

        Returns the new tokens of each prompt, in the order given, without the end token: a row
        stops at its first token in eos_ids (any collection of ids; empty: never stops early) or
        after max_new_tokens. Every prompt must fit with its continuation: len(prompt) +
        max_new_tokens <= block_size, else ValueError (no silent truncation). Runs in eval mode
        (no dropout) and restores the training mode. all_done(this batch is done) -> whether to
        stop: processes of a sharded model (FSDP) step together until every one is done.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        V, block_size = self.config.vocab_size, self.config.block_size
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty; generation needs at least one token")
            if len(p) + max_new_tokens > block_size:
                raise ValueError(f"prompt {i} has {len(p)} tokens; with max_new_tokens="
                                 f"{max_new_tokens} that exceeds block_size {block_size}")
            if min(p) < 0 or max(p) >= V:
                raise ValueError(f"prompt {i} has a token id outside [0, {V})")
        if max_new_tokens == 0:
            return [[] for _ in prompts]
        eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=self.lm_head.weight.device)
        out = []
        was_training = self.training
        self.eval()
        try:  # batches in the order given (eval.py sorts its prompts by length, to pad little)
            for s in range(0, len(prompts), batch_size):
                out += self._generate_batch(prompts[s:s + batch_size], max_new_tokens, eos, all_done)
        finally:
            self.train(was_training)
        return out

    def _generate_batch(self, prompts, max_new_tokens, eos, all_done):
        """One batch of greedy decoding. Prompts are LEFT-padded so that every row's last prompt
        token sits in the same column and every new token is written to the same cache column;
        padding keys are masked out and positions count from each row's first real token, so a
        row's result does not depend on the other rows."""
        device = self.lm_head.weight.device
        B = len(prompts)
        lengths = torch.tensor([len(p) for p in prompts], device=device)  # (B,)
        T = int(lengths.max())
        total = T + max_new_tokens  # cache columns
        # pad id 0: any valid id, never attended to
        idx = torch.tensor([[0] * (T - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)  # (B, T)
        # keys[b, j]: cache column j holds a real token of row b (prompt or generated)
        keys = torch.ones(B, total, dtype=torch.bool, device=device)  # (B, total)
        keys[:, :T] = torch.arange(T, device=device)[None, :] >= (T - lengths)[:, None]
        pos = (keys[:, :T].long().cumsum(dim=1) - 1).clamp(min=0)  # (B, T), 0 at first real token

        # Prefill mask: causal and real keys only. A padding query also sees itself, so that its
        # softmax row is never empty (an all-masked row gives NaN, and NaN values would leak
        # through the zero attention weights of later layers).
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()  # (T, T)
        eye = torch.eye(T, dtype=torch.bool, device=device)  # (T, T)
        prefill_mask = causal & (keys[:, None, :T] | eye)  # (B, T, T)

        caches = [KVCache(total) for _ in self.transformer.h]
        h = self._hidden(idx, pos, prefill_mask[:, None], caches, 0)  # (B, T, C)
        next_tok = self.lm_head(h[:, -1]).argmax(dim=-1)  # (B,)

        new = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)  # (B, N)
        finished = torch.zeros(B, dtype=torch.bool, device=device)  # (B,)
        for step in range(max_new_tokens):  # breaks at the last step at the latest
            new[:, step] = next_tok
            finished |= torch.isin(next_tok, eos)
            if all_done(bool(finished.all())) or step == max_new_tokens - 1:
                break
            col = T + step  # cache column of next_tok; every row has all keys up to it
            h = self._hidden(next_tok[:, None], (lengths + step)[:, None],  # (B, 1) ids, positions
                             keys[:, None, None, :col + 1], caches, col)  # -> (B, 1, C)
            next_tok = self.lm_head(h[:, -1]).argmax(dim=-1)  # (B,)

        new = new[:, :step + 1]  # each row cut before its first end token
        return [row[:is_eos.index(True)] if True in is_eos else row
                for row, is_eos in zip(new.tolist(), torch.isin(new, eos).tolist())]


# ----------------------------------------------------------------------------- log-probs, KL

def answer_logprob(model: GPT, idx, labels, fused: bool):
    """Per-sequence log-prob of the label tokens: (logp (B,) fp32, n_tokens (B,)).
    idx, labels (B, T) as npo expects. fused: npo.fused_sequence_logprob on the final hidden
    states (only label positions reach lm_head, no (B, T, V) logits); else the plain path."""
    if fused:
        hidden = model(idx, return_hidden=True)  # (B, T, C)
        return npo.fused_sequence_logprob(hidden, model.lm_head.weight, labels, bias=model.lm_head.bias)
    return npo.sequence_logprob(model(idx), labels)


def answer_kl(model: GPT, ref_model: GPT, idx, labels, all_positions: bool = False):
    """Per-sequence sum of KL(pi_ref || pi_theta) over the positions that predict a label token,
    and their count: (kl_sum (B,) fp32, count (B,)). all_positions: every position of the padded
    batch instead, question and padding included, as the NPO authors' code does. The reference
    runs without gradient; only the summed positions reach either lm_head."""
    mask = npo.shift_labels(labels) != npo.IGNORE_INDEX  # (B, T)
    if all_positions:
        mask = torch.ones_like(mask)
    with torch.no_grad():
        ref_logits = ref_model.lm_head(ref_model(idx, return_hidden=True)[mask])  # (N, V)
    logits = model.lm_head(model(idx, return_hidden=True)[mask])  # (N, V)
    kl = npo.kl_divergence(logits, ref_logits)  # (N,)
    return kl.new_zeros(mask.shape).masked_scatter(mask, kl).sum(dim=1), mask.sum(dim=1)


# ----------------------------------------------------------------------------- Hugging Face

def _hf_schema(family: str):
    """How a family's config.json maps to GPTConfig: (GPTConfig field -> config.json key, values
    of keys a file may leave out (transformers' class defaults), the only value this model
    supports for some keys, GPTConfig fields that every model of the family has)."""
    if family in ("gpt", "gpt2"):
        return (dict(vocab_size="vocab_size", block_size="n_positions", n_layer="n_layer", n_head="n_head",
                     n_embd="n_embd", intermediate_size="n_inner", norm_eps="layer_norm_epsilon",
                     activation="activation_function", dropout="resid_pdrop", tie_embeddings="tie_word_embeddings"),
                dict(layer_norm_epsilon=1e-5, activation_function="gelu_new", resid_pdrop=0.1, tie_word_embeddings=True),
                dict(scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                     reorder_and_upcast_attn=False, add_cross_attention=False),
                dict(family="gpt2"))
    keys = dict(vocab_size="vocab_size", block_size="max_position_embeddings", n_layer="num_hidden_layers",
                n_head="num_attention_heads", n_embd="hidden_size", n_kv_head="num_key_value_heads",
                intermediate_size="intermediate_size", activation="hidden_act", rope_theta="rope_theta",
                tie_embeddings="tie_word_embeddings")
    defaults = dict(rope_theta=10000.0, tie_word_embeddings=False)
    if family == "phi":
        return (keys | dict(norm_eps="layer_norm_eps", rotary_fraction="partial_rotary_factor", dropout="resid_pdrop"),
                defaults | dict(layer_norm_eps=1e-5, hidden_act="gelu_new", partial_rotary_factor=0.5, resid_pdrop=0.0),
                dict(qk_layernorm=False),
                dict(pos="rope", lm_head_bias=True, parallel_block=True, family=family))
    return (keys | dict(norm_eps="rms_norm_eps", rope_scaling="rope_scaling", dropout="attention_dropout"),
            defaults | dict(rms_norm_eps=1e-6, hidden_act="silu", attention_dropout=0.0),
            dict(attention_bias=False, mlp_bias=False) if family == "llama" else dict(use_sliding_window=False),
            dict(norm="rmsnorm", gated_mlp=True, pos="rope", bias=False, qkv_bias=family == "qwen2", family=family))


def config_from_hf(hf: dict, source="config.json") -> GPTConfig:
    """A Hugging Face config.json (model_type llama, qwen2, gpt2 or phi) -> GPTConfig. Reads both
    the flat rope fields of older files and transformers 5's nested "rope_parameters"."""
    kind = hf.get("model_type") if isinstance(hf, dict) else None
    if kind not in ("llama", "qwen2", "gpt2", "phi"):
        raise ModelError(f"{source}: model_type {kind!r} is not supported; expected llama, qwen2, gpt2 or phi")
    keys, defaults, supported, fixed = _hf_schema(kind)
    rope = hf.get("rope_parameters") or {}
    hf = defaults | {k: v for k, v in rope.items() if k in ("rope_theta", "partial_rotary_factor")} \
        | {k: v for k, v in hf.items() if v is not None}
    scaling = hf.get("rope_scaling") or rope
    scaling_type = scaling.get("rope_type", scaling.get("type", "default"))
    hf["rope_scaling"] = None if scaling_type == "default" else {
        k: v for k, v in scaling.items() if k not in ("type", "rope_theta", "partial_rotary_factor")} | {"rope_type": scaling_type}
    for key, value in supported.items():
        if hf.get(key, value) != value:
            raise ModelError(f"{source}: {key} = {hf[key]!r} is not supported (expected {value!r})")
    missing = [k for k in keys.values() if k not in hf and k not in ("n_inner", "num_key_value_heads")]
    if missing:
        raise ModelError(f"{source}: field(s) {', '.join(missing)} missing (model_type {kind!r})")
    values = {field: hf[key] for field, key in keys.items() if key in hf}
    activations = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "silu": "silu"}
    if values["activation"] not in activations:
        raise ModelError(f"{source}: {keys['activation']} {values['activation']!r} is not supported; "
                         f"expected one of {list(activations)}")
    values["activation"] = activations[values["activation"]]
    if hf.get("head_dim", values["n_embd"] // values["n_head"]) != values["n_embd"] // values["n_head"]:
        raise ModelError(f"{source}: head_dim {hf['head_dim']} is not hidden_size / num_attention_heads")
    return GPTConfig(**values, **fixed)


def config_to_hf(config: GPTConfig) -> dict:
    """GPTConfig -> the config.json of its family's Hugging Face class (the from-scratch GPT: GPT-2
    with exact GELU). ModelError if the family cannot express the config."""
    keys, _, supported, _ = _hf_schema(config.family)
    model_type = "gpt2" if config.family == "gpt" else config.family
    architecture = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                    "phi": "PhiForCausalLM"}[model_type]
    hf = {"architectures": [architecture], "model_type": model_type, **supported,
          **{key: getattr(config, field) for field, key in keys.items()}}
    hf[keys["activation"]] = {"gelu": "gelu", "gelu_tanh": "gelu_new", "silu": "silu"}[config.activation]
    if model_type == "gpt2":
        hf["embd_pdrop"] = hf["attn_pdrop"] = config.dropout
    if replace(config_from_hf(hf), family=config.family) != config:
        raise ModelError(f"{config} cannot be written as a Hugging Face {model_type} model")
    return hf


def load_config(model_dir) -> GPTConfig:
    """The GPTConfig of a Hugging Face model directory's config.json."""
    path = Path(model_dir) / "config.json"
    try:
        hf = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ModelError(f"{path}: cannot read a JSON model config ({e})") from None
    return config_from_hf(hf, str(path))


def hf_tensor_map(model: GPT) -> dict:
    """Hugging Face tensor name -> (the part of our parameter it holds, stored transposed?).

    Our module names are nanoGPT's. Llama, Qwen2 and Phi keep q, k, v (and Llama's gate and up)
    as separate matrices: each fills a block of rows of our fused c_attn (c_fc). GPT-2's Conv1D
    layers store their weights as (in, out), the transpose of nn.Linear's."""
    c = model.config
    if c.family in ("gpt", "gpt2"):
        names = {"layer": "transformer.h", "wte": "transformer.wte", "wpe": "transformer.wpe",
                 "ln_f": "transformer.ln_f"}
    else:
        names = {"layer": "model.layers", "wte": "model.embed_tokens", "ln_f": "model.norm",
                 "ln_1": "input_layernorm", "ln_2": "post_attention_layernorm",
                 "attn.c_attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                 "attn.c_proj": "self_attn.o_proj", "mlp.c_fc": ("mlp.gate_proj", "mlp.up_proj"),
                 "mlp.c_proj": "mlp.down_proj"}
        if c.family == "phi":
            names.update({"ln_f": "model.final_layernorm", "attn.c_proj": "self_attn.dense",
                          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"})
    row_blocks = {"attn.c_attn": model.transformer.h[0].attn.qkv_sizes,
                  "mlp.c_fc": [c.intermediate_size] * 2}
    out = {}
    for name, p in model.named_parameters():  # a tied lm_head.weight is listed once, as wte's
        module, _, kind = name.rpartition(".")  # e.g. "transformer.h.3.attn.c_attn", "weight"
        parts = module.split(".")
        if parts[:2] == ["transformer", "h"]:
            local, prefix = ".".join(parts[3:]), f"{names['layer']}.{parts[2]}."
        else:
            local, prefix = parts[-1], ""
        hf_names = names.get(local, local)
        hf_names, blocks = ((hf_names,), [p.shape[0]]) if isinstance(hf_names, str) else (hf_names, row_blocks[local])
        transposed = c.family in ("gpt", "gpt2") and kind == "weight" and prefix != "" and p.dim() == 2
        for hf_name, view in zip(hf_names, p.detach().split(blocks)):
            out[f"{prefix}{hf_name}.{kind}"] = (view, transposed)
    return out


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """Yield (name, tensor) for every tensor of a .safetensors file: an 8-byte little-endian
    header length, a JSON header {name: {dtype, shape, data_offsets}}, then the raw
    little-endian data. The tensors are views of the memory-mapped file, read from disk only when
    copied, so loading never holds a second copy of the weights in memory."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
        if not 0 < n <= size - 8:
            raise ModelError(f"{path}: not a safetensors file, or truncated: header length {n}, file size {size}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelError(f"{path}: the safetensors header is not valid JSON ({e})") from None
        # ACCESS_COPY: a private, writable mapping (torch.frombuffer wants one); pages are shared
        # with the page cache until written, which never happens here.
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    start = 8 + n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            shape, (begin, end) = [int(d) for d in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ModelError(f"{path}: tensor {name}: header entry {info!r} is not "
                             f"{{dtype: one of {list(_SAFETENSORS_DTYPES)}, shape, data_offsets}}") from None
        count = math.prod(shape)
        if end - begin != count * dtype.itemsize or not 0 <= begin <= end <= size - start:
            raise ModelError(f"{path}: tensor {name} ({info['dtype']} {shape}) needs bytes [{begin}, {end}) "
                             f"of a {size - start}-byte data section: the file is truncated or corrupt")
        yield name, torch.frombuffer(buf, dtype=dtype, count=count, offset=start + begin).view(shape)


def write_safetensors(path, tensors: dict) -> None:
    """The inverse of read_safetensors, tensor by tensor (no second copy of the whole model)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    names = {v: k for k, v in _SAFETENSORS_DTYPES.items()}
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned, as in the reference writer
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for t in tensors.values():
            f.write(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())


def from_pretrained(model_dir, dtype=None, device="cpu") -> GPT:
    """Load a Hugging Face model directory: config.json and model.safetensors, or shards listed
    in model.safetensors.index.json. dtype: the parameters' dtype (None: float32, whatever the
    files hold). The model is built without initialising and every parameter is copied in from the
    memory-mapped files once. A missing, unexpected or misshapen tensor raises ModelError. Like any
    new nn.Module the model is in training mode (GPT-2 configs carry dropout 0.1)."""
    model_dir = Path(model_dir)
    config = load_config(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if (model_dir / "model.safetensors").is_file():
        files = [model_dir / "model.safetensors"]
    elif index.is_file():
        try:
            files = [model_dir / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise ModelError(f"{index}: cannot read its weight_map ({e!r})") from None
    else:
        raise ModelError(f"{model_dir}: no model.safetensors or model.safetensors.index.json "
                         "(only the safetensors format is read)")

    with torch.device("meta"):  # shapes only: the weights come from the files
        model = GPT(config)
    model = model.to(dtype or torch.float32).to_empty(device=device)
    model.tie_weights()  # to_empty gives each module its own tensors
    targets, filled = hf_tensor_map(model), set()
    derived = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")  # buffers some files carry
    with torch.no_grad():
        for path in files:
            if not path.is_file():
                raise ModelError(f"{index}: lists {path.name}, which does not exist")
            for name, tensor in read_safetensors(path):
                if config.family == "gpt2" and not name.startswith(("transformer.", "lm_head.")):
                    name = "transformer." + name  # OpenAI's GPT-2 files name the trunk's tensors bare
                if name not in targets:
                    if name.endswith(derived) or (name == "lm_head.weight" and config.tie_embeddings):
                        continue
                    raise ModelError(f"{path}: unexpected tensor {name}; a {config.family} model with "
                                     f"this config has no such parameter")
                target, transposed = targets[name]
                source = tensor.t() if transposed else tensor
                if source.shape != target.shape:
                    raise ModelError(f"{path}: tensor {name} has shape {list(tensor.shape)}; config.json "
                                     f"implies {list(target.t().shape if transposed else target.shape)}")
                target.copy_(source)
                filled.add(name)
    missing = sorted(set(targets) - filled)
    if missing:
        raise ModelError(f"{model_dir}: {len(missing)} tensor(s) missing from the weight files, "
                         f"e.g. {', '.join(missing[:5])}")
    return model


def save_pretrained(model: GPT, out_dir) -> None:
    """Write config.json and model.safetensors (each atomically) so that transformers'
    AutoModelForCausalLM.from_pretrained(out_dir) builds the same model, with the same logits."""
    hf = config_to_hf(model.config)
    hf["torch_dtype"] = str(model.lm_head.weight.dtype).removeprefix("torch.")
    tensors = {name: t.t() if transposed else t for name, (t, transposed) in hf_tensor_map(model).items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # weights first: a config.json never describes weights that are not there yet
    write_atomic(out_dir / "model.safetensors", lambda path: write_safetensors(path, tensors))
    write_atomic(out_dir / "config.json", json.dumps(hf, indent=2) + "\n")


# ----------------------------------------------------------------------------- memory

def memory_estimate(config: GPTConfig, micro_batch: int, seq_len: int, dtype=torch.float32,
                    optimizer: str = "adamw", grad_checkpointing: bool = False, n_shards: int = 1,
                    ref_model_copy: bool = False, fused: bool = True, activation_dtype=None) -> dict:
    """A rough estimate of the bytes one device needs to train `config` on micro_batch x seq_len
    tokens. N = parameters (a tied matrix once), s = bytes per element of dtype (the weights),
    a = bytes per element of activation_dtype (None: dtype; torch.bfloat16 under autocast).
    dtypes may be given by name ("bfloat16").

        parameters   N s / n_shards, + N a under autocast (a < s) on one device: torch keeps a
                     low-precision copy of every weight the forward used until backward has run
        gradients    N s / n_shards
        optimizer    / n_shards: "adamw": two moments per element, 2 N s (torch.optim.AdamW
                     allocates them like the parameter: bf16 for bf16 weights); "adafactor":
                     torch.optim.Adafactor's factored second moment, rows + cols per matrix
                     (not rows x cols) and one per element of vectors, times s; "sgd": none
        reference    N a / n_shards for a frozen copy of the model (the KL methods)
        activations  tokens x a x the elements saved for backward per token: per layer, each
                     norm's input and output (RMSNorm: + the normalised input), q k v (C + 2 C_kv),
                     RoPE's rotated q and k (C + C_kv), the attention output twice (2C; attention
                     is flash-style, no T x T matrix), MLP intermediates (2I; gated 4I); times L,
                     or with checkpointing L C (each block's input) + one layer's set;
                     not fused: + tokens x V x 12 bytes (fp32 logits, log-softmax, gradient)
        gathered     only when sharded (n_shards > 1, FSDP2 with bf16 mixed precision): what
                     is gathered whole at a time, in a: the parameters outside the blocks
                     (embeddings, lm_head, final norm), kept from forward to backward, and two
                     blocks' (the running one and the prefetched next), each with its gradient
        total        their sum; allocator slack and the CUDA context come on top.
    """
    dtype, activation_dtype = (getattr(torch, d) if isinstance(d, str) else d for d in (dtype, activation_dtype))
    with torch.device("meta"):
        model = GPT(config)
    shapes = [p.shape for p in model.parameters()]
    n_params = sum(math.prod(shape) for shape in shapes)
    n_block = sum(p.numel() for p in model.transformer.h[0].parameters())
    s = torch.empty((), dtype=dtype).element_size()
    a = torch.empty((), dtype=activation_dtype or dtype).element_size()
    states = {"adamw": 2 * s * n_params, "sgd": 0,
              "adafactor": s * sum(sum(sh[-2:]) if len(sh) >= 2 else sh[0] for sh in shapes)}
    if optimizer not in states:
        raise ModelError(f"optimizer {optimizer!r} is not one of {sorted(states)}")
    C, L, I = config.n_embd, config.n_layer, config.intermediate_size
    kv = config.n_kv_head * (C // config.n_head)
    norm = 3 * C if config.norm == "rmsnorm" else 2 * C  # input, output (RMSNorm: + normalised)
    per_layer = ((1 if config.parallel_block else 2) * norm + (C + 2 * kv)  # elements per token
                 + (C + kv if config.pos == "rope" else 0) + 2 * C + (4 * I if config.gated_mlp else 2 * I))
    tokens = micro_batch * seq_len
    saved = L * C + per_layer if grad_checkpointing else L * per_layer
    estimate = {
        "parameters": n_params * s // n_shards + (n_params * a if a < s and n_shards == 1 else 0),
        "gradients": n_params * s // n_shards,
        "optimizer": states[optimizer] // n_shards,
        "reference": n_params * a // n_shards if ref_model_copy else 0,
        "activations": tokens * saved * a + (0 if fused else tokens * config.vocab_size * 12),
    }
    if n_shards > 1:
        estimate["gathered"] = 2 * (n_params - L * n_block + 2 * n_block) * a
    estimate["total"] = sum(estimate.values())
    return estimate


def format_memory(estimate: dict) -> str:
    """The estimate as a small table in GiB, for a --dry-run."""
    return "\n".join(f"{name:<12} {nbytes / 2**30:8.2f} GiB" for name, nbytes in estimate.items())


# ----------------------------------------------------------------------------- npo-gpt-v1 files

def load_checkpoint(path, map_location="cpu"):
    """Read a from-scratch GPT saved in the project's earlier single-file format, npo-gpt-v1 (a
    torch.save'd dict: format, model_config, model = the state_dict, tokenizer, train_config,
    ...) -> (model, checkpoint dict). Config fields added since then take their defaults."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a missing file, or unpickling errors of many types
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(f"{path} is not a readable PyTorch checkpoint: {first_line}") from None
    found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
    if found != "npo-gpt-v1":
        raise ModelError(f"{path} has format {found!r}, expected 'npo-gpt-v1' (a bare state_dict?)")
    stored, state = ckpt.get("model_config"), ckpt.get("model")
    names = {f.name for f in fields(GPTConfig)}
    if not isinstance(stored, dict) or not set(stored) <= names or not isinstance(state, dict):
        raise ModelError(f"{path}: expected a model_config dict with fields among {sorted(names)} "
                         f"and a state_dict under 'model'")
    model = GPT(GPTConfig(**stored))
    try:
        model.load_state_dict(state)  # copies into the tied parameters; tying survives
    except RuntimeError as e:  # torch's message lists missing, unexpected and misshapen tensors
        raise ModelError(f"{path}: weights do not match model_config {stored}: {e}") from None
    return model.to(map_location), ckpt
