"""Data parallelism for the training loop: one process, DDP, or FSDP2, behind one small interface.

The loop is the same in every case. Each optimizer step takes the same global batch `batch_at(k)` (a pure
function of the seed and k); rank r of W computes rows [r*B/W, (r+1)*B/W) of it, and gradients are averaged
across ranks, so W processes follow the single-process run up to float rounding (tests check this).

- DDP (`torch.nn.parallel.DistributedDataParallel`): every rank holds the whole model and optimizer.
- FSDP2 (`torch.distributed.fsdp.fully_shard` on each block, then the root): parameters, gradients and
  optimizer state are sharded across ranks, for models whose training state does not fit one device.

Checkpoints are written in one format whatever the parallelism: the full model state dict and the optimizer
state dict of a plain `torch.optim` optimizer (parameters numbered in param-group order). So a run saved under
FSDP on 8 GPUs resumes in one process, and back. Rank 0 writes; every rank reads.

The process group comes from whoever launched the processes: `torchrun` (RANK / WORLD_SIZE in the
environment; `init()` creates the group and binds rank r of a node to its GPU r) or Ray Train (the group
already exists in each worker; see `aifab.train.executors`).
"""

import os
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

Strategy = Literal["single", "ddp", "fsdp"]


@dataclass(frozen=True)
class Group:
    rank: int
    world: int
    local_world: int  # processes on this node: they share its CPU cores

    @property
    def main(self) -> bool:
        return self.rank == 0


def init(use_cuda: bool) -> Group:
    """Join the process group the launcher prepared (creating it under torchrun), or run alone."""
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if use_cuda:  # one GPU per process on a node (Ray Train sets the device itself)
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if not dist.is_initialized():
        return Group(0, 1, 1)
    world = dist.get_world_size()
    return Group(dist.get_rank(), world, int(os.environ.get("LOCAL_WORLD_SIZE", world)))


def rows(group: Group, batch: int) -> slice:
    """This rank's rows of a global batch of `batch` rows."""
    per = batch // group.world
    return slice(group.rank * per, (group.rank + 1) * per)


def wrap(model: nn.Module, strategy: Strategy, device: torch.device) -> nn.Module:
    """The module the loop calls. `model` itself keeps its parameter names for state dicts (FSDP2 shards it
    in place; DDP wraps it)."""
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:  # type: ignore[union-attr]
            fully_shard(block)
        fully_shard(model)  # the root holds the embeddings, the final norm and the (possibly tied) lm_head
    return model


def mean(group: Group, value: torch.Tensor) -> torch.Tensor:
    """The mean over ranks of a scalar tensor (gloo has no AVG: a sum, then a division)."""
    if group.world == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / group.world


def from_main(group: Group, obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if group.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(group: Group) -> None:
    if group.world > 1:
        dist.barrier()


def _options(cpu_offload: bool = False, strict: bool = True) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload, strict=strict)


def model_state(model: nn.Module, strategy: Strategy) -> dict[str, torch.Tensor]:
    """The full model state dict on CPU, on rank 0 (a collective under FSDP: every rank calls it; ranks other
    than 0 get {})."""
    if strategy != "fsdp":
        return model.state_dict()  # the live tensors: the caller serialises them before the next step
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state: Any = get_model_state_dict(model, options=_options(cpu_offload=True))
    return dict(state)


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, strategy: Strategy) -> dict[str, Any]:
    """The optimizer state dict in plain `torch.optim` form (parameters numbered in group order), on rank 0."""
    if strategy != "fsdp":
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full: Any = get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))
    if not full:
        return {}
    index: dict[str, int] = {}
    groups = []
    for g in full["param_groups"]:
        ids = [index.setdefault(fqn, len(index)) for fqn in g["params"]]
        groups.append({**g, "params": ids})
    return {"state": {index[fqn]: s for fqn, s in full["state"].items()}, "param_groups": groups}


def load(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    model_sd: dict[str, torch.Tensor],
    optimizer_sd: dict[str, Any],
    strategy: Strategy,
) -> tuple[list[str], list[str]]:
    """Load full state dicts (every rank passes the whole checkpoint); returns (missing, unexpected) keys."""
    if strategy != "fsdp":
        missing, unexpected = model.load_state_dict(model_sd, strict=False)
        optimizer.load_state_dict(optimizer_sd)
        return list(missing), list(unexpected)
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    # plain state dicts number parameters in param-group order; DCP names them
    name_of = {id(p): fqn for fqn, p in model.named_parameters()}
    fqns = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
    groups = [{**g, "params": [fqns[i] for i in g["params"]]} for g in optimizer_sd["param_groups"]]
    by_fqn: dict[str, Any] = {
        "state": {fqns[int(i)]: s for i, s in optimizer_sd["state"].items()},
        "param_groups": groups,
    }
    full: Any = model_sd
    result = set_model_state_dict(model, full, options=_options(strict=False))
    set_optimizer_state_dict(model, optimizer, by_fqn, options=_options())
    return list(result.missing_keys), list(result.unexpected_keys)
