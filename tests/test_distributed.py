"""Two processes (torch.multiprocessing, gloo on CPU) against one, on the toy pipeline: the same
evaluation logs of the same models, and the same unlearning within rounding, with DDP and with FSDP2."""

import json
import os
import shutil
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import distributed
import train_tofu
from model import GPT, GPTConfig, read_safetensors

# 3 micro-batches per step (2 + 1 per process, then a zero-weighted stand-in on the second), 20
# forget examples (a last step of one micro-batch), evaluation batches that do not split evenly; NPO
# with the KL retain term: cached reference log-probs and a frozen reference model
ARGS = ["--n-authors", "10", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--vocab-size", "300",
        "--base-epochs", "1", "--finetune-epochs", "0", "--epochs", "2", "--batch-size", "6", "--micro-batch-size", "2",
        "--eval-batch-size", "4", "--ds-size", "4", "--max-new-tokens", "4", "--methods", "npo_kl",
        "--seeds", "1", "--workers", "1"]
NAME = "builtin-generated-forget10"
MODES = ("ddp", "fsdp")
SGD_MODEL = GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_with_sgd(mode):
    """train_tofu.train() with plain SGD on a loss too small to be clipped, so that the weights
    follow the gradients themselves (Adam would hide their scale): the final weights, on rank 0."""
    cfg = train_tofu.parse_args(["--batch-size", "6", "--micro-batch-size", "2", "--parallel", mode])
    torch.manual_seed(0)
    net = train_tofu.distribute(GPT(SGD_MODEL), cfg)
    tokens = torch.randint(64, (20, 8), generator=torch.Generator().manual_seed(0))

    def loss_fn(idx):
        loss = 1e-3 * F.cross_entropy(net(tokens[idx]).flatten(0, 1), tokens[idx].roll(-1, 1).flatten())
        return loss, {"loss": loss.item()}

    status = train_tofu.train(net, loss_fn, len(tokens), epochs=2, lr=10.0, cfg=cfg, seed=0, tag=mode,
                              optimizer=torch.optim.SGD(net.parameters()))
    assert status == "ok"
    whole = distributed.whole_model(net, GPT)
    return whole and whole.state_dict()


def worker(rank, out, ports):
    """One of two processes, as torchrun would start it: a run with each --parallel mode, then
    train_with_sgd."""
    for mode, (port, sgd_port) in zip(MODES, ports):
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        assert train_tofu.main(ARGS + ["--out-dir", str(out / mode), "--parallel", mode]) == 0
        os.environ["MASTER_PORT"] = str(sgd_port)
        torch.distributed.init_process_group("gloo")
        weights = train_with_sgd(mode)
        if rank == 0:
            torch.save(weights, out / f"sgd-{mode}.pt")
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process builds everything; two processes evaluate its target and retain models, and
    unlearn from its target, in DDP and in FSDP."""
    out = tmp_path_factory.mktemp("distributed")
    assert train_tofu.main(ARGS + ["--out-dir", str(out / "single")]) == 0
    for mode in MODES:
        for part in ("data", "tokenizer", "base", "target", "retain"):
            shutil.copytree(out / "single" / NAME / part, out / mode / NAME / part)
    torch.save(train_with_sgd("ddp"), out / "sgd-single.pt")  # one process: no DDP
    ports = [(free_port(), free_port()) for _ in MODES]
    context = mp.start_processes(worker, args=(out, ports), nprocs=2, join=False, start_method="spawn")
    for _ in range(120):  # a deadlock fails the test instead of hanging it
        if context.join(timeout=1):
            break
    else:
        for process in context.processes:
            process.kill()
        pytest.fail("the two processes did not finish within 120 s")
    return {name: out / name / NAME for name in ("single", *MODES)} | {
        f"sgd-{name}": torch.load(out / f"sgd-{name}.pt") for name in ("single", *MODES)}


def records(job_dir):
    return [json.loads(p.read_text()) for p in sorted(job_dir.glob("epoch_*.json"))]


@pytest.mark.parametrize("mode", MODES)
def test_gradients_are_the_same_as_in_one_process(runs, mode):
    """Micro-batches split 2 + 1 over the processes, a stand-in weighing nothing, DDP's and FSDP's
    averaging undone: SGD's weights after 8 steps equal one process's."""
    single, ours = runs["sgd-single"], runs[f"sgd-{mode}"]
    assert single.keys() == ours.keys()
    for name in single:
        assert torch.allclose(single[name], ours[name], rtol=0, atol=1e-6), (name, (single[name] - ours[name]).abs().max())
    torch.manual_seed(0)
    start = GPT(SGD_MODEL).state_dict()
    assert max((single[name] - start[name]).abs().max() for name in start) > 1e-3  # moved: 1000x the tolerance


@pytest.mark.parametrize("mode", MODES)
def test_evaluation_is_the_same_as_in_one_process(runs, mode):
    for which in ("target", "retain"):
        files = sorted(p.name for p in (runs["single"] / "eval" / which).glob("eval_*.json"))
        assert len(files) == 4
        for name in files:
            assert json.loads((runs[mode] / "eval" / which / name).read_text()) == \
                   json.loads((runs["single"] / "eval" / which / name).read_text()), (which, name)


@pytest.mark.parametrize("mode", MODES)
def test_unlearning_matches_one_process(runs, mode):
    job = "unlearn/npo_kl/seed0"
    want, got = records(runs["single"] / job), records(runs[mode] / job)
    assert [r["epoch"] for r in got] == [1, 2] and all(r["status"] == "ok" for r in got)
    for a, b in zip(want, got):
        for key, value in a.items():  # the loss trajectory and every metric, within rounding
            if isinstance(value, float) and key != "seconds":
                assert b[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (a["epoch"], key)
    single = dict(read_safetensors(runs["single"] / job / "model" / "model.safetensors"))
    ours = dict(read_safetensors(runs[mode] / job / "model" / "model.safetensors"))
    assert single.keys() == ours.keys()
    C = 32
    for name in single:
        a, b = single[name].clone(), ours[name].clone()
        if name.endswith("attn.c_attn.bias"):
            # the key bias adds q.b to every score of a query, which softmax ignores: its true
            # gradient is 0, and Adam scales the rounding noise it gets instead up to steps of
            # size lr, differently for every summation order; it changes no output
            a, b = torch.cat([a[:C], a[2 * C:]]), torch.cat([b[:C], b[2 * C:]])
        assert torch.allclose(a, b, rtol=0, atol=1e-5), (name, (a - b).abs().max().item())
