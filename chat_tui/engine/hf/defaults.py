"""What a model's generation_config says, applied as `model.generate` would: the sampling defaults
(shown to the user as the model's own) and the tokens that end a reply."""

from __future__ import annotations

from typing import Any

from chat_tui.engine.params import InvalidParameter, SamplingParams

GENERATION_KEYS = ("do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p", "repetition_penalty",
                   "max_new_tokens", "stop_strings", "stop", "presence_penalty", "frequency_penalty", "repetition_window")


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



def end_of_text_ids(generation_config: Any, tokenizer: Any) -> set[int]:
    """The end-of-text ids generation_config and the tokenizer name (either may give one id or a list)."""
    return _ids(getattr(generation_config, "eos_token_id", None)) | _ids(getattr(tokenizer, "eos_token_id", None))
