"""chat-tui: chat with a language model in the terminal, tune its sampling, watch its attention.

Importing this package is cheap on purpose: no torch, no transformers, no files touched,
so the UI can paint its first frame before the heavy libraries load.
"""

__version__ = "0.1.0"
