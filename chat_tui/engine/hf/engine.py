"""`HFEngine`: a transformers causal LM behind the Engine protocol.

`HFEngine.load` checks everything it can before transformers sees the model (see the package's
docstring); the constructor takes a model already loaded (the benchmarks and tests build their own).
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import inspect as _inspect
import threading
from collections.abc import Callable, Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from chat_tui.engine.chat_formats import CHAT_FORMATS
from chat_tui.engine.devices import best_device, resolve_device
from chat_tui.engine.generation import stream_engine
from chat_tui.engine.hf.checks import (
    check_architecture,
    check_config_against_weights,
    check_config_sizes,
    check_weights_present,
    read_config_json,
)
from chat_tui.engine.hf.defaults import defaults_from_generation_config, end_of_text_ids
from chat_tui.engine.hf.errors import ChatTemplateError, MissingDependencyError
from chat_tui.engine.hf.formats import ChatFormat
from chat_tui.engine.hf.inside import HFInside
from chat_tui.engine.hf.loading import (
    QUANTIZATIONS,
    load_config,
    load_model,
    load_tokenizer,
    quantize_int8,
    quiet_bars,
    quiet_logs,
    relayout_output_head,
)
from chat_tui.engine.hf.locate import hub_offline_env, offline_mode, resolve_source, weights_hash
from chat_tui.engine.hf.memory import (
    DTYPE_NAMES,
    choose_dtype,
    count_parameters,
    ensure_memory,
    parse_dtype,
    short_count,
)
from chat_tui.engine.hf.runner import NO_ATTENTION, HFRunner, backend_decode
from chat_tui.engine.inside import Attribution, BlockTrace, Head, KnockOut, Lens, Rollout, TokenPiece
from chat_tui.engine.inside_maths import check_heads_or_fail
from chat_tui.engine.params import SamplingParams
from chat_tui.engine.token_bytes import is_byte_level, token_label
from chat_tui.engine.types import Conversation, MessageSpan, ParamsSource, Step
from chat_tui.errors import EngineError, first_line

if TYPE_CHECKING:
    from chat_tui.engine.explain import ChainReplay, Explanation


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
        self._read_shape(context_length)
        self._read_placement()
        self._read_forward_signature()
        # how the model carries its past from step to step (see HFRunner), learnt on the first prefill
        self.decode_mode: str | None = None
        self.decode_note: str | None = None  # e.g. that each step recomputes the whole sequence
        self._lock = threading.Lock()  # one generation at a time per model
        self._backend_decode = backend_decode(tokenizer)
        self.relaid_head = relayout_output_head(model)
        self._token_texts: dict[int, str] = {}
        self._byte_level = is_byte_level(getattr(tokenizer, "backend_tokenizer", None))
        self._prepare_attention()
        generation_config = getattr(model, "generation_config", None)
        self._read_generation_defaults(generation_config, defaults)
        self.format = ChatFormat(tokenizer, model_name=name, override=chat_format,
                                 names=(name, hub_id, folder, getattr(model.config, "_name_or_path", "")))
        self.eos_ids = end_of_text_ids(generation_config, tokenizer)
        if self.format.turn_end is not None:
            self.eos_ids.add(self.format.turn_end)

    def _read_shape(self, context_length: int | None) -> None:
        """Layers, heads, the context length, the parameter count and dtype, from the config and the weights."""
        model = self.model
        config = model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.model_type = str(getattr(config, "model_type", "unknown"))
        self.n_layer = int(_first_attr(text_config, ("num_hidden_layers", "n_layer", "num_layers"), 0))
        self.n_head = int(_first_attr(text_config, ("num_attention_heads", "n_head", "num_heads"), 0))
        self.n_kv_head = int(_first_attr(text_config, ("num_key_value_heads",), self.n_head) or self.n_head)
        positions = _first_attr(text_config, ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"), None)
        self.context_length = int(context_length or positions or 2048)
        size = getattr(config, "vocab_size", None)
        self.vocab_size: int | None = size if isinstance(size, int) else None
        self.parameters = sum(p.numel() for p in model.parameters())
        first = next(model.parameters())
        self.dtype = DTYPE_NAMES.get(first.dtype, str(first.dtype).removeprefix("torch."))

    def _read_placement(self) -> None:
        """Where the inputs go (the input embeddings' device) and where the weights are (all devices, with a map)."""
        model = self.model
        first = next(model.parameters())
        embeddings = model.get_input_embeddings()
        self.input_device = embeddings.weight.device if embeddings is not None else first.device
        placed = {str(p.device) for p in model.parameters()}
        self.device = ",".join(sorted(placed)) if len(placed) > 1 else str(self.input_device)

    def _read_forward_signature(self) -> None:
        """What the model's forward takes: its cache argument's name, logits_to_keep, position_ids."""
        signature = _forward_parameters(self.model)
        self.forward_parameters = signature
        self.cache_kwarg = "cache" if "cache" in signature else "past_key_values"
        self.logits_to_keep = "logits_to_keep" in signature
        self.takes_position_ids = "position_ids" in signature

    def _prepare_attention(self) -> None:
        """The implementation the model loaded with (fast), switched to eager only to inspect.

        The language model's own config decides (a multimodal wrapper's may say eager while it runs SDPA).
        """
        self._fast_attention = _attention_implementation(self.model) or "sdpa"
        self._current_attention = self._fast_attention
        self.attention_unavailable: str | None = None
        self.attention_layers: list[int] | None = None  # the layers whose weights the inspector shows
        self.attention_note: str | None = None  # which layers have no attention weights, when some do
        if self._fast_attention != "eager" and not hasattr(self.model, "set_attn_implementation"):
            self.attention_unavailable = self._no_switch_reason()

    def _read_generation_defaults(self, generation_config: Any,
                                  defaults: tuple[SamplingParams, dict[str, Any]] | None) -> None:
        """The sampling defaults shown to the user as the model's own, and where they come from."""
        self._defaults, self.generation_defaults = defaults or defaults_from_generation_config(generation_config)
        self.defaults_source = "generation_config.json" if self.generation_defaults else "transformers defaults (greedy)"

    @property
    def chat_format(self) -> str:
        return self.format.name

    @property
    def system_prompt(self) -> str:
        """Where the format puts a system prompt: "native", "merged" (into the first user message) or "ignored"."""
        return self.format.system_prompt

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
        """Find, check and load a model folder or hub id; every failure is one line (an EngineError)."""
        if unknown:
            raise EngineError(f"unknown option(s) for a Hugging Face model: {', '.join(sorted(unknown))}")
        trust = bool(trust_remote_code)
        if chat_format is not None and chat_format not in CHAT_FORMATS:
            raise ChatTemplateError(f"unknown chat format {chat_format!r} (use {', '.join(CHAT_FORMATS)})")
        wanted_dtype = parse_dtype(dtype)
        if quantize not in QUANTIZATIONS:
            raise EngineError(f"unknown quantization {quantize!r} (use {', '.join(q for q in QUANTIZATIONS if q)})")
        torch_device = _choose_device(device, device_map)
        env_reason = hub_offline_env()
        is_offline = bool(offline) or env_reason is not None
        reason = "--offline" if offline else (env_reason or "")

        with offline_mode(is_offline), quiet_bars(progress is not None), quiet_logs():
            folder, name, hub_id = resolve_source(
                str(model), offline=is_offline, offline_reason=reason, trust_remote_code=trust,
                progress=progress, cache_dir=cache_dir,
            )
            display = hub_id or str(model)
            data = read_config_json(folder, display)
            check_architecture(data, display, trust)
            check_config_sizes(data, folder)
            check_weights_present(folder, display)
            config = load_config(folder, display, trust)
            check_config_against_weights(folder, data, config, trust)
            torch_dtype = choose_dtype(wanted_dtype, config, torch_device)
            parameters = count_parameters(folder, config, trust)
            if check_memory and parameters:
                ensure_memory(display, parameters, torch_dtype, torch_device, device_map)
            tokenizer = load_tokenizer(folder, display, trust)
            if progress:
                size = f"{short_count(parameters)} parameters, " if parameters else ""
                where = f"device map {device_map}" if device_map else str(torch_device)
                progress(f"loading {name} ({size}{DTYPE_NAMES[torch_dtype]}) on {where}")
            hf_model = load_model(folder, display, config, torch_dtype, torch_device, device_map, trust)
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
        return self.format.encode(text, protect=True) if text else []

    def decode(self, ids: Sequence[int]) -> str:
        if self._backend_decode is not None:
            return self._backend_decode(list(ids), skip_special_tokens=False)
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def token_text(self, token_id: int) -> str:
        """One token's own text; a piece of a multi-byte character shows as its bytes, `<0xE4>`."""
        text = self._token_texts.get(token_id)
        if text is None:
            if 0 <= token_id < len(self.tokenizer):
                text = token_label(self.decode([token_id]), self.tokenizer.convert_ids_to_tokens(token_id),
                                   self._byte_level)
            else:
                text = "\ufffd"
            self._token_texts[token_id] = text
        return text

    def default_params(self) -> SamplingParams:
        return self._defaults

    def render(self, conversation: Conversation) -> tuple[list[int], list[MessageSpan]]:
        return self.format.render(conversation)

    @property
    def alive(self) -> bool:
        return True  # in this process: alive as long as the app is

    def close(self, *, wait: bool = True) -> None:
        """Free the model: drop this engine's references to it, and give CUDA's cached blocks back.

        A reply still streaming keeps the model until it ends (its runner holds it). Closing twice is
        fine. `wait` is `ProcessEngine.close`'s option (the app passes it to any engine): in this
        process the model is freed at once either way.
        """
        on_cuda = "cuda" in self.device
        self.model = None
        self._token_texts.clear()
        gc.collect()  # a reference cycle through the model would otherwise keep it until the next collection
        if on_cuda and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def stream(
        self,
        conversation: Conversation,
        params: ParamsSource,
        *,
        inspect: bool = False,
        cancel: threading.Event | None = None,
        candidates: bool = True,
        knock_out: frozenset[tuple[int, int]] = frozenset(),
        prefix_ids: Sequence[int] = (),
        lens: bool = False,  # no lens in this loop (the Steps' commit_layer stays None): the views compute it
    ) -> Iterator[Step]:
        heads = frozenset(knock_out)
        if heads:
            reason = self.inside_views()["knockout"]
            if reason is not None:
                raise EngineError(reason)
            check_heads_or_fail(heads, self.n_layer, self.n_head)
        # transformers' notes (Reformer pads every step) are not the user's business
        with self._lock, quiet_logs(), self._inside.hooks(None, heads) if heads else contextlib.nullcontext():
            yield from stream_engine(self, HFRunner(self), conversation, params, stops=self.format.stops,
                                     inspect=inspect, cancel=cancel, candidates=candidates, knock_out=heads,
                                     prefix_ids=prefix_ids)

    # ------------------------------------------------------------------ the inside views (issue #14) and Explain

    @cached_property
    def _inside(self) -> HFInside:
        return HFInside(self)

    def inside_views(self) -> dict[str, str | None]:
        return self._inside.views()

    def logit_lens(self, ids: Sequence[int], token_id: int, top: int = 3) -> Lens:
        return self._inside.lens(ids, token_id, top)

    def attribute(self, ids: Sequence[int], token_id: int) -> Attribution:
        return self._inside.attribute(ids, token_id)

    def rollout(self, ids: Sequence[int]) -> Rollout:
        return self._inside.rollout(ids)

    def knock_out(self, ids: Sequence[int], heads: frozenset[Head], top: int = 8) -> KnockOut:
        return self._inside.knock_out(ids, heads, top)

    def token_pieces(self, text: str) -> list[TokenPiece]:
        return self._inside.token_pieces(text)

    def block_trace(self, ids: Sequence[int], layer: int, head: int) -> BlockTrace:
        return self._inside.block_trace(ids, layer, head)

    @property
    def explains(self) -> bool:
        """Explain (q·k ÷ √d) for the families whose queries and keys the hooks can read."""
        return self.model is not None and self._inside.explains()

    def explain_attention(self, ids: Sequence[int], query_position: int, layer: int, head: int) -> Explanation:
        return self._inside.explain(ids, query_position, layer, head)

    def replay_chain(self, step: Step, context_ids: Sequence[int] | None,
                     params: SamplingParams | None) -> ChainReplay:
        from chat_tui.engine.explain import replay_chain

        return replay_chain(step, context_ids, params, vocab_size=self.vocab_size)

    def stream_columns(self, conversation: Conversation, params: Sequence[ParamsSource], *,
                       cancel: threading.Event | None = None, candidates: bool = True) -> Iterator[tuple[int, Step]]:
        """Several settings answering one conversation, a token of each in turn, each with a KV cache of its
        own (the compare screen: `chat_tui.engine.compare.stream_columns`)."""
        from chat_tui.engine.compare import interleave

        with self._lock, quiet_logs():
            yield from interleave([
                stream_engine(self, HFRunner(self), conversation, column_params, stops=self.format.stops,
                              inspect=False, cancel=cancel, candidates=candidates)
                for column_params in params])

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
                with quiet_logs():  # transformers only warns when it cannot: the check below tells
                    self.model.set_attn_implementation(wanted)
                took = _attention_implementation(self.model) == wanted
            except Exception as exc:  # noqa: BLE001 - transformers raises ValueError, ImportError, ...
                took, why = False, first_line(exc)
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
        with contextlib.suppress(Exception), quiet_logs():
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
                    if got else NO_ATTENTION.format(self.model_type)
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
            with self._lock, quiet_logs(), torch.inference_mode():
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


def _choose_device(device: str | None, device_map: str | None) -> torch.device:
    """The device to load on: the user's (checked), or with a device map the best one here (accelerate places the rest)."""
    if not device_map:
        return resolve_device(device)
    if importlib.util.find_spec("accelerate") is None:
        raise MissingDependencyError("--device-map needs the accelerate package: pip install accelerate")
    return torch.device(best_device())
