"""The reply controller without Textual: replies run from the prompt to the saved message, several at once,
and a finished reply's details line and saved fields are pure functions of the reply."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

from chat_tui.engine.fake import FakeEngine, tokenize
from chat_tui.engine.params import SamplingParams
from chat_tui.engine.types import Message, PromptInfo, Step
from chat_tui.store import Store
from chat_tui.ui.reply import ReplyController, details_line, finished_reply, prompt_messages, receipt_text
from chat_tui.ui.state import ChatItem, GenJob

ROOT = Path(__file__).resolve().parents[2]
PARAMS = SamplingParams(temperature=0.7, top_k=40, seed=3, max_new_tokens=400)


def test_the_controller_imports_no_textual():
    probe = "import sys, chat_tui.ui.reply; print(sorted(m for m in sys.modules if m.split('.')[0] == 'textual'))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def step(index: int, text: str, *, prob: float = 0.5, params: SamplingParams = PARAMS, finish: str | None = None,
         elapsed: float = 0.0, prompt: PromptInfo | None = None) -> Step:
    return Step(index=index, position=10 + index, token_id=index, token=text, text=text, prob=prob, chain_prob=prob,
                top=[], attention=None, top_ids=None, top_logits=None, logsumexp=0.0, step_s=0.01,
                elapsed_s=elapsed, finish_reason=finish, prompt=prompt, params=params)


def prompt_info(seed: int = 11) -> PromptInfo:
    return PromptInfo(ids=[1, 2, 3, 4], tokens=["a", "b", "c", "d"], spans=[], dropped_messages=0,
                      dropped_tokens=0, seed=seed, prefill_s=0.0)


class Engine:
    model_name, backend, checkpoint_hash = "m", "fake", "hash-1"


def absorbed(job: GenJob, steps: list[Step]) -> GenJob:
    """`job` as the controller leaves it after taking in `steps` (no sink needed for that)."""
    for s in steps:
        job.push(s)
    ReplyController(Sink(), lambda: PARAMS).absorb(job)
    return job


# ------------------------------------------------------------------ the pure parts


def test_a_finished_reply_records_what_made_it():
    changed = PARAMS.with_(temperature=0.2)
    job = GenJob([Message("user", "hi")], ChatItem("assistant", ""), conversation_id=1, system_prompt="be brief",
                 engine=Engine())
    absorbed(job, [step(0, "Hel", prompt=prompt_info(), prob=0.25), step(1, "lo", params=changed, elapsed=1.0),
                   step(2, "!", params=changed, finish="length", elapsed=2.0)])
    reply = finished_reply(job, error=None, params=SamplingParams())
    assert (reply.status, reply.content, reply.finish_reason, reply.tokens) == ("complete", "Hello!", "length", 3)
    assert reply.params == PARAMS.to_dict() and reply.seed == 11  # the first token's settings and the seed used
    assert reply.tokens_per_s == 1.5  # 3 tokens over the 2 s after the prefill
    assert reply.meta["param_changes"] == [(1, changed.to_dict())]
    assert reply.meta["token_probs"] == [["Hel", 0.25], ["lo", 0.5], ["!", 0.5]]
    assert reply.meta["system_prompt"] == "be brief"
    assert (reply.meta["checkpoint_hash"], reply.meta["backend"]) == ("hash-1", "fake")
    assert (reply.meta["prompt_tokens"], reply.meta["dropped_messages"]) == (4, 0)
    assert job.item.meta == {}, "the item is left as it was"


def test_a_token_without_a_probability_is_saved_as_null_and_read_back():
    import json
    import math

    from chat_tui.ui.state import stored_token_probs

    job = GenJob([Message("user", "hi")], ChatItem("assistant", ""), conversation_id=1, engine=Engine())
    absorbed(job, [step(0, "Hel", prompt=prompt_info(), prob=float("nan")), step(1, "lo", finish="eos")])
    meta = finished_reply(job, error=None, params=SamplingParams()).meta
    assert meta["token_probs"] == [["Hel", None], ["lo", 0.5]]
    json.dumps(meta, allow_nan=False)  # an export is valid JSON (NaN is not)
    back = stored_token_probs(json.loads(json.dumps(meta)))
    assert back[0][0] == "Hel" and math.isnan(back[0][1]) and back[1] == ("lo", 0.5)


def test_a_stopped_a_failed_and_an_empty_reply():
    job = absorbed(GenJob([], ChatItem("assistant", "")), [step(0, "Hi", prompt=prompt_info())])
    job.cancel.set()
    assert finished_reply(job, error=None, params=PARAMS).status == "stopped"
    failed = finished_reply(job, error="EngineError: boom", params=PARAMS)
    assert (failed.status, failed.finish_reason, failed.meta["error"]) == ("error", "error", "EngineError: boom")
    empty = finished_reply(GenJob([], ChatItem("assistant", "")), error="no model", params=PARAMS)
    # no token said which settings it used: the ones given are recorded
    assert (empty.tokens, empty.params, empty.seed, empty.content) == (0, PARAMS.to_dict(), None, "")
    assert "checkpoint_hash" not in empty.meta


def test_a_continued_reply_adds_to_its_message():
    item = ChatItem("assistant", "Once", status="stopped", tokens=1, params={"temperature": 0.5}, seed=4,
                    meta={"continuations": [{"tokens": 9}]})
    job = GenJob([], item, mode="continue", base_text="Once")
    absorbed(job, [step(0, " upon", prompt=prompt_info(seed=5)), step(1, " a time", finish="eos", elapsed=1.0)])
    reply = finished_reply(job, error=None, params=SamplingParams())
    assert (reply.content, reply.tokens, reply.params, reply.seed) == ("Once upon a time", 3, {"temperature": 0.5}, 4)
    assert reply.meta["continuations"] == [
        {"tokens": 9}, {"params": PARAMS.to_dict(), "seed": 5, "tokens": 2, "param_changes": []},
    ]
    assert "param_changes" not in reply.meta


def test_the_details_line():
    item = ChatItem("assistant", "x", tokens=12, tokens_per_s=3.25, model="tiny\x1b[2J", seed=7,
                    params=SamplingParams(temperature=0.0).to_dict(), finish_reason="length",
                    meta={"param_changes": [(3, {})]})
    assert details_line(item) == "12 tokens · 3.2 tok/s · greedy · settings changed 1× mid-reply · reached max tokens"
    # against the model's defaults: only what differs; the model and seed are in the full receipt
    defaults = SamplingParams(temperature=0.0, top_k=40)
    assert details_line(item, defaults=defaults) == (
        "12 tokens · 3.2 tok/s · top-k 0 · settings changed 1× mid-reply · reached max tokens")
    assert details_line(ChatItem("assistant", "x", params=defaults.to_dict()), defaults=defaults).endswith("defaults")
    receipt = receipt_text(item)
    assert "model: tiny\u241b[2J" in receipt and "seed: 7" in receipt and "temperature: 0.0" in receipt
    assert "top_k: " in receipt and "repetition_penalty: " in receipt  # every setting
    assert receipt.count("seed: ") == 1  # the seed used, not also the setting's "random"
    forked = ChatItem("assistant", "x", params=defaults.to_dict(), seed=3, meta={
        "branch": [1, 2, 5], "knocked_out": ["L1H2"],
        "fork": {"receipt": "forked at token 3: ' to' (p = 2.88%, dropped by top-p) instead of ' gamma'"}})
    lines = receipt_text(forked).splitlines()
    assert "context: the 3 messages of its branch (ids 1, 2, 5)" in lines  # which path of the tree it answered
    assert "forked at token 3: ' to' (p = 2.88%, dropped by top-p) instead of ' gamma'" in lines
    assert "heads off: L1H2" in lines
    forked.meta["fork"]["at"] = 2
    assert details_line(forked, defaults=defaults) == "defaults · forked at token 3 · heads off: L1H2"
    item.status, item.finish_reason = "stopped", "cancelled"
    assert "stopped" not in details_line(item)  # the header says it
    failed = ChatItem("assistant", "", status="error", finish_reason="error", meta={"error": "Boom\nmore"})
    assert details_line(failed) == "failed: Boom more"


def test_the_details_line_while_streaming_counts_the_live_job():
    item = ChatItem("assistant", "Once", tokens=4, status="generating")
    job = absorbed(GenJob([], item, mode="continue"), [step(0, " upon", prompt=prompt_info())])
    assert details_line(item, live=job) == "5 tokens"
    fresh = absorbed(GenJob([], ChatItem("assistant", "")), [step(0, "a"), step(1, "b", elapsed=0.5)])
    assert details_line(fresh.item, live=fresh) == "2 tokens · 4.0 tok/s"


# ------------------------------------------------------------------ running replies


class Sink:
    """A view that records what it is told, as the app's ReplySink would show it."""

    def __init__(self) -> None:
        self.shown: dict[int, str] = {}
        self.finished: list[tuple[GenJob, BaseException | None]] = []
        self.not_saved: list[Exception] = []
        self.notices: list[str] = []
        self.steps = 0

    def reply_text(self, job, text, probs):
        self.shown[job.id] = self.shown.get(job.id, "") + text

    def reply_step(self, job, step):
        self.steps += 1

    def reply_progress(self, job, final):
        pass

    def reply_notice(self, job, notice):
        self.notices.append(notice)

    def reply_finished(self, job, error):
        self.finished.append((job, error))

    def store_failed(self, error):
        self.not_saved.append(error)


def run_replies(controller: ReplyController, engine, jobs: list[GenJob], timeout: float = 30.0) -> int:
    """Launch `jobs` at once, each streaming in its own thread, and play the app's event loop here: every
    report from a worker is handled on this one thread, in the order it came, with a flush between.
    Returns how many replies were at once under way (some text shown, not finished)."""
    events: queue.Queue = queue.Queue()

    def work(job: GenJob) -> None:
        try:
            controller.stream(job, lambda job: events.put(("steps", job)))
            events.put(("done", job))
        except Exception as exc:  # the app's worker reports this through Worker.StateChanged
            events.put(("error", job, exc))

    for job in jobs:
        controller.begin(job)
        controller.launch(job, engine)
    threads = [threading.Thread(target=work, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    at_once = 0
    while controller.jobs:
        at_once = max(at_once, sum(1 for job in controller.jobs if job.shown_count))
        kind, job, *error = events.get(timeout=timeout)
        if kind == "steps":
            controller.steps_ready(job)
        elif kind == "done":
            controller.done(job)
        else:
            controller.fail(job, error[0])
        controller.flush()
    for thread in threads:
        thread.join(timeout)
    return at_once


def user_turn(store: Store, cid: int, text: str) -> tuple[GenJob, str]:
    store.add_message(cid, "user", text)
    conversation = [Message("user", text)]
    return GenJob(conversation, ChatItem("assistant", "", status="waiting"), conversation_id=cid), text


def story(conversation, params) -> str:
    return " ".join(f"{conversation[-1].content}-{i}" for i in range(60)) + "."


def test_two_replies_stream_at_once_and_both_are_saved_whole(tmp_path):
    store = Store(tmp_path / "chat.db")
    first, second = store.create_conversation("a"), store.create_conversation("b")
    engine = FakeEngine([story], token_delay=0.001)
    sink = Sink()
    controller = ReplyController(sink, lambda: PARAMS, store)
    (job_a, a), (job_b, b) = user_turn(store, first, "alpha"), user_turn(store, second, "beta")

    assert run_replies(controller, engine, [job_a, job_b]) == 2

    assert not controller.jobs and not controller.streaming
    assert [job for job, _ in sink.finished] and {job.id for job, _ in sink.finished} == {job_a.id, job_b.id}
    assert all(error is None for _, error in sink.finished) and not sink.not_saved
    for cid, job, word in ((first, job_a, a), (second, job_b, b)):
        expected = story([Message("user", word)], PARAMS)
        reply = store.messages(cid)[-1]
        assert (reply.role, reply.content, reply.status) == ("assistant", expected, "complete")
        assert reply.tokens == job.count == len(tokenize(expected)) + 1  # and the end-of-text token
        assert reply.params == PARAMS.to_dict() and reply.seed == PARAMS.seed
        assert reply.model == "fake-model" and reply.meta["backend"] == "fake"
        assert "".join(text for text, _ in reply.meta["token_probs"]) == expected
        assert sink.shown[job.id] == expected, "the view was given every token, once"
        assert job.item.content == expected and job.item.db_id == reply.id
        assert "token_probs" not in job.item.meta, "in memory the colours are kept once, in item.token_probs"
    assert sink.steps == job_a.count + job_b.count


def test_a_failing_reply_keeps_what_arrived_and_the_other_finishes(tmp_path):
    store = Store(tmp_path / "chat.db")
    cid = store.create_conversation("a")
    controller = ReplyController(sink := Sink(), lambda: PARAMS, store)
    good, _ = user_turn(store, cid, "good")
    bad, _ = user_turn(store, cid, "bad")
    failing = FakeEngine([story], fail_at=5)
    run_replies(controller, FakeEngine([story]), [good])
    run_replies(controller, failing, [bad])
    saved = store.messages(cid)
    assert [m.status for m in saved if m.role == "assistant"] == ["complete", "error"]
    assert saved[-1].content == "".join(tokenize(story([Message("user", "bad")], PARAMS))[:5])
    assert saved[-1].tokens == 5
    assert "failed on purpose" in saved[-1].meta["error"]
    assert isinstance(sink.finished[-1][1], Exception)


def test_closing_keeps_a_streaming_reply_as_stopped_and_forgets_a_waiting_one(tmp_path):
    store = Store(tmp_path / "chat.db")
    cid = store.create_conversation("a")
    controller = ReplyController(Sink(), lambda: PARAMS, store)
    streaming, _ = user_turn(store, cid, "one")
    waiting, _ = user_turn(store, cid, "two")
    controller.begin(streaming)
    controller.launch(streaming, FakeEngine(["partial reply"]))
    controller.begin(waiting)
    assert controller.waiting() == [waiting] and controller.current is waiting
    for s in (step(0, "partial", prompt=prompt_info()), step(1, " rep")):
        streaming.push(s)
    controller.stop_all()
    assert not controller.jobs and waiting.done and waiting.cancel.is_set()
    saved = store.messages(cid)[-1]
    assert (saved.content, saved.status, saved.tokens) == ("partial rep", "stopped", 2)


def test_a_reply_that_cannot_be_saved_is_reported_and_kept_on_screen(tmp_path):
    store = Store(tmp_path / "chat.db")
    cid = store.create_conversation("a")
    job, _ = user_turn(store, cid, "hello")
    store.close()  # every write now fails
    controller = ReplyController(sink := Sink(), lambda: PARAMS, store)
    run_replies(controller, FakeEngine(["Hi there."]), [job])
    assert len(sink.not_saved) == 1 and job.item.content == "Hi there." and job.item.status == "complete"
    assert job.item.db_id is None


def test_the_prompt_is_the_system_prompt_and_the_conversation_up_to_the_reply():
    hi, reply, empty = ChatItem("user", "hi"), ChatItem("assistant", "hello"), ChatItem("assistant", "", status="error")
    later, waiting = ChatItem("user", "more"), ChatItem("assistant", "", status="waiting")
    items = [hi, reply, empty, later, waiting]
    assert prompt_messages(items, "be brief") == [
        Message("system", "be brief"), Message("user", "hi"), Message("assistant", "hello"), Message("user", "more"),
    ]
    assert prompt_messages(items, "  ", upto=reply) == [Message("user", "hi"), Message("assistant", "hello")]
