"""Mask training over several processes: ``torchrun --nproc_per_node N --no-python leank train ...``.

Data parallelism over samples, α replicated:

* every rank holds the frozen model (or, with ``--fsdp``, a shard of it: FSDP2
  ``fully_shard`` per decoder layer) and an identical copy of α and its AdamW state;
* step ``s`` uses the same global samples ``s·B … s·B + B − 1`` as a single-process run
  with ``--batch B``; rank ``r`` takes positions ``r, r + N, …`` of them (shares may be
  unequal: every sample's loss is divided by the global ``B``, so the *sum* of the ranks'
  gradients is the single-process gradient);
* the gradient of α (and the step's distillation loss, for the log) is summed over ranks
  with one all-reduce before the optimiser step, so every rank takes the same step;
* α is broadcast from rank 0 at the start of every stage and the optimiser state on
  resume (only rank 0 reads checkpoints); only rank 0 writes files and shows progress;
* validation samples are split the same way and their losses summed over ranks.

Context (sequence) parallelism is not implemented: every sample must fit one GPU.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import LeanKError
from ..parallel import launched_world


@dataclass(frozen=True)
class Dist:
    """This process's place in the job; ``Dist()`` is the single-process run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, count: int) -> range:
        """This rank's positions among ``count`` items (``r, r + N, …``)."""
        return range(self.rank, count, self.world)

    def device(self, requested: str) -> torch.device:
        """The requested device; for CUDA under torchrun, the GPU of ``LOCAL_RANK``."""
        device = torch.device(requested)
        if self.enabled and device.type == "cuda" and torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return device

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's values into ``tensor`` on every rank (in place)."""
        if self.enabled:
            dist.broadcast(tensor, src=0)
        return tensor

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` (any picklable value) on every rank."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn: Callable[[], object]):
        """``fn()`` on rank 0 only; a :class:`LeanKError` it raises is raised on every rank
        (none is left waiting in a collective). Returns ``fn()``'s result on rank 0, else None."""
        result = error = None
        if self.is_main:
            try:
                result = fn()
            except LeanKError as e:
                if not self.enabled:
                    raise
                error = str(e)
        error = self.broadcast_object(error)
        if error is not None:
            raise LeanKError(error)
        return result

    def main_first(self, fn: Callable[[], object]):
        """``fn()`` on rank 0, then on the other ranks (e.g. a model conversion cached on disk)."""
        result = self.on_main(fn)
        return result if self.is_main else fn()


def setup(device: str) -> Dist:
    """Join the torchrun job if there is one: ``WORLD_SIZE`` > 1 in the environment, or a
    process group the caller initialised. Backend nccl for CUDA, gloo for the CPU.

    A group initialised here lives until the process exits, so that several :func:`train`
    calls in one torchrun script share it (re-creating the default group in the same job
    can meet the previous group's rendezvous keys)."""
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local)
    world = launched_world()
    if world <= 1:
        return Dist()
    if not dist.is_available():
        raise LeanKError("WORLD_SIZE > 1 but this torch build has no torch.distributed: install a full torch build")
    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
    if cuda:
        if local >= torch.cuda.device_count():
            raise LeanKError(
                f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs are visible: "
                "use --nproc_per_node <= the number of GPUs"
            )
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    atexit.register(_destroy)
    return Dist(rank=rank, world=world, local_rank=local)


def _destroy() -> None:
    if dist.is_initialized():
        if dist.get_backend() == "gloo":
            # Leave together: a rank that tears down while another still talks aborts it
            # ("terminate called without an active exception", seen under heavy CPU load).
            try:
                dist.monitored_barrier(timeout=timedelta(seconds=60))
            except RuntimeError:  # a rank is gone: nothing to wait for
                pass
        dist.destroy_process_group()


def sync_grad(d: Dist, alpha: torch.Tensor, distill: float) -> float:
    """Sum α's gradient and the step's distillation loss over ranks (one all-reduce);
    return the global loss. Every rank's loss was already divided by the global batch."""
    if not d.enabled:
        return distill
    grad = alpha.grad if alpha.grad is not None else torch.zeros_like(alpha)
    buf = torch.cat([grad.reshape(-1), torch.tensor([distill], dtype=grad.dtype, device=grad.device)])
    d.all_reduce_sum(buf)
    alpha.grad = buf[:-1].view_as(alpha).clone()
    return buf[-1].item()


def shard_model(model, device: torch.device) -> None:
    """FSDP2 ``fully_shard`` on every decoder layer and on the decoder (the root: training
    calls the decoder, never the LM head, which stays where it was loaded, unsharded).
    The shards move to ``device`` (each rank's own)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    for layer in decoder.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(decoder, mesh=mesh)
