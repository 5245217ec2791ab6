"""xaudit: train image classifiers with Lightning and audit how they decide.

Importing the package registers the OmegaConf resolvers the configs use (``${xaudit.*:...}``);
both entry points import it before Hydra resolves anything.
"""

from __future__ import annotations

import atexit
import contextlib
import sys
from typing import Any

from omegaconf import OmegaConf

__version__ = "0.1.0"

#: strategies that start their own worker processes: Slurm runs one task per node for them
_SELF_SPAWNING = ("spawn", "fork", "notebook")


def gpu_precision() -> str:
    """``bf16-mixed`` where the CUDA GPU computes bfloat16 natively (Ampere and newer), else ``16-mixed``.

    Resolved where the config is resolved (inside the job on a cluster, not on the login node).
    It initialises CUDA in that process, which Lightning's ``ddp`` and ``ddp_spawn`` allow
    (``ddp_fork`` does not; pass ``trainer.precision=...`` explicitly there).
    """
    import torch

    if not torch.cuda.is_available():
        return "16-mixed"  # no GPU here: accelerator=gpu stops with Lightning's own clear error anyway
    try:
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.4 has no including_emulation
        native = torch.cuda.is_bf16_supported()
    return "bf16-mixed" if native else "16-mixed"


def device_count(devices: Any) -> int:
    """How many devices per node a Lightning ``devices`` value asks for.

    An int or a digit string is a count, a list or "0,2" names the devices; "auto" and -1 ("all the
    node has") cannot be known before the job runs and count as 1 (pass ``trainer.devices=N``).
    """
    if isinstance(devices, bool):
        raise ValueError(f"trainer.devices={devices} is not a device count or list.")
    if isinstance(devices, int):
        return max(1, devices) if devices != -1 else 1
    if isinstance(devices, str):
        text = devices.strip()
        if text in ("auto", "-1", ""):
            return 1
        if "," in text:
            return len([p for p in text.split(",") if p.strip()])
        if text.isdigit():
            return max(1, int(text))
        raise ValueError(f"trainer.devices={devices!r} is not a device count, list or 'auto'.")
    return max(1, len(list(devices)))  # a list (ListConfig) of device ids


def slurm_tasks_per_node(devices: Any, strategy: Any = "auto") -> int:
    """Slurm tasks per node: one per device (Lightning's DDP under Slurm), one for spawning strategies."""
    if any(word in str(strategy) for word in _SELF_SPAWNING):
        return 1
    return device_count(devices)


def slurm_gpus_per_node(accelerator: Any, devices: Any) -> int:
    """GPUs to request per node: none for ``accelerator=cpu``, else one per device."""
    return 0 if str(accelerator) == "cpu" else device_count(devices)


def _register_resolvers() -> None:
    for name, fn in (("xaudit.gpu_precision", gpu_precision),
                     ("xaudit.slurm_tasks", slurm_tasks_per_node),
                     ("xaudit.slurm_gpus", slurm_gpus_per_node)):
        OmegaConf.register_new_resolver(name, fn, replace=True)


_register_resolvers()


def _destroy_process_group_at_exit() -> None:
    """Destroy a still-open ``torch.distributed`` process group before the interpreter shuts down.

    Lightning does this at exit for NCCL only. A gloo group left to the C++ static destructors (CPU
    DDP, ``ddp_spawn`` workers) can abort the exiting process ("terminate called without an active
    exception", SIGABRT) while its worker threads are still joinable; destroying it here joins them.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


atexit.register(_destroy_process_group_at_exit)
