"""One decision, broadcast: rank 0 reads shared state and every rank takes the same branch.

Lightning brings the process group up inside the first ``fit``/``predict``/``test`` call, but an
audit decides what to run (which cells are missing, which shards exist) before that. Under a
script-launched DDP strategy (``strategy=ddp``: every rank runs the whole ``audit.py``; Slurm,
torchrun, or Lightning's own child processes) ranks that read the file system on their own can see
different states and then hang in the next collective. :func:`init_distributed` therefore starts
the process group from the audit's first Trainer, before anything is read, and :func:`broadcast`
sends rank 0's decision to all ranks. Under ``ddp_spawn`` (and one device) the main process is the
only one that decides, so both are no-ops there.
"""

from __future__ import annotations

import logging
from typing import Any, TypeVar

import pytorch_lightning as pl
import torch

log = logging.getLogger("xaudit")
T = TypeVar("T")


def group_ready() -> bool:
    """Whether a ``torch.distributed`` process group with more than one rank is up."""
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


def global_rank() -> int:
    """This process' rank in the process group (0 without one)."""
    return torch.distributed.get_rank() if group_ready() else 0


def is_global_zero() -> bool:
    """Whether this process makes the decisions and writes the results."""
    return global_rank() == 0


def init_distributed(trainer: pl.Trainer) -> None:
    """Start the process group now when ``trainer``'s strategy runs one script per rank.

    Rank 0 launches the other ranks' processes here (as Lightning would at the first ``fit``), and
    every rank joins the group; later Trainers of the same process reuse it. Strategies that spawn
    workers per call (``ddp_spawn``) and single-device runs are left alone.
    """
    from pytorch_lightning.strategies import DDPStrategy
    from pytorch_lightning.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    strategy = trainer.strategy
    if not isinstance(strategy, DDPStrategy) or not isinstance(strategy.launcher, _SubprocessScriptLauncher):
        return
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    log.info("xaudit: rank %d/%d joining the process group", trainer.global_rank, trainer.world_size)
    strategy.launcher.launch(strategy.setup_environment, trainer=trainer)


def compute_device(trainer: pl.Trainer) -> torch.device:
    """Where this process runs the model outside Lightning's loops (dry runs, sanity, concepts).

    The trainer's root device, except under spawn-based strategies: their main process only hands
    the model to the workers, which must receive it on the CPU.
    """
    from pytorch_lightning.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    if isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher):
        return torch.device("cpu")
    return trainer.strategy.root_device


def broadcast(obj: T, src: int = 0) -> T:
    """``obj`` as rank ``src`` holds it, on every rank (unchanged without a process group)."""
    if not group_ready():
        return obj
    box: list[Any] = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait for every rank when a process group is up."""
    if group_ready():
        torch.distributed.barrier()


def reset_gpu_peak() -> None:
    """Start a new peak-memory measurement on this process' CUDA device (no-op without CUDA)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def gpu_peak() -> dict[str, float]:
    """``{"gpu_peak_mib": ...}``: the most CUDA memory this process allocated since
    :func:`reset_gpu_peak`, for a cell's record; empty where this process never used CUDA (CPU
    runs, or the main process of ``ddp_spawn``, whose workers hold the GPUs)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {"gpu_peak_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)}
    return {}
