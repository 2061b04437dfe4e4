"""The one-line settings summary (message details, the inspector) and the chain order's short form."""

from __future__ import annotations

from chat_tui.engine.params import DEFAULT_ORDER, SamplingParams, order_summary, settings_summary


def test_the_details_name_what_differs_from_neutral():
    params = SamplingParams(temperature=0.7, top_k=40, top_p=0.95, typical_p=0.9, repetition_penalty=1.1,
                            stop=("a", "b"), order=tuple(reversed(DEFAULT_ORDER)), seed=3, max_new_tokens=9)
    expected = "T 0.7 top-k 40 top-p 0.95 typ-p 0.9 rep 1.1 2 stop custom order"
    assert settings_summary(params) == expected
    assert settings_summary(params.to_dict()) == expected, "a saved message's dict reads the same"
    assert settings_summary(SamplingParams()) == "T 1"
    assert settings_summary(SamplingParams(temperature=0, min_p=0.05)) == "greedy min-p 0.05"
    biased = SamplingParams(temperature=0.5, logit_bias="50256:-100,198:5")
    assert settings_summary(biased) == settings_summary(biased.to_dict()) == "T 0.5 2 bias"
    assert settings_summary({"temperature": 0.5, "logit_bias": "garbled"}) == "T 0.5"


def test_a_saved_dict_may_lack_keys_or_be_missing():
    assert settings_summary(None) == "" and settings_summary({}) == ""
    assert settings_summary({"top_p": 0.9}) == "T 1 top-p 0.9"
    assert settings_summary({"temperature": 0.5, "top_k": None}) == "T 0.5"


def test_the_inspectors_short_form_is_narrower_and_leaves_out_stops_and_order():
    params = SamplingParams(temperature=0.8, top_k=5, top_p=0.9, typical_p=0.5, presence_penalty=0.2,
                            frequency_penalty=-0.1, stop=("x",), order=tuple(reversed(DEFAULT_ORDER)))
    assert settings_summary(params, short=True) == "T 0.8 k 5 p 0.9 typ 0.5 pres 0.2 freq -0.1"


def test_the_order_reads_default_or_its_stages_in_short():
    assert order_summary(DEFAULT_ORDER) == "default"
    assert order_summary(reversed(DEFAULT_ORDER)) == "typ→min-p→p→k→temp→pres/freq→rep"
