"""Which device and dtype an engine runs on."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when it is usable; asking for CUDA without it falls back to CPU with a log line."""
    if name in ("auto", "cuda") or name.startswith("cuda:"):
        if torch.cuda.is_available():
            return torch.device("cuda" if name == "auto" else name)
        if name != "auto":
            log.warning("CUDA was asked for but is not usable here; running on CPU")
        return torch.device("cpu")
    return torch.device(name)


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32
