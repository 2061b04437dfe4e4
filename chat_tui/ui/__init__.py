"""The Textual UI of chat-tui. Importing it does not import torch: the model loads in a worker."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from chat_tui.engine.collector import collection_paused
from chat_tui.engine.types import Engine


def run_app(
    model: str | None = None,
    *,
    new: bool = False,
    conversation_id: int | None = None,
    device: str | None = None,
    engine_factory: Callable[[], Engine] | None = None,
    load_options: dict[str, Any] | None = None,
) -> int:
    """Run the chat app in the terminal and return the exit status.

    `model`: a checkpoint folder (None: `model` from config.toml, else the bundled mini-GPT).
    `new`: start with an empty conversation instead of the latest one.
    `conversation_id`: open this saved conversation (exit status 2 if there is none).
    `device`: "cpu", "cuda", "mps" (None: config.toml, else the best available).
    `load_options`: extra keyword arguments for `chat_tui.engine.load_engine` (dtype, Hugging Face options).
    `engine_factory`: build the engine without `load_engine` (tests, demos).
    """
    # the app freezes what start-up made and turns collection back on once the first frame is
    # painted (tune_runtime)
    with collection_paused():
        return _run_app(model, new=new, conversation_id=conversation_id, device=device,
                        engine_factory=engine_factory, load_options=load_options)


def _run_app(
    model: str | None,
    *,
    new: bool,
    conversation_id: int | None,
    device: str | None,
    engine_factory: Callable[[], Engine] | None,
    load_options: dict[str, Any] | None,
) -> int:
    from chat_tui.config import get_paths
    from chat_tui.store import Store, StoreError
    from chat_tui.ui.app import ChatApp

    if new and conversation_id is not None:
        print("chat-tui: --new and --conversation cannot be used together", file=sys.stderr)
        return 2
    if conversation_id is not None:
        paths = get_paths()
        if not paths.database.exists():
            print(f"chat-tui: no conversation {conversation_id} (no saved conversations yet)", file=sys.stderr)
            return 2
        try:
            store = Store(paths.database)
            found = store.get_conversation(conversation_id) is not None
            store.close()
        except StoreError:
            found = True  # let the app report the database problem itself
        if not found:
            print(f"chat-tui: no conversation {conversation_id}; Ctrl+O in the app lists them", file=sys.stderr)
            return 2
    app = ChatApp(
        model, new=new, conversation_id=conversation_id, device=device, engine_factory=engine_factory,
        load_options=load_options, model_process=True,
    )
    app.tune_runtime = True
    result = app.run()
    if app.return_code:
        return app.return_code
    return result if isinstance(result, int) else 0


__all__ = ["run_app"]
