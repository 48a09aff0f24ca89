"""A compact GPT in the style of nanoGPT, with batched KV-cache greedy decoding and a
self-describing checkpoint file.

    GPTConfig            architecture hyperparameters
    GPT                  the model: forward() -> logits or final hidden states; generate()
    save_checkpoint      one file: config, weights, tokenizer, training config, step (atomic)
    load_checkpoint      -> (GPT, checkpoint dict); a file that does not fit is a CheckpointError
"""

import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 4096
    block_size: int = 256  # longest sequence the position table covers
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and LayerNorms

    def __post_init__(self):
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")


class KVCache:
    """Keys and values of one attention layer, preallocated for the whole decode.

    With left-padded prompts every row writes its next token into the same column, so one
    slice assignment per step updates the whole batch."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.k = None  # (B, nh, max_len, hs), allocated on first use with the incoming dtype
        self.v = None

    def update(self, k, v, start: int):
        # k, v: (B, nh, T, hs) for cache columns [start, start + T)
        if self.k is None:
            # Allocate lazily so the cache takes k's dtype (bf16 under autocast) and device.
            B, nh, _, hs = k.shape
            self.k = k.new_empty(B, nh, self.max_len, hs)
            self.v = v.new_empty(B, nh, self.max_len, hs)
        end = start + k.size(2)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]  # (B, nh, end, hs)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        # q, k, v projections in one matrix
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, attn_mask=None, cache: KVCache | None = None, cache_start: int = 0):
        """attn_mask: None for plain causal attention, else a boolean mask broadcastable to
        (B, nh, T, T_keys), True = may attend (used with the KV cache)."""
        B, T, C = x.size()
        hs = C // self.n_head
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(k, v, cache_start)  # (B, nh, cache_start + T, hs)
        dropout_p = self.dropout if self.training else 0.0
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, C)


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask=None, cache=None, cache_start=0):
        x = x + self.attn(self.ln_1(x), attn_mask, cache, cache_start)  # (B, T, C)
        x = x + self.mlp(self.ln_2(x))  # (B, T, C)
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying: one (V, C) matrix

        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer), since each block adds two
        # of them to the residual stream.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        """Number of parameters, the tied embedding / lm_head matrix counted once."""
        return sum(p.numel() for p in self.parameters())

    def _hidden(self, idx, pos, attn_mask=None, caches=None, cache_start=0):
        """Transformer trunk. idx (B, T), pos (T,) or (B, T) -> hidden after ln_f (B, T, C)."""
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, attn_mask, None if caches is None else caches[i], cache_start)
        return self.transformer.ln_f(x)  # (B, T, C)

    def forward(self, idx, return_hidden: bool = False):
        """idx (B, T) token ids -> logits (B, T, V), or with return_hidden=True the final
        hidden states after ln_f (B, T, C), so that a fused log-prob computation can multiply
        by lm_head.weight in chunks without ever building the (B, T, V) logits."""
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)  # (T,)
        h = self._hidden(idx, pos)  # (B, T, C)
        if return_hidden:
            return h
        return self.lm_head(h)  # (B, T, V)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, eos_id: int | None,
                 batch_size: int = 128) -> list[list[int]]:
        """Greedy decoding with a KV cache, `batch_size` prompts at a time.

        Returns the new tokens of each prompt, in the order given, EOS excluded: a row stops at
        its first EOS or after max_new_tokens. eos_id=None never stops early. Every prompt must
        fit with its continuation: len(prompt) + max_new_tokens <= block_size, else ValueError
        (no silent truncation). Runs in eval mode (no dropout) and restores the training mode.
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
        # Batches of similar length waste little compute on padding; results come back in order.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out = [None] * len(prompts)
        was_training = self.training
        self.eval()
        try:
            for s in range(0, len(order), batch_size):
                rows = order[s:s + batch_size]
                for i, new in zip(rows, self._generate_batch([prompts[i] for i in rows],
                                                             max_new_tokens, eos_id)):
                    out[i] = new
        finally:
            self.train(was_training)
        return out

    def _generate_batch(self, prompts, max_new_tokens, eos_id):
        """One batch of greedy decoding. Prompts are LEFT-padded so that every row's last prompt
        token sits in the same column and every new token is written to the same cache column;
        padding keys are masked out and positions count from each row's first real token, so a
        row's result does not depend on the other rows."""
        device = self.lm_head.weight.device
        B = len(prompts)
        lengths = torch.tensor([len(p) for p in prompts], device=device)  # (B,)
        T = int(lengths.max())
        total = T + max_new_tokens  # cache columns

        idx = torch.zeros(B, T, dtype=torch.long)  # pad id 0: any valid id, never attended to
        for b, p in enumerate(prompts):
            idx[b, T - len(p):] = torch.tensor(p, dtype=torch.long)
        idx = idx.to(device)  # (B, T)
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
        n = 0
        for step in range(max_new_tokens):
            new[:, step] = next_tok
            n = step + 1
            if eos_id is not None:
                finished |= next_tok == eos_id
                if bool(finished.all()):
                    break
            if step == max_new_tokens - 1:
                break
            col = T + step  # cache column of next_tok; every row has all keys up to it
            h = self._hidden(next_tok[:, None], (lengths + step)[:, None],  # (B, 1) ids, positions
                             keys[:, None, None, :col + 1], caches, col)  # -> (B, 1, C)
            next_tok = self.lm_head(h[:, -1]).argmax(dim=-1)  # (B,)

        result = []
        for row in new[:, :n].tolist():
            if eos_id is not None and eos_id in row:
                row = row[:row.index(eos_id)]
            result.append(row)
        return result


# ----------------------------------------------------------------------------- checkpoints

CHECKPOINT_FORMAT = "npo-gpt-v1"
CHECKPOINT_KEYS = ("format", "model_config", "model", "tokenizer", "train_config", "step", "extra")


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, of another format, or does not fit the model."""


def _check_plain(obj, where: str):
    """torch.load(weights_only=True) accepts only tensors and plain Python containers/scalars;
    refuse anything else at save time, naming the field, instead of writing an unloadable file."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool, bytes)) and k is not None:
                raise CheckpointError(f"{where}: key {k!r} has type {type(k).__name__}; "
                                      "checkpoint keys must be str, int, float, bool or bytes")
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    elif not (obj is None or isinstance(obj, (str, int, float, bool, bytes, torch.Tensor))):
        raise CheckpointError(f"{where} has type {type(obj).__name__}; a checkpoint stores only "
                              "tensors, str, int, float, bool, bytes, None, list, tuple and dict "
                              "(convert it, e.g. str(path))")


def save_checkpoint(path, model: GPT, tokenizer: dict, train_config: dict, step: int,
                    extra: dict | None = None) -> None:
    """Write one self-describing checkpoint file atomically (temporary file + os.replace)."""
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "model_config": asdict(model.config),
        "model": model.state_dict(),
        "tokenizer": tokenizer,
        "train_config": train_config,
        "step": int(step),
        "extra": {} if extra is None else extra,
    }
    for key in ("tokenizer", "train_config", "extra"):
        _check_plain(ckpt[key], key)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path, map_location="cpu", expected_config: GPTConfig | None = None):
    """Read a checkpoint written by save_checkpoint -> (model, checkpoint dict).

    The model is built from the stored config, moved to map_location, and left in training
    mode like any new nn.Module. expected_config, if given, must agree with the stored config
    in every architecture field (dropout is a training setting and may differ; the stored
    value is used). Any mismatch raises CheckpointError listing the differing fields.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # unpickling errors come in many types; all mean "not a checkpoint"
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint: {first_line}") from None
    if not isinstance(ckpt, dict) or "format" not in ckpt:
        raise CheckpointError(f"{path} is not an {CHECKPOINT_FORMAT} checkpoint "
                              "(no 'format' field; a bare state_dict?)")
    if ckpt["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} has format {ckpt['format']!r}, expected {CHECKPOINT_FORMAT!r}")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} lacks field(s) {', '.join(missing)}")

    stored = ckpt["model_config"]
    names = [f.name for f in fields(GPTConfig)]
    if not isinstance(stored, dict) or set(stored) != set(names):
        got = sorted(stored) if isinstance(stored, dict) else type(stored).__name__
        raise CheckpointError(f"{path}: model_config has fields {got}, expected {names}")
    try:
        config = GPTConfig(**stored)
    except ValueError as e:
        raise CheckpointError(f"{path}: invalid model_config: {e}") from None
    if expected_config is not None:
        diffs = [f"{n}: checkpoint {getattr(config, n)!r}, expected {getattr(expected_config, n)!r}"
                 for n in names
                 if n != "dropout" and getattr(config, n) != getattr(expected_config, n)]
        if diffs:
            raise CheckpointError(f"{path} does not fit the expected model config: "
                                  + "; ".join(diffs))

    model = GPT(config)
    state = ckpt["model"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: 'model' is a {type(state).__name__}, expected a state_dict")
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = [f"missing {k}" for k in want if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in want]
    problems += [f"{k}: checkpoint shape {tuple(state[k].shape)}, config expects {want[k]}"
                 for k in want if k in state and isinstance(state[k], torch.Tensor)
                 and tuple(state[k].shape) != want[k]]
    problems += [f"{k}: not a tensor" for k in want
                 if k in state and not isinstance(state[k], torch.Tensor)]
    if problems:
        shown = "; ".join(problems[:8])
        if len(problems) > 8:
            shown += f"; ... ({len(problems)} in all)"
        raise CheckpointError(f"{path}: weights do not match model_config {stored}: {shown}")
    model.load_state_dict(state)  # copies into the tied parameters; tying survives
    model.to(map_location)
    return model, ckpt


if __name__ == "__main__":
    model = GPT(GPTConfig())
    print(f"GPTConfig() -> {model.num_params():,} parameters "
          f"({model.transformer.wpe.weight.numel():,} of them position embeddings)")
