"""transformers' own loading calls, each failure turned into one line, and what is done to a loaded
model for decoding on the CPU (int8 quantization on request, the output head's layout always).

transformers is imported inside the functions: a failed pre-load check never pays for importing it.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

import torch

from chat_tui.engine.hf.errors import (
    InsufficientMemoryError,
    InvalidConfigError,
    RemoteCodeError,
    TokenizerLoadError,
    UnsupportedModelError,
    WeightsLoadError,
)
from chat_tui.errors import EngineError, first_line

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model", "vocab.txt",
    "tokenizer.tiktoken",
)


@contextlib.contextmanager
def quiet_bars(quiet: bool):
    """No transformers progress bars on the terminal while the app shows its own progress line."""
    if not quiet:
        yield
        return
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def quiet_logs():
    """transformers' warnings and load reports stay off the terminal: what matters becomes an error here."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def load_config(folder: Path, name: str, trust: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder), trust_remote_code=trust, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - ValueError, KeyError, OSError, TypeError...
        message = first_line(exc)
        if "trust_remote_code" in message:
            raise RemoteCodeError(f"{name}: this model runs its own Python code; chat-tui runs it only with --trust-remote-code") from None
        raise InvalidConfigError(f"{name}: config.json is invalid ({message})") from None


def load_tokenizer(folder: Path, name: str, trust: bool):
    from transformers import AutoTokenizer

    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise TokenizerLoadError(f"{name}: no tokenizer (tokenizer.json or tokenizer_config.json) in the folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - tokenizers raise anything from Exception to OSError
        message = first_line(exc)
        if "trust_remote_code" in message:
            raise RemoteCodeError(f"{name}: its tokenizer runs its own Python code; chat-tui runs it only with --trust-remote-code") from None
        raise TokenizerLoadError(f"{name}: the tokenizer failed to load ({message})") from None
    if isinstance(tokenizer, bool) or not callable(getattr(tokenizer, "decode", None)):
        raise TokenizerLoadError(f"{name}: the tokenizer failed to load (got {type(tokenizer).__name__})")
    return tokenizer


def load_model(folder: Path, name: str, config: Any, dtype: torch.dtype, device: torch.device,
                device_map: str | None, trust: bool):
    import transformers
    from transformers import AutoModelForCausalLM

    dtype_kwarg = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    kwargs: dict[str, Any] = {"trust_remote_code": trust, "local_files_only": True, dtype_kwarg: dtype, "config": config,
                              "output_loading_info": True}
    if device_map:
        kwargs["device_map"] = device_map
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    except EngineError:
        raise
    except MemoryError:
        raise InsufficientMemoryError(f"{name}: ran out of memory while loading the weights") from None
    except Exception as exc:  # noqa: BLE001 - truncated files, mismatched shapes, refused pickles
        message = first_line(exc)
        if "trust_remote_code" in message:
            raise RemoteCodeError(f"{name}: this model runs its own Python code; chat-tui runs it only with --trust-remote-code") from None
        if "Unrecognized configuration class" in message:
            raise UnsupportedModelError(f"{name}: not a causal language model ({message})") from None
        if "weights_only" in message or "Unpickl" in message or "unpickl" in message:
            raise WeightsLoadError(f"{name}: the weights were refused: a pickle that is not plain tensors ({message})") from None
        raise WeightsLoadError(f"{name}: the weights failed to load ({message})") from None
    missing = sorted(info.get("missing_keys") or []) if isinstance(info, dict) else []
    if missing:  # transformers would fill them with random numbers: a model that only babbles
        s = "s" if len(missing) > 1 else ""
        raise WeightsLoadError(
            f"{name}: the weights do not match config.json: {len(missing)} tensor{s} missing (first: {missing[0]})"
        )
    if not device_map:
        try:
            model.to(device)
        except (RuntimeError, torch.OutOfMemoryError) as exc:
            raise InsufficientMemoryError(f"{name}: does not fit on {device} ({first_line(exc)})") from None
    return model.eval()


QUANTIZATIONS = (None, "int8")


def quantize_int8(model: Any) -> int:
    """torch's dynamic int8 quantization of every Linear layer (the output head included), in place,
    for decoding on the CPU; returns how many layers it quantized.

    Decoding one token reads every weight once, so on a CPU it runs at memory speed: int8 weights
    are a quarter of float32's bytes. Activations stay float32 and are quantized per call, so the
    logits move a little and a greedy reply can part from float32's after a while
    (benchmarks/bench_hf.py reports how many of 128 tokens agree). GPT-2's Conv1D layers (a Linear
    with the weight transposed) become Linear first, so they are quantized too.
    """
    from torch.ao.nn.quantized.dynamic import Linear as QuantizedLinear
    from torch.ao.quantization import quantize_dynamic
    from transformers.pytorch_utils import Conv1D

    def to_linear(module: torch.nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, Conv1D):
                linear = torch.nn.Linear(child.weight.shape[0], child.weight.shape[1], device="meta")
                linear.weight = torch.nn.Parameter(child.weight.detach().t().contiguous(), requires_grad=False)
                linear.bias = torch.nn.Parameter(child.bias.detach(), requires_grad=False)
                setattr(module, name, linear)
            else:
                to_linear(child)

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notes (its successor is the torchao package)
        to_linear(model)
        quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    return sum(isinstance(m, QuantizedLinear) for m in model.modules())


def relayout_output_head(model: Any) -> bool:
    """Store the output head's float32 CPU weight column-major: same shape, same values.

    `F.linear` computes x @ W.T. With W (vocabulary x width) stored row-major, a one-token decode
    step runs MKL's transposed matrix-vector product, which reads the weight at half the speed of
    the plain one: 12.5 ms against 6.5 ms for GPT-2's 50257 x 768 head here, a sixth of the whole
    step (benchmarks/bench_hf.py). A tied input embedding shares the tensor and reads one strided
    row per token, which costs nothing measurable. The other layers are too narrow to gain.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if not isinstance(head, torch.nn.Linear) or not isinstance(weight, torch.nn.Parameter):
        return False
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.dim() != 2 or not weight.is_contiguous():
        return False
    with torch.no_grad():
        weight.data = weight.data.t().contiguous().t()  # the Parameter object (and any tie) stays the same
    return True
