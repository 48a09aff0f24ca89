"""Capacity check: a from-scratch GPT (default GPTConfig, about 4M parameters, vocabulary 4,096)
overfits 64 TOFU QA pairs until the mean answer-token loss is under a threshold; prints the time.

    python bench_overfit.py --data-dir ../shared/tofu     # (or the built-in data without it)
"""

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

import data
import npo
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


@torch.no_grad()
def mean_answer_loss(model, pairs) -> float:
    model.eval()
    ids, labels = data.collate(pairs, 0)
    logp, n = npo.sequence_logprob(model(ids), labels)
    model.train()
    return float(-logp.sum() / n.sum())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in vars(OverfitConfig()).items():
        p.add_argument("--" + name.replace("_", "-"), type=type(default) if default is not None else str,
                       default=default)
    cfg = OverfitConfig(**vars(p.parse_args(argv)))
    torch.manual_seed(cfg.seed)
    data_dir = cfg.data_dir or data.write_tofu_style_dataset(tempfile.mkdtemp() + "/tofu", seed=cfg.seed)
    enc = data.build_encoding(data.train_bpe(data.corpus_texts(data_dir), cfg.vocab_size))
    rows = data.load_split(data_dir, "full")[:cfg.n_pairs]
    pairs = [data.encode_qa(enc, r["question"], r["answer"]) for r in rows]
    model = GPT(GPTConfig(vocab_size=enc.n_vocab))
    print(f"{model.num_params() / 1e6:.2f}M parameters, vocabulary {enc.n_vocab}, {len(pairs)} QA pairs")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    t0 = time.time()
    for epoch in range(cfg.max_epochs):
        for idx in data.batch_indices(len(pairs), cfg.batch_size, cfg.seed, epoch):
            ids, labels = data.collate([pairs[i] for i in idx], 0)
            logp, n = npo.sequence_logprob(model(ids), labels)
            loss = npo.retain_nll(logp, n)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        loss = mean_answer_loss(model, pairs)
        print(f"epoch {epoch + 1}: mean answer-token loss {loss:.4f} at {time.time() - t0:.1f}s", flush=True)
        if loss < cfg.target_loss:
            print(f"reached {cfg.target_loss} after {epoch + 1} epochs in {time.time() - t0:.1f}s")
            return 0
    print(f"did not reach {cfg.target_loss} in {cfg.max_epochs} epochs")
    return 1


if __name__ == "__main__":
    sys.exit(main())
