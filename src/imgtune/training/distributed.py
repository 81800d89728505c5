"""Rank helpers for data-parallel training (torch.distributed), in the spirit of torchvision's reference
`utils.py`: who am I, reduce metrics over ranks, agree on a stop. Everything here is a no-op in a single
process, so the Trainer calls it unconditionally.

Who starts the processes and the process group (Ray Train's TorchTrainer) is `imgtune.runs.distributed`'s
business; this module only talks to the group once it exists.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def _reduce_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo reduces CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of `values` over all ranks (a new CPU tensor; `values` itself is unchanged)."""
    if not is_distributed():
        return values.clone()
    total = values.to(_reduce_device(), copy=True)
    dist.all_reduce(total)
    return total.cpu()


def first_stopping_rank(stopping: bool) -> int | None:
    """Called by every rank at the same point: the lowest rank that wants to stop, or None. One small
    all-reduce; this is how a stop requested on one rank (a debugger rule on rank 0) reaches every rank."""
    if not is_distributed():
        return 0 if stopping else None
    size = dist.get_world_size()
    flag = torch.tensor([dist.get_rank() if stopping else size], device=_reduce_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    first = int(flag.item())
    return None if first == size else first


def share_buffers(module: torch.nn.Module, source: int = 0) -> None:
    """Give every rank rank `source`'s buffers (BatchNorm's running statistics), in place. DDP does this at
    the start of each training forward only, so after the last step each rank holds statistics that include
    its own last batch; evaluating with them would score each shard with a different model."""
    if not is_distributed():
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=source)


def broadcast_text(text: str | None, source: int) -> str | None:
    """`text` as rank `source` has it, on every rank."""
    if not is_distributed():
        return text
    box = [text]
    dist.broadcast_object_list(box, src=source)
    return box[0]


def gather_objects(value: object) -> list[object]:
    """Every rank's `value`, in rank order, on every rank (small things: where each rank runs)."""
    if not is_distributed():
        return [value]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()
