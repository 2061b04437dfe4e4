"""The mini-GPT checkpoint folder: config.json, model.safetensors, tokenizer.json, generation_config.json.

Loading checks the config against sane limits before allocating anything, loads the weights
strictly, and never unpickles: safetensors only, or `torch.load(weights_only=True)` for a
`model.pt` state dict. Every failure is a CheckpointError with one line naming the file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from chat_tui.engine.files import atomic_write_bytes
from chat_tui.engine.model import ACTIVATIONS, GPT, GPTConfig
from chat_tui.engine.params import InvalidParameter, SamplingParams
from chat_tui.engine.tokenizer import ChatTokenizer
from chat_tui.engine.types import CheckpointError

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


def _fail(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}")


def read_config(folder: Path) -> GPTConfig:
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


def load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    weights = folder / WEIGHTS
    if weights.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(weights))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise _fail(weights, f"unreadable or truncated ({_first_line(exc)})") from None
    for name in PICKLE_WEIGHTS:
        path = folder / name
        if path.is_file():
            try:
                state = torch.load(str(path), map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - any unpickling failure is the file's fault
                raise _fail(path, f"refused: not a plain tensor file ({_first_line(exc)})") from None
            if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
                state = state["model"]  # a training checkpoint
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise _fail(path, "does not hold a state dict of tensors")
            return state
    raise _fail(weights, "missing (a checkpoint folder needs model.safetensors)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, ChatTokenizer, SamplingParams]:
    folder = Path(folder)
    config = read_config(folder)
    tokenizer_path = folder / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise _fail(tokenizer_path, "missing (a checkpoint folder needs tokenizer.json)")
    try:
        tokenizer = ChatTokenizer.from_file(tokenizer_path)
    except Exception as exc:  # noqa: BLE001 - tokenizers raises bare Exceptions
        raise _fail(tokenizer_path, f"unreadable ({_first_line(exc)})") from None
    if tokenizer.vocab_size > config.vocab_size:
        raise _fail(tokenizer_path, f"has {tokenizer.vocab_size} tokens, the model only {config.vocab_size}")
    defaults = read_generation_config(folder)
    state = load_state_dict(folder)
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}  # saved from a compiled model
    state.pop(TIED, None)
    with torch.device("meta"):
        model = GPT(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != TIED}
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
    model = GPT(config)
    model.load_state_dict({**state, TIED: state["transformer.wte.weight"]}, strict=True)
    model.to(device)
    model.eval()
    return model, tokenizer, defaults


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
