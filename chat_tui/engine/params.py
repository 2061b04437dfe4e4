"""Sampling parameters: one validated, immutable value shared by every backend and the UI.

Pure Python on purpose (no torch): the UI validates what the user types before the model loads.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

# The stages of the sampling chain, by name. The default order follows Hugging Face's
# `generate`: penalties on the raw logits, then temperature, then the truncations.
STAGES = ("repetition", "presence_frequency", "temperature", "top_k", "top_p", "min_p", "typical_p")
DEFAULT_ORDER = STAGES
# the chain's dropped_by code for a token that was already -inf before it (masked by the backend)
MASKED_BEFORE = -2


class InvalidParameter(ValueError):
    """A sampling parameter outside its range; the message names the parameter, value and range."""

    def __init__(self, name: str, value: Any, allowed: str) -> None:
        self.name, self.value, self.allowed = name, value, allowed
        super().__init__(f"{name} = {value!r} is invalid: allowed {allowed}")

    def __reduce__(self) -> tuple[Any, ...]:  # so it crosses a process boundary as itself
        return type(self), (self.name, self.value, self.allowed)


@dataclass(frozen=True)
class ParamSpec:
    """How one numeric parameter is shown, stepped and checked."""

    name: str
    kind: type  # float or int
    low: float
    high: float
    low_open: bool = False  # True: the low end itself is not allowed
    step: float = 0.1
    help: str = ""
    optional: bool = False  # None allowed (seed)

    @property
    def range_text(self) -> str:
        left = "(" if self.low_open else "["
        high = "∞" if math.isinf(self.high) else _fmt(self.high)
        right = ")" if math.isinf(self.high) else "]"
        return f"{left}{_fmt(self.low)}, {high}{right}"


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


SPECS: dict[str, ParamSpec] = {
    s.name: s
    for s in (
        ParamSpec("temperature", float, 0.0, 100.0, step=0.05, help="0 = greedy; higher = flatter"),
        ParamSpec("top_k", int, 0, 1_000_000, step=1, help="keep the k most likely tokens; 0 = off"),
        ParamSpec("top_p", float, 0.0, 1.0, low_open=True, step=0.05, help="nucleus: smallest set with mass p"),
        ParamSpec("min_p", float, 0.0, 1.0, step=0.01, help="drop tokens below min_p × top probability"),
        ParamSpec("typical_p", float, 0.0, 1.0, low_open=True, step=0.05, help="locally typical sampling"),
        ParamSpec("repetition_penalty", float, 0.0, 100.0, low_open=True, step=0.05,
                  help="divide logits of seen tokens (>1 discourages repeats)"),
        ParamSpec("repetition_window", int, 0, 1_000_000, step=16,
                  help="how many recent tokens the penalties look at; 0 = all"),
        ParamSpec("presence_penalty", float, -2.0, 2.0, step=0.1, help="OpenAI: subtract once per seen token"),
        ParamSpec("frequency_penalty", float, -2.0, 2.0, step=0.1, help="OpenAI: subtract per occurrence"),
        ParamSpec("max_new_tokens", int, 1, 1_000_000, step=16, help="longest reply in tokens"),
        ParamSpec("seed", int, 0, 2**63 - 1, step=1, optional=True, help="fixed seed = reproducible; empty = random"),
        ParamSpec("top_candidates", int, 1, 256, step=1, help="candidates reported per token"),
    )
}


# the on/off settings, with what each does (the numeric ones are in SPECS)
FLAGS: dict[str, str] = {
    "slide_context": "when the context is full, slide the window and go on (off: the reply ends)",
}
_FLAG_WORDS = {"true": True, "on": True, "yes": True, "1": True, "false": False, "off": False, "no": False, "0": False}


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    repetition_window: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_new_tokens: int = 256
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # OpenAI's logit_bias: (token id, bias) pairs added to the raw logits before every stage; in text
    # "50256:-100,198:5"
    logit_bias: tuple[tuple[int, float], ...] = ()
    order: tuple[str, ...] = field(default=DEFAULT_ORDER)
    top_candidates: int = 10
    # when the context is full: slide the window (the model then sees only the newest tokens) and
    # go on, as nanoGPT's generate does; off, the reply ends with stop reason "context"
    slide_context: bool = True

    def __post_init__(self) -> None:
        for spec in SPECS.values():
            value = getattr(self, spec.name)
            object.__setattr__(self, spec.name, check_value(spec, value))
        for name in FLAGS:
            object.__setattr__(self, name, check_flag(name, getattr(self, name)))
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (tuple, list)) or not all(isinstance(s, str) for s in stop):
            raise InvalidParameter("stop", stop, "a list of strings")
        object.__setattr__(self, "stop", tuple(s for s in stop if s))
        object.__setattr__(self, "logit_bias", check_logit_bias(self.logit_bias))
        order = self.order
        allowed = "a permutation of " + ", ".join(STAGES)
        try:
            order = tuple(order) if not isinstance(order, str) else (order,)
        except TypeError:  # None, a number
            raise InvalidParameter("order", self.order, allowed) from None
        if not all(isinstance(stage, str) for stage in order) or sorted(order) != sorted(STAGES):
            raise InvalidParameter("order", self.order, allowed)
        object.__setattr__(self, "order", order)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def with_(self, **changes: Any) -> SamplingParams:
        """A validated copy with some values changed (raises InvalidParameter)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop"] = list(self.stop)
        d["order"] = list(self.order)
        d["logit_bias"] = logit_bias_text(self.logit_bias)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingParams:
        """Build from a dict (a preset file, generation_config.json); unknown keys are ignored."""
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        if "stop" in kwargs and isinstance(kwargs["stop"], list):
            kwargs["stop"] = tuple(kwargs["stop"])
        if "order" in kwargs and isinstance(kwargs["order"], list):
            kwargs["order"] = tuple(kwargs["order"])
        return cls(**kwargs)

    @classmethod
    def neutral(cls) -> SamplingParams:
        """Every processor off: plain softmax sampling at temperature 1."""
        return cls()


def check_flag(name: str, value: Any) -> bool:
    """A boolean, or one of the words for it ("on", "off", "true", "false", "yes", "no", "1", "0")."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _FLAG_WORDS:
        return _FLAG_WORDS[value.strip().lower()]
    raise InvalidParameter(name, value, "on or off")


LOGIT_BIAS_RANGE = 100.0  # OpenAI's: a bias is in [-100, 100]
LOGIT_BIAS_ALLOWED = "token:bias pairs such as 50256:-100,198:5 (token ids >= 0, biases in [-100, 100])"


def check_logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """(token id, bias) pairs, sorted by id, from their text ("50256:-100,198:5"), a mapping
    ({"50256": -100}, as the OpenAI API sends it) or pairs; raises InvalidParameter."""
    if value is None:
        return ()
    if isinstance(value, str):
        pairs: Iterable[Any] = [item.partition(":")[::2] for item in value.replace(",", " ").split()]
    elif isinstance(value, Mapping):
        pairs = value.items()
    elif isinstance(value, (tuple, list)):
        pairs = value
    else:
        raise InvalidParameter("logit_bias", value, LOGIT_BIAS_ALLOWED)
    biases: dict[int, float] = {}
    for pair in pairs:
        try:
            token, bias = pair
            if isinstance(token, bool) or isinstance(bias, bool):
                raise ValueError
            token_id = int(token.strip()) if isinstance(token, str) else int(token)
            if token_id != token and not isinstance(token, str):  # 1.5 is not a token id
                raise ValueError
            amount = float(bias)
        except (TypeError, ValueError, OverflowError):
            raise InvalidParameter("logit_bias", value, LOGIT_BIAS_ALLOWED) from None
        if token_id < 0 or not -LOGIT_BIAS_RANGE <= amount <= LOGIT_BIAS_RANGE:  # NaN fails too
            raise InvalidParameter("logit_bias", value, LOGIT_BIAS_ALLOWED)
        biases[token_id] = amount
    return tuple(sorted(biases.items()))


def logit_bias_text(pairs: Iterable[tuple[int, float]]) -> str:
    """The text form of (token id, bias) pairs: "50256:-100,198:5" ("" for none)."""
    return ",".join(f"{token}:{bias:g}" for token, bias in pairs)


def check_value(spec: ParamSpec, value: Any) -> Any:
    """Coerce `value` to the parameter's type or raise InvalidParameter naming the range.

    Strings are parsed ("0.7", " 40 ", and "40.0" or "1e3" for an integer parameter); numpy
    scalars are numbers too; booleans are not.
    """
    if value is None and spec.optional:
        return None
    original = value
    if isinstance(value, str):
        text = value.strip()
        if text == "" and spec.optional:
            return None
        try:
            value = int(text) if spec.kind is int else float(text)
        except ValueError:
            try:  # "40.0" or "1e3" for an integer: checked as the float it is
                value = float(text)
            except ValueError:
                raise InvalidParameter(spec.name, original, spec.range_text) from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidParameter(spec.name, original, spec.range_text)
    if spec.kind is int:
        if not isinstance(value, numbers.Integral):
            value = float(value)
            if not value.is_integer():
                raise InvalidParameter(spec.name, original, f"an integer in {spec.range_text}")
        value = int(value)
    else:
        try:
            value = float(value)
        except OverflowError:  # an int too large for a float
            raise InvalidParameter(spec.name, original, spec.range_text) from None
        if math.isnan(value) or math.isinf(value):
            raise InvalidParameter(spec.name, original, spec.range_text)
    too_low = value <= spec.low if spec.low_open else value < spec.low
    if too_low or value > spec.high:
        raise InvalidParameter(spec.name, original, spec.range_text)
    return value


# The short names of the settings and of the chain's stages, for one-line summaries (the
# inspector's, the sampling pane's order row); the message details spell three of them out
SHORT_NAMES: dict[str, str] = {
    "repetition": "rep",
    "presence_frequency": "pres/freq",
    "temperature": "temp",
    "top_k": "k",
    "top_p": "p",
    "min_p": "min-p",
    "typical_p": "typ",
    "repetition_penalty": "rep",
    "presence_penalty": "pres",
    "frequency_penalty": "freq",
}
DETAIL_NAMES: dict[str, str] = {**SHORT_NAMES, "top_k": "top-k", "top_p": "top-p", "typical_p": "typ-p"}
SUMMARISED = ("top_k", "top_p", "min_p", "typical_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


def settings_summary(params: SamplingParams | Mapping[str, Any] | None, *, short: bool = False) -> str:
    """The sampling settings that differ from neutral, in one line: "T 0.7 top-p 0.95 rep 1.1 2 stop".

    `params`: the settings, or their dict as a saved message keeps it (keys may be missing).
    `short`: the inspector's narrower line ("k 40", "p 0.9"; no stop strings, no order).
    """
    values = params.to_dict() if isinstance(params, SamplingParams) else params
    if not values:
        return ""
    neutral = SamplingParams.neutral().to_dict()
    names = SHORT_NAMES if short else DETAIL_NAMES
    parts = ["greedy"] if values.get("temperature") == 0 else [f"T {values.get('temperature', 1.0):g}"]
    for key in SUMMARISED:
        value = values.get(key)
        if value is not None and value != neutral[key]:
            parts.append(f"{names[key]} {value:g}")
    if not short:
        if values.get("stop"):
            parts.append(f"{len(values['stop'])} stop")
        if values.get("logit_bias"):
            with contextlib.suppress(InvalidParameter):  # a saved dict is read, never refused
                parts.append(f"{len(check_logit_bias(values['logit_bias']))} bias")
        if values.get("order") and list(values["order"]) != list(DEFAULT_ORDER):
            parts.append("custom order")
    return " ".join(parts)


def order_summary(order: Iterable[str]) -> str:
    """The sampling chain's order in short names ("rep→pres/freq→temp→k→p→min-p→typ"), or "default"."""
    order = tuple(order)
    if order == DEFAULT_ORDER:
        return "default"
    return "→".join(SHORT_NAMES.get(stage, stage) for stage in order)
