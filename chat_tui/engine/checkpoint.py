"""The mini-GPT checkpoint folder: config.json, model.safetensors, tokenizer.json, generation_config.json.

Loading checks the config against sane limits before allocating anything, loads the weights
strictly, and never unpickles: safetensors only, or `torch.load(weights_only=True)` for a
`model.pt` state dict. Every failure is a CheckpointError with one line naming the file.

`read_checkpoint` reads a safetensors folder as numpy arrays without importing torch (the CPU
decoder runs on them); `load_model` builds the torch model from the same arrays.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from chat_tui.engine.files import atomic_write_bytes
from chat_tui.engine.gptconfig import ACTIVATIONS, GPTConfig, parameter_shapes
from chat_tui.engine.params import InvalidParameter, SamplingParams
from chat_tui.engine.tokenizer import ChatTokenizer
from chat_tui.engine.types import CheckpointError
from chat_tui.errors import first_line

MODEL_TYPE = "chat-tui-minigpt"
WEIGHTS = "model.safetensors"
PICKLE_WEIGHTS = ("model.pt", "pytorch_model.bin", "ckpt.pt")
# Refuse configs that would allocate absurd amounts before we try (a typo or a hostile file).
LIMITS = {
    "vocab_size": (1, 1_000_000),
    "block_size": (1, 131_072),
    "n_layer": (1, 256),
    "n_head": (1, 256),
    "n_embd": (1, 32_768),
}
MAX_PARAMETERS = 20_000_000_000
TIED = "lm_head.weight"  # tied to transformer.wte.weight, not stored twice
# config.json's list of token ids the weights never learned (the special tokens a nanoGPT import
# appends): the decoder gives them logit -inf so they neither compete nor take probability
UNTRAINED = "untrained_token_ids"

if TYPE_CHECKING:
    import torch

    from chat_tui.engine.model import GPT


def _fail(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}")


def read_config(folder: Path) -> GPTConfig:
    return _config_from(folder, _config_data(folder))


def _config_data(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not folder.exists():
        raise _fail(folder, "no such checkpoint folder")
    if not folder.is_dir():
        raise _fail(folder, "not a folder (a checkpoint is a folder with config.json and model.safetensors)")
    if not path.is_file():
        raise _fail(path, "missing (a checkpoint folder needs config.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(path, f"not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise _fail(path, "must hold a JSON object")
    if data.get("model_type") != MODEL_TYPE:
        raise _fail(path, f"model_type is {data.get('model_type')!r}, expected {MODEL_TYPE!r}")
    return data


def _config_from(folder: Path, data: dict[str, Any]) -> GPTConfig:
    path = folder / "config.json"
    values: dict[str, Any] = {}
    for f in fields(GPTConfig):
        if f.name not in data:
            continue
        value = data[f.name]
        if f.name == "activation":
            if value not in ACTIVATIONS:
                raise _fail(path, f"activation = {value!r} is not one of {', '.join(ACTIVATIONS)}")
        elif f.name in LIMITS:
            low, high = LIMITS[f.name]
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise _fail(path, f"{f.name} = {value!r} is outside the sane range [{low}, {high}]")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(path, f"{f.name} = {value!r} is not a number")
        values[f.name] = value
    config = GPTConfig(**values)
    if config.n_embd % config.n_head:
        raise _fail(path, f"n_embd ({config.n_embd}) is not a multiple of n_head ({config.n_head})")
    approx = 12 * config.n_layer * config.n_embd**2 + (config.vocab_size + config.block_size) * config.n_embd
    if approx > MAX_PARAMETERS:
        raise _fail(path, f"describes {approx:,} parameters, more than the limit of {MAX_PARAMETERS:,}")
    return config


def _untrained_ids(folder: Path, data: dict[str, Any], config: GPTConfig) -> tuple[int, ...]:
    ids = data.get(UNTRAINED, [])
    if not isinstance(ids, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i < config.vocab_size for i in ids
    ):
        raise _fail(folder / "config.json", f"{UNTRAINED} must be a list of token ids below {config.vocab_size}")
    return tuple(sorted(set(ids)))


def read_generation_config(folder: Path) -> SamplingParams:
    path = folder / "generation_config.json"
    if not path.is_file():
        return SamplingParams()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("must hold a JSON object")
        if data.get("do_sample") is False:
            data["temperature"] = 0.0
        return SamplingParams.from_dict(data)
    except (UnicodeDecodeError, ValueError, TypeError, InvalidParameter) as exc:
        raise _fail(path, f"invalid ({exc})") from None


def load_arrays(folder: Path) -> dict[str, np.ndarray]:
    """The stored tensors as numpy arrays; torch is imported only for a pickle-format file or bfloat16."""
    weights = folder / WEIGHTS
    if weights.is_file():
        from safetensors import SafetensorError

        try:
            if "BF16" not in _safetensors_dtypes(weights):
                from safetensors.numpy import load_file

                return load_file(str(weights))
            from safetensors.torch import load_file as load_torch  # numpy has no bfloat16

            return {k: v.float().numpy() for k, v in load_torch(str(weights)).items()}
        except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
            raise _fail(weights, f"unreadable or truncated ({first_line(exc)})") from None
    for name in PICKLE_WEIGHTS:
        path = folder / name
        if path.is_file():
            import torch

            try:
                state = torch.load(str(path), map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - any unpickling failure is the file's fault
                raise _fail(path, f"refused: not a plain tensor file ({first_line(exc)})") from None
            if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
                state = state["model"]  # a training checkpoint
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise _fail(path, "does not hold a state dict of tensors")
            return {k: v.detach().float().numpy() for k, v in state.items()}
    raise _fail(weights, "missing (a checkpoint folder needs model.safetensors)")


def _safetensors_dtypes(path: Path) -> set[str]:
    """The dtypes named in a safetensors header (8-byte length, then JSON)."""
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        (size,) = struct.unpack("<Q", head)
        if size > 100_000_000:
            raise ValueError("header too large")
        header = json.loads(f.read(size))
    return {v.get("dtype") for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}


@dataclass
class Checkpoint:
    """A checkpoint folder read without torch: its config, float32 weights, tokenizer and defaults."""

    folder: Path
    config: GPTConfig
    arrays: dict[str, np.ndarray]  # float32, names as GPT's state dict, without the tied output head
    tokenizer: ChatTokenizer
    defaults: SamplingParams
    untrained_token_ids: tuple[int, ...] = ()


def read_checkpoint(folder: str | Path) -> Checkpoint:
    """Read and check a checkpoint folder (torch-free for safetensors weights)."""
    folder = Path(folder)
    data = _config_data(folder)
    config = _config_from(folder, data)
    untrained = _untrained_ids(folder, data, config)
    tokenizer_path = folder / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise _fail(tokenizer_path, "missing (a checkpoint folder needs tokenizer.json)")
    try:
        tokenizer = ChatTokenizer.from_file(tokenizer_path)
    except Exception as exc:  # noqa: BLE001 - tokenizers raises bare Exceptions
        raise _fail(tokenizer_path, f"unreadable ({first_line(exc)})") from None
    if tokenizer.vocab_size > config.vocab_size:
        raise _fail(tokenizer_path, f"has {tokenizer.vocab_size} tokens, the model only {config.vocab_size}")
    defaults = read_generation_config(folder)
    state = load_arrays(folder)
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}  # saved from a compiled model
    state.pop(TIED, None)
    expected = parameter_shapes(config)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    where = folder / WEIGHTS if (folder / WEIGHTS).is_file() else folder
    if missing:
        raise _fail(where, f"does not match config.json: {len(missing)} tensors missing (first: {missing[0]})")
    if unexpected:
        raise _fail(where, f"does not match config.json: unexpected tensor {unexpected[0]}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise _fail(where, f"does not match config.json: {name} has shape {tuple(state[name].shape)}, expected {shape}")
    arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.items()}
    return Checkpoint(folder, config, arrays, tokenizer, defaults, untrained)


def model_from_arrays(config: GPTConfig, arrays: dict[str, np.ndarray], device: str | torch.device = "cpu") -> GPT:
    """The torch model holding `arrays` (copied), in eval mode on `device`."""
    import torch

    from chat_tui.engine.model import GPT

    state = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in arrays.items()}
    model = GPT(config)
    model.load_state_dict({**state, TIED: state["transformer.wte.weight"]}, strict=True)
    model.to(device)
    model.eval()
    return model


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, ChatTokenizer, SamplingParams]:
    checkpoint = read_checkpoint(folder)
    model = model_from_arrays(checkpoint.config, checkpoint.arrays, device)
    return model, checkpoint.tokenizer, checkpoint.defaults


def checkpoint_hash(folder: str | Path) -> str:
    """A short content hash of the weights, recorded with every reply so it can be replayed."""
    folder = Path(folder)
    for name in (WEIGHTS, *PICKLE_WEIGHTS):
        path = folder / name
        if path.is_file():
            digest = hashlib.sha256()
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            return digest.hexdigest()[:16]
    return "unknown"


def save_checkpoint(
    folder: str | Path,
    model: GPT,
    tokenizer: ChatTokenizer,
    generation: SamplingParams | None = None,
    extra_config: dict | None = None,
) -> Path:
    """Write a complete checkpoint folder; each file is written atomically."""
    from safetensors.torch import save

    folder = Path(folder)
    raw = getattr(model, "_orig_mod", model)
    state = {k: v.detach().to("cpu").contiguous() for k, v in raw.state_dict().items() if k != TIED}
    config = {**raw.config.to_dict(), **(extra_config or {})}
    generation_config = (generation or SamplingParams()).to_dict()
    generation_config.pop("order", None)
    generation_config["do_sample"] = generation_config["temperature"] > 0
    atomic_write_bytes(folder / WEIGHTS, save(state, metadata={"format": "pt"}))
    atomic_write_bytes(folder / "tokenizer.json", tokenizer.tokenizer.to_str(pretty=False).encode("utf-8"))
    atomic_write_bytes(folder / "generation_config.json", (json.dumps(generation_config, indent=2) + "\n").encode())
    atomic_write_bytes(folder / "config.json", (json.dumps(config, indent=2) + "\n").encode())
    return folder
