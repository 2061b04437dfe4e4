"""SamplingParams: every value the UI or a preset can send is checked, coerced or refused by name."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from chat_tui.engine.params import DEFAULT_ORDER, SPECS, STAGES, InvalidParameter, SamplingParams


def refused(name: str, value, allowed_piece: str) -> InvalidParameter:
    with pytest.raises(InvalidParameter) as info:
        SamplingParams(**{name: value})
    err = info.value
    message = str(err)
    assert err.name == name and name in message
    assert repr(value) in message or (isinstance(value, float) and math.isnan(value) and "nan" in message)
    assert allowed_piece in message, message
    return err


@pytest.mark.parametrize(
    ("name", "value", "allowed"),
    [
        ("temperature", -0.1, "[0, 100]"),
        ("temperature", 100.5, "[0, 100]"),
        ("top_p", 0.0, "(0, 1]"),
        ("top_p", 1.01, "(0, 1]"),
        ("top_p", -0.5, "(0, 1]"),
        ("typical_p", 0, "(0, 1]"),
        ("min_p", 1.5, "[0, 1]"),
        ("top_k", -1, "[0, 1000000]"),
        ("top_k", 2.5, "an integer in [0, 1000000]"),
        ("max_new_tokens", 0, "[1, 1000000]"),
        ("max_new_tokens", -5, "[1, 1000000]"),
        ("repetition_penalty", 0.0, "(0, 100]"),
        ("repetition_window", -1, "[0, 1000000]"),
        ("presence_penalty", 2.5, "[-2, 2]"),
        ("frequency_penalty", -2.01, "[-2, 2]"),
        ("top_candidates", 0, "[1, 256]"),
        ("seed", -1, "[0, 9223372036854775807]"),
        ("seed", 2**63, "[0, 9223372036854775807]"),
    ],
)
def test_out_of_range_is_refused_with_name_value_and_range(name, value, allowed):
    err = refused(name, value, allowed)
    assert err.value == value and allowed.endswith(err.allowed)


@pytest.mark.parametrize("name", ["temperature", "top_p", "min_p", "typical_p", "presence_penalty", "top_k", "seed"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_and_infinity_are_refused(name, value):
    refused(name, value, SPECS[name].range_text)


@pytest.mark.parametrize("value", ["abc", "", "0.7.1", True, False, None, [0.5], {"t": 1}, object()])
def test_non_numbers_are_refused(value):
    refused("temperature", value, "[0, 100]")


@pytest.mark.parametrize("name", ["top_k", "max_new_tokens", "top_candidates", "repetition_window"])
def test_none_is_refused_where_not_optional(name):
    refused(name, None, SPECS[name].range_text)


def test_strings_are_coerced():
    p = SamplingParams(temperature="0.7", top_k=" 40 ", top_p="0.9", max_new_tokens="128", seed="7", min_p="0")
    assert p.temperature == 0.7 and isinstance(p.temperature, float)
    assert p.top_k == 40 and isinstance(p.top_k, int)
    assert p.top_p == 0.9 and p.max_new_tokens == 128 and p.seed == 7 and p.min_p == 0.0
    # an integral float, in a string or not, is fine for an integer parameter
    assert SamplingParams(top_k="40.0").top_k == 40
    assert SamplingParams(top_k=40.0).top_k == 40
    assert SamplingParams(max_new_tokens="1e3").max_new_tokens == 1000
    refused("top_k", "4.5", "an integer in [0, 1000000]")
    refused("temperature", "nan", "[0, 100]")
    refused("temperature", "-1", "[0, 100]")


def test_numpy_scalars_are_numbers():
    p = SamplingParams(temperature=np.float32(0.5), top_k=np.int64(12))
    assert p.temperature == 0.5 and type(p.temperature) is float
    assert p.top_k == 12 and type(p.top_k) is int


def test_seed_empty_means_random():
    assert SamplingParams(seed="").seed is None
    assert SamplingParams(seed="  ").seed is None
    assert SamplingParams(seed=None).seed is None
    assert SamplingParams(seed="12").seed == 12
    assert SamplingParams(seed=2**63 - 1).seed == 2**63 - 1  # exact: not rounded through a float
    refused("seed", True, "[0, 9223372036854775807]")
    refused("seed", "abc", "[0, 9223372036854775807]")


def test_ints_become_floats_for_float_parameters():
    p = SamplingParams(temperature=1, top_p=1, presence_penalty=-2)
    assert type(p.temperature) is float and type(p.top_p) is float and p.presence_penalty == -2.0


def test_edges_are_allowed():
    p = SamplingParams(temperature=0, top_p=1, min_p=1, typical_p=1, top_k=0, max_new_tokens=1, seed=0)
    assert p.greedy and p.seed == 0
    assert not SamplingParams(temperature=1e-6).greedy


def test_stop_strings():
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "", "b"]).stop == ("a", "b")
    for bad in (None, 3, ["a", 3]):
        with pytest.raises(InvalidParameter, match="stop"):
            SamplingParams(stop=bad)


def test_order():
    assert SamplingParams().order == DEFAULT_ORDER == STAGES
    reordered = tuple(reversed(STAGES))
    assert SamplingParams(order=list(reordered)).order == reordered
    allowed = "a permutation of repetition, presence_frequency"
    for bad in (
        STAGES[:-1],  # one missing
        (*STAGES, "top_k"),  # one twice
        (*STAGES[:-1], "top_a"),  # an unknown stage
        ("top_k",) * len(STAGES),
        "top_k",
        None,
        42,
        (*STAGES[:-1], 1),
    ):
        with pytest.raises(InvalidParameter) as info:
            SamplingParams(order=bad)
        assert info.value.name == "order" and "order" in str(info.value) and allowed in str(info.value)


def test_to_dict_from_dict_round_trip():
    p = SamplingParams(
        temperature=0.7,
        top_k=40,
        top_p=0.9,
        min_p=0.05,
        typical_p=0.95,
        repetition_penalty=1.1,
        repetition_window=64,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        max_new_tokens=300,
        seed=1234,
        stop=("User:", "\n\n"),
        order=tuple(reversed(STAGES)),
        top_candidates=5,
    )
    d = p.to_dict()
    assert d["stop"] == ["User:", "\n\n"] and d["order"] == list(reversed(STAGES))
    assert set(d) == {f.name for f in dataclasses.fields(SamplingParams)}
    assert SamplingParams.from_dict(d) == p
    assert SamplingParams.from_dict(json.loads(json.dumps(d))) == p
    assert SamplingParams.from_dict(SamplingParams().to_dict()) == SamplingParams()


def test_from_dict_ignores_unknown_keys_and_validates():
    p = SamplingParams.from_dict({"temperature": "0.3", "do_sample": True, "eos_token_id": 2})
    assert p.temperature == 0.3
    with pytest.raises(InvalidParameter, match="top_p"):
        SamplingParams.from_dict({"top_p": 2})


def test_with_validates_and_is_immutable():
    p = SamplingParams()
    q = p.with_(temperature="0.2")
    assert q.temperature == 0.2 and p.temperature == 1.0
    with pytest.raises(InvalidParameter, match="temperature"):
        p.with_(temperature=-1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.5  # type: ignore[misc]


def test_neutral_is_every_stage_off():
    n = SamplingParams.neutral()
    assert (n.temperature, n.top_k, n.top_p, n.min_p, n.typical_p) == (1.0, 0, 1.0, 0.0, 1.0)
    assert (n.repetition_penalty, n.presence_penalty, n.frequency_penalty) == (1.0, 0.0, 0.0)


def test_range_text():
    assert SPECS["top_p"].range_text == "(0, 1]"
    assert SPECS["temperature"].range_text == "[0, 100]"
    assert SPECS["presence_penalty"].range_text == "[-2, 2]"


def test_logit_bias_reads_its_text_the_api_mapping_and_pairs():
    from chat_tui.engine.params import logit_bias_text

    text = SamplingParams(logit_bias=" 50256:-100, 198:5 ")
    assert text.logit_bias == ((198, 5.0), (50256, -100.0))
    assert SamplingParams(logit_bias={"198": 5, "50256": -100}) == text  # the OpenAI API's keys are strings
    assert SamplingParams(logit_bias=[(50256, -100), (198, 5.0)]) == text
    assert logit_bias_text(text.logit_bias) == "198:5,50256:-100" == text.to_dict()["logit_bias"]
    assert SamplingParams(logit_bias="").logit_bias == () == SamplingParams(logit_bias=None).logit_bias
    assert SamplingParams.from_dict(json.loads(json.dumps(text.to_dict()))) == text


@pytest.mark.parametrize("bad", ["5:101", "5:-100.5", "-1:3", "5", "x:1", "5:nan", "5:inf", 7, {"1.5": 2},
                                 {"3": True}, [(1, 2, 3)]])
def test_a_bad_logit_bias_is_refused_in_one_line(bad):
    with pytest.raises(InvalidParameter) as info:
        SamplingParams(logit_bias=bad)
    message = str(info.value)
    assert info.value.name == "logit_bias" and "\n" not in message
    assert "ids >= 0" in message and "[-100, 100]" in message
