"""Several processes under torchrun, with PyTorch's own engines: DDP and FSDP2.

`torchrun --nproc_per_node N train_tofu.py ...` starts N copies of the program, one per GPU (on a
CPU: processes talking through gloo). They go through every stage together, on the same files:
each computes a share (micro-batches of a step, batches of the reference log-probs and of each
evaluation), the results are summed or gathered, and rank 0 alone writes files and prints. In a
single process every function here is a no-op, so the training script reads the same either way;
its lines that use them are marked "--- distributed".
"""

import contextlib
import datetime

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

WHOLE_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered, on rank 0's CPU


def init(cuda: bool, local_rank: int) -> None:
    if cuda:
        torch.cuda.set_device(local_rank)  # "cuda" now means this process's GPU
    # NCCL for the model's tensors, gloo for a few small CPU ones; a long timeout, as the others
    # wait while rank 0 alone writes a large model's state
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=1))


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """The CPU tensor t summed over the processes, in place."""
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def any_process(flag: bool) -> bool:
    return bool(all_sum(torch.tensor([float(flag)])).item())


def all_done(done: bool) -> bool:
    """Whether every process is done (each generation step asks: under FSDP all keep stepping)."""
    return not any_process(not done)


def rank0_first(fn, *args):
    """fn(*args) on rank 0, then on the other processes, which find what it wrote."""
    if not is_main():
        barrier()
    result = fn(*args)
    if is_main():
        barrier()
    return result


def rank_share(items: list) -> list[tuple]:
    """This process's share of items, each with whether it is its own: items rank, rank + world,
    ...; then a stand-in (items[0], its results to drop) where the share is one short, since under
    FSDP every process must make the same forward calls. One process: every item, its own."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = items[rank::world]
    return [(item, True) for item in mine] + [(item, False) for item in items[:-(-len(items) // world) - len(mine)]]


def gathered(results: dict) -> dict:
    """Every process's share of results, merged (one process: as it is)."""
    if not dist.is_initialized():
        return results
    shares = [None] * dist.get_world_size()
    dist.all_gather_object(shares, results)
    return {key: value for share in shares for key, value in share.items()}


class DDP(torch.nn.parallel.DistributedDataParallel):
    """DDP reading the model's attributes through (lm_head, config, generate), so that model.py's and
    eval.py's functions take it as they take the model."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(self.module, name)


def wrap(net, mode: str, mixed_precision: bool, frozen: bool = False):
    """The model each process trains: net itself in a single process; under torchrun, in DDP (a
    copy per process; a frozen model stays as it is), or sharded by FSDP2: each block, then the
    rest, gathered in bf16 for compute where mixed_precision (fp32 master weights)."""
    if not dist.is_initialized():
        return net
    if mode == "ddp":
        return net if frozen else DDP(net)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision else MixedPrecisionPolicy()
    mesh = init_device_mesh(next(net.parameters()).device.type, (world_size(),))
    for block in net.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    return fully_shard(net, mesh=mesh, mp_policy=policy)


def skip_gradient_sync(net, skip: bool):
    """DDP averages gradients in every backward unless told to skip it (FSDP reduce-scatters in
    each: its gradients stay sharded)."""
    return net.no_sync() if skip and isinstance(net, DDP) else contextlib.nullcontext()


def resharded(net):
    """net, with FSDP's root parameters sharded again as the state-dict functions need them (a
    forward without backward leaves them gathered)."""
    if isinstance(net, FSDPModule):
        net.reshard()
    return net


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def whole_model(net, build):
    """The whole model on rank 0, to save; None on the others. Every process must call it: FSDP
    gathers the shards. build(config) makes an empty model of net's architecture."""
    if isinstance(net, FSDPModule):
        state = get_model_state_dict(resharded(net), options=WHOLE_STATE)
        if not is_main():
            return None
        with torch.device("meta"):
            whole = build(net.config)
        whole.load_state_dict(state, assign=True)
        whole.tie_weights()
        return whole
    return (net.module if isinstance(net, DDP) else net) if is_main() else None
