"""Capacity check: a from-scratch GPT (default GPTConfig, about 4M parameters, vocabulary 4,096)
overfits 64 TOFU QA pairs until the mean answer-token loss is under a threshold; prints the time.

    python bench_overfit.py --data-dir ../shared/tofu --threads 1   # (generated TOFU-style data without it)
"""

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

import data
import npo
import tofu_style
from model import GPT, GPTConfig


@dataclass
class OverfitConfig:
    data_dir: str | None = None
    n_pairs: int = 64
    vocab_size: int = 4096
    lr: float = 1e-3
    batch_size: int = 16
    target_loss: float = 0.05
    max_epochs: int = 200
    seed: int = 0
    threads: int = 0  # torch threads (0: torch's default)


def load_pairs(cfg: OverfitConfig) -> tuple[data.Tokenizer, list[tuple[list[int], list[int]]]]:
    """A BPE trained on the whole dataset's text, and the first n_pairs QA pairs of full.json encoded."""
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = data.resolve_data_dir(cfg.data_dir) or tofu_style.write_tofu_style_dataset(tmp, seed=cfg.seed)
        tok = data.bpe_tokenizer(data.train_bpe(data.corpus_texts(data_dir), cfg.vocab_size))
        rows = data.load_split(data_dir, "full")[:cfg.n_pairs]
    return tok, [data.encode_qa(tok, data.PROMPT_FORMATS["qa"], r["question"], r["answer"]) for r in rows]


@torch.no_grad()
def mean_answer_loss(model, pairs, pad_id: int) -> float:
    model.eval()
    ids, labels = data.collate(pairs, pad_id)
    logp, n = npo.sequence_logprob(model(ids), labels)
    model.train()
    return float(-logp.sum() / n.sum())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in vars(OverfitConfig()).items():
        p.add_argument("--" + name.replace("_", "-"), type=type(default) if default is not None else str,
                       default=default)
    cfg = OverfitConfig(**vars(p.parse_args(argv)))
    if min(cfg.n_pairs, cfg.batch_size, cfg.max_epochs) < 1:
        p.error("--n-pairs, --batch-size and --max-epochs must be at least 1")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    try:
        tok, pairs = load_pairs(cfg)
    except ValueError as e:  # data.DataError, or a vocabulary too small for train_bpe
        print(f"bench_overfit.py: error: {e}", file=sys.stderr)
        return 2
    model = GPT(GPTConfig(vocab_size=tok.n_vocab))
    print(f"{model.num_params() / 1e6:.2f}M parameters, vocabulary {tok.n_vocab}, {len(pairs)} QA pairs, "
          f"{torch.get_num_threads()} threads")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    t0 = time.time()
    for epoch in range(cfg.max_epochs):
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(pairs)).tolist()  # a function of (seed, epoch)
        for start in range(0, len(pairs), cfg.batch_size):
            ids, labels = data.collate([pairs[i] for i in order[start : start + cfg.batch_size]], tok.pad_id)
            logp, n = npo.sequence_logprob(model(ids), labels)
            loss = npo.retain_nll(logp, n)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        loss = mean_answer_loss(model, pairs, tok.pad_id)
        print(f"epoch {epoch + 1}: mean answer-token loss {loss:.4f} at {time.time() - t0:.1f}s", flush=True)
        if loss < cfg.target_loss:
            print(f"reached {cfg.target_loss} after {epoch + 1} epochs in {time.time() - t0:.1f}s")
            return 0
    print(f"did not reach {cfg.target_loss} in {cfg.max_epochs} epochs")
    return 1


if __name__ == "__main__":
    sys.exit(main())
