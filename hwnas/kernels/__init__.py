"""MixedOp kernels: one entry point, several backends with identical results.

`backend="auto"` picks the compiled extension (hwnas._C) for the tensor's device when it is built,
and the pure-PyTorch reference otherwise (warning once).
"""
from __future__ import annotations

import functools
import logging
import os

import torch
from torch import nn

from hwnas.kernels.reference import mixed_op_reference

log = logging.getLogger(__name__)
BACKENDS = ("reference", "cpu", "cuda")


@functools.lru_cache(maxsize=1)
def _compiled():
    """The compiled-kernel module, or None when hwnas._C is not built (warned once)."""
    if os.environ.get("HWNAS_DISABLE_EXTENSION"):
        return None
    try:
        from hwnas.kernels import compiled
    except ImportError as err:
        log.warning("hwnas._C is not built (%s); using the pure-PyTorch reference kernels", err)
        return None
    return compiled


def available_backends() -> list[str]:
    """Backends usable in this process."""
    compiled = _compiled()
    found = ["reference"]
    if compiled is not None:
        found += [b for b in ("cpu", "cuda") if compiled.has_backend(b)]
    return found


def backend(device: torch.device | str = "cpu") -> str:
    """The backend `auto` resolves to for tensors on `device`."""
    kind = torch.device(device).type
    return kind if kind in available_backends() else "reference"


def mixed_op(
    x: torch.Tensor, weights: torch.Tensor, ops: nn.ModuleList, stride: int, backend_name: str = "auto",
    skip: list[bool] | None = None,
) -> torch.Tensor:
    """Weighted sum of the eight DARTS ops on x (N, C, H, W) with weights (8,): see reference.py.

    `skip`: skippable(weights) when the caller knows it on the host (saves a device read per edge).
    """
    name = backend(x.device) if backend_name == "auto" else backend_name
    if name == "reference":
        return mixed_op_reference(x, weights, ops, stride, skip)
    if name not in available_backends():
        raise RuntimeError(f"kernel backend {name!r} is not available here; available: {available_backends()}")
    if name != x.device.type:
        raise RuntimeError(f"kernel backend {name!r} cannot run tensors on {x.device}")
    return _compiled().mixed_op(x, weights, ops, stride, skip)
