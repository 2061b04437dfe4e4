"""Finding the model: a local folder, or a hub id in the Hugging Face cache (downloaded when allowed).

What a model argument may name is decided without any library by `chat_tui.engine.source` (the
Load model dialog uses the same rules); this module then finds the folder, in the cache or on the
Hub, with every failure one line. Also here: which files of a folder are its weights, and their hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chat_tui.engine.hf.errors import DownloadError, ModelNotFoundError, NotCachedError
from chat_tui.engine.source import source_problem
from chat_tui.errors import first_line

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.pt")
# what a download fetches: configs, safetensors weights, tokenizer files (pickled weights only when needed)
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken", "tokenizer*"]
DOWNLOAD_IGNORE = ["*/*", "consolidated*", "*.onnx", "*.gguf"]


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_offline_env() -> str | None:
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if _env_true(name):
            return f"{name}=1"
    return None


@contextlib.contextmanager
def offline_mode(offline: bool):
    """While loading offline, make huggingface_hub itself refuse any request (belt and braces)."""
    if not offline:
        yield
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before



def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            return [folder / n for n in names]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
    found: list[Path] = []
    for pattern in WEIGHT_PATTERNS:
        found.extend(p for p in sorted(folder.glob(pattern)) if p.is_file() and not p.name.startswith("consolidated"))
    return found


def has_weights(folder: Path) -> bool:
    return bool(weight_files(folder)) or (folder / "pytorch_model.bin.index.json").is_file()


def resolve_source(
    model: str,
    *,
    offline: bool,
    offline_reason: str,
    trust_remote_code: bool,
    progress: Callable[[str], None] | None,
    cache_dir: str | None = None,
) -> tuple[Path, str, str | None]:
    """(local folder, a short name, the hub id or None) for a folder path or a hub id."""
    text = str(model).strip()
    if not text:
        raise ModelNotFoundError("no model given: pass a folder or a Hugging Face hub id")
    problem = source_problem(text)
    if problem is not None:
        raise ModelNotFoundError(problem)
    path = Path(text).expanduser()
    if path.exists():
        return path, path.resolve().name or text, None
    return _from_hub(text, offline=offline, offline_reason=offline_reason, trust_remote_code=trust_remote_code,
                     progress=progress, cache_dir=cache_dir), text, text


def _from_hub(
    repo_id: str,
    *,
    offline: bool,
    offline_reason: str,
    trust_remote_code: bool,
    progress: Callable[[str], None] | None,
    cache_dir: str | None,
) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    where = cache_dir or constants.HF_HUB_CACHE
    cached: Path | None = None
    try:
        cached = Path(snapshot_download(repo_id, local_files_only=True, cache_dir=cache_dir))
    except HFValidationError:
        raise ModelNotFoundError(f"{repo_id}: no such folder, and not a valid Hugging Face hub id") from None
    except (LocalEntryNotFoundError, OSError, ValueError):
        cached = None
    if cached is not None and (cached / "config.json").is_file() and has_weights(cached):
        return cached
    if offline:
        partly = " (only partly: no weights)" if cached is not None else ""
        raise NotCachedError(
            f"{repo_id}: no such folder, and not in the Hugging Face cache{partly} at {where}; "
            f"offline ({offline_reason}), so it cannot be downloaded: run `hf download {repo_id}` with the network on"
        )
    if progress:
        progress(f"downloading {repo_id} from the Hugging Face Hub")
    patterns = [*DOWNLOAD_PATTERNS, *(["*.py"] if trust_remote_code else [])]
    kwargs: dict[str, Any] = {"cache_dir": cache_dir, "ignore_patterns": DOWNLOAD_IGNORE}
    if progress is not None:
        kwargs["tqdm_class"] = _progress_tqdm(progress, repo_id)
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=patterns, **kwargs))
        if not has_weights(folder):  # an older repository with pickled weights only
            folder = Path(snapshot_download(repo_id, allow_patterns=["pytorch_model*.bin", "*.json"], **kwargs))
    except GatedRepoError:
        raise DownloadError(
            f"{repo_id} is gated: accept its terms on https://huggingface.co/{repo_id}, then log in with `hf auth login`"
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"{repo_id}: no such folder, and no such model on the Hugging Face Hub (a private one needs `hf auth login`)"
        ) from None
    except OfflineModeIsEnabled:
        raise NotCachedError(f"{repo_id}: not in the Hugging Face cache at {where}, and the Hub is set offline") from None
    except Exception as exc:  # noqa: BLE001 - connection errors come in many classes
        raise DownloadError(
            f"{repo_id}: could not download it from the Hugging Face Hub ({first_line(exc)}); "
            "check the network, or pass a local folder"
        ) from None
    return folder


def _progress_tqdm(progress: Callable[[str], None], repo_id: str):
    """A tqdm class that reports to `progress` instead of drawing on the terminal."""
    from tqdm.auto import tqdm

    class Report(tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self._report = progress
            self._count = 0

        def update(self, n: float | None = 1) -> bool | None:
            self._count += n or 0
            total = self.total
            self._report(f"downloading {repo_id}: {self._count:,.0f}/{total:,.0f}" if total else f"downloading {repo_id}")
            return None

        def __iter__(self):  # a disabled tqdm iterates without counting: count here
            for item in self.iterable:
                yield item
                self.update(1)

    return Report



def weights_hash(folder: Path) -> str:
    """A short content hash of the weights (for a single file: its sha256, as the mini-GPT's).

    Files in the Hugging Face cache are named by their sha256 already: nothing is read for them.
    """
    files = weight_files(folder)
    if not files:
        return "unknown"
    digests = []
    for path in files:
        real = path.resolve()
        if real.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", real.name):
            digests.append(real.name)
            continue
        digest = hashlib.sha256()
        with real.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
        digests.append(digest.hexdigest())
    if len(digests) == 1:
        return digests[0][:16]
    return hashlib.sha256("".join(digests).encode()).hexdigest()[:16]

