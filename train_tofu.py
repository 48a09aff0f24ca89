"""TOFU unlearning end to end: data -> target and retain models -> unlearning with each method and
seed -> TOFU metrics after every epoch -> the Forget Quality / Model Utility frontier.

    python train_tofu.py                                  # built-in TOFU-style data, on a CPU
    python train_tofu.py --data-dir ../shared/tofu --split forget10
    python train_tofu.py --data-dir DIR --model FULL_DIR --retain-model RETAIN_DIR   # a real LLM
    python train_tofu.py --data-dir DIR --base-model PRETRAINED_DIR       # fine-tune target/retain first
    python train_tofu.py --model DIR --dry-run                            # memory estimate only
    torchrun --nproc_per_node 4 train_tofu.py --device cuda ...           # 4 GPUs: DDP or FSDP2 (--parallel)

Without --model, the target and retain models are trained here: the built-in GPT from scratch
(or --base-model) fine-tuned on `full` (target) and on `retainYY` (retain model). Every stage
writes into one run directory, out/tofu/<run name>/, and is skipped when its finished output is
there; a run directory belongs to one configuration. Unlearning saves its state after every epoch,
so a killed run resumes where it stopped, with the same numbers. Every unlearned model is kept as a
Hugging Face directory (unlearn/<method>/seed<k>/model).
"""

import argparse
import json
import math
import operator
import os
import re
import signal
import sys
import time
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

import data
import distributed
import eval as tofu_eval
import npo
import model as models
import report
import tofu_style


def option(default, help, **checks):
    """A config field: its --help, its choices (argparse checks them), and bounds that validate()
    checks, as operator names (ge=1: the value must be >= 1; gt: >; le: <=)."""
    return field(default=default, metadata={"help": help, **checks})


# the built-in data's authors: every first name with every surname
MAX_AUTHORS = len(tofu_style._FIRST_NAMES) * len(tofu_style._SURNAMES)


@dataclass
class Config:
    # data
    data_dir: str | None = option(None, "directory of TOFU's .json files (else $TOFU_DATA_DIR, else the built-in TOFU-style data)")
    split: str = option("forget10", "forget split, forget01 ... forget90")
    n_authors: int = option(40, "authors in the built-in data (TOFU has 200)", ge=10, le=MAX_AUTHORS)
    data_seed: int = option(0, "seed of the built-in data", ge=0)
    # models: Hugging Face directories, or the built-in GPT trained here
    model: str | None = option(None, "fine-tuned target model (Hugging Face directory); skips base and target training")
    retain_model: str | None = option(None, "retain model directory, for Forget Quality (default: trained here)")
    retain_logs: str | None = option(None, "the retain model's TOFU-format eval logs, instead of --retain-model")
    base_model: str | None = option(None, "pretrained model directory to fine-tune into the target and retain models")
    prompt_format: str | None = option(None, "prompt format (default: from the model)", choices=tuple(data.PROMPT_FORMATS))
    vocab_size: int = option(2048, "built-in GPT: BPE vocabulary size (256 bytes + end of text + merges)", ge=257)
    n_layer: int = option(2, "built-in GPT: layers", ge=1)
    n_head: int = option(4, "built-in GPT: attention heads", ge=1)
    n_embd: int = option(128, "built-in GPT: width", ge=1)
    block_size: int = option(256, "built-in GPT: longest sequence", ge=1)
    base_epochs: int = option(60, "built-in GPT: epochs on real_authors + world_facts", ge=0)
    base_lr: float = option(3e-3, "built-in GPT: learning rate of base training", gt=0)
    finetune_epochs: int | None = option(None, "epochs of target/retain fine-tuning (TOFU: 5; built-in GPT: 30)", ge=0)
    finetune_lr: float | None = option(None, "fine-tuning learning rate (TOFU: 1e-5; built-in GPT: 3e-3)", gt=0)
    mix_base: bool = option(True, "built-in GPT: keep the base QA pairs in every fine-tuning epoch")
    # unlearning
    methods: str = option("ga,ga_rt,ga_kl,npo,npo_rt,npo_kl", "comma-separated methods, from npo.METHODS (also idk, dpo, dpo_rt, dpo_kl, simnpo, simnpo_rt)")
    seeds: int = option(3, "unlearning seeds per method: seed, seed + 1, ...", ge=1)
    epochs: int = option(10, "unlearning epochs", ge=1)
    lr: float | None = option(None, "peak unlearning learning rate (authors: 1e-5; built-in GPT: 2e-3)", gt=0)
    batch_size: int = option(32, "examples per optimizer step (the authors' 4 x 4 x 2 GPUs)", ge=1)
    micro_batch_size: int | None = option(None, "examples per forward pass; loss averaged over micro-batches (default: batch size on CPU, 4 on CUDA, or 2 or 1 where 4 does not divide it)", ge=1)
    beta: float = option(0.1, "inverse temperature of NPO, DPO and SimNPO", gt=0)
    delta: float = option(0.0, "SimNPO's margin", ge=0)
    forget_coef: float = option(1.0, "weight of the forget term", ge=0)
    retain_coef: float = option(1.0, "weight of the retain term (RT or KL)", ge=0)
    kl_positions: str = option("answer", "KL term over 'answer' tokens, or 'all' positions of the padded batch (the authors' code)", choices=("answer", "all"))
    weight_decay: float = option(0.01, "AdamW weight decay (not on biases and norms, as HF's Trainer)", ge=0)
    # evaluation
    ds_size: int = option(300, "rows of each evaluation split (TOFU: 300)", ge=1)
    eval_batch_size: int = option(128, "sequences per evaluation batch", ge=1)
    max_new_tokens: int | None = option(None, "generation length for ROUGE (default: TOFU's bound, 200 tokens with the prompt; built-in GPT: the longest evaluated answer)", ge=1)
    # system
    seed: int = option(0, "first unlearning seed, and the seed of base training and fine-tuning", ge=0, le=2**63 - 1)
    device: str = option("cpu", "cpu, cuda or cuda:N")
    dtype: str = option("float32", "weights: float32, or bfloat16 (bf16 weights and optimizer state)", choices=("float32", "bfloat16"))
    optimizer: str = option("adamw", "adamw, or adafactor (factored second moments; an 8B model with --dtype bfloat16: 31 GiB)", choices=("adamw", "adafactor"))
    grad_checkpointing: bool = option(False, "recompute each block in backward (less activation memory)")
    logprob: str = option("plain", "plain (logits) or fused (answer positions only, chunked; for large vocabularies)", choices=("plain", "fused"))
    threads: int = option(1, "torch CPU threads per process (results are pinned to it)", ge=1)
    workers: int = option(2, "processes running jobs (seeds, methods, target/retain) side by side; 1 on CUDA", ge=1)
    parallel: str = option("auto", "under torchrun: ddp (a model copy per process), fsdp (FSDP2: weights, gradients and optimizer state sharded), or auto (ddp where --dry-run's estimate fits a GPU)", choices=("auto", "ddp", "fsdp"))
    out_dir: str = option("out/tofu", "output root")
    run_name: str | None = option(None, "run directory name, inside --out-dir (default: from the data and split)")
    dry_run: bool = option(False, "print the memory estimate for the chosen model and batch, then stop")


# Options that only choose WHICH jobs run; every other option changes results, so a run directory
# refuses a configuration that differs in any of them.
SCOPE_OPTIONS = {"methods", "seeds", "workers", "parallel", "out_dir", "run_name", "dry_run", "eval_batch_size"}
BUILTIN = dict(finetune_epochs=30, finetune_lr=3e-3, lr=2e-3)  # the built-in GPT's recipe
HF = dict(finetune_epochs=5, finetune_lr=1e-5, lr=1e-5)  # TOFU's and the NPO authors' recipe


class ConfigError(ValueError):
    pass


def parse_args(argv=None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(Config):
        name, kind = "--" + f.name.replace("_", "-"), typing.get_args(f.type)[0] if typing.get_args(f.type) else f.type
        if kind is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            parser.add_argument(name, type=kind, default=f.default, help=f.metadata["help"], choices=f.metadata.get("choices"))
    cfg = Config(**vars(parser.parse_args(argv)))
    cfg.data_dir = cfg.data_dir or os.environ.get("TOFU_DATA_DIR")
    for key, value in (HF if cfg.model or cfg.base_model else BUILTIN).items():
        setattr(cfg, key, value if getattr(cfg, key) is None else getattr(cfg, key))
    if cfg.micro_batch_size is None:
        cfg.micro_batch_size = math.gcd(4, cfg.batch_size) if cfg.device.startswith("cuda") else cfg.batch_size
    problems = validate(cfg)
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    return cfg


BOUNDS = {"ge": ">=", "gt": ">", "le": "<="}  # option()'s bounds: operator name -> symbol


def validate(cfg: Config) -> list[str]:
    """Every problem of the configuration, before any work starts: each option against its bounds,
    then the options against each other, the paths, and the data files they name."""
    problems = []

    def need(ok, message):
        if not ok:
            problems.append(message)

    for f in fields(Config):
        value, flag, checks = getattr(cfg, f.name), "--" + f.name.replace("_", "-"), f.metadata
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{flag} {value}: must be a finite number")
        elif value is not None:
            problems += [f"{flag} {value}: must be {symbol} {checks[op]}" for op, symbol in BOUNDS.items()
                         if op in checks and not getattr(operator, op)(value, checks[op])]
    need(cfg.n_head < 1 or cfg.n_embd % cfg.n_head == 0, f"--n-embd {cfg.n_embd} must be divisible by --n-head {cfg.n_head}")
    need(cfg.micro_batch_size < 1 or cfg.batch_size % cfg.micro_batch_size == 0,
         f"--batch-size {cfg.batch_size} must be a multiple of --micro-batch-size {cfg.micro_batch_size}")
    split_ok = re.fullmatch(data.FORGET_SPLIT, cfg.split)
    need(split_ok, f"--split {cfg.split!r}: expected forgetXX, e.g. forget10")
    need(not split_ok or cfg.data_dir or int(cfg.split[6:]) in tofu_style.FORGET_PERCENTS,
         f"--split {cfg.split}: the built-in data has {', '.join(f'forget{p:02d}' for p in tofu_style.FORGET_PERCENTS)}")
    for name in methods_of(cfg):
        need(name in npo.METHODS, f"--methods: unknown method {name!r}; valid: {', '.join(npo.METHODS)}")
    need(bool(methods_of(cfg)), "--methods: no method given")
    need(not (cfg.retain_model and cfg.retain_logs), "--retain-model and --retain-logs: give one, not both")
    need(not (cfg.model and cfg.base_model), "--model and --base-model: give one, not both")
    need(not (cfg.model and not (cfg.retain_model or cfg.retain_logs)) or cfg.dry_run,
         "--model needs --retain-model or --retain-logs (Forget Quality compares with the retain model)")
    need(not (cfg.model or cfg.base_model) or cfg.data_dir or cfg.dry_run,
         f"--{'model' if cfg.model else 'base-model'} (a Hugging Face model) needs TOFU's files: --data-dir")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", cfg.device):
        problems.append(f"--device {cfg.device!r}: expected cpu, cuda or cuda:N")
    elif cfg.device != "cpu" and not cfg.dry_run and int(cfg.device.partition(":")[2] or 0) >= torch.cuda.device_count():
        problems.append(f"--device {cfg.device}: no such CUDA device here ({torch.cuda.device_count()} found)")
    # paths, as they will be used: model directories, logs that read, the data's files, a writable output
    for name in ("model", "retain_model", "base_model"):
        path = getattr(cfg, name)
        need(path is None or (Path(path) / "config.json").is_file(), f"--{name.replace('_', '-')} {path}: not a model directory (no config.json)")
    need(cfg.data_dir is None or Path(cfg.data_dir).is_dir(), f"--data-dir {cfg.data_dir}: not a directory")
    missing = None
    if split_ok and cfg.data_dir and Path(cfg.data_dir).is_dir():
        data_dir = Path(cfg.data_dir)
        missing = [f"{s}.json" for s in data_splits(Run(cfg)) if not (data_dir / f"{s}.json").is_file()]
        missing += [] if (data_dir / data.IDK_FILE).is_file() else [data.IDK_FILE]
        need(not missing, f"--data-dir {cfg.data_dir}: no {', '.join(missing)} (for --split {cfg.split})")
    if cfg.retain_logs:
        try:
            retain = tofu_eval.read_logs(cfg.retain_logs, (tofu_eval.FORGET_STEM,))[tofu_eval.FORGET_STEM]
            rows = tofu_eval.log_rows(retain, cfg.retain_logs)
            if missing == []:  # the data is all there: Forget Quality compares the same questions
                split = tofu_eval.default_eval_forget_split(data_dir, cfg.split)
                why = tofu_eval.retain_rows_mismatch(retain, rows, cfg.retain_logs, data_dir, split, cfg.ds_size)
                need(why is None, f"--retain-logs: {why}")
        except data.DataError as e:  # the forget split does not read
            problems.append(f"--data-dir: {e}")
        except ValueError as e:
            problems.append(f"--retain-logs: {e}")
    need(not cfg.run_name or Path(cfg.run_name).name == cfg.run_name != "..", f"--run-name {cfg.run_name!r}: expected a directory name, not a path")
    run_dir = Path(cfg.out_dir) / (cfg.run_name or "")
    existing = next((p for p in [run_dir, *run_dir.parents] if p.exists()), Path("."))
    flag = f"--run-name {cfg.run_name}" if cfg.run_name and existing == run_dir else f"--out-dir {cfg.out_dir}"
    need(existing.is_dir() and os.access(existing, os.W_OK), f"{flag}: {existing} is not a writable directory")
    return problems


def methods_of(cfg: Config) -> list[str]:
    return [m.strip() for m in cfg.methods.split(",") if m.strip()]


# ----------------------------------------------------------------------------- small utilities

def log(message: str) -> None:
    if distributed.is_main():  # --- distributed: rank 0 speaks for all
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def write_json(path: Path, obj) -> None:
    data.write_atomic(path, json.dumps(obj, indent=1, allow_nan=True))


def read_json(path: Path):
    """A stored record, or None (with a warning) when it is missing or unreadable: rebuild it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log(f"warning: {path} is unreadable ({type(e).__name__}); rebuilding it")
        return None


def lr_at(step: int, steps_per_epoch: int, total_steps: int, peak: float) -> float:
    """HF's linear schedule as the authors use it: warmup over one epoch of steps, then linear
    decay to 0 at the last step (HF's first step runs at lr 0)."""
    if step < steps_per_epoch:
        return peak * step / steps_per_epoch
    return peak * max(0.0, (total_steps - step) / max(1, total_steps - steps_per_epoch))


def make_optimizer(model, lr: float, cfg: Config):
    """AdamW (or Adafactor) with weight decay on matrices only, as HF's Trainer."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adafactor":
        return torch.optim.Adafactor(groups, lr=lr)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=True)  # fused: one kernel, no temporaries


class Run:
    """Where everything of one configuration lives, and what it loads."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        name = cfg.run_name or f"{Path(cfg.model or cfg.base_model or 'builtin').name}-{'tofu' if cfg.data_dir else 'generated'}-{cfg.split}"
        self.dir = Path(cfg.out_dir) / name
        self.data_dir = Path(cfg.data_dir) if cfg.data_dir else self.dir / "data"
        self.retain_split = data.retain_split_for(cfg.split)
        self.methods = methods_of(cfg)

    def claim(self) -> None:
        """A run directory belongs to one configuration: refuse another, naming what differs."""
        mine, stored = asdict(self.cfg), read_json(self.dir / "config.json")
        if stored is not None:
            differ = sorted(k for k in (mine.keys() | stored.keys()) - SCOPE_OPTIONS - {"torch"}
                            if mine.get(k) != stored.get(k))
            if differ:
                names = ", ".join("--" + k.replace("_", "-") for k in differ)
                raise ConfigError(f"{self.dir} holds a run with other options ({names}); choose another --run-name or --out-dir")
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.dir / "config.json", {**mine, "torch": torch.__version__})

    def load(self, model_dir):
        net = models.from_pretrained(model_dir, dtype=getattr(torch, self.cfg.dtype), device=self.cfg.device)
        net.gradient_checkpointing = self.cfg.grad_checkpointing
        return net

    def retain_logs(self) -> dict:
        """The retain model's forget log, which Forget Quality compares against."""
        where = Path(self.cfg.retain_logs) if self.cfg.retain_logs else self.dir / "eval" / "retain"
        return tofu_eval.read_logs(where, (tofu_eval.FORGET_STEM,))

    def tokenizer(self, model_dir):
        tok = data.load_tokenizer(model_dir)
        return tok, data.PROMPT_FORMATS[self.cfg.prompt_format or data.default_prompt_format(model_dir, tok)]


# ----------------------------------------------------------------------------- the training loop

def train(net, loss_fn, n_examples: int, *, epochs: int, lr: float, cfg: Config, seed: int, tag: str,
          start_epoch=0, optimizer=None, on_epoch_end=None) -> str:
    """Minimise loss_fn(example indices) -> (loss, stats) over n_examples for `epochs` epochs.

    Each epoch is one permutation (drawn from a generator seeded once, so epoch k's order is the
    same whether or not the run resumed), cut into batches of cfg.batch_size, each the mean of its
    micro-batches' losses (as HF's gradient accumulation). Gradients are clipped at norm 1 (HF's
    default). Returns "ok", or "diverged (...)" when a loss or a weight becomes non-finite.
    Under torchrun each process runs its share of every step's micro-batches, as many calls on each.
    """
    optimizer = optimizer or make_optimizer(net, lr, cfg)
    generator = torch.Generator().manual_seed(seed)
    orders = [torch.randperm(n_examples, generator=generator).tolist() for _ in range(epochs)]
    steps_per_epoch = math.ceil(n_examples / cfg.batch_size)
    total_steps, t0 = epochs * steps_per_epoch, time.time()
    cuda = cfg.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()  # the peak each epoch reports: training's, to set against --dry-run
    for epoch in range(start_epoch, epochs):
        net.train()
        sums, n_micro = {}, 0
        for step in range(steps_per_epoch):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(epoch * steps_per_epoch + step, steps_per_epoch, total_steps, lr)
            batch = orders[epoch][step * cfg.batch_size:(step + 1) * cfg.batch_size]
            micro_batches = [batch[i:i + cfg.micro_batch_size] for i in range(0, len(batch), cfg.micro_batch_size)]
            optimizer.zero_grad(set_to_none=True)
            share = distributed.rank_share(micro_batches)  # --- distributed: as many on every process
            for call, (idx, mine) in enumerate(share):
                with distributed.skip_gradient_sync(net, call < len(share) - 1):  # --- distributed
                    with autocast(cfg):
                        loss, stats = loss_fn(idx)
                    if distributed.any_process(not math.isfinite(stats["loss"])):  # --- distributed: all stop together
                        return f"diverged (non-finite loss at epoch {epoch + 1}, step {step + 1})"
                    # --- distributed: DDP and FSDP average over processes; a stand-in weighs 0
                    (loss * (distributed.world_size() * mine) / len(micro_batches)).backward()
                sums = {k: sums.get(k, 0.0) + mine * v for k, v in stats.items()}
                n_micro += mine
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            optimizer.step()
        if distributed.any_process(not all(torch.isfinite(distributed.local_tensor(p)).all() for p in net.parameters())):
            return f"diverged (non-finite weights in epoch {epoch + 1})"
        n_micro, *totals = distributed.all_sum(torch.tensor([n_micro, *sums.values()], dtype=torch.float64)).tolist()  # --- distributed
        means = {k: v / n_micro for k, v in zip(sums, totals)}
        eta = (time.time() - t0) / (epoch + 1 - start_epoch) * (epochs - epoch - 1)
        log(f"[{tag}] epoch {epoch + 1}/{epochs} " + " ".join(f"{k} {v:.4g}" for k, v in means.items())
            + f" | {time.time() - t0:.0f}s, eta {eta:.0f}s" + (f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else ""))
        if on_epoch_end is not None:
            on_epoch_end(epoch, means)
    return "ok"


def mixed_precision(cfg: Config) -> bool:
    # fp32 weights on CUDA compute in bf16 (fp32 master weights); bf16 weights need nothing more
    return cfg.device.startswith("cuda") and cfg.dtype == "float32"


def autocast(cfg: Config):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=mixed_precision(cfg))


class Pairs:
    """Encoded (question, answer) pairs, batched on demand."""

    def __init__(self, tok, fmt, rows, cfg: Config):
        self.pairs = [data.encode_qa(tok, fmt, r["question"], r["answer"]) for r in rows]
        self.pad_id, self.cfg = tok.pad_id, cfg

    def __len__(self):
        return len(self.pairs)

    def batch(self, idx):
        return tuple(t.to(self.cfg.device) for t in data.collate([self.pairs[i] for i in idx], self.pad_id))

    def scores(self, net, idx, ref=None) -> npo.Scores:
        logp, n = models.answer_logprob(net, *self.batch(idx), fused=self.cfg.logprob == "fused")
        return npo.Scores(logp, n, None if ref is None else ref[idx].to(logp.device))

    @torch.no_grad()
    def reference(self, net) -> torch.Tensor:
        """log pi_ref of every answer (N,), net the reference: computed once, as the answers never
        change. Each value comes from the process that computed it (zeros elsewhere), summed."""
        net.eval()
        size, logp = self.cfg.eval_batch_size, torch.zeros(len(self))
        batches = [range(s, min(s + size, len(self))) for s in range(0, len(self), size)]
        for idx, mine in distributed.rank_share(batches):  # --- distributed: a share each, summed below
            with autocast(self.cfg):
                batch_logp = self.scores(net, idx).logp
            if mine:
                logp[list(idx)] = batch_logp.cpu()
        return distributed.all_sum(logp)


# ----------------------------------------------------------------------------- stages

def finished(path: Path, load) -> bool:
    """Whether path holds a finished stage (its done.json) whose output loads; a broken one is
    rebuilt, with a warning, never trusted and never a crash."""
    if read_json(path / "done.json") is None:
        return False
    try:
        load(path)
        return True
    except (ValueError, OSError, RuntimeError, KeyError, TypeError) as e:
        log(f"warning: {path} cannot be loaded ({type(e).__name__}: {str(e)[:100]}); rebuilding it")
        (path / "done.json").unlink(missing_ok=True)  # --- distributed: every process may get here
        return False


def load_model_dir(path: Path) -> None:
    models.from_pretrained(path)
    data.load_tokenizer(path)


def prepare_data(run: Run) -> None:
    """The data (generated for the built-in run), the tokenizer, and a check that every pair fits
    the model, before any training."""
    cfg = run.cfg
    if not cfg.data_dir and not finished(run.data_dir, lambda path: [data.load_split(path, s) for s in data_splits(run)]):
        tofu_style.write_tofu_style_dataset(run.data_dir, n_authors=cfg.n_authors, seed=cfg.data_seed)
        write_json(run.data_dir / "done.json", {"n_authors": cfg.n_authors, "seed": cfg.data_seed})
    model_dir = cfg.model or cfg.base_model
    if model_dir:
        tok, fmt = run.tokenizer(model_dir)
        limit = models.load_config(model_dir).block_size
    else:
        tokenizer_dir = run.dir / "tokenizer"
        if not finished(tokenizer_dir, data.load_tokenizer):
            tok = data.bpe_tokenizer(data.train_bpe(data.corpus_texts(run.data_dir), cfg.vocab_size))
            tok.save(tokenizer_dir)
            write_json(tokenizer_dir / "done.json", {"vocab_size": tok.n_vocab})
        tok, fmt, limit = data.load_tokenizer(tokenizer_dir), data.PROMPT_FORMATS["qa"], cfg.block_size
    # every pair trained on, and every answer, paraphrase and perturbed answer scored, must fit
    eval_data = {s.data_split for s in tofu_eval.eval_splits(tofu_eval.default_eval_forget_split(run.data_dir, cfg.split))}
    eval_answers = []
    for split in data_splits(run):
        rows = data.load_split(run.data_dir, split)
        if split in eval_data:
            eval_answers += [r["answer"] for r in rows[:cfg.ds_size]]
            rows = [{"question": r["question"], "answer": a} for r in rows[:cfg.ds_size]
                    for a in (r["answer"], r.get("paraphrased_answer"), *r["perturbed_answer"]) if a]
        longest = max((len(data.encode_qa(tok, fmt, r["question"], r["answer"])[0]) for r in rows), default=0)
        if longest > limit:
            raise ConfigError(f"{'' if model_dir else f'--block-size {limit}: '}{run.data_dir}/{split}.json: a "
                              f"question-answer pair has {longest} tokens, more than the model's {limit} positions")
    if cfg.max_new_tokens is None and not model_dir:
        # a faithful answer ends by then, and a degenerate one need not run to TOFU's bound
        cfg.max_new_tokens = 1 + max(len(tok.encode(" " + answer)) for answer in eval_answers)


def data_splits(run: Run) -> list[str]:
    splits = tofu_eval.eval_splits(tofu_eval.default_eval_forget_split(run.data_dir, run.cfg.split))
    return ["full", run.retain_split, run.cfg.split, "real_authors", "world_facts"] + [s.data_split for s in splits]


def model_job(cfg: Config, which: str) -> None:
    """The model run.dir/which: "base", the built-in GPT trained from scratch on what a model knows
    before it meets the fictitious authors (real_authors + world_facts); "target" and "retain", the
    base model (or --base-model) fine-tuned on full and on retainYY."""
    torch.set_num_threads(cfg.threads)
    run = Run(cfg)
    t0 = time.time()

    def known():  # what a model knows before it meets the fictitious authors
        return data.load_split(run.data_dir, "real_authors") + data.load_split(run.data_dir, "world_facts")

    if which == "base":
        tok, fmt = data.load_tokenizer(run.dir / "tokenizer"), data.PROMPT_FORMATS["qa"]
        torch.manual_seed(cfg.seed)
        net = models.GPT(models.GPTConfig(vocab_size=tok.n_vocab, block_size=cfg.block_size, n_layer=cfg.n_layer,
                                          n_head=cfg.n_head, n_embd=cfg.n_embd)).to(cfg.device)
        rows, epochs, lr, seed, info = known(), cfg.base_epochs, cfg.base_lr, cfg.seed, {}
        source = f"{net.num_params() / 1e6:.2f}M-parameter GPT from scratch"
    else:
        base_dir = cfg.base_model or str(run.dir / "base")
        net, (tok, fmt) = run.load(base_dir), run.tokenizer(base_dir)
        split = "full" if which == "target" else run.retain_split
        rows = data.load_split(run.data_dir, split)
        if not cfg.base_model and cfg.mix_base:  # a tiny model otherwise overwrites what it knew
            rows = rows + known()
        epochs, lr, seed, info = cfg.finetune_epochs, cfg.finetune_lr, cfg.seed + 1, {"split": split}
        source = f"fine-tune {base_dir} on {split}"
    net = distribute(net, cfg)
    pairs = Pairs(tok, fmt, rows, cfg)  # lengths checked in prepare_data
    log(f"stage {which}: {source} ({len(pairs)} pairs), {epochs} epochs")

    def nll_loss(idx):
        loss = npo.retain_nll(*pairs.scores(net, idx)[:2])
        return loss, {"loss": loss.item()}

    status = train(net, nll_loss, len(pairs), epochs=epochs, lr=lr, cfg=cfg, seed=seed, tag=which)
    whole = distributed.whole_model(net, models.GPT)  # --- distributed: on rank 0, None elsewhere
    if whole is not None:
        models.save_pretrained(whole, run.dir / which)
        tok.save(run.dir / which)
        write_json(run.dir / which / "done.json", {"status": status, **info, "seconds": time.time() - t0})
    distributed.barrier()  # --- distributed: written before any process looks


def evaluate(run: Run, net, tok, fmt, ref=None) -> dict:
    cfg = run.cfg
    with autocast(cfg):
        return tofu_eval.evaluate_model(net, tok, fmt, run.data_dir, cfg.split, ds_size=cfg.ds_size,
                                        batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens,
                                        fused=cfg.logprob == "fused", ref_model=ref)


def eval_job(cfg: Config, model_dir: str, which: str) -> None:
    """TOFU logs of the target or retain model, kept in the run directory."""
    torch.set_num_threads(cfg.threads)
    run = Run(cfg)
    net = run.load(model_dir)
    tok, fmt = run.tokenizer(model_dir)
    t0 = time.time()
    logs = evaluate(run, net, tok, fmt)  # --- distributed: each process a share, the whole gathered
    if distributed.is_main():
        tofu_eval.write_logs(run.dir / "eval" / which, logs)
        write_json(run.dir / "eval" / which / "done.json", {"model": model_dir, "seconds": time.time() - t0})
    log(f"stage eval {which}: {time.time() - t0:.1f}s")


# ----------------------------------------------------------------------------- unlearning

def unlearn_job(cfg: Config, target_dir: str, name: str, seed: int) -> None:
    """One method, one seed: cfg.epochs epochs from the target, TOFU metrics after each. Each epoch
    writes its logs, then its record, then the state that claims it, so a kill at any instant
    resumes (from the state) to the same records."""
    torch.set_num_threads(cfg.threads)
    run = Run(cfg)
    out = run.dir / "unlearn" / name / f"seed{seed}"
    if finished(out, check_job_records):
        return
    method = replace(npo.get_method(name), forget_coef=cfg.forget_coef, retain_coef=cfg.retain_coef)
    net = distribute(run.load(target_dir), cfg)
    # --- distributed: made before any forward, after which FSDP keeps the root's parameters gathered
    optimizer = make_optimizer(net, cfg.lr, cfg)
    tok, fmt = run.tokenizer(target_dir)
    # pi_ref as a model only where a term needs it on changing batches (KL); frozen, in cfg.dtype
    ref_model = distribute(run.load(target_dir).eval().requires_grad_(False), cfg, frozen=True) if method.needs_ref_model else None
    retain_logs = run.retain_logs()
    forget_rows = data.load_split(run.data_dir, cfg.split)
    retain_rows = data.load_split(run.data_dir, run.retain_split)
    idk_answers = data.load_idk(run.data_dir)
    forget = Pairs(tok, fmt, forget_rows, cfg)
    retain = Pairs(tok, fmt, [retain_rows[(i + first_draw(i, len(retain_rows))) % len(retain_rows)]
                              for i in range(len(forget_rows))], cfg)
    idk = Pairs(tok, fmt, [{"question": r["question"], "answer": idk_answers[first_draw(i, len(idk_answers))]}
                           for i, r in enumerate(forget_rows)], cfg)
    # pi_ref on the forget and IDK answers, cached once: net is still the target here (resume() below
    # loads a saved state into it afterwards)
    forget_ref, idk_ref = forget.reference(net), idk.reference(net) if method.needs_idk else None
    retain_scores = {  # the retain term's per-sequence inputs
        "nll": lambda idx: retain.scores(net, idx),
        "kl": lambda idx: npo.Scores(*models.answer_kl(net, ref_model, *retain.batch(idx), all_positions=cfg.kl_positions == "all")),
    }

    def loss_fn(idx):
        return npo.unlearning_loss(
            method,
            forget=forget.scores(net, idx, forget_ref) if method.needs_forget else None,
            retain=retain_scores[method.retain](idx) if method.retain else None,
            idk=idk.scores(net, idx, idk_ref) if method.needs_idk else None,
            beta=cfg.beta, delta=cfg.delta)

    resumed = resume(out, net, optimizer)
    if resumed is None:
        return unlearn_job(cfg, target_dir, name, seed)
    start_epoch, seconds = resumed
    t0 = time.time() - seconds

    def on_epoch_end(epoch, train_stats):
        logs = evaluate(run, net, tok, fmt, ref=ref_model)
        # the whole model and optimizer state, keyed by parameter name, the same from one process,
        # DDP or FSDP (on rank 0, sharded ones gathered; empty elsewhere)
        model_state, optimizer_state = get_state_dict(distributed.resharded(net), optimizer, options=distributed.WHOLE_STATE)
        if not distributed.is_main():  # --- distributed: rank 0 writes
            return
        record = {"method": name, "seed": seed, "epoch": epoch + 1, "status": "ok",
                  **{f"train_{k}": v for k, v in train_stats.items()},
                  **tofu_eval.aggregate(logs, retain_logs), "seconds": time.time() - t0}
        tofu_eval.write_logs(out / "logs", logs)
        write_json(out / f"epoch_{epoch + 1:03d}.json", record)
        data.write_atomic(out / "state.pt", lambda path: torch.save(
            {"model": model_state, "optimizer": optimizer_state, "epoch": epoch + 1, "seconds": time.time() - t0}, path))
        log(f"[{name} seed {seed}] epoch {epoch + 1}: Forget Quality {record['Forget Quality']:.3g}, "
            f"Model Utility {record['Model Utility']:.3f}, W mean {train_stats.get('W_mean', float('nan')):.3f}")

    status = train(net, loss_fn, len(forget), epochs=cfg.epochs, lr=cfg.lr, cfg=cfg, seed=seed,
                   tag=f"{name} seed {seed}", start_epoch=start_epoch, optimizer=optimizer, on_epoch_end=on_epoch_end)
    whole = distributed.whole_model(net, models.GPT) if status == "ok" else None  # --- distributed: on rank 0, None elsewhere
    if not distributed.is_main():  # --- distributed: rank 0 writes
        return
    if status == "ok":
        models.save_pretrained(whole, out / "model")
        tok.save(out / "model")
    else:
        log(f"[{name} seed {seed}] {status}")
        epoch = len(list(out.glob("epoch_*.json"))) + 1
        write_json(out / f"epoch_{epoch:03d}.json", {"method": name, "seed": seed, "epoch": epoch, "status": status})
    write_json(out / "done.json", {"status": status, "epochs": len(list(out.glob("epoch_*.json"))), "seconds": time.time() - t0})
    (out / "state.pt").unlink(missing_ok=True)  # the model is kept in out/model; the optimizer state is not needed


def first_draw(i: int, n: int) -> int:
    """The authors pair forget example i with ONE retain example and ONE refusal, fixed for the
    run: the first draw of torch's generator seeded with i."""
    return torch.randint(n, (1,), generator=torch.Generator().manual_seed(i)).item()


def check_job_records(out: Path, epochs: int | None = None) -> None:
    """The records of epochs 1..epochs (None: as many as done.json says) are there and read."""
    for k in range(1, (epochs if epochs is not None else read_json(out / "done.json")["epochs"]) + 1):
        if read_json(out / f"epoch_{k:03d}.json") is None:
            raise ValueError(f"the record of epoch {k} is missing or unreadable")


def resume(out: Path, net, optimizer) -> tuple[int, float] | None:
    """(epochs done, seconds spent) from out/state.pt into net and optimizer; (0, 0) for a fresh
    start. Records after the state's epoch are deleted: redone, identically. A state that fails to
    load, or whose epoch records are missing, is deleted with a warning, and None returned: the job
    restarts (net may hold part of it)."""
    out.mkdir(parents=True, exist_ok=True)
    epoch, seconds = 0, 0.0
    try:
        if (out / "state.pt").exists():
            state = torch.load(out / "state.pt", map_location="cpu", weights_only=True, mmap=True)
            epoch, seconds = int(state["epoch"]), float(state["seconds"])
            check_job_records(out, epoch)
            # each process takes its part of the whole state (its shard under FSDP)
            set_state_dict(distributed.resharded(net), optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"], options=StateDictOptions(full_state_dict=True))
    except Exception as e:  # truncated or foreign file: never trust it, never crash on it
        log(f"warning: {out / 'state.pt'} cannot be resumed ({type(e).__name__}: {str(e)[:80]}); restarting this job")
        epoch = None
    distributed.barrier()  # --- distributed: every process has read the files before rank 0 changes them
    if distributed.is_main():
        if epoch is None:
            (out / "state.pt").unlink()
        for stale in out.glob("epoch_*.json"):
            if int(stale.stem[6:]) > (epoch or 0):
                stale.unlink()
    if epoch:
        log(f"{out}: resuming after epoch {epoch}")
    return None if epoch is None else (epoch, seconds)


# ----------------------------------------------------------------------------- processes

def parallel(fn, jobs: list[tuple], workers: int) -> None:
    """Run fn(*job) for every job, in `workers` processes side by side (each job writes its own
    files, so the order does not matter); in this process when there is one worker or one job."""
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            fn(*job)
            distributed.barrier()  # --- distributed: a job's files are written before any process reads them
        return
    import multiprocessing
    pool = multiprocessing.get_context("spawn").Pool(min(workers, len(jobs)), initializer=signal.signal,
                                                     initargs=(signal.SIGINT, signal.SIG_IGN))  # Ctrl-C: the parent stops them
    try:
        pool.starmap(fn, jobs, chunksize=1)  # re-raises a worker's error here
        pool.close()
    finally:
        pool.terminate()
        pool.join()


# ----------------------------------------------------------------------------- several processes: torchrun

def init_distributed(cfg: Config) -> None:
    """Under torchrun: the process group, and --parallel auto resolved once (config.json keeps what
    was asked): ddp where the estimate for one device fits 90% of this GPU (the rest for the CUDA
    context and the allocator's slack), else fsdp."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or dist.is_initialized():
        return
    if cfg.device not in ("cpu", "cuda"):
        raise ConfigError(f"--device {cfg.device}: under torchrun give --device cuda (each process takes its own GPU)")
    distributed.init(cfg.device == "cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if cfg.parallel == "auto":
        fits = (cfg.device == "cpu"
                or memory_needed(cfg)["total"] < 0.9 * torch.cuda.get_device_properties().total_memory)
        cfg.parallel = "ddp" if fits else "fsdp"
    if cfg.parallel == "fsdp" and cfg.optimizer == "adafactor":
        raise ConfigError(f"--optimizer adafactor: torch {torch.__version__}'s Adafactor cannot step FSDP's sharded "
                          "parameters; use --optimizer adamw with FSDP")
    log(f"{dist.get_world_size()} processes, {cfg.parallel}")


def distribute(net, cfg: Config, frozen: bool = False):
    """net, or under torchrun net in DDP or FSDP2 as cfg.parallel says (bf16 compute from fp32
    weights where autocast() would run)."""
    return distributed.wrap(net, cfg.parallel, mixed_precision(cfg), frozen)


def memory_config(cfg: Config) -> models.GPTConfig:
    model_dir = cfg.model or cfg.base_model
    return models.load_config(model_dir) if model_dir else models.GPTConfig(
        vocab_size=cfg.vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd)


def memory_needed(cfg: Config, n_shards: int = 1) -> dict:
    """models.memory_estimate for this run, per device: a forget and a retain micro-batch share
    one backward; TOFU's QA pairs stay under 256 tokens; activations in bf16 on CUDA."""
    config = memory_config(cfg)
    return models.memory_estimate(
        config, micro_batch=2 * cfg.micro_batch_size, seq_len=min(256, config.block_size), dtype=cfg.dtype,
        optimizer=cfg.optimizer, grad_checkpointing=cfg.grad_checkpointing, n_shards=n_shards,
        ref_model_copy=any(npo.METHODS[m].needs_ref_model for m in methods_of(cfg)), fused=cfg.logprob == "fused",
        activation_dtype=torch.bfloat16 if cfg.device.startswith("cuda") else None)


def print_memory_estimate(cfg: Config) -> None:
    """--dry-run: the model's size, the setting, and memory_needed per device (and under FSDP)."""
    with torch.device("meta"):  # shapes only: a 7B model costs nothing here
        n_params = models.GPT(memory_config(cfg)).num_params()
    weights = cfg.dtype + (" under bf16 autocast" if mixed_precision(cfg) else "")
    print(f"{cfg.model or cfg.base_model or 'built-in GPT'}: {n_params / 1e6:,.1f}M parameters, {weights} "
          f"weights, {cfg.optimizer}, micro-batches of {cfg.micro_batch_size} forget + "
          f"{cfg.micro_batch_size} retain pairs, gradient checkpointing {'on' if cfg.grad_checkpointing else 'off'}, "
          f"{cfg.logprob} log-probs; per device:")
    print(models.format_memory(memory_needed(cfg)))
    if cfg.optimizer != "adafactor":  # refused under FSDP (init_distributed)
        print("FSDP, per GPU: " + ", ".join(f"{n} GPUs {memory_needed(cfg, n)['total'] / 2**30:.2f} GiB" for n in (2, 4, 8)))


# ----------------------------------------------------------------------------- main

def run_experiment(cfg: Config) -> Path:
    t_start = time.time()
    torch.set_num_threads(cfg.threads)
    run = Run(cfg)
    if cfg.dry_run:
        print_memory_estimate(cfg)
        return run.dir
    run.claim()
    init_distributed(cfg)  # --- distributed
    workers = 1 if cfg.device.startswith("cuda") or dist.is_initialized() else cfg.workers
    log(f"run {run.dir}: {cfg.split}, methods {cfg.methods}, seeds {cfg.seed}..{cfg.seed + cfg.seeds - 1}, "
        f"{workers} worker(s) x {cfg.threads} thread(s), torch {torch.__version__}")
    distributed.rank0_first(prepare_data, run)  # --- distributed: rank 0 makes the data and tokenizer, the others read them
    if not cfg.model:
        if not cfg.base_model and not finished(run.dir / "base", load_model_dir):
            model_job(cfg, "base")
        wanted = ["target"] + ([] if cfg.retain_model or cfg.retain_logs else ["retain"])
        parallel(model_job, [(cfg, w) for w in wanted if not finished(run.dir / w, load_model_dir)], workers)
    target_dir = cfg.model or str(run.dir / "target")
    retain_dir = cfg.retain_model or str(run.dir / "retain")
    evals = [(cfg, target_dir, "target")] + ([] if cfg.retain_logs else [(cfg, retain_dir, "retain")])
    parallel(eval_job, [job for job in evals if not finished(run.dir / "eval" / job[2], tofu_eval.read_logs)], workers)
    jobs = [(cfg, target_dir, name, seed) for seed in range(cfg.seed, cfg.seed + cfg.seeds) for name in run.methods]
    parallel(unlearn_job, jobs, workers)
    if distributed.is_main():  # --- distributed
        report.write(run)
    log(f"done in {time.time() - t_start:.0f}s: {run.dir}")
    return run.dir


def main(argv=None) -> int:
    try:
        run_experiment(parse_args(argv))
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to resume where it stopped", file=sys.stderr)
        return 130
    except (ConfigError, data.DataError, models.ModelError, tofu_eval.LogError, OSError) as e:
        print(f"train_tofu.py: error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():  # --- distributed
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
