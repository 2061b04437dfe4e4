"""Stop strings: held back while they might be starting, swallowed once complete, never leaked."""

from __future__ import annotations

import random

import pytest

from chat_tui.engine.stopping import StopStringFilter


def expected_output(text: str, stops: list[str]) -> tuple[str, bool]:
    """What the stream must show: the text before the stop string that is complete first."""
    best = None
    for stop in stops:
        if not stop:
            continue
        start = text.find(stop)
        if start >= 0:
            key = (start + len(stop), -len(stop))
            if best is None or key < best[0]:
                best = (key, start)
    if best is None:
        return text, False
    return text[: best[1]], True


def run(stops: list[str], chunks: list[str]) -> tuple[list[str], bool, str]:
    """Feed chunk by chunk; returns what each feed released, whether it stopped, and the flush."""
    f = StopStringFilter(stops)
    released, stopped = [], False
    for chunk in chunks:
        out, stopped_now = f.feed(chunk)
        released.append(out)
        if stopped:
            assert out == "" and stopped_now, "a stopped filter must release nothing more"
        stopped = stopped or stopped_now
    return released, stopped, f.flush()


def random_chunks(text: str, rng: random.Random) -> list[str]:
    chunks, i = [], 0
    while i < len(text):
        n = rng.randint(0, 4)  # empty feeds too
        chunks.append(text[i : i + n])
        i += n
    return chunks


def test_no_stops_passes_through_without_holding_back():
    f = StopStringFilter([])
    for piece in ["Hel", "lo", " <", "|end|", ">"]:
        assert f.feed(piece) == (piece, False)
        assert f.held == ""
    assert f.flush() == ""
    # empty strings are no stops at all
    assert StopStringFilter(["", ""]).feed("abc") == ("abc", False)


def test_stop_split_across_many_feeds():
    released, stopped, flushed = run(["<|end|>"], ["Hello", " wor", "ld<", "|e", "nd", "|", ">", "tail"])
    assert "".join(released) == "Hello world"
    assert stopped and flushed == ""
    # the tail after the stop string never shows, the stop string itself neither
    assert released == ["Hello", " wor", "ld", "", "", "", "", ""]


def test_stop_inside_one_feed_swallows_the_rest():
    released, stopped, _ = run(["###"], ["answer: 42### and then more"])
    assert released == ["answer: 42"] and stopped


def test_holds_back_only_what_could_still_become_a_stop():
    f = StopStringFilter(["<END>"])
    assert f.feed("a <") == ("a ", False)
    assert f.held == "<"
    assert f.feed("E") == ("", False)
    assert f.held == "<E"
    assert f.feed("x") == ("<Ex", False)  # not a stop after all: released at once
    assert f.held == ""
    assert f.feed("<EN") == ("", False)
    assert f.flush() == "<EN"  # the stream ended: what was held is released
    assert f.held == ""


def test_held_back_suffix_restarts_inside_a_failed_match():
    # "aab" fails as "aaa" but its tail "aa" could still start the stop string
    f = StopStringFilter(["aab"])
    assert f.feed("aa") == ("", False)
    assert f.feed("a") == ("a", False)
    assert f.feed("b") == ("", True)
    assert f.matched == "aab"


@pytest.mark.parametrize(
    ("stops", "text", "shown"),
    [
        (["User:", "Assistant:"], "Sure.\nAssistant: hi", "Sure.\n"),
        (["User:", "Assistant:"], "Sure.\nUser: hi\nAssistant:", "Sure.\n"),
        (["abcd", "bc"], "xabcd", "xa"),  # "bc" is complete first
        (["bcd", "abcd"], "xabcd", "x"),  # both end together: the longer one is swallowed
        (["\n\n", "\n"], "one\n\ntwo", "one"),
        (["ab", "abab"], "cababab", "c"),
    ],
)
def test_multiple_and_overlapping_stops(stops, text, shown):
    for chunks in ([text], list(text), [text[:2], text[2:5], text[5:]]):
        released, stopped, flushed = run(stops, chunks)
        assert "".join(released) == shown
        assert stopped and flushed == ""


def test_unicode_stops_and_text():
    stops = ["。\n", "🛑", "終わり"]
    text = "こんにちは、世界。元気？😀 ça va — 終わ…終わりです"
    released, stopped, _ = run(stops, list(text))
    assert "".join(released) == "こんにちは、世界。元気？😀 ça va — 終わ…"
    assert stopped
    released, stopped, _ = run(stops, ["x😀y", "🛑", "z"])
    assert released == ["x😀y", "", ""] and stopped
    released, stopped, flushed = run(stops, ["naïve 終", "わ"])
    assert "".join(released) == "naïve " and not stopped and flushed == "終わ"


def test_after_a_stop_nothing_more_is_released():
    f = StopStringFilter(["STOP"])
    assert f.feed("goSTOPgone") == ("go", True)
    assert f.stopped and f.matched == "STOP"
    assert f.feed("more") == ("", True)
    assert f.flush() == ""


@pytest.mark.parametrize("seed", range(40))
def test_random_streams_never_leak(seed):
    rng = random.Random(seed)
    alphabet = "ab<|>\n"
    stops = [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))
    ]
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
    shown, should_stop = expected_output(text, stops)
    for _ in range(5):
        chunks = random_chunks(text, rng)
        f = StopStringFilter(stops)
        so_far, fed, stopped = "", "", False
        for chunk in chunks:
            out, stopped = f.feed(chunk)
            so_far += out
            fed += chunk
            if not stopped:  # nothing lost: what was fed is released or held
                assert so_far + f.held == fed
            # never ahead of what the stream may show: no piece of a stop string, nothing after it
            assert shown.startswith(so_far), (stops, chunks, so_far)
            # and held back only while it could still become a stop string
            assert f.held == "" or any(s.startswith(f.held) and s != f.held for s in stops)
        assert stopped == should_stop, (stops, text, chunks)
        if not stopped:
            so_far += f.flush()
        assert so_far == shown, (stops, text, chunks)
