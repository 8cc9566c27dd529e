"""Tensor parallelism (transformers' ``tp_plan``): which KV heads this process's cache holds.

Under ``from_pretrained(..., tp_plan="auto")`` (launched with ``torchrun``) transformers
shards each attention layer's K/V projections by rows across the tensor-parallel group, so
rank ``r`` of ``n`` computes KV heads ``[r * H / n, (r + 1) * H / n)`` and its attention sees
only those (and their query heads). A :class:`~leank.cache.LeanKCache` built from such a model
takes the same rows of the mask; every byte count of the cache is then this process's, and
:func:`sum_over_ranks` adds them up.
"""

from __future__ import annotations

import os

import torch

from .errors import LeanKError


def launched_world() -> int:
    """The number of processes torchrun started this job with (1 outside torchrun); one clear
    error for a ``WORLD_SIZE`` that is not an integer or comes without the rest of torchrun's
    environment."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        world = int(raw)
    except ValueError:
        raise LeanKError(f"WORLD_SIZE must be an integer (torchrun sets it), got {raw!r}") from None
    if world > 1:
        missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise LeanKError(f"WORLD_SIZE is {world} but {', '.join(missing)} unset: launch with torchrun")
    return world


# Key projections whose rows are KV heads (one head_dim block each), by architecture.
_KEY_PROJECTIONS = ("k_proj.weight",)


def tensor_parallel(model) -> tuple[int, int] | None:
    """(rank, size) of this process in the group sharding ``model``'s KV heads, or None when the
    model is not tensor-parallel (or only a config is given)."""
    size = getattr(model, "tp_size", None)
    if not isinstance(size, int) or size <= 1:
        return None
    from torch.distributed.tensor import DTensor, Shard

    for name, param in model.named_parameters():
        if isinstance(param, DTensor) and name.endswith(_KEY_PROJECTIONS):
            mesh = param.device_mesh
            for dim, placement in enumerate(param.placements):
                # the tensor-parallel mesh dimension (not, e.g., an FSDP one that also shards rows)
                if isinstance(placement, Shard) and placement.dim == 0 and mesh.size(dim) == size:
                    return mesh.get_local_rank(dim), size
    raise LeanKError(
        f"this model is tensor-parallel (tp_size {size}) but no key projection is sharded by rows "
        f"(looked for DTensor parameters named *{' / *'.join(_KEY_PROJECTIONS)} with Shard(0)): LeanK cannot "
        "tell which KV heads this process holds; use a tensor-parallel plan that shards k_proj column-wise"
    )


def kv_head_rows(model, num_kv_heads: int) -> slice:
    """The rows of a ``[H_kv, D]`` mask layer that this process's attention holds (all of them
    without tensor parallelism)."""
    tp = tensor_parallel(model)
    if tp is None:
        return slice(0, num_kv_heads)
    rank, size = tp
    if num_kv_heads % size:
        raise LeanKError(
            f"{num_kv_heads} KV heads do not split evenly over {size} tensor-parallel processes: "
            "use a number of processes that divides the KV head count"
        )
    per = num_kv_heads // size
    return slice(rank * per, (rank + 1) * per)


def sum_over_ranks(value: int, group=None) -> int:
    """``value`` summed over the processes of ``group`` (default: all; e.g. ``cache.nbytes()``
    under tensor parallelism); ``value`` itself outside ``torch.distributed``."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    backend = torch.distributed.get_backend(group)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    total = torch.tensor([value], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(total, group=group)
    return int(total.item())
