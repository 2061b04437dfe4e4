"""The engine: models, tokenizers, sampling and the decode loop, with no UI.

Nothing heavy is imported here. `load_engine` loads transformers (and torch) for a Hugging Face
model; a mini-GPT on the CPU runs in numpy and never imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from chat_tui.engine.params import InvalidParameter, SamplingParams
from chat_tui.engine.types import (
    Candidate,
    CheckpointError,
    Conversation,
    Engine,
    EngineError,
    Explainer,
    Message,
    MessageSpan,
    PromptInfo,
    Reply,
    Step,
    collect,
    explainer,
)

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "Candidate",
    "CheckpointError",
    "Conversation",
    "Engine",
    "EngineError",
    "Explainer",
    "InvalidParameter",
    "Message",
    "MessageSpan",
    "PromptInfo",
    "Reply",
    "SamplingParams",
    "Step",
    "bundled_model_path",
    "collect",
    "explainer",
    "load_engine",
]

BUNDLED_MODEL = "minigpt"


def bundled_model_path() -> Path:
    """The mini-GPT shipped with the package (inside the wheel, or `assets/` in a source checkout)."""
    package_dir = Path(__file__).resolve().parent.parent
    for candidate in (package_dir / "assets" / BUNDLED_MODEL, package_dir.parent / "assets" / BUNDLED_MODEL):
        if (candidate / "config.json").is_file():
            return candidate
    raise CheckpointError(
        f"the bundled model is missing: looked in {package_dir / 'assets' / BUNDLED_MODEL} "
        f"and {package_dir.parent / 'assets' / BUNDLED_MODEL}"
    )


def load_engine(
    model: str | Path | None = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
    progress: Callable[[str], None] | None = None,
    **options: object,
) -> Engine:
    """Load a model by path (a mini-GPT checkpoint folder or a Hugging Face folder) or hub id.

    `None` loads the bundled mini-GPT. With `base_url=URL` (and `api_key_env`, `api_key_file`,
    `timeout`), `model` is a model on that OpenAI-compatible server. Raises EngineError with a
    one-line message on bad input.
    """
    remember = options.pop("server_memory", None)  # where a server's rejected fields are kept (any model)
    if options.get("base_url"):
        from chat_tui.engine.remote import DEFAULT_TIMEOUT_S, RemoteEngine, read_key

        key = read_key(options.get("api_key_env"), options.get("api_key_file"))  # type: ignore[arg-type]
        timeout = float(options.get("timeout") or DEFAULT_TIMEOUT_S)  # type: ignore[arg-type]
        return RemoteEngine(str(options["base_url"]), None if model is None else str(model), api_key=key,
                            timeout=timeout, remember=remember)  # type: ignore[arg-type]
    for name in ("api_key_env", "api_key_file", "timeout"):
        if options.get(name):
            raise EngineError(f"--{name.replace('_', '-')} is for a server: give --base-url URL too")
    path = bundled_model_path() if model is None else Path(str(model)).expanduser()
    if _is_minigpt_checkpoint(path):
        from chat_tui.engine.minigpt import MiniGPTEngine

        if options.get("quantize"):
            raise EngineError("--quantize is for Hugging Face models (the mini-GPT decodes in float32)")
        chat_format = options.get("chat_format")
        return MiniGPTEngine.load(path, device=device, progress=progress,
                                  chat_format=None if chat_format is None else str(chat_format))
    try:
        from chat_tui.engine.hf import HFEngine
    except ImportError:  # the Hugging Face backend is not part of this build
        raise CheckpointError(f"{model}: not a chat-tui mini-GPT checkpoint (no config.json with model_type 'chat-tui-minigpt')") from None
    return HFEngine.load(str(model), device=device, dtype=dtype, progress=progress, **options)


def _is_minigpt_checkpoint(path: Path) -> bool:
    import json

    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type") == "chat-tui-minigpt"
    except (OSError, ValueError, AttributeError):
        # a folder of ours with a broken config: let the mini-GPT loader name the problem
        return (path / "model.safetensors").exists() or (path / "model.pt").exists()
