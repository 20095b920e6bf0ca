"""Training past one process, on PyTorch's own engine: `torchrun --nproc_per_node=N -m chatforge train ...`.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK (and the rendezvous for several machines); `init` joins the process group
(NCCL on CUDA, gloo on CPU, chosen from the device), with a timeout so that a lost peer ends a collective with an
error instead of a hang. `distributed: ddp` (default) keeps a replica per process and all-reduces gradients
(DistributedDataParallel); `distributed: fsdp` shards parameters, gradients and optimizer state with FSDP2
(`fully_shard` per block, then the root, bf16 compute and fp32 gradient reduction through MixedPrecisionPolicy
when the run is bf16).

The data split is exact: every process draws the same global batch of batch_size x world rows and takes its own
slice, and the loss of every micro-batch is divided by the trained tokens of the whole global step (all-reduced),
so N processes compute the gradient of the same batch one process would (tests/train/test_distributed.py holds the
losses equal to 1e-5). Rank 0 alone logs, writes metrics and model folders; checkpoints are
torch.distributed.checkpoint (DCP) folders that every rank writes its shards into and that load back on any number
of processes, one included.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

from chatforge.errors import ChatforgeError

MODES = ("ddp", "fsdp")
TIMEOUT_S = float(os.environ.get("CHATFORGE_DIST_TIMEOUT_S", "300"))  # a collective waits this long for a peer


@dataclass
class Dist:
    """This process's place in the job."""

    rank: int
    world: int
    local_rank: int
    backend: str

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, value: float) -> float:
        """The sum of a number over all processes (fp64 on the host side: exact for token counts)."""
        return self.sums([value])[0]

    def sums(self, values: list[float]) -> list[float]:
        """Each number summed over all processes, in one all-reduce."""
        import torch
        import torch.distributed as td

        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        td.all_reduce(t)
        return t.tolist()

    @property
    def device(self):
        import torch

        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")


def launched() -> bool:
    """Started by torchrun (or another launcher that sets WORLD_SIZE) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device_name: str) -> Dist | None:
    """Join torchrun's process group; None for a plain single-process run."""
    if not launched():
        return None
    import torch
    import torch.distributed as td

    cuda = torch.cuda.is_available() and device_name in ("auto", "cuda") or device_name.startswith("cuda")
    backend = "nccl" if cuda else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not td.is_initialized():
        td.init_process_group(backend=backend, timeout=timedelta(seconds=TIMEOUT_S))
    return Dist(td.get_rank(), td.get_world_size(), local_rank, backend)


def close() -> None:
    """A barrier, then destroy the group (FSDP2 aborts at exit now and then without the barrier)."""
    if not launched():
        return
    import torch.distributed as td

    if td.is_initialized():
        with contextlib.suppress(Exception):  # a peer already gone: nothing left to wait for
            td.barrier()
        td.destroy_process_group()


def lost_peer(dist: Dist, step: int, error: BaseException) -> ChatforgeError:
    """The one-line error of a collective that failed because another process died or hung."""
    return ChatforgeError(f"distributed: rank {dist.rank} of {dist.world}: a collective failed at step {step + 1} "
                          f"({type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}); "
                          "another process has probably died or stopped answering. The run stopped; its last "
                          "checkpoint resumes with --resume on any number of processes")


def wrap(model, mode: str, dtype, dist: Dist):
    """(module the steps call, module holding the parameters). DDP wraps; FSDP2 shards `model` in place."""
    import torch

    if mode not in MODES:
        raise ChatforgeError(f"config: distributed: must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [dist.local_rank] if dist.backend == "nccl" else None
        return DistributedDataParallel(model, device_ids=ids), model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype != torch.float32 \
        else MixedPrecisionPolicy()
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ChatforgeError("config: distributed: fsdp shards chatforge's GPT blocks; this model has none "
                             "(use distributed: ddp)")
    for block in layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model, model


class RankSlice:
    """A batch stream that draws the global batch (batch_size x world rows) and yields this rank's rows. Its
    position is the global stream's, the same on every rank, so a checkpoint resumes on any number of processes
    as long as the global batch stays the same."""

    def __init__(self, stream, dist: Dist, batch_size: int):
        self.stream, self.dist, self.batch_size = stream, dist, batch_size

    def next(self):
        from chatforge.data.pack import Batch

        b = self.stream.next()
        lo = self.dist.rank * self.batch_size
        return Batch(*(t[lo:lo + self.batch_size] for t in (b.input_ids, b.targets, b.loss_mask, b.doc_ids,
                                                              b.position_ids)), packed=b.packed)

    def __getattr__(self, name):  # epoch, row, state(), load_state(), rows_per_epoch(): the global stream's
        return getattr(self.stream, name)


def full_state(model) -> dict:
    """The whole model state dict on every rank (a collective under FSDP2), on the CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def plain_copy(core, sharded):
    """An unsharded GPT with the trained weights, for rank 0's model folders and samples (all ranks call it; the
    others get None, as the full state is gathered on rank 0 only)."""
    import copy

    import torch.distributed as td

    from chatforge.model.gpt import GPT

    state = full_state(sharded)
    if td.get_rank() != 0:
        return None
    plain = GPT(copy.deepcopy(core.config))
    plain.load_state_dict(state)
    plain.gradient_checkpointing = False
    return plain


def save_checkpoint(folder, model, optimizer) -> None:
    """Model and optimizer state as a DCP folder: each rank writes its own shards (every rank calls it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(folder))


def load_checkpoint(folder, model, optimizer) -> None:
    """Load a DCP folder written by any number of processes into this run's model and optimizer (sharded or not;
    a single process without a process group reads it too)."""
    import torch.distributed as td
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(folder), no_dist=not td.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
