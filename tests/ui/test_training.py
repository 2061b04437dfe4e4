"""Pilot tests of the training screen: the palette command, the form's checks, a real tiny run
streamed into the chart, opening its checkpoint in the chat while it trains, and stopping it."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console
from rich.text import Text
from textual.widgets import Input, Select, Static

from chat_tui.train.config import TrainConfig, setting_text
from chat_tui.ui.app import ChatApp
from chat_tui.ui.training import (
    NUMBER_FIELDS,
    FiguresView,
    FormError,
    LossChartView,
    TrainingScreen,
    TrainingSession,
    parse_form,
)

from .conftest import ready, wait_for

TEXT = "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n" * 60  # ~5 KB


def rendered(widget: Static | LossChartView | FiguresView, width: int = 100) -> str:
    if isinstance(widget, FiguresView):
        return widget.pack(width).plain
    content = widget.chart if isinstance(widget, LossChartView) else widget.content
    if isinstance(content, Text):
        return content.plain
    console = Console(width=width, record=True, color_system=None)
    console.print(content)
    return console.export_text()


def screen_text(screen: TrainingScreen, id_: str) -> str:
    return rendered(screen.query_one(f"#{id_}"))


async def open_training(pilot, app: ChatApp) -> TrainingScreen:
    await ready(pilot, app)
    await pilot.press("ctrl+t")
    await wait_for(pilot, lambda: isinstance(app.screen, TrainingScreen), what="the training screen")
    await pilot.pause()
    return app.screen  # type: ignore[return-value]


def fill(screen: TrainingScreen, **values: str) -> None:
    for name, value in values.items():
        if name in ("kind", "tokenizer"):
            screen.query_one(f"#{name}", Select).value = value
        else:
            screen.query_one(f"#{name}", Input).value = value


def tiny_form(tmp_path: Path, **changes: str) -> dict[str, str]:
    corpus = tmp_path / "sonnet.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    base = dict(data=str(corpus), out=str(tmp_path / "run"), n_layer="1", n_head="2", n_embd="32", block_size="32",
                batch_size="4", max_steps="30", lr="1e-3", eval_every="10")
    return {**base, **changes}


async def test_the_palette_command_opens_the_training_screen(make_app):
    app, _ = make_app()
    async with app.run_test(size=(120, 36)) as pilot:
        await ready(pilot, app)
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"Train a model")
        await pilot.pause(0.3)
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, TrainingScreen), what="the training screen")
        await pilot.pause()
        screen = app.screen
        assert "No run yet" in screen_text(screen, "train-state")
        assert screen.query_one("#init_from", Input).disabled  # sft only
        ids = {row[3] for row in app.binding_rows()}
        assert {"train", "training_start", "training_stop", "training_open_checkpoint", "training_close"} <= ids
        await pilot.press("ctrl+r")  # the chat's keys do not act behind the screen
        assert app.job is None
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, TrainingScreen)
        await pilot.press("ctrl+t")  # the binding opens it again
        await wait_for(pilot, lambda: isinstance(app.screen, TrainingScreen), what="the training screen again")


def help_defaults(kind: str, capsys) -> dict[str, str]:
    """`chat-tui train KIND --help`: each option's "(default …)", by TrainConfig field name."""
    import re

    from chat_tui.cli import main

    with pytest.raises(SystemExit):
        main(["train", kind, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    found = re.findall(r"(?<![\w-])--([a-z-]+) [A-Z]+ (?:(?!--|\(default)[^\[\]])*\(default ([0-9][\w.-]*)", text)
    return {flag.replace("-", "_"): value for flag, value in found}


async def test_the_form_the_cli_help_and_the_kinds_defaults_agree(make_app, capsys):
    in_help = {kind: help_defaults(kind, capsys) for kind in ("pretrain", "sft")}  # before the app takes stdout
    for kind, defaults in in_help.items():
        assert defaults == {name: setting_text(getattr(TrainConfig.defaults(kind), name)) for name in defaults}
        assert {"batch_size", "lr", "warmup", "max_steps", "eval_every", "seed"} <= set(defaults)
        assert ({"n_layer", "n_embd", "block_size", "vocab_size"} <= set(defaults)) == (kind == "pretrain")
        assert (defaults["lr"], defaults["max_steps"]) == {"pretrain": ("1e-3", "2000"), "sft": ("3e-4", "500")}[kind]
    app, _ = make_app()
    async with app.run_test(size=(120, 36)) as pilot:
        screen = await open_training(pilot, app)
        for kind in ("sft", "pretrain"):  # the form opens on pretrain: both ways round
            fill(screen, kind=kind)
            await pilot.pause()
            defaults = TrainConfig.defaults(kind)
            shown = {name: screen.query_one(f"#{name}", Input).value for name, *_ in NUMBER_FIELDS}
            assert shown == {name: "" if getattr(defaults, name) is None else setting_text(getattr(defaults, name))
                             for name in shown}
            assert {name: shown[name] for name in in_help[kind] if name in shown} == {
                name: value for name, value in in_help[kind].items() if name in shown}


async def test_invalid_input_is_refused_with_one_line(make_app, tmp_path):
    app, _ = make_app()
    async with app.run_test(size=(120, 36)) as pilot:
        screen = await open_training(pilot, app)
        form = tiny_form(tmp_path)
        cases = [
            (dict(data=""), "Data: give one or more"),
            (dict(data=str(tmp_path / "missing.txt")), "no such file or folder"),
            (dict(n_layer="two"), "Layers must be a whole number"),
            (dict(n_head="0"), "Heads must be at least 1"),
            (dict(n_embd="30", n_head="4"), "Width (30) must be a multiple of Heads (4)"),
            (dict(lr="-1"), "Learning rate must be above 0"),
            (dict(lr="fast"), "Learning rate must be a number"),
            (dict(out=""), "Output folder"),
            (dict(out=str(tmp_path / "sonnet.txt")), "is a file, not a folder"),
            (dict(kind="sft", init_from=""), "needs a checkpoint to start from"),
            (dict(kind="sft", init_from=str(tmp_path)), "is not a checkpoint folder"),
            (dict(data="'unclosed"), "Data: No closing quotation"),
            (dict(data="[bold]x[/bold]\x1b[31m"), "no such file or folder"),
        ]
        for changes, message in cases:
            fill(screen, **{**form, "kind": "pretrain", **changes})
            await pilot.pause()
            await pilot.press("ctrl+s")
            await pilot.pause()
            error = screen_text(screen, "train-error")
            assert message in error, (changes, error)
            assert "Traceback" not in error and "\x1b" not in error
            assert app.training is None
        assert "[bold]x[/bold]" in screen_text(screen, "train-error")  # shown literally, not as markup
        await pilot.click("#resume")
        await pilot.pause()
        assert "Nothing to resume" in screen_text(screen, "train-error")
        await pilot.press("ctrl+b")
        assert "No run is going" in screen_text(screen, "train-error")
        await pilot.press("ctrl+o")
        assert "No run yet" in screen_text(screen, "train-error")


async def test_a_failed_start_shows_the_trainers_one_line_error(make_app, tmp_path):
    app, _ = make_app()
    async with app.run_test(size=(120, 36)) as pilot:
        screen = await open_training(pilot, app)
        fill(screen, **tiny_form(tmp_path, block_size="4096", max_steps="3"))  # longer than the text
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: app.training is not None and app.training.finished, timeout=90,
                       what="the run to fail")
        await pilot.pause(0.6)
        assert app.training.state == "failed"
        state = screen_text(screen, "train-state")
        assert "failed" in state and "too short for a context of 4096" in state and "Traceback" not in state


async def test_a_real_tiny_run_streams_into_the_chart_and_its_checkpoint_opens_in_the_chat(make_app, tmp_path):
    app, engine = make_app()
    async with app.run_test(size=(120, 36)) as pilot:
        screen = await open_training(pilot, app)
        fill(screen, **tiny_form(tmp_path))
        await pilot.click("#start")
        await wait_for(pilot, lambda: app.training is not None, timeout=60, what="the run to start")
        session = app.training
        await wait_for(pilot, lambda: session.finished, timeout=120, what="the run to finish")
        await pilot.pause(0.6)
        assert session.state == "done", session.run.error()
        steps = [row["step"] for row in session.rows]
        assert steps == [1, 10, 20, 30]  # every logged step, once, in order
        assert len(session.chart.train) == 4 and len(session.chart.val) == 3
        chart = screen_text(screen, "train-chart")
        assert "step 1" in chart and "30" in chart and "validation" in chart
        assert any(0x2800 < ord(ch) <= 0x28FF for ch in chart)  # braille dots drawn
        figures = screen_text(screen, "train-figures")
        assert "step 30/30" in figures and "val loss" in figures and "tok/s" in figures and "lr" in figures
        assert "done" in screen_text(screen, "train-state")
        assert "checkpoint at step 30" in screen_text(screen, "train-checkpoint")
        assert not screen.query_one("#start").disabled and screen.query_one("#stop").disabled

        app.engine_factory = None  # from here on the app loads checkpoints for real
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: not isinstance(app.screen, TrainingScreen), what="the chat")
        out = tmp_path / "run"
        assert app.model_source == str(out)
        await wait_for(pilot, lambda: app.engine is not None and app.engine is not engine, timeout=60,
                       what="the checkpoint to load")
        assert app.engine.model_name == "run" and app.engine.backend == "minigpt"
        assert app.state == "idle"


async def test_stop_ends_a_run_and_the_checkpoint_opens_while_it_trains(make_app, tmp_path):
    app, engine = make_app()
    async with app.run_test(size=(120, 36)) as pilot:
        screen = await open_training(pilot, app)
        fill(screen, **tiny_form(tmp_path, max_steps="100000", eval_every="5"))
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: app.training is not None and app.training.run.latest_checkpoint() is not None,
                       timeout=90, what="a first checkpoint")
        session = app.training
        assert not session.finished
        await pilot.press("ctrl+s")  # one run at a time
        assert "already going" in screen_text(screen, "train-error")
        app.engine_factory = None
        await pilot.press("ctrl+o")  # open it while training goes on
        await wait_for(pilot, lambda: app.engine is not None and app.engine is not engine, timeout=60,
                       what="the checkpoint to load")
        assert app.model_source == str(tmp_path / "run") and not session.finished and session.run.running
        await pilot.press("ctrl+t")  # back to the run, which kept going
        await wait_for(pilot, lambda: isinstance(app.screen, TrainingScreen), what="the training screen")
        screen = app.screen
        await pilot.click("#stop")
        assert session.stopping and "stopping" in screen_text(screen, "train-state")
        await wait_for(pilot, lambda: session.finished, timeout=60, what="the run to stop")
        await pilot.pause(0.6)
        assert session.state == "interrupted" and session.run.returncode == 130
        assert "interrupted" in screen_text(screen, "train-state")
        stopped_at = session.rows[-1]["step"]
        assert session.run.status()["saved_step"] == stopped_at

        await pilot.press("ctrl+s")  # the folder holds a run now: Start refuses, Resume continues it
        assert "already holds a run" in screen_text(screen, "train-error")
        await pilot.click("#resume")
        await wait_for(pilot, lambda: app.training is not session, timeout=60, what="the resumed run")
        resumed = app.training
        await wait_for(pilot, lambda: any(r["step"] > stopped_at for r in resumed.rows), timeout=90,
                       what="a step after the resume")
        assert resumed.run.running and not resumed.rows[0]["step"] <= 0
        await pilot.press("ctrl+b")
        await wait_for(pilot, lambda: resumed.finished, timeout=60, what="the resumed run to stop")
        assert resumed.state == "interrupted"


def test_parse_form_builds_the_train_config(tmp_path):
    form = tiny_form(tmp_path, kind="pretrain", tokenizer="char")
    cfg = parse_form(form)
    assert cfg == dict(kind="pretrain", data=[form["data"]], out=form["out"], tokenizer="char", n_layer=1, n_head=2,
                       n_embd=32, block_size=32, batch_size=4, max_steps=30, lr=1e-3, eval_every=10, warmup=6,
                       log_every=10)
    TrainConfig(**cfg).validate()
    # a BPE model takes its vocabulary size; a time budget can stand in for the step count
    timed = parse_form({**form, "tokenizer": "bpe", "vocab_size": "300", "max_steps": "", "time_budget": "1m30s"})
    assert (timed["vocab_size"], timed["max_steps"], timed["time_budget"]) == (300, None, 90.0)
    TrainConfig(**timed).validate()
    for bad, message in (({"time_budget": "soon"}, "Time budget"), ({"max_steps": ""}, "Steps"),
                         ({"tokenizer": "bpe", "vocab_size": "0"}, "Vocab")):
        with pytest.raises(FormError, match=message):
            parse_form({**form, **bad})


# ---------------------------------------------------------------------------- snapshot


class FakeRun:
    """A finished-looking run with fixed metrics: what the snapshot shows does not depend on timing."""

    def __init__(self, out: Path, rows: list[dict]) -> None:
        self.out = out
        self.rows = rows
        self.running = True
        self.returncode = None

    def poll(self) -> list[dict]:
        rows, self.rows = self.rows, []
        return rows

    def status(self) -> dict:
        return {"state": "running", "step": 400, "saved_step": 300, "best_val_loss": 1.9843}

    def error(self) -> str | None:
        return None

    def latest_checkpoint(self) -> Path | None:
        return self.out

    def stop(self, *, wait: bool = True, timeout: float | None = 120.0) -> int | None:
        return None


def fake_rows() -> list[dict]:
    rows = []
    for step in [1, *range(10, 401, 10)]:
        loss = 1.7 + 2.5 * 0.992 ** step
        row = {"step": step, "loss": round(loss, 4), "lr": 1e-3 * min(1.0, step / 100), "tokens": step * 3072,
               "tokens_per_s": 18250.0, "elapsed_s": step * 0.17, "eta_s": (2000 - step) * 0.17}
        if step % 50 == 0:
            row["val_loss"] = round(loss + 0.12, 4)
        rows.append(row)
    return rows


@pytest.mark.parametrize("size", [(120, 36), (80, 24), (120, 40)])
def test_training_screen_snapshot(snap_compare, make_app, size):
    app, _ = make_app()
    settings = dict(kind="pretrain", data=["/data/shakespeare.txt"], out="/runs/shakespeare", tokenizer="char",
                    n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, max_steps=2000, lr=1e-3,
                    eval_every=50)

    async def show(pilot) -> None:
        await ready(pilot, app)
        app.training = TrainingSession(FakeRun(Path("/runs/shakespeare"), fake_rows()), settings)
        await pilot.press("ctrl+t")
        await wait_for(pilot, lambda: isinstance(app.screen, TrainingScreen))
        await pilot.pause(0.1)
        app.screen.query_one("#data", Input).cursor_blink = False

    assert snap_compare(app, terminal_size=size, run_before=show)


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
async def test_the_form_fits_its_fields(make_app, size):

    app, _ = make_app()
    async with app.run_test(size=size) as pilot:
        await ready(pilot, app)
        await pilot.press("ctrl+t")
        await wait_for(pilot, lambda: isinstance(app.screen, TrainingScreen))
        await pilot.pause()
        for field in app.screen.query("#train-form Input"):
            assert len(field.placeholder) <= field.content_size.width, (field.id, field.placeholder)
        for select in app.screen.query("#train-form Select"):
            label = dict((v, str(p)) for p, v in select._options)[select.value]
            assert len(label) + 3 <= select.content_size.width, (select.id, label)  # and its ▼
