"""Where the tensor work of a process runs: ``--device auto|cpu|cuda|cuda:N``.

``auto`` (the default) is the first GPU when torch sees one, else the CPU. The device is a
property of a process, not of a run: the orchestrator sends the run's config to every worker, and
a worker started with its own ``--device`` (``FEDSEQ_DEVICE``) computes there instead, so GPU and
CPU workers can serve one federation. On a GPU, benign updates (:func:`fedseq.training.compute_updates`)
and evaluation (:class:`fedseq.metrics.Evaluator`) run on the device in the same micro-batches;
the updates come back to the CPU for encoding and aggregation, which stay on the CPU. Attack
computations and adversarial training run on the CPU.
"""

from __future__ import annotations

import copy
import re
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a device is resolved: the run config checks names without it
    import torch
    from torch import nn

__all__ = ["DeviceError", "check_name", "model_on", "resolve"]

_NAME = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class DeviceError(ValueError):
    """A device name that is malformed or names hardware this process cannot use."""


def check_name(name: str) -> None:
    """Raise :class:`DeviceError` unless ``name`` is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise DeviceError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")


def resolve(name: str) -> torch.device:
    """The device ``name`` means in this process; a CUDA device this process cannot use raises
    :class:`DeviceError` saying why (fail fast, not a silent fall-back to the CPU)."""
    import torch

    check_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA support" if torch.version.cuda is None
                   else "torch sees no GPU (driver, CUDA_VISIBLE_DEVICES, or container runtime)")
            raise DeviceError(f"device {name!r} requested but {why}; use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r} requested but torch sees {torch.cuda.device_count()} GPU(s)")
    return dev


_COPIES: weakref.WeakKeyDictionary[nn.Module, dict[torch.device, nn.Module]] = weakref.WeakKeyDictionary()


def model_on(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` itself on the CPU; elsewhere a copy living on ``device`` (made once per model and
    device, kept while the model lives). Callers load the weights they need into it."""
    if device.type == "cpu":
        return model
    per = _COPIES.setdefault(model, {})
    if device not in per:
        per[device] = copy.deepcopy(model).to(device)
    return per[device]
