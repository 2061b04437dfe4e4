"""The dtype a model loads in, and whether it fits: parameters × bytes per parameter against the free
memory, before anything is allocated."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from chat_tui.engine.hf.checks import numel, safetensors_shapes
from chat_tui.engine.hf.errors import DeviceError, InsufficientMemoryError

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
MEMORY_HEADROOM = 0.9  # refuse to load when the weights alone need more than this share of the free memory


def default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    """A torch dtype, "auto" (the checkpoint's own), or None (the device's default)."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPE_NAMES:
        return dtype
    text = str(dtype).strip().lower().removeprefix("torch.")
    if text in {"", "default"}:
        return None
    if text == "auto":
        return "auto"
    if text in DTYPES:
        return DTYPES[text]
    raise DeviceError(f"unknown dtype {dtype!r} (use float32, bfloat16, float16 or auto)")


def _config_dtype(config: Any) -> torch.dtype:
    for attr in ("dtype", "torch_dtype"):
        value = getattr(config, attr, None)
        if isinstance(value, str):
            value = DTYPES.get(value.removeprefix("torch."))
        if isinstance(value, torch.dtype) and value in DTYPE_NAMES:
            return value
    return torch.float32



def choose_dtype(wanted: torch.dtype | str | None, config: Any, device: torch.device) -> torch.dtype:
    """The dtype to load in: `wanted` (from `parse_dtype`), the checkpoint's own for "auto", else the device's."""
    return _config_dtype(config) if wanted == "auto" else (wanted or default_dtype(device))


def count_parameters(folder: Path, config: Any = None, trust_remote_code: bool = False) -> int | None:
    """Parameters in the checkpoint: from the safetensors headers (free), else an empty model on `meta`."""
    total = sum(numel(shape) for shape, _ in safetensors_shapes(folder).values())
    if total:
        return total
    if config is None:
        return None
    try:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        return sum(p.numel() for p in model.parameters())
    except Exception:  # noqa: BLE001 - the estimate is a courtesy; loading will say what is wrong
        return None


def free_memory(device: torch.device, device_map: str | None = None) -> int | None:
    """Bytes free for the weights on `device` (all GPUs and the CPU with a device map); None if unknown."""
    if device_map:
        total = _free_cpu_memory() or 0
        if torch.cuda.is_available():
            total += sum(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
        return total or None
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "mps":
        try:
            return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
        except (AttributeError, RuntimeError):
            return None
    return _free_cpu_memory()


def _free_cpu_memory() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil  # type: ignore[import-not-found]

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - psutil is optional
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _gb(n: float) -> str:
    if n >= 1e8:
        return f"{n / 1e9:.1f} GB"
    return f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def short_count(n: int) -> str:
    return f"{n / 1e6:,.0f}M" if n >= 1e7 else f"{n:,}"


def ensure_memory(name: str, parameters: int, dtype: torch.dtype, device: torch.device, device_map: str | None) -> None:
    free = free_memory(device, device_map)
    if free is None:
        return
    per = torch.empty((), dtype=dtype).element_size()
    needed = parameters * per
    if needed > MEMORY_HEADROOM * free:
        where = "the GPUs and the CPU" if device_map else str(device)
        hint = "a smaller --dtype (bfloat16), " if per > 2 else ""
        raise InsufficientMemoryError(
            f"{name} needs about {_gb(needed)} ({short_count(parameters)} parameters × {per} bytes as "
            f"{DTYPE_NAMES.get(dtype, dtype)}) but only {_gb(free)} is free on {where}: try {hint}"
            "another --device, or a smaller model"
        )

