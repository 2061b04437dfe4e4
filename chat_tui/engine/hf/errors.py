"""The Hugging Face backend's errors: each one line, fit to show as it is.

A problem with the model's files is a `CheckpointError`; any other is an `EngineError`. An unknown
or unavailable device or dtype is the shared `chat_tui.errors.DeviceError`.
"""

from __future__ import annotations

from chat_tui.errors import CheckpointError, DeviceError, EngineError

__all__ = [
    "ChatTemplateError", "DeviceError", "DownloadError", "EmptyFolderError", "InsufficientMemoryError",
    "InvalidConfigError", "MissingDependencyError", "MissingWeightsError", "ModelNotFoundError", "NotCachedError",
    "RemoteCodeError", "TokenizerLoadError", "UnsupportedModelError", "WeightsLoadError",
]


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


