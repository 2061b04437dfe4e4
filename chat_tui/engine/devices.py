"""Which torch device to run on: one answer for the mini-GPT, Hugging Face models and training.

torch is imported inside the functions: the mini-GPT on the CPU decodes in numpy and never needs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from chat_tui.errors import DeviceError

if TYPE_CHECKING:
    import torch

USE = "use cpu, cuda, cuda:N or mps"


def best_device() -> str:
    """The fastest torch device here: "cuda", then "mps", else "cpu"."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_device(device: str | None) -> torch.device:
    """The torch device for a user's `--device` value ("auto", "" or None: the best one here).

    Raises `DeviceError` with a one-line reason for a name torch does not know or a device this
    machine does not have.
    """
    import torch

    if device is None or str(device).strip().lower() in {"", "auto"}:
        return torch.device(best_device())
    try:
        d = torch.device(str(device).strip().lower())
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"unknown device {device!r} ({USE})") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device!r}: CUDA is not available here (no GPU, or torch was built without it)")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise DeviceError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif d.type == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise DeviceError(f"device {device!r}: Apple's MPS is not available here")
    elif d.type != "cpu":
        raise DeviceError(f"unknown device {device!r} ({USE})")
    return d
