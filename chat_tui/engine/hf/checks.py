"""Checks before transformers sees the folder: config.json, the architecture, the weights' shapes.

Each refuses with one line that names the file and the key, before anything is built or allocated
(a config that asks for 100000 layers would otherwise allocate for minutes, then fail with a page).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from chat_tui.engine.hf.errors import (
    EmptyFolderError,
    InvalidConfigError,
    MissingWeightsError,
    ModelNotFoundError,
    RemoteCodeError,
    UnsupportedModelError,
)
from chat_tui.engine.hf.locate import has_weights, weight_files
from chat_tui.errors import first_line

# config.json's sizes that must be positive whole numbers (the names architectures give them)
SIZE_KEYS = (
    "n_layer", "n_layers", "num_hidden_layers", "num_layers", "n_embd", "hidden_size", "d_model", "emb_dim",
    "n_head", "n_heads", "num_attention_heads", "num_key_value_heads", "vocab_size", "intermediate_size",
    "n_inner", "ffn_dim", "n_positions", "n_ctx", "max_position_embeddings", "head_dim",
)
LAYER_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")
LAYER_INDEX = re.compile(r"(?:^|\.)(?:h|layers|layer|blocks|block)\.(\d+)\.")


def read_config_json(folder: Path, name: str) -> dict:
    """config.json as a dict, after the checks that give the clearest messages."""
    try:
        entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    except OSError as exc:
        raise ModelNotFoundError(f"{name}: cannot read the folder ({first_line(exc)})") from None
    if not entries:
        raise EmptyFolderError(f"{name}: the folder is empty (a model folder holds config.json, weights and a tokenizer)")
    path = folder / "config.json"
    if not path.is_file():
        raise InvalidConfigError(f"{name}: no config.json, so this is not a Hugging Face model folder")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidConfigError(f"{path}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise InvalidConfigError(f"{path}: unreadable ({first_line(exc)})") from None
    if not isinstance(data, dict):
        raise InvalidConfigError(f"{path}: must hold a JSON object")
    return data


def check_architecture(data: dict, name: str, trust_remote_code: bool) -> None:
    """Refuse remote code (unless trusted), unknown architectures and models that cannot generate."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = data.get("model_type")
    auto_map = data.get("auto_map") if isinstance(data.get("auto_map"), dict) else {}
    if model_type is not None and not isinstance(model_type, str):
        raise InvalidConfigError(f"{name}: config.json has a model_type that is not a string ({model_type!r})")
    known = model_type in CONFIG_MAPPING_NAMES
    causal = model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    remote = auto_map.get("AutoModelForCausalLM") or auto_map.get("AutoConfig")
    if not trust_remote_code and remote and (not known or (not causal and "AutoModelForCausalLM" in auto_map)):
        raise RemoteCodeError(
            f"{name}: this model runs its own Python code ({remote}); chat-tui runs it only with "
            "--trust-remote-code, after you have read that code"
        )
    if model_type is None:
        return  # very old configs: transformers guesses from the file names, and says so if it cannot
    if not known and not (trust_remote_code and remote):
        raise UnsupportedModelError(
            f"{name}: model_type {model_type!r} is unknown to transformers {transformers.__version__} "
            "(upgrade it: pip install -U transformers)"
        )
    if known and not causal and not (trust_remote_code and "AutoModelForCausalLM" in auto_map):
        raise UnsupportedModelError(f"{name}: a {model_type!r} model is not a causal language model, so it cannot chat")


def check_config_sizes(data: dict, folder: Path) -> None:
    """Every size in config.json a positive whole number, before transformers builds anything from them."""
    path = folder / "config.json"
    for where, section in (("", data), ("text_config.", data.get("text_config"))):
        if not isinstance(section, dict):
            continue
        for key in SIZE_KEYS:
            value = section.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidConfigError(f"{path}: {where}{key} is {json.dumps(value)}; it must be a positive whole number")


def check_weights_present(folder: Path, name: str) -> None:
    """Weights transformers can load (safetensors or pytorch_model.bin), or one line naming what is there."""
    if not has_weights(folder):
        other = [p.name for p in folder.iterdir() if p.suffix in {".h5", ".msgpack", ".gguf", ".onnx"}]
        extra = f" (only {', '.join(other)}, which chat-tui does not load)" if other else ""
        raise MissingWeightsError(f"{name}: no weights: model.safetensors or pytorch_model.bin{extra}")


def safetensors_shapes(folder: Path, *, floats_only: bool = False) -> dict[str, tuple[tuple[int, ...], str]]:
    """Each tensor's shape and file, from the safetensors headers (nothing loaded); {} if unreadable.

    `floats_only` leaves out integer tensors (quantized weights are packed into other shapes).
    """
    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    for path in (p for p in weight_files(folder) if p.suffix == ".safetensors"):
        try:
            with path.open("rb") as f:
                size = int.from_bytes(f.read(8), "little")
                if not 0 < size < 100_000_000:
                    return {}
                header = json.loads(f.read(size))
            for key, info in header.items():
                if key != "__metadata__" and not (floats_only and not str(info.get("dtype", "F")).startswith(("F", "BF"))):
                    shapes[key] = (tuple(int(d) for d in info["shape"]), path.name)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}
    return shapes


def numel(shape: Sequence[int]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


def check_config_against_weights(folder: Path, data: dict, config: Any, trust_remote_code: bool) -> None:
    """config.json against the weights' shapes (read from the safetensors headers), before building the model.

    A config that asks for more layers than the weights hold, or sizes other than the tensors', would
    otherwise build a model of any size first (n_layer: 100000 allocates for minutes) and then fail
    with transformers' report. The error names config.json, the key and the tensor that disagrees.
    """
    shapes = safetensors_shapes(folder, floats_only=True)
    if not shapes or "quantization_config" in data:
        return  # pickled weights (their shapes cannot be read without loading them), or packed quantized ones
    path = folder / "config.json"
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None)
    indices = {int(m.group(1)) for key in shapes for m in [LAYER_INDEX.search(key)] if m}
    if text is config and isinstance(layers, int) and indices and layers > max(indices) + 1:
        key = next((k for k in LAYER_KEYS if data.get(k) == layers), "num_hidden_layers")
        file = sorted({f for _, f in shapes.values()})[0]
        raise InvalidConfigError(
            f"{path}: {key} is {layers}, but the weights ({file}) hold {max(indices) + 1} layers"
        )
    try:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    except Exception:  # noqa: BLE001 - a model that cannot be built empty: loading will say what is wrong
        return
    for key, shape in expected.items():
        found = shapes.get(key)
        if found is None or found[0] == shape or numel(found[0]) == numel(shape):
            continue  # the same numbers in another layout are for transformers' load-time conversions
        differing = {d for d, w in zip(shape, found[0], strict=False) if d != w}
        culprit = next((k for k, v in data.items() if isinstance(v, int) and not isinstance(v, bool)
                        and v in differing and k in SIZE_KEYS), None)
        said = f"{culprit} is {data[culprit]}, but" if culprit else "does not match the weights:"
        raise InvalidConfigError(
            f"{path}: {said} {found[1]} holds {key} with shape {list(found[0])} (config.json makes it {list(shape)})"
        )

