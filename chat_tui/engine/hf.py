"""The Hugging Face backend: any causal LM that `transformers` can load, behind the Engine protocol.

A model is a local folder or a hub id served from the local Hugging Face cache (downloaded first
when the network is allowed). Loading checks everything it can before transformers sees it (the
path, the folder, config.json, remote code, the weights, the memory it will take) and turns every
failure into one line: a subclass of `EngineError` defined below.

Generation is not `model.generate`: `HFRunner` drives the model through its KV cache for the shared
decode loop (`chat_tui.engine.generation.run_stream`), so a Hugging Face model gets the same
sampling chain, candidates, stop strings, cancel and context policy as the mini-GPT.

Conversation formats (`HFEngine.chat_format`):

- ``template``: the tokenizer's own chat template (`apply_chat_template`), when it has one;
- ``dialogpt``: DialoGPT's turns joined by the end-of-text token (chosen for DialoGPT checkpoints);
- ``plain``: ``User: …`` / ``Assistant: …`` lines, for base models without a template;
- ``raw``: the messages' text exactly as typed, one after the other, nothing added.

Decoding: `HFRunner` passes what `generate` passes (`position_ids` among them) and carries the
model's past the way the model keeps it: its KV cache, its own recurrent state (RWKV), or none
(GPT-1, XLM, Reformer: every step runs the whole sequence again, and `decode_note` says so).

Attention: the fast attention (SDPA) returns no weights, so when the inspector asks for them the
model is switched to eager attention for that reply, and back afterwards. The switch is checked
(transformers only warns when a model cannot make it); a model that cannot is left as it is, so
the inspector never changes a reply, and `attention_unavailable` says why. The layers that return
weights are shown (`attention_layers`); `attention_note` names those that do not (the linear or
state-space layers of hybrid models). Grouped-query models report one row per query head (the
keys are repeated per group, as the model computes them).
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import hashlib
import importlib.util
import inspect as _inspect
import json
import os
import re
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from chat_tui.engine.chat_formats import CHAT_FORMATS, PLAIN_STOP, render_text, with_stops
from chat_tui.engine.generation import run_stream
from chat_tui.engine.minigpt import best_device
from chat_tui.engine.params import InvalidParameter, SamplingParams
from chat_tui.engine.source import source_problem
from chat_tui.engine.types import (
    CheckpointError,
    Conversation,
    EngineError,
    Message,
    MessageSpan,
    ParamsSource,
    Step,
)

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
MEMORY_HEADROOM = 0.9  # refuse to load when the weights alone need more than this share of the free memory
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.pt")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model", "vocab.txt",
    "tokenizer.tiktoken",
)
# what a download fetches: configs, safetensors weights, tokenizer files (pickled weights only when needed)
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken", "tokenizer*"]
DOWNLOAD_IGNORE = ["*/*", "consolidated*", "*.onnx", "*.gguf"]
_NO_ATTENTION = "{} has no attention layers (its layers return no attention weights)"
GENERATION_KEYS = ("do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p", "repetition_penalty",
                   "max_new_tokens", "stop_strings", "stop", "presence_penalty", "frequency_penalty", "repetition_window")


# ----------------------------------------------------------------------------------------------------
# The errors, each one line fit to show as it is.


class ModelNotFoundError(CheckpointError):
    """A path that does not exist (and is no hub id), or a hub id the Hub does not know."""


class EmptyFolderError(CheckpointError):
    """A model folder with nothing in it."""


class InvalidConfigError(CheckpointError):
    """A folder whose config.json is missing, not JSON, or rejected by transformers."""


class UnsupportedModelError(CheckpointError):
    """An architecture transformers does not know, or one that is not a causal language model."""


class RemoteCodeError(CheckpointError):
    """A model that needs Python code from its repository, refused without --trust-remote-code."""


class NotCachedError(CheckpointError):
    """A hub id that is not in the local cache while the network is off."""


class MissingWeightsError(CheckpointError):
    """A model folder without weights transformers can load."""


class WeightsLoadError(CheckpointError):
    """Weights that are truncated, mismatched or refused (pickles beyond plain tensors)."""


class TokenizerLoadError(CheckpointError):
    """A tokenizer that is missing or fails to load."""


class ChatTemplateError(EngineError):
    """A chat template that fails on a conversation, or a chat format that does not fit the model."""


class InsufficientMemoryError(EngineError):
    """The model would not fit in the memory that is free."""


class DownloadError(EngineError):
    """The Hub could not be reached or refused the download."""


class MissingDependencyError(EngineError):
    """An optional package an option needs (accelerate for --device-map)."""


class DeviceError(EngineError):
    """A device or dtype that is unknown or not available here."""


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0][:240] if lines else type(exc).__name__


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_offline_env() -> str | None:
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if _env_true(name):
            return f"{name}=1"
    return None


@contextlib.contextmanager
def _offline_mode(offline: bool):
    """While loading offline, make huggingface_hub itself refuse any request (belt and braces)."""
    if not offline:
        yield
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


@contextlib.contextmanager
def _quiet_bars(quiet: bool):
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
def _quiet_logs():
    """transformers' warnings and load reports stay off the terminal: what matters becomes an error here."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


# ----------------------------------------------------------------------------------------------------
# Finding the model: a local folder, or a hub id in the cache (downloaded when allowed).


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            return [folder / n for n in names]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
    found: list[Path] = []
    for pattern in WEIGHT_PATTERNS:
        found.extend(p for p in sorted(folder.glob(pattern)) if p.is_file() and not p.name.startswith("consolidated"))
    return found


def _has_weights(folder: Path) -> bool:
    return bool(_weight_files(folder)) or (folder / "pytorch_model.bin.index.json").is_file()


def resolve_source(
    model: str,
    *,
    offline: bool,
    offline_reason: str,
    trust_remote_code: bool,
    progress: Callable[[str], None] | None,
    cache_dir: str | None = None,
) -> tuple[Path, str, str | None]:
    """(local folder, a short name, the hub id or None) for a folder path or a hub id."""
    text = str(model).strip()
    if not text:
        raise ModelNotFoundError("no model given: pass a folder or a Hugging Face hub id")
    problem = source_problem(text)
    if problem is not None:
        raise ModelNotFoundError(problem)
    path = Path(text).expanduser()
    if path.exists():
        return path, path.resolve().name or text, None
    return _from_hub(text, offline=offline, offline_reason=offline_reason, trust_remote_code=trust_remote_code,
                     progress=progress, cache_dir=cache_dir), text, text


def _from_hub(
    repo_id: str,
    *,
    offline: bool,
    offline_reason: str,
    trust_remote_code: bool,
    progress: Callable[[str], None] | None,
    cache_dir: str | None,
) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    where = cache_dir or constants.HF_HUB_CACHE
    cached: Path | None = None
    try:
        cached = Path(snapshot_download(repo_id, local_files_only=True, cache_dir=cache_dir))
    except HFValidationError:
        raise ModelNotFoundError(f"{repo_id}: no such folder, and not a valid Hugging Face hub id") from None
    except (LocalEntryNotFoundError, OSError, ValueError):
        cached = None
    if cached is not None and (cached / "config.json").is_file() and _has_weights(cached):
        return cached
    if offline:
        partly = " (only partly: no weights)" if cached is not None else ""
        raise NotCachedError(
            f"{repo_id}: no such folder, and not in the Hugging Face cache{partly} at {where}; "
            f"offline ({offline_reason}), so it cannot be downloaded: run `hf download {repo_id}` with the network on"
        )
    if progress:
        progress(f"downloading {repo_id} from the Hugging Face Hub")
    patterns = [*DOWNLOAD_PATTERNS, *(["*.py"] if trust_remote_code else [])]
    kwargs: dict[str, Any] = {"cache_dir": cache_dir, "ignore_patterns": DOWNLOAD_IGNORE}
    if progress is not None:
        kwargs["tqdm_class"] = _progress_tqdm(progress, repo_id)
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=patterns, **kwargs))
        if not _has_weights(folder):  # an older repository with pickled weights only
            folder = Path(snapshot_download(repo_id, allow_patterns=["pytorch_model*.bin", "*.json"], **kwargs))
    except GatedRepoError:
        raise DownloadError(
            f"{repo_id} is gated: accept its terms on https://huggingface.co/{repo_id}, then log in with `hf auth login`"
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"{repo_id}: no such folder, and no such model on the Hugging Face Hub (a private one needs `hf auth login`)"
        ) from None
    except OfflineModeIsEnabled:
        raise NotCachedError(f"{repo_id}: not in the Hugging Face cache at {where}, and the Hub is set offline") from None
    except Exception as exc:  # noqa: BLE001 - connection errors come in many classes
        raise DownloadError(
            f"{repo_id}: could not download it from the Hugging Face Hub ({_first_line(exc)}); "
            "check the network, or pass a local folder"
        ) from None
    return folder


def _progress_tqdm(progress: Callable[[str], None], repo_id: str):
    """A tqdm class that reports to `progress` instead of drawing on the terminal."""
    from tqdm.auto import tqdm

    class Report(tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self._report = progress
            self._count = 0

        def update(self, n: float | None = 1) -> bool | None:
            self._count += n or 0
            total = self.total
            self._report(f"downloading {repo_id}: {self._count:,.0f}/{total:,.0f}" if total else f"downloading {repo_id}")
            return None

        def __iter__(self):  # a disabled tqdm iterates without counting: count here
            for item in self.iterable:
                yield item
                self.update(1)

    return Report


# ----------------------------------------------------------------------------------------------------
# Checks before transformers sees the folder.


def read_config_json(folder: Path, name: str) -> dict:
    """config.json as a dict, after the checks that give the clearest messages."""
    try:
        entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    except OSError as exc:
        raise ModelNotFoundError(f"{name}: cannot read the folder ({_first_line(exc)})") from None
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
        raise InvalidConfigError(f"{path}: unreadable ({_first_line(exc)})") from None
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


# config.json's sizes that must be positive whole numbers (the names architectures give them)
SIZE_KEYS = (
    "n_layer", "n_layers", "num_hidden_layers", "num_layers", "n_embd", "hidden_size", "d_model", "emb_dim",
    "n_head", "n_heads", "num_attention_heads", "num_key_value_heads", "vocab_size", "intermediate_size",
    "n_inner", "ffn_dim", "n_positions", "n_ctx", "max_position_embeddings", "head_dim",
)
LAYER_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers")
LAYER_INDEX = re.compile(r"(?:^|\.)(?:h|layers|layer|blocks|block)\.(\d+)\.")


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


def safetensors_shapes(folder: Path, *, floats_only: bool = False) -> dict[str, tuple[tuple[int, ...], str]]:
    """Each tensor's shape and file, from the safetensors headers (nothing loaded); {} if unreadable.

    `floats_only` leaves out integer tensors (quantized weights are packed into other shapes).
    """
    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    for path in (p for p in _weight_files(folder) if p.suffix == ".safetensors"):
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


def _numel(shape: Sequence[int]) -> int:
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
        if found is None or found[0] == shape or _numel(found[0]) == _numel(shape):
            continue  # the same numbers in another layout are for transformers' load-time conversions
        differing = {d for d, w in zip(shape, found[0], strict=False) if d != w}
        culprit = next((k for k, v in data.items() if isinstance(v, int) and not isinstance(v, bool)
                        and v in differing and k in SIZE_KEYS), None)
        said = f"{culprit} is {data[culprit]}, but" if culprit else "does not match the weights:"
        raise InvalidConfigError(
            f"{path}: {said} {found[1]} holds {key} with shape {list(found[0])} (config.json makes it {list(shape)})"
        )


def resolve_device(device: str | None) -> torch.device:
    if device is None or str(device).strip().lower() in {"", "auto"}:
        return torch.device(best_device())
    try:
        d = torch.device(str(device).strip().lower())
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"unknown device {device!r} (use cpu, cuda, cuda:N or mps)") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device!r}: CUDA is not available here (no GPU, or torch was built without it)")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise DeviceError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif d.type == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise DeviceError(f"device {device!r}: Apple's MPS is not available here")
    elif d.type != "cpu":
        raise DeviceError(f"unknown device {device!r} (use cpu, cuda, cuda:N or mps)")
    return d


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


# ----------------------------------------------------------------------------------------------------
# Memory: parameters × bytes per parameter, against what is free, before anything is allocated.


def count_parameters(folder: Path, config: Any = None, trust_remote_code: bool = False) -> int | None:
    """Parameters in the checkpoint: from the safetensors headers (free), else an empty model on `meta`."""
    total = sum(_numel(shape) for shape, _ in safetensors_shapes(folder).values())
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


def _count(n: int) -> str:
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
            f"{name} needs about {_gb(needed)} ({_count(parameters)} parameters × {per} bytes as "
            f"{DTYPE_NAMES.get(dtype, dtype)}) but only {_gb(free)} is free on {where}: try {hint}"
            "another --device, or a smaller model"
        )


# ----------------------------------------------------------------------------------------------------
# Checkpoint identity.


def weights_hash(folder: Path) -> str:
    """A short content hash of the weights (for a single file: its sha256, as the mini-GPT's).

    Files in the Hugging Face cache are named by their sha256 already: nothing is read for them.
    """
    files = _weight_files(folder)
    if not files:
        return "unknown"
    digests = []
    for path in files:
        real = path.resolve()
        if real.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", real.name):
            digests.append(real.name)
            continue
        digest = hashlib.sha256()
        with real.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
        digests.append(digest.hexdigest())
    if len(digests) == 1:
        return digests[0][:16]
    return hashlib.sha256("".join(digests).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------
# Defaults from generation_config, as `model.generate` would apply them.


def defaults_from_generation_config(gc: Any) -> tuple[SamplingParams, dict[str, Any]]:
    """(the sampling defaults, the generation_config values they come from, for showing)."""
    source: dict[str, Any] = {}
    for key in GENERATION_KEYS:
        value = getattr(gc, key, None) if gc is not None else None
        if value is not None:
            source[key] = value
    do_sample = bool(source.get("do_sample", False))
    values: dict[str, Any] = {}
    if do_sample:
        values["temperature"] = source.get("temperature", 1.0)
        values["top_k"] = source.get("top_k", 50)  # generate's default when sampling
    else:
        values["temperature"] = 0.0  # generate is greedy unless do_sample is set
        if "top_k" in source:
            values["top_k"] = source["top_k"]
    for key in ("top_p", "min_p", "typical_p", "repetition_penalty", "max_new_tokens",
                "presence_penalty", "frequency_penalty", "repetition_window"):
        if key in source:
            values[key] = source[key]
    stops = source.get("stop_strings") or source.get("stop")  # stop: what chat-tui's export writes
    if stops:
        values["stop"] = (stops,) if isinstance(stops, str) else tuple(s for s in stops if isinstance(s, str))
    params = SamplingParams()
    for key, value in values.items():  # one bad value does not lose the others
        try:
            params = params.with_(**{key: value})
        except (InvalidParameter, TypeError, ValueError):
            source.pop(key, None)
    return params, source


def _ids(value: Any) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    if isinstance(value, (list, tuple, set)):
        return {int(v) for v in value if isinstance(v, int)}
    return set()


# ----------------------------------------------------------------------------------------------------
# The runner the shared decode loop drives.


class HFRunner:
    """Drives a transformers model step by step, as `model.generate` would.

    How a model carries what it has read from one step to the next is learnt on its first prefill
    and kept on the engine (`HFEngine.decode_mode`):

    - ``cache``: the KV cache the model returns (most models);
    - ``own-cache``: a cache handed to the model, which fills it in place and returns none
      (RecurrentGemma: its attention layers' keys there, its recurrent state in its layers);
    - ``state``: the model's own recurrent state (RWKV's ``state``);
    - ``recompute``: no cache at all (GPT-1, XLM, Reformer): every step runs the whole sequence
      again, with the inputs the model's `prepare_inputs_for_generation` builds (XLM appends its
      mask token), so each step costs as much as a prefill.
    """

    def __init__(self, engine: HFEngine) -> None:
        self.engine = engine
        self.model = engine.model
        self.device = engine.input_device
        self.cache: Any = None
        self.state: Any = None
        self.tokens: list[int] = []
        self.length = 0
        self.capture = False

    def _forward(self, ids: list[int], capture: bool, first: bool, mode: str):
        engine = self.engine
        if mode == "recompute":
            return self._recompute(capture)
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        kwargs: dict[str, Any] = {"use_cache": True}
        if mode == "state":
            if not first:
                kwargs["state"] = self.state
        elif not first or self.cache is not None:
            kwargs[engine.cache_kwarg] = self.cache
        if engine.takes_position_ids:  # as generate passes them: some models count positions wrongly without
            start = 0 if first else self.length
            kwargs["position_ids"] = torch.arange(start, start + len(ids), device=self.device).unsqueeze(0)
        if capture:
            kwargs["output_attentions"] = True
        if first and engine.logits_to_keep:
            kwargs["logits_to_keep"] = 1  # the prompt's other positions need no logits
        out = self.model(input_ids=x, **kwargs)
        if mode == "state":
            self.state = getattr(out, "state", None)
        else:
            cache = getattr(out, "cache", None)
            if cache is None:
                cache = getattr(out, "past_key_values", None)
            self.cache = cache if cache is not None else self.cache
        return out

    def _recompute(self, capture: bool):
        x = torch.tensor([self.tokens], dtype=torch.long, device=self.device)
        inputs = dict(self.engine.generation_inputs(x))
        inputs["use_cache"] = False
        if capture:
            inputs["output_attentions"] = True
        return self.model(**inputs)

    def _learn_mode(self, ids: list[int]):
        """The first prefill of this model: find how it decodes, and return that prefill's output."""
        engine = self.engine
        try:
            out = self._forward(ids, self.capture, first=True, mode="cache")
        except Exception:  # noqa: BLE001 - a model that takes no step-by-step inputs at all (Reformer)
            out = None
        if out is not None and dataclasses.is_dataclass(out) and "attentions" not in {f.name for f in dataclasses.fields(out)}:
            engine.attention_unavailable = engine.attention_unavailable or _NO_ATTENTION.format(engine.model_type)
        if out is not None and self.cache is not None:
            engine.decode_mode = "cache"
            return out
        if out is not None and getattr(out, "state", None) is not None and "state" in engine.forward_parameters:
            engine.decode_mode = "state"
            self.state = out.state
            return out
        own = engine.own_cache() if out is not None else None
        if own is not None:  # a model that fills a cache it is given but returns none (RecurrentGemma)
            self.cache = own
            out = self._forward(ids, self.capture, first=True, mode="cache")
            if own.get_seq_length() == len(ids):
                engine.decode_mode = "own-cache"
                return out
            self.cache = None
        out = self._recompute(self.capture)
        engine.decode_mode = "recompute"
        engine.decode_note = "no KV cache: recomputing the whole sequence each step (slower)"
        return out

    def prefill(self, ids: Sequence[int], inspect: bool):
        engine = self.engine
        self.capture = engine.attention_mode(inspect)
        ids = list(ids)
        self.tokens = list(ids)
        self.length = len(ids)
        if engine.decode_mode is None:
            out = self._learn_mode(ids)
        else:
            if engine.decode_mode == "own-cache":
                self.cache = engine.own_cache()
            out = self._forward(ids, self.capture, first=True, mode=engine.decode_mode)
        matrix = None
        if self.capture:
            layers = engine.layer_weights(getattr(out, "attentions", None), self.length, first=True)
            if layers is None:
                self.capture = False
            else:  # (layers, heads, P, P); a recomputing model may have read a token more (XLM's mask)
                matrix = torch.stack([_pad_keys(a[0, :, : self.length, : self.length], self.length) for a in layers])
        return engine.logits_out(out.logits[0, -1]), matrix

    def feed(self, token_id: int, inspect: bool):
        engine = self.engine
        self.tokens.append(token_id)
        out = self._forward([token_id], self.capture, first=False, mode=engine.decode_mode or "cache")
        self.length += 1
        row = None
        if self.capture:
            layers = engine.layer_weights(getattr(out, "attentions", None), self.length, first=False)
            if layers is None:
                self.capture = False
            else:
                last = self.length - 1  # the new token's row (the last one, unless the whole sequence was run)
                row = torch.stack([_pad_keys(a[0, :, -1] if a.shape[-2] == 1 else a[0, :, last, : self.length], self.length)
                                   for a in layers])
        return engine.logits_out(out.logits[0, -1]), row


def _backend_decode(tokenizer: Any) -> Callable[..., str] | None:
    """The `tokenizers` decoder itself, when the transformers tokenizer adds nothing to it.

    The loop decodes twice per token; transformers' own `decode` wraps the same call in some
    20 µs of argument handling, a tenth of a small model's step.
    """
    try:
        from transformers import PreTrainedTokenizerFast
    except ImportError:  # pragma: no cover - transformers is how this backend loads at all
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(tokenizer)._decode is not PreTrainedTokenizerFast._decode:
        return None  # a tokenizer class with its own decoding rules: keep them
    return backend.decode


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


def _relayout_output_head(model: Any) -> bool:
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


def _attention_implementation(model: Any) -> str | None:
    """The attention implementation the language model runs (a multimodal wrapper's own may differ)."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    found = getattr(text, "_attn_implementation", None) or getattr(config, "_attn_implementation", None)
    return found if isinstance(found, str) else None


def _is_attention(weights: Any, queries: int, keys: int, heads: int | None) -> bool:
    """(1, heads, queries, ≤ keys) weights, a layer's softmax over the keys (or the whole sequence's, run again)."""
    if not isinstance(weights, torch.Tensor) or weights.dim() != 4 or weights.shape[0] != 1:
        return False
    if heads is not None and weights.shape[1] != heads:
        return False
    q, k = weights.shape[-2], weights.shape[-1]
    if q == queries and 1 <= k <= keys:  # the prompt, or one cached step
        return True
    return q == k >= keys  # a model without a cache ran the whole sequence (XLM: and its mask token)


def _ranges(indices: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> "0–2, 5"."""
    parts: list[str] = []
    start = prev = None
    for i in [*indices, None]:
        if i is not None and prev is not None and i == prev + 1:
            prev = i
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}–{prev}")
        start = prev = i
    return ", ".join(parts)


def _pad_keys(weights: torch.Tensor, length: int) -> torch.Tensor:
    """(heads, queries, keys) with keys left-padded by zeros to `length` (a sliding window sees fewer)."""
    keys = weights.shape[-1]
    if keys == length:
        return weights
    if keys > length:
        return weights[..., -length:]
    return torch.nn.functional.pad(weights, (length - keys, 0))


# ----------------------------------------------------------------------------------------------------


@dataclass
class _Rendered:
    text: str
    ends: list[int]  # char offset where each message's part of the text ends
    start: int  # where the first message's part starts (after a template's preamble)
    contents: list[tuple[int, int] | None]  # each message's own text within `text`, when found
    protect: bool  # a message holds a special-token string: encode the messages' text as plain text


class HFEngine:
    """A transformers causal LM behind the Engine protocol."""

    backend = "hf"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str,
        folder: Path | None = None,
        hub_id: str | None = None,
        chat_format: str | None = None,
        context_length: int | None = None,
        defaults: tuple[SamplingParams, dict[str, Any]] | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_name = name
        self.folder = folder
        self.hub_id = hub_id
        config = model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.model_type = str(getattr(config, "model_type", "unknown"))
        self.n_layer = int(_first_attr(text_config, ("num_hidden_layers", "n_layer", "num_layers"), 0))
        self.n_head = int(_first_attr(text_config, ("num_attention_heads", "n_head", "num_heads"), 0))
        self.n_kv_head = int(_first_attr(text_config, ("num_key_value_heads",), self.n_head) or self.n_head)
        positions = _first_attr(text_config, ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"), None)
        self.context_length = int(context_length or positions or 2048)
        self.parameters = sum(p.numel() for p in model.parameters())
        first = next(model.parameters())
        self.dtype = DTYPE_NAMES.get(first.dtype, str(first.dtype).removeprefix("torch."))
        embeddings = model.get_input_embeddings()
        self.input_device = embeddings.weight.device if embeddings is not None else first.device
        placed = {str(p.device) for p in model.parameters()}
        self.device = ",".join(sorted(placed)) if len(placed) > 1 else str(self.input_device)
        signature = _forward_parameters(model)
        self.forward_parameters = signature
        self.cache_kwarg = "cache" if "cache" in signature else "past_key_values"
        self.logits_to_keep = "logits_to_keep" in signature
        self.takes_position_ids = "position_ids" in signature
        # how the model carries its past from step to step (see HFRunner), learnt on the first prefill
        self.decode_mode: str | None = None
        self.decode_note: str | None = None  # e.g. that each step recomputes the whole sequence
        self._lock = threading.Lock()  # one generation at a time per model
        self._backend_decode = _backend_decode(tokenizer)
        self.relaid_head = _relayout_output_head(model)
        self._token_texts: dict[int, str] = {}

        # attention: the implementation it loaded with (fast), switched to eager only to inspect; the
        # language model's own config decides (a multimodal wrapper's may say eager while it runs SDPA)
        self._fast_attention = _attention_implementation(model) or "sdpa"
        self._current_attention = self._fast_attention
        self.attention_unavailable: str | None = None
        self.attention_layers: list[int] | None = None  # the layers whose weights the inspector shows
        self.attention_note: str | None = None  # which layers have no attention weights, when some do
        if self._fast_attention != "eager" and not hasattr(model, "set_attn_implementation"):
            self.attention_unavailable = self._no_switch_reason()

        # generation defaults, shown to the user as the model's own
        gc = getattr(model, "generation_config", None)
        self._defaults, self.generation_defaults = defaults or defaults_from_generation_config(gc)
        self.defaults_source = "generation_config.json" if self.generation_defaults else "transformers defaults (greedy)"

        # the conversation format
        self.chat_format = self._choose_format(chat_format)
        if self.chat_format == "template" and importlib.util.find_spec("jinja2") is None:
            raise MissingDependencyError(f"{name}: its chat template needs the jinja2 package: pip install jinja2")
        self.system_prompt = "native"  # "native", "merged" (into the first user message) or "ignored"
        self._format_stops: tuple[str, ...] = ()
        self._special_strings = sorted(
            {t for t in (getattr(tokenizer, "all_special_tokens", None) or []) if t}
            | {str(t) for t in (getattr(tokenizer, "get_added_vocab", dict)() or {}) if len(str(t)) > 1},
            key=len,
        )
        eos = _ids(getattr(gc, "eos_token_id", None)) | _ids(getattr(tokenizer, "eos_token_id", None))
        if self.chat_format == "template":
            if not self._template_takes_system():
                self.system_prompt = "merged"
            turn_end = self._template_turn_end()
            if turn_end is not None:
                eos.add(turn_end)
        elif self.chat_format == "dialogpt":
            self.system_prompt = "ignored"
        elif self.chat_format == "plain":
            self._format_stops = (PLAIN_STOP,)
        self.eos_ids = eos
        self._prefix_ids = self._auto_prefix() if self.chat_format in ("plain", "raw") else []

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls,
        model: str | Path,
        *,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        progress: Callable[[str], None] | None = None,
        offline: bool | None = None,
        trust_remote_code: bool | None = False,
        device_map: str | None = None,
        chat_format: str | None = None,
        context_length: int | None = None,
        check_memory: bool = True,
        cache_dir: str | None = None,
        quantize: str | None = None,
        **unknown: Any,
    ) -> HFEngine:
        if unknown:
            raise EngineError(f"unknown option(s) for a Hugging Face model: {', '.join(sorted(unknown))}")
        trust = bool(trust_remote_code)
        if chat_format is not None and chat_format not in CHAT_FORMATS:
            raise ChatTemplateError(f"unknown chat format {chat_format!r} (use {', '.join(CHAT_FORMATS)})")
        wanted_dtype = parse_dtype(dtype)
        if quantize not in QUANTIZATIONS:
            raise EngineError(f"unknown quantization {quantize!r} (use {', '.join(q for q in QUANTIZATIONS if q)})")
        if device_map:
            if importlib.util.find_spec("accelerate") is None:
                raise MissingDependencyError("--device-map needs the accelerate package: pip install accelerate")
            torch_device = torch.device(best_device())
        else:
            torch_device = resolve_device(device)
        env_reason = _hub_offline_env()
        is_offline = bool(offline) or env_reason is not None
        reason = "--offline" if offline else (env_reason or "")

        with _offline_mode(is_offline), _quiet_bars(progress is not None), _quiet_logs():
            folder, name, hub_id = resolve_source(
                str(model), offline=is_offline, offline_reason=reason, trust_remote_code=trust,
                progress=progress, cache_dir=cache_dir,
            )
            display = hub_id or str(model)
            data = read_config_json(folder, display)
            check_architecture(data, display, trust)
            check_config_sizes(data, folder)
            if not _has_weights(folder):
                other = [p.name for p in folder.iterdir() if p.suffix in {".h5", ".msgpack", ".gguf", ".onnx"}]
                extra = f" (only {', '.join(other)}, which chat-tui does not load)" if other else ""
                raise MissingWeightsError(f"{display}: no weights: model.safetensors or pytorch_model.bin{extra}")
            config = _load_config(folder, display, trust)
            check_config_against_weights(folder, data, config, trust)
            torch_dtype = _config_dtype(config) if wanted_dtype == "auto" else (wanted_dtype or default_dtype(torch_device))
            parameters = count_parameters(folder, config, trust)
            if check_memory and parameters:
                ensure_memory(display, parameters, torch_dtype, torch_device, device_map)
            tokenizer = _load_tokenizer(folder, display, trust)
            if progress:
                size = f"{_count(parameters)} parameters, " if parameters else ""
                where = f"device map {device_map}" if device_map else str(torch_device)
                progress(f"loading {name} ({size}{DTYPE_NAMES[torch_dtype]}) on {where}")
            hf_model = _load_model(folder, display, config, torch_dtype, torch_device, device_map, trust)
            if quantize == "int8":
                if torch_device.type != "cpu" or device_map or torch_dtype != torch.float32:
                    raise EngineError(f"{display}: --quantize int8 is for float32 models on the CPU "
                                      "(leave out --device, --device-map and --dtype)")
                quantize_int8(hf_model)
        engine = cls(hf_model, tokenizer, name=name, folder=folder, hub_id=hub_id, chat_format=chat_format,
                     context_length=context_length)
        engine.learn_decode_mode()
        return engine

    # ------------------------------------------------------------------ the Engine protocol

    @cached_property
    def checkpoint_hash(self) -> str:  # computed when first needed: hashing gigabytes takes seconds
        return weights_hash(self.folder) if self.folder is not None else "in-memory"

    def encode(self, text: str) -> list[int]:
        """Plain text to ids; a special-token string typed by a user stays plain text."""
        return self._encode(text, protect=True) if text else []

    def decode(self, ids: Sequence[int]) -> str:
        if self._backend_decode is not None:
            return self._backend_decode(list(ids), skip_special_tokens=False)
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self.decode([token_id]) if 0 <= token_id < len(self.tokenizer) else "\ufffd"
            self._token_texts[token_id] = text
        return text

    def default_params(self) -> SamplingParams:
        return self._defaults

    def render(self, conversation: Conversation) -> tuple[list[int], list[MessageSpan]]:
        messages = list(conversation)
        if self.chat_format == "dialogpt":
            return self._render_dialogpt(messages)
        if self.chat_format == "template":
            rendered, indices = self._render_template(messages)
            prefix: list[int] = []
        else:
            rendered, indices = self._render_text(messages)
            prefix = self._prefix_ids
        ids, cuts = self._encode_rendered(rendered)
        ids = prefix + ids
        shift = len(prefix)
        spans: list[MessageSpan] = []
        start = cuts[0]
        for k, index in enumerate(indices):
            end = cuts[k + 1]
            spans.append(MessageSpan(index, messages[index].role, start + shift, end + shift))
            start = end
        if cuts[-1] > start:  # the generation prompt
            spans.append(MessageSpan(-1, "assistant", start + shift, cuts[-1] + shift))
        return ids, spans

    def stream(
        self,
        conversation: Conversation,
        params: ParamsSource,
        *,
        inspect: bool = False,
        cancel: threading.Event | None = None,
        candidates: bool = True,
    ) -> Iterator[Step]:
        with self._lock, _quiet_logs():  # transformers' notes (Reformer pads every step) are not the user's business
            runner = HFRunner(self)
            yield from run_stream(
                runner,
                conversation=conversation,
                render=self.render,
                decode=self.decode,
                token_text=self.token_text,
                eos_ids=self.eos_ids,
                context_length=self.context_length,
                params=self._with_format_stops(params),
                candidates=candidates,
                inspect=inspect,
                cancel=cancel,
                model_name=self.model_name,
            )

    # ------------------------------------------------------------------ attention

    def attention_mode(self, inspect: bool) -> bool:
        """Eager attention while inspecting, the fast one otherwise; True when weights will be captured.

        The switch is checked, not trusted: transformers only warns when a model cannot change its
        attention at run time (Falcon), and such a model would then compute its eager path without
        a causal mask and change the reply. Such a model is left as it is, and the inspector says why.
        """
        capture = inspect and self.attention_unavailable is None
        wanted = "eager" if capture else self._fast_attention
        if wanted != self._current_attention:
            try:
                with _quiet_logs():  # transformers only warns when it cannot: the check below tells
                    self.model.set_attn_implementation(wanted)
                took = _attention_implementation(self.model) == wanted
            except Exception as exc:  # noqa: BLE001 - transformers raises ValueError, ImportError, ...
                took, why = False, _first_line(exc)
            else:
                why = "transformers left it unchanged"
            if not took:
                if wanted != "eager":
                    raise EngineError(f"{self.model_name}: could not switch attention back to {wanted} ({why})")
                self.attention_unavailable = self._no_switch_reason()
                self._restore_attention()
                return False
            self._current_attention = wanted
        return capture

    def _no_switch_reason(self) -> str:
        import transformers

        return (f"{self.model_type} cannot switch to eager attention at run time (transformers "
                f"{transformers.__version__}), so its attention weights cannot be shown without changing the reply")

    def _restore_attention(self) -> None:
        """Back to the implementation the model loaded with, after a switch that went only part of the way."""
        with contextlib.suppress(Exception), _quiet_logs():
            self.model.set_attn_implementation(self._fast_attention)
        self._current_attention = self._fast_attention

    def layer_weights(self, attentions: Any, length: int, *, first: bool) -> list[torch.Tensor] | None:
        """The weights of the layers that have attention, or None (and why in `attention_unavailable`).

        The prefill (`first`) finds which layers return (1, heads, queries, keys) weights: a state-space
        or linear-attention layer returns none, or weights of another shape (MiniMax), and is left out;
        `attention_layers` lists the layers shown and `attention_note` names the others. The later
        steps take the same layers.
        """
        got = list(attentions) if attentions else []
        if first:
            shown = [i for i, a in enumerate(got) if _is_attention(a, length, length, None)]
            heads = {got[i].shape[1] for i in shown}
            if len(heads) > 1:  # layers with different head counts cannot share one matrix: keep the first kind
                shown = [i for i in shown if got[i].shape[1] == got[shown[0]].shape[1]]
            total = max(self.n_layer, len(got))
            if not shown:
                self.attention_unavailable = (
                    f"{self.model_type} has no attention weights to show: none of its {total} layers returned any"
                    if got else _NO_ATTENTION.format(self.model_type)
                )
                self._restore_attention()
                return None
            self.attention_layers = shown
            missing = [i for i in range(total) if i not in shown]
            self.attention_note = (
                f"attention of layer{'s' if len(shown) > 1 else ''} {_ranges(shown)} shown; "
                f"layer{'s' if len(missing) > 1 else ''} {_ranges(missing)} {'have' if len(missing) > 1 else 'has'} "
                "no attention weights" if missing else None
            )
            return [got[i] for i in shown]
        shown = self.attention_layers or []
        ok = bool(shown) and len(got) > shown[-1] and isinstance(got[shown[0]], torch.Tensor)
        if not ok or not all(_is_attention(got[i], 1, length, got[shown[0]].shape[1]) for i in shown):
            self.attention_unavailable = f"{self.model_type} stopped returning attention weights after the prompt"
            self._restore_attention()
            return None
        return [got[i] for i in shown]

    # ------------------------------------------------------------------ decoding without a returned cache

    def learn_decode_mode(self) -> None:
        """How the model carries its past (see HFRunner), from a one-token prefill: known, with
        `decode_note`, before the first reply. A model that fails here learns it on its first reply."""
        try:
            with self._lock, _quiet_logs(), torch.inference_mode():
                HFRunner(self).prefill([min(self.eos_ids, default=0)], inspect=False)
        except Exception:  # noqa: BLE001 - the first reply will try again, and say what is wrong
            self.decode_mode = self.decode_note = None

    def own_cache(self) -> Any:
        """A cache for a model that fills one it is given but returns none, as `generate` makes it; else None."""
        from transformers import DynamicCache, GenerationMixin

        model = self.model
        supports = getattr(model, "_supports_default_dynamic_cache", None)
        overridden = type(model).prepare_inputs_for_generation is not GenerationMixin.prepare_inputs_for_generation
        if self.cache_kwarg not in self.forward_parameters or supports is None or not supports() or overridden:
            return None
        config = model.config
        try:
            return DynamicCache(config=config.get_text_config(decoder=True))
        except Exception:  # noqa: BLE001 - a cache this model cannot describe: decode without one
            return None

    def generation_inputs(self, ids: torch.Tensor) -> dict[str, Any]:
        """The inputs `generate` gives this model for the whole sequence `ids` (XLM adds its mask token)."""
        try:
            inputs = self.model.prepare_inputs_for_generation(ids)
        except Exception:  # noqa: BLE001 - a model that wants more than the ids: give it the ids
            return {"input_ids": ids}
        return {k: v for k, v in dict(inputs).items() if v is not None and k != "cache_position"}

    def logits_out(self, logits: torch.Tensor) -> torch.Tensor:
        """One row of logits for the sampling chain, on the CPU (where the seeded generator lives)."""
        return logits.detach().float().cpu() if logits.device.type != "cpu" else logits

    # ------------------------------------------------------------------ formats

    def _choose_format(self, override: str | None) -> str:
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if override is not None:
            if override not in CHAT_FORMATS:
                raise ChatTemplateError(f"unknown chat format {override!r} (use {', '.join(CHAT_FORMATS)})")
            if override == "template" and not has_template:
                raise ChatTemplateError(f"{self.model_name}: the tokenizer has no chat template (use plain or raw)")
            if override == "dialogpt" and self.tokenizer.eos_token_id is None:
                raise ChatTemplateError(f"{self.model_name}: the dialogpt format needs an end-of-text token")
            return override
        if has_template:
            return "template"
        return self._without_template()

    def _without_template(self) -> str:
        names = " ".join(
            str(n) for n in (self.model_name, self.hub_id, self.folder, getattr(self.model.config, "_name_or_path", ""))
        )
        if "dialogpt" in names.lower() and self.tokenizer.eos_token_id is not None:
            return "dialogpt"
        return "plain"

    def _with_format_stops(self, params: ParamsSource) -> ParamsSource:
        return with_stops(params, self._format_stops)

    def _auto_prefix(self) -> list[int]:
        """What the tokenizer puts before any text by itself (a BOS for Llama-style tokenizers)."""
        try:
            with_specials = self.tokenizer("a", add_special_tokens=True)["input_ids"]
            without = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        except Exception:  # noqa: BLE001
            return []
        n = len(with_specials) - len(without)
        if n > 0 and with_specials[n:n + len(without)] == without:
            return list(with_specials[:n])
        return []

    def _encode(self, text: str, *, protect: bool) -> list[int]:
        kwargs: dict[str, Any] = {"add_special_tokens": False}
        if protect:
            kwargs["split_special_tokens"] = True
        return list(self.tokenizer(text, **kwargs)["input_ids"])

    def _render_dialogpt(self, messages: list[Message]) -> tuple[list[int], list[MessageSpan]]:
        eos = self.tokenizer.eos_token_id
        ids: list[int] = []
        spans: list[MessageSpan] = []
        for index, message in enumerate(messages):
            if message.role == "system":
                continue  # DialoGPT has no system prompt
            start = len(ids)
            ids.extend(self._encode(message.content, protect=True))
            if not (index == len(messages) - 1 and message.role == "assistant"):  # a last reply is continued
                ids.append(eos)
            spans.append(MessageSpan(index, message.role, start, len(ids)))
        return ids, spans

    def _render_text(self, messages: list[Message]) -> tuple[_Rendered, list[int]]:
        """The plain and raw formats, as text with known boundaries."""
        plain = self.chat_format == "plain"
        text, ends, contents = render_text(messages, plain=plain)
        protect = plain and self._holds_special(messages)
        return _Rendered(text, ends, 0, list(contents), protect), list(range(len(messages)))

    def _holds_special(self, messages: Sequence[Message]) -> bool:
        return any(s in m.content for m in messages for s in self._special_strings)

    # -- chat templates

    def _template_messages(self, messages: list[Message]) -> tuple[list[dict[str, str]], list[int]]:
        """The messages as the template takes them (a system prompt merged when it has no place for one)."""
        out: list[dict[str, str]] = []
        indices: list[int] = []
        pending: list[str] = []
        for index, message in enumerate(messages):
            if message.role == "system" and self.system_prompt == "merged":
                pending.append(message.content)
                continue
            content = message.content
            if pending and message.role == "user":
                content = "\n\n".join([*pending, content])
                pending = []
            out.append({"role": message.role, "content": content})
            indices.append(index)
        return out, indices

    def _apply_template(self, conversation: list[dict[str, str]], *, prompt: bool) -> str:
        continue_final = prompt and bool(conversation) and conversation[-1]["role"] == "assistant"
        return self.tokenizer.apply_chat_template(
            conversation,
            tokenize=False,
            add_generation_prompt=prompt and not continue_final,
            continue_final_message=continue_final,
        )

    def _render_template(self, messages: list[Message]) -> tuple[_Rendered, list[int]]:
        conversation, indices = self._template_messages(messages)
        try:
            text = self._apply_template(conversation, prompt=True)
        except Exception as exc:  # noqa: BLE001 - jinja2 errors, raise_exception() in the template
            raise ChatTemplateError(f"the chat template of {self.model_name} refused this conversation: {_first_line(exc)}") from None
        # where each message ends: the longest prefix the text shares with the conversation up to it
        ends: list[int] = []
        contents: list[tuple[int, int] | None] = []
        bos = getattr(self.tokenizer, "bos_token", None)
        start = len(bos) if bos and text.startswith(bos) else 0  # a leading BOS belongs to no message
        previous = start
        for k, message in enumerate(conversation):
            end = None
            if k == len(conversation) - 1 and message["role"] == "assistant":
                end = len(text)  # the reply being continued runs to the end
            else:
                try:
                    end = _common_prefix(self._apply_template(conversation[: k + 1], prompt=False), text)
                except Exception:  # noqa: BLE001 - e.g. a template that wants a user message last
                    end = None
            found = _find_content(text, message["content"], previous)
            if end is None or end < previous:
                end = found[1] if found is not None else previous
            contents.append(found)
            ends.append(end)
            previous = end
        protect = self._holds_special(messages)
        return _Rendered(text, ends, start, contents, protect), indices

    def _template_takes_system(self) -> bool:
        probe = "chat-tui system probe"
        try:
            text = self.tokenizer.apply_chat_template(
                [{"role": "system", "content": probe}, {"role": "user", "content": "hi"}],
                tokenize=False, add_generation_prompt=True,
            )
        except Exception:  # noqa: BLE001 - "System role not supported"
            return False
        return probe in text

    def _template_turn_end(self) -> int | None:
        """The token the template closes an assistant turn with (<|im_end|>, <|eot_id|>, <|end|>, ...)."""
        probe = "chat-tui reply probe"
        try:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}], tokenize=False
            )
        except Exception:  # noqa: BLE001
            return None
        at = text.rfind(probe)
        if at < 0:
            return None
        tail = text[at + len(probe):].lstrip(" ")
        if not tail:
            return None
        ids = self._encode(tail, protect=False)
        special = set(getattr(self.tokenizer, "all_special_ids", None) or [])
        added = set((getattr(self.tokenizer, "get_added_vocab", dict)() or {}).values())
        for token in ids[:2]:
            if token in special or token in added:
                return int(token)
        return None

    # -- text to ids with message boundaries

    def _encode_rendered(self, r: _Rendered) -> tuple[list[int], list[int]]:
        """The ids of `r.text` and the token index of [start, each message end..., the end]."""
        cuts_chars = [r.start, *r.ends, len(r.text)]
        if not r.protect:
            try:
                enc = self.tokenizer(r.text, add_special_tokens=False, return_offsets_mapping=True)
                ids = list(enc["input_ids"])
                starts = [s for s, _ in enc["offset_mapping"]]
            except (NotImplementedError, ValueError, TypeError, KeyError):
                pass  # a slow tokenizer: no offsets, tokenize the pieces instead
            else:
                starts = _monotonic(starts)
                return ids, [bisect.bisect_left(starts, c) for c in cuts_chars]
        # Piece by piece, cut at every boundary: the format's own text with its special tokens, and
        # each message's content with any special-token string in it kept as plain text.
        contents = [c for c in r.contents if c is not None]
        bounds = sorted({0, len(r.text), *cuts_chars, *(x for c in contents for x in c)})
        ids = []
        at_char = {0: 0}
        for a, b in zip(bounds, bounds[1:], strict=False):
            inside = any(s <= a and b <= e for s, e in contents)
            ids.extend(self._encode(r.text[a:b], protect=inside and r.protect))
            at_char[b] = len(ids)
        return ids, [at_char[c] for c in cuts_chars]


def _monotonic(starts: list[int]) -> list[int]:
    out: list[int] = []
    high = 0
    for s in starts:
        high = max(high, s)
        out.append(high)
    return out


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n
    while lo < hi:  # the first position where they differ
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _find_content(text: str, content: str, start: int) -> tuple[int, int] | None:
    for candidate in (content, content.strip()):
        if candidate:
            at = text.find(candidate, start)
            if at >= 0:
                return at, at + len(candidate)
    return None


def _first_attr(config: Any, names: Sequence[str], default: Any) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return default


def _forward_parameters(model: Any) -> set[str]:
    try:
        return set(_inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


# ----------------------------------------------------------------------------------------------------
# transformers calls, each failure turned into one line.


def _load_config(folder: Path, name: str, trust: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder), trust_remote_code=trust, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - ValueError, KeyError, OSError, TypeError...
        message = _first_line(exc)
        if "trust_remote_code" in message:
            raise RemoteCodeError(f"{name}: this model runs its own Python code; chat-tui runs it only with --trust-remote-code") from None
        raise InvalidConfigError(f"{name}: config.json is invalid ({message})") from None


def _load_tokenizer(folder: Path, name: str, trust: bool):
    from transformers import AutoTokenizer

    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise TokenizerLoadError(f"{name}: no tokenizer (tokenizer.json or tokenizer_config.json) in the folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - tokenizers raise anything from Exception to OSError
        message = _first_line(exc)
        if "trust_remote_code" in message:
            raise RemoteCodeError(f"{name}: its tokenizer runs its own Python code; chat-tui runs it only with --trust-remote-code") from None
        raise TokenizerLoadError(f"{name}: the tokenizer failed to load ({message})") from None
    if isinstance(tokenizer, bool) or not callable(getattr(tokenizer, "decode", None)):
        raise TokenizerLoadError(f"{name}: the tokenizer failed to load (got {type(tokenizer).__name__})")
    return tokenizer


def _load_model(folder: Path, name: str, config: Any, dtype: torch.dtype, device: torch.device,
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
        message = _first_line(exc)
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
            raise InsufficientMemoryError(f"{name}: does not fit on {device} ({_first_line(exc)})") from None
    return model.eval()
