"""Which torch device a job computes on (shared by training and sampling).

Parse-time cheap: torch is imported inside the function.
"""

from __future__ import annotations

from tifactory.errors import TifactoryError


class DeviceError(TifactoryError, RuntimeError):
    """The configured device cannot be used here (e.g. `cuda` asked for on a machine without CUDA)."""


def pick_device(requested: str):
    """`auto` -> the CUDA device when there is one, else the CPU; anything else as torch names it."""
    import torch

    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as error:
        raise DeviceError(f"device {requested!r} is not a torch device name ({error})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {requested!r} asked for, but no CUDA device is available")
    return device
