"""The TOFU experiment end to end: data -> tokenizer -> base model -> target and retain models ->
unlearning with every method -> TOFU metrics after every epoch -> report and figure.

    python train_tofu.py                       # built-in TOFU-style data, forget10, 8 methods
    python train_tofu.py --quick               # the same stages at a smaller size (minutes)
    python train_tofu.py --data-dir ../shared/tofu --split forget10    # the real TOFU files
    python train_tofu.py --preset gpu --data-dir DIR                   # TOFU scale on one GPU

Every stage's output is cached under out/tofu/cache/<stage>-<hash of its configuration>/ and
reused by a rerun; unlearning checkpoints after every epoch, so an interrupted run resumes
where it stopped. Results land in out/tofu/<run name>/: metrics.jsonl, summary.md, tofu.png,
samples.md.
"""

import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

import data
import eval as tofu_eval
import npo
from model import GPT, CheckpointError, GPTConfig, load_checkpoint, save_checkpoint

DEFAULT_METHODS = "ga,ga_rt,ga_kl,npo,npo_rt,npo_kl,idk,dpo"


@dataclass
class TofuConfig:
    # data
    data_dir: str | None = None  # real TOFU directory (or $TOFU_DATA_DIR); None: built-in data
    n_authors: int = 40  # built-in data only (the generator's own default is TOFU's 200)
    data_seed: int = 0
    split: str = "forget10"
    # tokenizer and model
    tokenizer: str = "bpe"  # bpe (trained here) or gpt2 (tiktoken's, where available locally)
    vocab_size: int = 2048
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 256
    # base model: trained from scratch on real_authors + world_facts
    base_epochs: int = 60
    base_lr: float = 3e-3
    # target (full) and retain (retainYY) models: fine-tuned from the base model
    finetune_epochs: int = 30
    finetune_lr: float = 3e-3
    mix_base: bool = True  # keep the base QA pairs in every fine-tuning epoch
    batch_size: int = 16
    # unlearning
    methods: str = DEFAULT_METHODS
    unlearn_epochs: int = 10
    unlearn_lr: float = 5e-4
    unlearn_batch_size: int = 16
    beta: float = 0.1  # NPO / DPO / SimNPO inverse temperature
    simnpo_delta: float = 0.0
    forget_coef: float = 1.0  # weight of the forget term (GA, NPO, IDK, DPO, SimNPO)
    retain_coef: float = 1.0  # weight of the retain term (RT: NLL, KL)
    # evaluation
    ds_size: int = 300  # TOFU evaluates the first 300 rows of each split
    eval_batch_size: int = 128
    max_new_tokens: int = 0  # 0: the longest ground-truth answer of the evaluated rows, in tokens
    rouge: str = "builtin"
    # system
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"  # float32 or bfloat16 (autocast)
    compile: bool = False
    logprob: str = "plain"  # plain (logits) or fused (chunked, never builds the logits tensor)
    out_dir: str = "out/tofu"
    run_name: str | None = None
    preset: str = "default"


# Presets set the size of a run; any option given on the command line overrides them.
PRESETS = {
    "default": {},
    "quick": dict(n_authors=20, n_layer=1, base_epochs=25, finetune_epochs=12,
                  finetune_lr=5e-3, unlearn_batch_size=8, unlearn_epochs=6),
    # Real TOFU (picked when a data directory is given and no preset is): 4,000 QA pairs twice as
    # long as the built-in ones, so fewer epochs to fit a CPU hour, and a larger BPE for the text.
    "tofu": dict(vocab_size=4096, base_epochs=40, finetune_epochs=10, unlearn_epochs=5),
    "toy": dict(n_authors=20, n_layer=1, n_head=2, n_embd=32, vocab_size=600, base_epochs=2,
                finetune_epochs=1, unlearn_epochs=2, ds_size=16, max_new_tokens=8,
                eval_batch_size=64),
    "gpu": dict(device="cuda", dtype="bfloat16", compile=True, n_layer=12, n_head=12, n_embd=768,
                vocab_size=8192, finetune_epochs=20, base_epochs=100, finetune_lr=3e-4,
                base_lr=3e-4, unlearn_lr=5e-5, unlearn_epochs=10),
}

HELP = {
    "data_dir": "directory with TOFU's .json files (default: $TOFU_DATA_DIR, else built-in data)",
    "n_authors": "number of fictitious authors in the built-in data",
    "data_seed": "seed of the built-in data generator",
    "split": "forget split: forget01, forget05, forget10; forget20/30/50/90 where a forgetXX_perturbed "
             "file exists (the built-in data has them, TOFU does not)",
    "tokenizer": "bpe: a byte-level BPE trained on the data; gpt2: tiktoken's gpt2 (needs its files)",
    "vocab_size": "BPE vocabulary size, <|endoftext|> included",
    "n_layer": "transformer blocks", "n_head": "attention heads", "n_embd": "model width",
    "block_size": "longest sequence (tokens) the model accepts",
    "base_epochs": "epochs of base-model training on real_authors + world_facts",
    "base_lr": "peak learning rate of base-model training",
    "finetune_epochs": "epochs of target/retain fine-tuning", "finetune_lr": "its peak learning rate",
    "mix_base": "keep the base QA pairs in the fine-tuning data (see README)",
    "batch_size": "batch size of base training and fine-tuning",
    "methods": "comma-separated unlearning methods (see npo.METHODS)",
    "unlearn_epochs": "epochs over the forget set", "unlearn_lr": "unlearning learning rate",
    "unlearn_batch_size": "forget (and retain) examples per unlearning step",
    "beta": "inverse temperature of NPO, DPO and SimNPO", "simnpo_delta": "SimNPO's reward margin",
    "forget_coef": "weight of the forget term", "retain_coef": "weight of the retain term (RT / KL)",
    "ds_size": "rows of each evaluation split (TOFU: 300)",
    "eval_batch_size": "sequences per evaluation forward / generation batch",
    "max_new_tokens": "generation length bound for ROUGE (0: the longest evaluated answer)",
    "rouge": "builtin (no stemming) or rouge_score (TOFU's scorer with Porter stemming)",
    "seed": "training seed", "device": "cpu or cuda", "dtype": "float32 or bfloat16 (autocast)",
    "compile": "torch.compile the model for training", "logprob": "plain or fused log-prob path",
    "out_dir": "output root", "run_name": "name of the results directory (default from data/split)",
    "preset": "size preset: default (built-in data), tofu (real TOFU on a CPU; the default with "
              "--data-dir), quick, toy (tests), gpu (TOFU scale on one GPU)",
}


class ConfigError(ValueError):
    pass


def parse_config(argv=None) -> TofuConfig:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Defaults shown are the default preset's; --preset tofu/quick/toy/gpu change some of "
               "them (see PRESETS in train_tofu.py; tofu is the default with --data-dir), and an "
               "option given here overrides its preset.")
    defaults = TofuConfig()
    for f in fields(TofuConfig):
        default = getattr(defaults, f.name)
        name = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=HELP[f.name] + f" (default: {default})")
        else:
            kind = {int: int, float: float}.get(type(default), str)
            choices = list(PRESETS) if f.name == "preset" else None
            parser.add_argument(name, type=kind, default=argparse.SUPPRESS, choices=choices,
                                help=HELP[f.name] + ("" if default is None else f" (default: {default})"))
    parser.add_argument("--quick", action="store_true", default=argparse.SUPPRESS,
                        help="shorthand for --preset quick (a few minutes on a laptop CPU)")
    args = vars(parser.parse_args(argv))
    if args.pop("quick", False):
        args.setdefault("preset", "quick")
    real_data = args.get("data_dir") or os.environ.get("TOFU_DATA_DIR")
    preset = args.setdefault("preset", "tofu" if real_data else "default")
    cfg = TofuConfig(**{**PRESETS[preset], **args})
    check_config(cfg)
    return cfg


def check_config(cfg: TofuConfig) -> None:
    for name in method_list(cfg):
        try:
            npo.get_method(name)
        except ValueError as e:  # names the valid methods
            raise ConfigError(f"--methods: {e}") from None
    if not method_list(cfg):
        raise ConfigError("--methods: no method given")
    if not re.fullmatch(r"forget\d\d", cfg.split):
        raise ConfigError(f"--split {cfg.split!r}: expected forgetXX, e.g. forget10")
    if cfg.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"--dtype {cfg.dtype!r}: expected float32 or bfloat16")
    if cfg.logprob not in ("plain", "fused"):
        raise ConfigError(f"--logprob {cfg.logprob!r}: expected plain or fused")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available on this machine")


def method_list(cfg: TofuConfig) -> list[str]:
    return [m.strip() for m in cfg.methods.split(",") if m.strip()]


# ----------------------------------------------------------------------------- small utilities

def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 60}:{seconds % 60:02d}"


def config_key(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def autocast(cfg: TofuConfig):
    if cfg.dtype == "bfloat16":
        return torch.autocast(device_type=torch.device(cfg.device).type, dtype=torch.bfloat16)
    return nullcontext()


def sequence_logprob(model, input_ids, labels, cfg: TofuConfig):
    """Per-sequence summed answer log-prob and answer-token count, by the chosen path."""
    with autocast(cfg):
        if cfg.logprob == "fused":
            hidden = model(input_ids, return_hidden=True)  # (B, T, C), no logits
            return npo.fused_sequence_logprob(hidden, model.lm_head.weight, labels)
        return npo.sequence_logprob(model(input_ids), labels)


# ----------------------------------------------------------------------------- stages 1-2: data

class Stages:
    """Paths and keys of the cached stages. A stage is done when its done.json exists."""

    def __init__(self, cfg: TofuConfig):
        self.cfg = cfg
        self.root = Path(cfg.out_dir)
        self.cache = self.root / "cache"
        data_dir = data.resolve_data_dir(cfg.data_dir) if (cfg.data_dir or os.environ.get("TOFU_DATA_DIR")) else None
        self.real_data = data_dir is not None
        self.data_key = ({"source": "tofu", "dir": str(data_dir.resolve())} if data_dir else
                         {"source": "generated", "n_authors": cfg.n_authors, "seed": cfg.data_seed})
        self.data_dir = data_dir or self.cache / f"data-{config_key(self.data_key)}"
        self.tok_key = {**self.data_key, "tokenizer": cfg.tokenizer, "vocab_size": cfg.vocab_size}
        self.model_key = {**self.tok_key, **{k: getattr(cfg, k) for k in
                                             ("n_layer", "n_head", "n_embd", "block_size")}}
        self.base_key = {**self.model_key, "stage": "base", "seed": cfg.seed,
                         **{k: getattr(cfg, k) for k in ("base_epochs", "base_lr", "batch_size")}}
        ft = {k: getattr(cfg, k) for k in ("finetune_epochs", "finetune_lr", "mix_base", "batch_size")}
        self.target_key = {**self.base_key, "stage": "target", "train_split": "full", **ft}
        self.retain_split = data.retain_split_for(cfg.split)
        self.retain_key = {**self.base_key, "stage": "retain", "train_split": self.retain_split, **ft}
        self.refresh_keys()
        default_name = f"{'tofu' if self.real_data else 'generated'}-{cfg.split}"
        if cfg.preset not in ("default", "tofu"):
            default_name += f"-{cfg.preset}"
        self.run_dir = self.root / (cfg.run_name or default_name)

    def refresh_keys(self) -> None:
        """Keys of the evaluation and unlearning stages (they depend on max_new_tokens, which is
        resolved once the tokenizer exists)."""
        cfg = self.cfg
        self.eval_key = {k: getattr(cfg, k) for k in ("split", "ds_size", "max_new_tokens", "rouge")}
        self.unlearn_key = {"target": config_key(self.target_key),
                            "retain": config_key(self.retain_key), **self.eval_key,
                            **{k: getattr(cfg, k) for k in (
                                "unlearn_epochs", "unlearn_lr", "unlearn_batch_size", "beta",
                                "simnpo_delta", "forget_coef", "retain_coef", "seed", "logprob")}}

    def stage_dir(self, name: str, key: dict) -> Path:
        return self.cache / f"{name}-{config_key(key)}"


def prepare_data(st: Stages) -> Path:
    if st.real_data:
        log(f"stage data: real TOFU files in {st.data_dir}")
        return st.data_dir
    done = st.data_dir / "done.json"
    if done.exists():
        log(f"stage data: cached ({st.data_dir})")
    else:
        t0 = time.time()
        data.write_tofu_style_dataset(st.data_dir, n_authors=st.cfg.n_authors, seed=st.cfg.data_seed)
        tofu_eval.write_json_atomic(done, st.data_key)
        log(f"stage data: generated {st.cfg.n_authors} authors in {time.time() - t0:.1f}s -> {st.data_dir}")
    return st.data_dir


def prepare_tokenizer(st: Stages):
    if st.cfg.tokenizer == "gpt2":
        return data.gpt2_encoding()
    out = st.stage_dir("tokenizer", st.tok_key)
    path = out / "bpe.tiktoken"
    if path.exists():
        log(f"stage tokenizer: cached ({path})")
        return data.build_encoding(data.load_ranks(path))
    t0 = time.time()
    ranks = data.train_bpe(data.corpus_texts(st.data_dir), st.cfg.vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    data.save_ranks(ranks, path)  # atomic: its existence marks the stage done
    log(f"stage tokenizer: trained {len(ranks) + 1} tokens in {time.time() - t0:.1f}s -> {path}")
    return data.build_encoding(ranks)


def longest_eval_answer(enc, st: Stages) -> int:
    """Tokens of the longest ground-truth answer among the evaluated rows (+1 for EOS): a greedy
    answer longer than that cannot raise ROUGE-L recall of a faithful model."""
    longest = 0
    for spec in tofu_eval.split_specs(st.cfg.split):
        for row in data.load_split(st.data_dir, spec.data_split)[:st.cfg.ds_size]:
            longest = max(longest, len(enc.encode_ordinary(" " + row["answer"])) + 1)
    return longest


def encode_rows(enc, rows, block_size: int, where: str) -> list:
    pairs = [data.encode_qa(enc, r["question"], r["answer"]) for r in rows]
    longest = max((len(ids) for ids, _ in pairs), default=0)
    if longest > block_size:
        raise ConfigError(f"{where}: a QA pair has {longest} tokens, more than --block-size {block_size}")
    return pairs


# ----------------------------------------------------------------------------- stages 3-4: models

def train_answer_nll(model, pairs, *, epochs: int, lr: float, batch_size: int, seed: int,
                     cfg: TofuConfig, tag: str) -> list[float]:
    """Minimise the answer NLL on `pairs` with AdamW, linear warmup then cosine decay.
    Returns the mean training loss of each epoch."""
    device = cfg.device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    total = epochs * len(data.bucketed_batch_indices([0] * len(pairs), batch_size, 0))
    warmup = max(1, total // 20)
    fwd = torch.compile(model) if cfg.compile else model
    lengths = [len(ids) for ids, _ in pairs]
    model.train()
    epoch_losses, step, t0 = [], 0, time.time()
    for epoch in range(epochs):
        tokens = loss_sum = 0.0
        # batches of similar lengths: TOFU's QA pairs run from 30 to 200 tokens, and padding is waste
        for idx in data.bucketed_batch_indices(lengths, batch_size, seed, epoch):
            # lr: linear warmup, then cosine decay to 10% of the peak
            frac = step / warmup if step < warmup else (step - warmup) / max(1, total - warmup)
            step_lr = lr * frac if step < warmup else lr * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
            for g in opt.param_groups:
                g["lr"] = step_lr
            ids, labels = (t.to(device) for t in data.collate([pairs[i] for i in idx], 0))
            logp, n = sequence_logprob(fwd, ids, labels, cfg)
            loss = npo.retain_nll(logp, n)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            tokens += float(n.sum())
            loss_sum += loss.item() * float(n.sum())
        epoch_losses.append(loss_sum / max(tokens, 1))
        elapsed = time.time() - t0
        log(f"[{tag}] epoch {epoch + 1}/{epochs} step {step}/{total} answer loss "
            f"{epoch_losses[-1]:.4f} lr {step_lr:.2e} eta {fmt_eta(elapsed / step * (total - step))}")
    model.eval()
    return epoch_losses


@torch.no_grad()
def mean_answer_loss(model, pairs, cfg: TofuConfig) -> float:
    """Mean answer-token NLL over `pairs` (eval mode): how well a model has memorised them."""
    model.eval()
    total = count = 0.0
    for idx in data.batch_indices(len(pairs), cfg.eval_batch_size, 0, shuffle=False):
        ids, labels = (t.to(cfg.device) for t in data.collate([pairs[i] for i in idx], 0))
        logp, n = sequence_logprob(model, ids, labels, cfg)
        total -= float(logp.sum())
        count += float(n.sum())
    return total / max(count, 1)


def base_rows(data_dir) -> list[dict]:
    """The knowledge a model has before it meets the fictitious authors."""
    return data.load_split(data_dir, "real_authors") + data.load_split(data_dir, "world_facts")


def base_pairs(enc, data_dir, block_size):
    return encode_rows(enc, base_rows(data_dir), block_size, "real_authors/world_facts")


def prepare_base(st: Stages, enc) -> Path:
    cfg, out = st.cfg, st.stage_dir("base", st.base_key)
    path = out / "model.pt"
    if (out / "done.json").exists():
        log(f"stage base: cached ({path})")
        return path
    torch.manual_seed(cfg.seed)
    mcfg = GPTConfig(vocab_size=enc.n_vocab, block_size=cfg.block_size, n_layer=cfg.n_layer,
                     n_head=cfg.n_head, n_embd=cfg.n_embd)
    model = GPT(mcfg).to(cfg.device)
    pairs = base_pairs(enc, st.data_dir, cfg.block_size)
    log(f"stage base: {model.num_params() / 1e6:.2f}M-parameter GPT from scratch on "
        f"{len(pairs)} real_authors + world_facts pairs, {cfg.base_epochs} epochs")
    t0 = time.time()
    losses = train_answer_nll(model, pairs, epochs=cfg.base_epochs, lr=cfg.base_lr,
                              batch_size=cfg.batch_size, seed=cfg.seed, cfg=cfg, tag="base")
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, model, data.tokenizer_spec(enc), asdict(cfg), step=0,
                    extra={"stage": "base", "train_losses": losses})
    tofu_eval.write_json_atomic(out / "done.json", {"key": st.base_key, "seconds": time.time() - t0,
                                          "final_train_loss": losses[-1]})
    return path


def prepare_finetuned(st: Stages, enc, base_path: Path, which: str) -> Path:
    """which = "target" (fine-tuned on full) or "retain" (on retainYY): the same recipe."""
    cfg = st.cfg
    key = st.target_key if which == "target" else st.retain_key
    out = st.stage_dir(which, key)
    path = out / "model.pt"
    if (out / "done.json").exists():
        info = json.loads((out / "done.json").read_text())
        log(f"stage {which}: cached ({path}); answer loss on {info['train_split']} {info['answer_loss']:.4f}")
        return path
    split = key["train_split"]
    pairs = encode_rows(enc, data.load_split(st.data_dir, split), cfg.block_size, split)
    train_pairs = pairs + (base_pairs(enc, st.data_dir, cfg.block_size) if cfg.mix_base else [])
    model, _ = load_checkpoint(base_path, map_location=cfg.device)
    log(f"stage {which}: fine-tune the base model on {split} ({len(pairs)} pairs"
        f"{' + base pairs' if cfg.mix_base else ''}), {cfg.finetune_epochs} epochs")
    t0 = time.time()
    losses = train_answer_nll(model, train_pairs, epochs=cfg.finetune_epochs, lr=cfg.finetune_lr,
                              batch_size=cfg.batch_size, seed=cfg.seed + 1, cfg=cfg, tag=which)
    answer_loss = mean_answer_loss(model, pairs, cfg)
    log(f"stage {which}: mean answer loss on {split} (eval mode) {answer_loss:.4f}")
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, model, data.tokenizer_spec(enc), asdict(cfg), step=0,
                    extra={"stage": which, "train_losses": losses})
    tofu_eval.write_json_atomic(out / "done.json", {"key": key, "train_split": split, "answer_loss": answer_loss,
                                          "seconds": time.time() - t0})
    return path


def evaluate(model, enc, st: Stages, ref_model=None) -> dict:
    cfg = st.cfg
    with autocast(cfg):
        return tofu_eval.evaluate_model(model, enc, st.data_dir, cfg.split, ds_size=cfg.ds_size,
                                        batch_size=cfg.eval_batch_size,
                                        max_new_tokens=cfg.max_new_tokens, device=cfg.device,
                                        rouge=cfg.rouge, ref_model=ref_model)


def cached_eval(st: Stages, enc, which: str, model_path: Path, model=None, ref_model=None) -> dict:
    """TOFU logs of the target or retain model, cached next to its checkpoint."""
    out = model_path.parent / f"eval-{config_key(st.eval_key)}"
    if (out / "done.json").exists():
        return tofu_eval.read_logs(out)
    if model is None:
        model, _ = load_checkpoint(model_path, map_location=st.cfg.device)
    t0 = time.time()
    logs = evaluate(model, enc, st, ref_model=ref_model)
    out.mkdir(parents=True, exist_ok=True)
    tofu_eval.write_logs(out, logs)
    tofu_eval.write_json_atomic(out / "done.json", {"key": st.eval_key, "seconds": time.time() - t0})
    log(f"stage eval {which}: {time.time() - t0:.1f}s")
    return logs


# ----------------------------------------------------------------------------- stage 5: unlearning

class UnlearningData:
    """Encoded forget, retain and IDK pairs, and the reference log-probs cached once."""

    def __init__(self, st: Stages, enc, target):
        cfg = st.cfg
        forget_rows = data.load_split(st.data_dir, cfg.split)
        retain_rows = data.load_split(st.data_dir, st.retain_split)
        idk = data.load_idk(st.data_dir)
        self.forget = encode_rows(enc, forget_rows, cfg.block_size, cfg.split)
        self.retain = encode_rows(enc, retain_rows, cfg.block_size, st.retain_split)
        # each forget question gets one refusal, drawn once from a seeded generator (as TOFU)
        g = torch.Generator().manual_seed(cfg.seed)
        picks = torch.randint(len(idk), (len(forget_rows),), generator=g).tolist()
        idk_rows = [{"question": r["question"], "answer": idk[j]} for r, j in zip(forget_rows, picks)]
        self.idk = encode_rows(enc, idk_rows, cfg.block_size, "idontknow")
        # pi_ref log-probs never change during unlearning: compute them once, here
        t0 = time.time()
        self.forget_ref = self._ref_logprobs(target, self.forget, cfg)
        self.idk_ref = self._ref_logprobs(target, self.idk, cfg)
        log(f"stage unlearning data: {len(self.forget)} forget, {len(self.retain)} retain pairs; "
            f"reference log-probs cached in {time.time() - t0:.1f}s")

    @staticmethod
    def _ref_logprobs(target, pairs, cfg):
        batches = [tuple(t.to(cfg.device) for t in data.collate([pairs[i] for i in idx], 0))
                   for idx in data.batch_indices(len(pairs), cfg.eval_batch_size, 0, shuffle=False)]
        with autocast(cfg):
            return npo.precompute_ref_logprobs(target, batches)

    def batch(self, pairs, idx, device):
        return tuple(t.to(device) for t in data.collate([pairs[i] for i in idx], 0))


def unlearning_loss(method, model, ref_model, ud: UnlearningData, f_idx, r_idx, cfg: TofuConfig):
    """The method's loss on one step (npo.Method): forget_coef * forget term + retain_coef * retain term.
    Returns (loss, forget term, retain term) as tensors."""
    dev = cfg.device
    ids_f, lab_f = ud.batch(ud.forget, f_idx, dev)
    ref_f = ud.forget_ref[f_idx].to(dev)
    kind = method.forget
    if kind == "ga":
        logp, n = sequence_logprob(model, ids_f, lab_f, cfg)
        forget = npo.ga_loss(logp, n)
    elif kind == "npo":
        logp, _ = sequence_logprob(model, ids_f, lab_f, cfg)
        forget = npo.npo_loss(logp, ref_f, cfg.beta)
    elif kind == "simnpo":
        logp, n = sequence_logprob(model, ids_f, lab_f, cfg)
        forget = npo.simnpo_loss(logp, n, cfg.beta, cfg.simnpo_delta)
    elif kind == "idk":
        logp_idk, n_idk = sequence_logprob(model, *ud.batch(ud.idk, f_idx, dev), cfg)
        forget = npo.idk_loss(logp_idk, n_idk)
    elif kind == "dpo":
        logp_idk, _ = sequence_logprob(model, *ud.batch(ud.idk, f_idx, dev), cfg)
        logp, _ = sequence_logprob(model, ids_f, lab_f, cfg)
        forget = npo.dpo_loss(logp_idk, ud.idk_ref[f_idx].to(dev), logp, ref_f, cfg.beta)
    else:
        raise ConfigError(f"unknown forget term {kind!r}")
    retain = torch.zeros((), device=dev)
    if method.retain == "nll":
        logp_r, n_r = sequence_logprob(model, *ud.batch(ud.retain, r_idx, dev), cfg)
        retain = npo.retain_nll(logp_r, n_r)
    elif method.retain == "kl":
        ids_r, lab_r = ud.batch(ud.retain, r_idx, dev)
        with autocast(cfg):
            logits = model(ids_r)
            with torch.no_grad():
                ref_logits = ref_model(ids_r)
        retain = npo.kl_retain(logits, ref_logits, lab_r)
    loss = method.forget_coef * forget + method.retain_coef * retain
    return loss, forget.detach(), retain.detach()


def method_dir(st: Stages, name: str) -> Path:
    """A method's results, keyed by everything they depend on: a changed option starts afresh."""
    return st.run_dir / "methods" / f"{name}-{config_key({**st.unlearn_key, 'method': name})}"


def run_method(name: str, st: Stages, enc, target_path: Path, target, ud: UnlearningData | None,
               retain_logs: dict) -> list[dict]:
    """Unlearn with one method for cfg.unlearn_epochs epochs; evaluate and checkpoint after each.
    Returns one metrics record per epoch. Resumes from the last finished epoch."""
    cfg = st.cfg
    method = dataclasses.replace(npo.get_method(name), forget_coef=cfg.forget_coef, retain_coef=cfg.retain_coef)
    out = method_dir(st, name)
    out.mkdir(parents=True, exist_ok=True)
    records = [json.loads(p.read_text()) for p in sorted(out.glob("epoch_*.json"))]
    if (out / "done.json").exists():
        log(f"[{name}] cached: {len(records)} epochs ({out})")
        return records

    model, _ = load_checkpoint(target_path, map_location=cfg.device)
    # beta2 = 0.999 (HF's default, as in TOFU's and NPO's code): a short second-moment memory
    # would rescale NPO's fading gradients back up and undo what its weights W_i do.
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.unlearn_lr, betas=(0.9, 0.999), weight_decay=0.01)
    start_epoch, seconds = 0, 0.0
    if records and (out / "state.pt").exists():
        state = torch.load(out / "state.pt", map_location=cfg.device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_epoch, seconds = state["epoch"], state["seconds"]
        records = records[:start_epoch]
        log(f"[{name}] resuming after epoch {start_epoch}")
    ref_model = target if method.needs_ref_model else None  # only the KL term needs pi_ref per step
    fwd = torch.compile(model) if cfg.compile else model
    n_f = len(ud.forget)
    steps_per_epoch = math.ceil(n_f / cfg.unlearn_batch_size)
    status = "ok"
    for epoch in range(start_epoch, cfg.unlearn_epochs):
        t0 = time.time()
        model.train()
        f_batches = data.batch_indices(n_f, cfg.unlearn_batch_size, cfg.seed, epoch)
        r_batches = data.batch_indices(len(ud.retain), cfg.unlearn_batch_size, cfg.seed + 1, epoch)
        sums = {"loss": 0.0, "forget": 0.0, "retain": 0.0}
        for step, f_idx in enumerate(f_batches):
            # lr: linear warmup over the first epoch, then constant
            global_step = epoch * steps_per_epoch + step
            for g in opt.param_groups:
                g["lr"] = cfg.unlearn_lr * min(1.0, (global_step + 1) / steps_per_epoch)
            r_idx = r_batches[step % len(r_batches)]
            loss, forget, retain = unlearning_loss(method, fwd, ref_model, ud, f_idx, r_idx, cfg)
            if not torch.isfinite(loss):
                status = f"diverged (non-finite loss at epoch {epoch + 1}, step {step + 1})"
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if not all(torch.isfinite(p).all() for p in model.parameters()):
                status = f"diverged (non-finite weights at epoch {epoch + 1}, step {step + 1})"
                break
            for k, v in (("loss", loss), ("forget", forget), ("retain", retain)):
                sums[k] += v.item()
        train_seconds = time.time() - t0
        if status != "ok":
            log(f"[{name}] {status}; stopping this method")
            break
        logs = evaluate(model, enc, st, ref_model=target)
        metrics = tofu_eval.aggregate(logs, retain_logs)
        seconds += time.time() - t0
        rec = {"method": name, "epoch": epoch + 1, "status": status,
               **{f"train_{k}": v / steps_per_epoch for k, v in sums.items()},
               "seconds": seconds, **metrics}
        records.append(rec)
        # the epoch's logs (the last epoch's feed samples.md), its record, then the resumable state
        tofu_eval.write_logs(out / "logs", logs)
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                    "seconds": seconds}, out / "state.tmp")
        os.replace(out / "state.tmp", out / "state.pt")
        tofu_eval.write_json_atomic(out / f"epoch_{epoch + 1:03d}.json", rec)
        eta = seconds / (epoch + 1 - start_epoch or 1) * (cfg.unlearn_epochs - epoch - 1)
        log(f"[{name}] epoch {epoch + 1}/{cfg.unlearn_epochs} loss {rec['train_loss']:.4f} "
            f"(forget {rec['train_forget']:.4f}, retain {rec['train_retain']:.4f}) "
            f"train {train_seconds:.1f}s | FQ {fmt_num(metrics['Forget Quality'])} "
            f"MU {metrics['Model Utility']:.4f} forget ROUGE {metrics['Forget ROUGE']:.3f} "
            f"| method eta {fmt_eta(eta)}")
    if status != "ok":
        records.append({"method": name, "epoch": len(records) + 1, "status": status,
                        "seconds": seconds})
        tofu_eval.write_json_atomic(out / f"epoch_{len(records):03d}.json", records[-1])
    tofu_eval.write_json_atomic(out / "done.json", {"status": status, "epochs": len(records)})
    (out / "state.pt").unlink(missing_ok=True)  # finished: only metrics and logs are kept
    return records


# ----------------------------------------------------------------------------- stage 6: report

def fmt_num(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and (v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e4)):
        return f"{v:.2e}"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


_WORD = re.compile(r"[a-z0-9]+")


def repeated_ngram_share(text: str, n: int = 3) -> float:
    """Share of a generation's word n-grams that repeat an earlier n-gram of it (0 = none)."""
    words = _WORD.findall(text.lower())
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def unknown_word_share(text: str, vocab: set[str]) -> float:
    """Share of a generation's words that never occur in the training text (gibberish)."""
    words = _WORD.findall(text.lower())
    return sum(w not in vocab for w in words) / len(words) if words else 0.0


def is_degenerate(text: str, vocab: set[str]) -> bool:
    """Degenerate: no word at all, at least half of its word 3-grams repeated, or at least half
    of its words unknown to the training text."""
    return (not _WORD.search(text.lower()) or repeated_ngram_share(text) >= 0.5
            or unknown_word_share(text, vocab) >= 0.5)


def training_vocabulary(data_dir) -> set[str]:
    """Every word of the fine-tuning text (full, real_authors, world_facts, refusals)."""
    rows = data.load_split(data_dir, "full") + base_rows(data_dir)
    texts = [r[k] for r in rows for k in ("question", "answer")] + data.load_idk(data_dir)
    return {w for t in texts for w in _WORD.findall(t.lower())}


def degeneracy(logs: dict, vocab: set[str]) -> dict:
    """Degeneracy figures of the forget-question generations in `logs`."""
    gens = [g for _, g, _ in generations(logs)]
    n = max(len(gens), 1)
    return {"Degenerate Share": sum(is_degenerate(g, vocab) for g in gens) / n,
            "Repeated 3-gram Share": sum(repeated_ngram_share(g) for g in gens) / n,
            "Unknown Word Share": sum(unknown_word_share(g, vocab) for g in gens) / n}


def generations(logs: dict) -> list[tuple[str, str, str]]:
    """(question, generation, ground truth) of the forget split, in row order."""
    gen = logs["eval_log_forget"]["generated_text"]
    items = gen.values() if isinstance(gen, dict) else gen
    return [tuple(x) for x in items]


def best_epoch(records: list[dict], target_mu: float) -> dict | None:
    """Best epoch = highest Forget Quality among epochs whose Model Utility is at least 90% of
    the target model's; None when no epoch keeps that much utility."""
    ok = [r for r in records if r.get("status") == "ok" and r.get("Forget Quality") is not None
          and r["Model Utility"] >= 0.9 * target_mu]
    return max(ok, key=lambda r: r["Forget Quality"]) if ok else None


def report(st: Stages, target_rec: dict, retain_rec: dict, results: dict, method_dirs: dict) -> None:
    cfg, run = st.cfg, st.run_dir
    lines = [target_rec, retain_rec] + [r for recs in results.values() for r in recs]
    write_text_atomic(run / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in lines))

    target_mu = target_rec["Model Utility"]
    md = [f"# TOFU unlearning: {'real TOFU' if st.real_data else 'built-in TOFU-style data'}, {cfg.split}",
          "",
          f"Model {cfg.n_layer} layers x {cfg.n_embd}, vocab {cfg.vocab_size}; unlearning "
          f"{cfg.unlearn_epochs} epochs, lr {cfg.unlearn_lr}, batch {cfg.unlearn_batch_size}, "
          f"beta {cfg.beta}. Best epoch = highest Forget Quality among epochs whose Model Utility "
          f"is >= 90% of the target model's.",
          "",
          "| model / method | status | FQ final | MU final | forget ROUGE final | FQ best | MU best | best epoch | degenerate | wall s |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for rec, label in ((target_rec, "target (before unlearning)"), (retain_rec, "retain model")):
        md.append(f"| {label} | - | {fmt_num(rec['Forget Quality'])} | {fmt_num(rec['Model Utility'])} | "
                  f"{fmt_num(rec['Forget ROUGE'])} | | | | {rec['Degenerate Share']:.2f} | |")
    for name, recs in results.items():
        ok = [r for r in recs if r.get("status") == "ok"]
        final = ok[-1] if ok else {}
        status = recs[-1]["status"] if recs else "no epochs"
        best = best_epoch(recs, target_mu)
        g = final.get("Degenerate Share")
        seconds = f"{recs[-1]['seconds']:.1f}" if recs else "n/a"
        md.append(f"| {name} | {status} | {fmt_num(final.get('Forget Quality'))} | "
                  f"{fmt_num(final.get('Model Utility'))} | {fmt_num(final.get('Forget ROUGE'))} | "
                  f"{fmt_num(best['Forget Quality']) if best else 'n/a'} | "
                  f"{fmt_num(best['Model Utility']) if best else 'n/a'} | "
                  f"{best['epoch'] if best else 'n/a'} | {'n/a' if g is None else f'{g:.2f}'} | "
                  f"{seconds} |")
    md += ["", "FQ = Forget Quality (KS-test p-value against the retain model), MU = Model Utility, "
           "degenerate = share of forget-question generations that are degenerate (see samples.md), "
           "wall s = training and evaluation time of the method.", ""]
    text = "\n".join(md)
    write_text_atomic(run / "summary.md", text)
    print(text)
    plot(st, target_rec, retain_rec, results)
    samples(st, results, method_dirs)


def plot(st: Stages, target_rec: dict, retain_rec: dict, results: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    floor = 1e-30  # a p-value of exactly 0 cannot sit on a log axis
    for name, recs in results.items():
        pts = [(target_rec["Model Utility"], target_rec["Forget Quality"])] + [
            (r["Model Utility"], r["Forget Quality"]) for r in recs if r.get("status") == "ok"]
        xs, ys = zip(*[(x, max(y, floor)) for x, y in pts])
        (line,) = ax.plot(xs, ys, "-o", ms=3, label=name)
        if recs and recs[-1].get("status") != "ok":
            ax.plot(xs[-1], ys[-1], "x", ms=10, color=line.get_color())
    ax.plot(target_rec["Model Utility"], max(target_rec["Forget Quality"], floor), "k*", ms=14,
            label="target (before unlearning)")
    ax.plot(retain_rec["Model Utility"], retain_rec["Forget Quality"], "P", color="gold", ms=12,
            markeredgecolor="k", label="retain model")
    ax.set_yscale("log")
    ax.set_xlabel("Model Utility")
    ax.set_ylabel("Forget Quality (KS-test p-value)")
    ax.set_title(f"TOFU {st.cfg.split}: one point per epoch, starting at the target model")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    tmp = st.run_dir / "tofu.tmp.png"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, st.run_dir / "tofu.png")
    plt.close(fig)


def samples(st: Stages, results: dict, method_dirs: dict, n_questions: int = 5) -> None:
    md = [f"# Generations on forget questions ({st.cfg.split}), after the last epoch", ""]
    per_method = {}
    for name, out in method_dirs.items():
        logs_dir = out / "logs"
        if (logs_dir / "eval_log_forget.json").exists():
            per_method[name] = generations(tofu_eval.read_logs(logs_dir, stems=("eval_log_forget",)))
    if per_method:
        first = next(iter(per_method.values()))
        for i in range(min(n_questions, len(first))):
            q, _, truth = first[i]
            md += [f"## Q{i + 1}. {q}", "", f"- **ground truth**: {truth}"]
            md += [f"- **{name}**: {gens[i][1]!r}" for name, gens in per_method.items()]
            md.append("")
    md += ["## Degeneracy", "",
           "Per method, over all forget-question generations: the share that is degenerate (no "
           "word, at least half of its word 3-grams repeated, or at least half of its words absent "
           "from the training text), the mean share of repeated 3-grams, and the mean share of "
           "unknown words.", "",
           "| method | status | degenerate | repeated 3-grams | unknown words |", "|---|---|---|---|---|"]
    for name, recs in results.items():
        final = recs[-1] if recs else {}
        if "Degenerate Share" in final:
            md.append(f"| {name} | {final['status']} | {final['Degenerate Share']:.2f} | "
                      f"{final['Repeated 3-gram Share']:.2f} | {final['Unknown Word Share']:.2f} |")
        else:
            md.append(f"| {name} | {final.get('status', 'no epochs')} | n/a | n/a | n/a |")
    write_text_atomic(st.run_dir / "samples.md", "\n".join(md) + "\n")


# ----------------------------------------------------------------------------- main

def run(cfg: TofuConfig) -> Path:
    t_start = time.time()
    torch.manual_seed(cfg.seed)
    st = Stages(cfg)
    st.run_dir.mkdir(parents=True, exist_ok=True)
    log(f"run {st.run_dir} | data {st.data_key} | split {cfg.split} | methods {cfg.methods}")

    prepare_data(st)
    perturbed = st.data_dir / f"{cfg.split}_perturbed.json"
    if not perturbed.exists():
        raise ConfigError(f"{perturbed}: not found; evaluating {cfg.split} needs it (TOFU publishes "
                          f"it for forget01/05/10 only; the built-in data has it for every split)")
    enc = prepare_tokenizer(st)
    if cfg.max_new_tokens <= 0:
        cfg.max_new_tokens = longest_eval_answer(enc, st)
        st.refresh_keys()
    tofu_eval.write_json_atomic(st.run_dir / "config.json", asdict(cfg))
    base_path = prepare_base(st, enc)
    target_path = prepare_finetuned(st, enc, base_path, "target")
    retain_path = prepare_finetuned(st, enc, base_path, "retain")

    target, _ = load_checkpoint(target_path, map_location=cfg.device)
    target.eval()
    for p in target.parameters():
        p.requires_grad_(False)
    vocab = training_vocabulary(st.data_dir)
    retain_logs = cached_eval(st, enc, "retain", retain_path)
    target_logs = cached_eval(st, enc, "target", target_path, model=target, ref_model=target)
    target_rec = {"method": "target", "epoch": 0, "status": "ok",
                  **tofu_eval.aggregate(target_logs, retain_logs),
                  **degeneracy(target_logs, vocab)}
    retain_rec = {"method": "retain", "epoch": 0, "status": "ok",
                  **tofu_eval.aggregate(retain_logs, retain_logs),
                  **degeneracy(retain_logs, vocab)}
    log(f"target: FQ {fmt_num(target_rec['Forget Quality'])} MU {target_rec['Model Utility']:.4f} | "
        f"retain: MU {retain_rec['Model Utility']:.4f}")

    ud = None  # built (reference log-probs included) only when a method still has work to do
    results, method_dirs = {}, {}
    for i, name in enumerate(method_list(cfg)):
        log(f"stage unlearning: method {i + 1}/{len(method_list(cfg))}: {name}")
        if ud is None and not (method_dir(st, name) / "done.json").exists():
            ud = UnlearningData(st, enc, target)
        recs = run_method(name, st, enc, target_path, target, ud, retain_logs)
        out = method_dirs[name] = method_dir(st, name)
        if recs and recs[-1].get("status") == "ok" and (out / "logs").exists():
            recs[-1].update(degeneracy(tofu_eval.read_logs(out / "logs", stems=("eval_log_forget",)), vocab))
        results[name] = recs
    report(st, target_rec, retain_rec, results, method_dirs)
    log(f"done in {time.time() - t_start:.0f}s: {st.run_dir}")
    return st.run_dir


def main(argv=None) -> int:
    try:
        cfg = parse_config(argv)
        run(cfg)
    except (ConfigError, data.DataError, CheckpointError, tofu_eval.LogError) as e:
        print(f"train_tofu.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
