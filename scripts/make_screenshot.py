"""Make the README's screenshot: `assets/screenshot.svg`, with Textual's `save_screenshot`.

    python scripts/make_screenshot.py            # the bundled model (the FakeEngine if it is missing)
    python scripts/make_screenshot.py --fake     # a scripted reply, no model
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FAKE_REPLY = (
    "Attention lets each token look back at the ones before it. A tiny example:\n\n"
    "```python\nweights = softmax(q @ k.T / sqrt(d))\nout = weights @ v\n```\n\n"
    "Each row of `weights` sums to **1**: the token spreads its attention over the context."
)
PROMPT = "How does attention work in a transformer?"  # for the scripted reply
BUNDLED_PROMPT = "What is AI?"  # a question the small bundled model knows


async def shoot(out: Path, fake: bool, size: tuple[int, int]) -> None:
    from chat_tui.config import get_paths
    from chat_tui.engine import bundled_model_path
    from chat_tui.engine.params import SamplingParams
    from chat_tui.engine.types import CheckpointError
    from chat_tui.ui.app import ChatApp

    factory = None
    if not fake:
        try:
            bundled_model_path()
        except CheckpointError:
            print("the bundled model is missing: using the FakeEngine", file=sys.stderr)
            fake = True
    if fake:
        from chat_tui.engine.fake import FakeEngine

        engine = FakeEngine([FAKE_REPLY], defaults=SamplingParams(temperature=0.7, top_p=0.95, seed=42),
                            model_name="minigpt (scripted)")
        factory = lambda: engine  # noqa: E731
    app = ChatApp(engine_factory=factory, paths=get_paths(), new=True, device="cpu")
    async with app.run_test(size=size) as pilot:
        while app.engine is None:
            if app.state == "no model":
                raise SystemExit(f"could not load the model: {app.load_note}")
            await pilot.pause(0.05)
        if not fake:
            app.params = app.params.with_(seed=42, max_new_tokens=80)
            app.params_touched = True
        app.prompt_input.cursor_blink = False
        app.prompt_input.load_text(PROMPT if fake else BUNDLED_PROMPT)
        app.prompt_input.action_submit()
        while app.last_job is None or not app.settled:
            await pilot.pause(0.05)
        await pilot.pause(0.3)
        app.save_screenshot(filename=out.name, path=str(out.parent))
    print(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fake", action="store_true", help="a scripted reply instead of the bundled model")
    parser.add_argument("--out", type=Path, default=ROOT / "assets" / "screenshot.svg")
    parser.add_argument("--size", default="120x36", help="terminal size, COLSxROWS")
    args = parser.parse_args()
    cols, rows = (int(x) for x in args.size.split("x"))
    with tempfile.TemporaryDirectory() as home:
        os.environ["CHAT_TUI_HOME"] = home  # never touch the user's conversations
        asyncio.run(shoot(args.out, args.fake, (cols, rows)))


if __name__ == "__main__":
    main()
