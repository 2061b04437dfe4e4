"""The Hugging Face backend: any causal LM that `transformers` can load, behind the Engine protocol.

A model is a local folder or a hub id served from the local Hugging Face cache (downloaded first
when the network is allowed). Loading checks everything it can before transformers sees it (the
path, the folder, config.json, remote code, the weights, the memory it will take) and turns every
failure into one line: a subclass of `EngineError` from `errors`.

Generation is not `model.generate`: `HFRunner` drives the model through its KV cache for the shared
decode loop (`chat_tui.engine.generation.run_stream`), so a Hugging Face model gets the same
sampling chain, candidates, stop strings, cancel and context policy as the mini-GPT. It passes
what `generate` passes (`position_ids` among them) and carries the model's past the way the model
keeps it: its KV cache, its own recurrent state (RWKV), or none (GPT-1, XLM, Reformer: every step
runs the whole sequence again, and `decode_note` says so).

Attention: the fast attention (SDPA) returns no weights, so when the inspector asks for them the
model is switched to eager attention for that reply, and back afterwards. The switch is checked
(transformers only warns when a model cannot make it); a model that cannot is left as it is, so
the inspector never changes a reply, and `attention_unavailable` says why. The layers that return
weights are shown (`attention_layers`); `attention_note` names those that do not (the linear or
state-space layers of hybrid models). Grouped-query models report one row per query head (the
keys are repeated per group, as the model computes them).

The modules, in the order a load goes through them:

- `errors`: the error classes, each message one line;
- `locate`: finding the model (a folder, the cache, a download) and its weight files;
- `checks`: config.json, the architecture and the weights' shapes, before anything is built;
- `memory`: the dtype, and whether the weights fit in the free memory;
- `loading`: transformers' own loading calls, int8 quantization, the output head's layout;
- `defaults`: what generation_config says (sampling defaults, end-of-text ids);
- `formats`: how a conversation becomes token ids (template, dialogpt, plain, raw);
- `runner`: the model stepped for the shared decode loop;
- `engine`: `HFEngine`, which holds them together.

torch is imported here (this package is loaded only when a Hugging Face model is); transformers
only when a model is checked or loaded.
"""

from chat_tui.engine.hf.engine import HFEngine
from chat_tui.engine.hf.errors import (
    ChatTemplateError,
    DeviceError,
    DownloadError,
    EmptyFolderError,
    InsufficientMemoryError,
    InvalidConfigError,
    MissingDependencyError,
    MissingWeightsError,
    ModelNotFoundError,
    NotCachedError,
    RemoteCodeError,
    TokenizerLoadError,
    UnsupportedModelError,
    WeightsLoadError,
)
from chat_tui.engine.hf.loading import quantize_int8
from chat_tui.engine.hf.memory import count_parameters
from chat_tui.engine.hf.runner import HFRunner

__all__ = [
    "ChatTemplateError", "DeviceError", "DownloadError", "EmptyFolderError", "HFEngine", "HFRunner",
    "InsufficientMemoryError", "InvalidConfigError", "MissingDependencyError", "MissingWeightsError",
    "ModelNotFoundError", "NotCachedError", "RemoteCodeError", "TokenizerLoadError", "UnsupportedModelError",
    "WeightsLoadError", "count_parameters", "quantize_int8",
]
