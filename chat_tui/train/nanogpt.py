"""`chat-tui import nanogpt CKPT.pt [--meta meta.pkl] OUT`: a nanoGPT model becomes a chat-tui checkpoint.

nanoGPT's GPT has our layout and names (`transformer.h.0.attn.c_attn.weight`, nn.Linear, tied
lm_head), so the weights copy across as they are; a model trained with `bias=False` gets zero
biases, which computes the same thing. The vocabulary comes from:

- a character model: nanoGPT's meta.pkl (`--meta`, or beside CKPT, or data/<dataset>/meta.pkl).
  The characters keep their ids; our five chat special tokens are appended after them, with the
  embedding of the newline (so, as input, a turn boundary reads as a line break);
- a GPT-2-token model: GPT-2's tokenizer.json (`--tokenizer`, or transformers' local cache),
  with the special tokens in the padding rows nanoGPT adds after id 50256.

The special tokens were never trained: config.json lists them under `untrained_token_ids`, so the
engine never samples them (their logits would tie with the newline's) and talks to the model in
the raw format (your text, no roles), until `chat-tui train sft --from OUT` trains them.

Safety: CKPT is read with `torch.load(weights_only=True)` (tensors and plain containers only),
and meta.pkl with an unpickler that refuses every class: only dicts, strings and integers load.

nanoGPT's MLP uses the exact (erf) GELU where GPT-2 uses the tanh approximation: the imported
config says `activation: "gelu"`, so the imported model computes exactly what nanoGPT computes.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from pathlib import Path

import torch

from chat_tui.engine.checkpoint import UNTRAINED, load_model, save_checkpoint
from chat_tui.engine.model import GPT, GPTConfig
from chat_tui.engine.params import SamplingParams
from chat_tui.engine.tokenizer import SPECIAL_TOKENS, ChatTokenizer
from chat_tui.engine.types import CheckpointError
from chat_tui.errors import first_line

IMPORT_DEFAULTS = SamplingParams(temperature=0.8, top_k=200, max_new_tokens=200)  # nanoGPT's sample.py
IGNORED_BUFFERS = (".attn.bias", ".attn.masked_bias")  # the causal mask nanoGPT keeps without flash attention


class _Refused(Exception):
    pass


class _MetaUnpickler(pickle.Unpickler):
    """Unpickles plain data only: any class, function or persistent id is refused."""

    def find_class(self, module: str, name: str):
        raise _Refused(f"it names {module}.{name}")

    def persistent_load(self, pid):
        raise _Refused("it uses a persistent id")


def _check_plain(value, depth: int = 0) -> None:
    if depth > 8:
        raise _Refused("it is nested too deeply")
    if type(value) is dict:
        for k, v in value.items():
            _check_plain(k, depth + 1)
            _check_plain(v, depth + 1)
    elif type(value) not in (str, int):
        raise _Refused(f"it holds a {type(value).__name__}")


def read_meta(path: str | Path) -> dict:
    """nanoGPT's meta.pkl, accepting only dicts, strings and integers."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(data) > 64 * 1024 * 1024:
        raise CheckpointError(f"{path}: too large for a vocabulary file")
    try:
        meta = _MetaUnpickler(io.BytesIO(data)).load()
        _check_plain(meta)
    except _Refused as exc:
        raise CheckpointError(f"{path}: refused: meta.pkl may hold only dicts, strings and integers ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - a damaged pickle fails in many ways
        raise CheckpointError(f"{path}: not a readable meta.pkl ({first_line(f'{type(exc).__name__}: {exc}')})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("itos"), dict):
        raise CheckpointError(f"{path}: not nanoGPT's meta.pkl (no 'itos' vocabulary)")
    return meta


def _load_ckpt(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - refused or damaged: the file's fault either way
        raise CheckpointError(f"{path}: refused: not a plain nanoGPT checkpoint ({first_line(exc)})") from None
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        return ckpt
    if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return {"model": ckpt}
    raise CheckpointError(f"{path}: not a nanoGPT checkpoint (expected a dict with 'model' and 'model_args')")


def _model_config(path: Path, state: dict[str, torch.Tensor], args: dict) -> GPTConfig:
    def need(name: str) -> torch.Tensor:
        if name not in state:
            raise CheckpointError(f"{path}: not a nanoGPT GPT (no {name})")
        return state[name]

    vocab_size, n_embd = need("transformer.wte.weight").shape
    block_size = need("transformer.wpe.weight").shape[0]
    layers = {int(k.split(".")[2]) for k in state if k.startswith("transformer.h.")}
    n_layer = len(layers)
    if layers != set(range(n_layer)) or not n_layer:
        raise CheckpointError(f"{path}: the transformer blocks are not numbered 0..n-1")
    n_head = args.get("n_head")
    if not isinstance(n_head, int) or n_head < 1 or n_embd % n_head:
        raise CheckpointError(f"{path}: model_args lacks a valid n_head (nanoGPT saves it in model_args)")
    for key, value in (("n_layer", n_layer), ("n_embd", n_embd), ("block_size", block_size)):
        if key in args and args[key] != value:
            raise CheckpointError(f"{path}: model_args says {key}={args[key]}, the weights say {value}")
    return GPTConfig(vocab_size=int(vocab_size), block_size=int(block_size), n_layer=n_layer, n_head=n_head,
                     n_embd=int(n_embd), dropout=0.0, layer_norm_epsilon=1e-5,
                     activation="gelu")  # nanoGPT's nn.GELU() is the exact (erf) one


def _find_meta(ckpt_path: Path, ckpt: dict, meta: str | Path | None) -> Path | None:
    if meta is not None:
        return Path(meta)
    candidates = [ckpt_path.parent / "meta.pkl"]
    config = ckpt.get("config")
    dataset = config.get("dataset") if isinstance(config, dict) else None
    if isinstance(dataset, str) and dataset and "/" not in dataset and ".." not in dataset:
        candidates += [Path("data") / dataset / "meta.pkl", ckpt_path.parent.parent / "data" / dataset / "meta.pkl"]
    return next((c for c in candidates if c.is_file()), None)


def _gpt2_tokenizer(tokenizer: str | Path | None):
    from tokenizers import Tokenizer

    if tokenizer is not None:
        try:
            return Tokenizer.from_file(str(tokenizer))
        except Exception as exc:  # noqa: BLE001 - tokenizers raises bare Exceptions
            raise CheckpointError(f"{tokenizer}: not a tokenizer.json ({first_line(exc)})") from None
    try:  # GPT-2's tokenizer, if transformers has it cached; never the network
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained("gpt2", local_files_only=True).backend_tokenizer
    except Exception:  # noqa: BLE001
        return None


def import_nanogpt(
    ckpt: str | Path,
    out: str | Path,
    *,
    meta: str | Path | None = None,
    tokenizer: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    ckpt_path, out = Path(ckpt), Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "config.json").is_file())):
        raise CheckpointError(f"{out}: exists and is not an empty folder or a checkpoint: choose another OUT")
    raw = _load_ckpt(ckpt_path)
    args = raw.get("model_args") if isinstance(raw.get("model_args"), dict) else {}
    state = {k.removeprefix("_orig_mod."): v for k, v in raw["model"].items()}
    state = {k: v for k, v in state.items() if not k.endswith(IGNORED_BUFFERS)}
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{ckpt_path}: the model entry is not a state dict of tensors")
    config = _model_config(ckpt_path, state, args)

    wte = state["transformer.wte.weight"].float()
    head = state.get("lm_head.weight")
    if head is not None and (head.shape != wte.shape or not torch.equal(head.float(), wte)):
        raise CheckpointError(f"{ckpt_path}: lm_head is not tied to the token embedding (chat-tui's GPT ties them)")

    meta_path = _find_meta(ckpt_path, raw, meta)
    if meta_path is not None:
        from chat_tui.train.chartok import char_tokenizer_from_itos

        vocab = read_meta(meta_path)
        try:
            chat_tokenizer = char_tokenizer_from_itos(vocab["itos"])
        except ValueError as exc:
            raise CheckpointError(f"{meta_path}: {exc}") from None
        if len(vocab["itos"]) > config.vocab_size:
            raise CheckpointError(f"{meta_path}: has {len(vocab['itos'])} characters, the model only {config.vocab_size}")
        source = f"characters from {meta_path}"
    else:
        backend = _gpt2_tokenizer(tokenizer)
        if backend is None:
            raise CheckpointError(
                f"{ckpt_path}: no meta.pkl found beside it: pass --meta meta.pkl for a character model, "
                "or --tokenizer tokenizer.json (GPT-2's) for a GPT-2-token model")
        backend.add_special_tokens(SPECIAL_TOKENS)
        chat_tokenizer = ChatTokenizer(backend)
        source = f"tokenizer {tokenizer or 'gpt2 (local cache)'}"

    new_ids = [chat_tokenizer.special_ids[t] for t in SPECIAL_TOKENS]
    vocab_size = max(config.vocab_size, chat_tokenizer.vocab_size)
    if vocab_size > config.vocab_size:
        wte = torch.cat([wte, torch.zeros(vocab_size - config.vocab_size, config.n_embd)])
        config.vocab_size = vocab_size
    newline = chat_tokenizer.encode("\n")
    fill = wte[newline[0]].clone() if len(newline) == 1 and newline[0] not in new_ids else torch.zeros(config.n_embd)
    for i in new_ids:
        wte[i] = fill
    state["transformer.wte.weight"] = wte

    model = GPT(config)
    expected = model.state_dict()
    for name, tensor in expected.items():
        if name == "lm_head.weight":
            continue
        if name not in state:
            if name.endswith(".bias"):  # nanoGPT's bias=False: a zero bias computes the same
                state[name] = torch.zeros_like(tensor)
            else:
                raise CheckpointError(f"{ckpt_path}: missing {name}")
        elif tuple(state[name].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{ckpt_path}: {name} has shape {tuple(state[name].shape)}, expected {tuple(tensor.shape)}")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise CheckpointError(f"{ckpt_path}: unexpected tensor {unexpected[0]} (not nanoGPT's GPT layout)")
    state["lm_head.weight"] = state["transformer.wte.weight"]
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    model.eval()
    extra = {"imported_from": "nanoGPT", "source": str(ckpt_path), "iter_num": raw.get("iter_num"),
             "nanogpt_best_val_loss": float(raw["best_val_loss"]) if isinstance(raw.get("best_val_loss"), (int, float, torch.Tensor)) else None,
             # the chat tokens were never trained: the engine keeps them out of sampling, and the
             # default chat format is raw, until `chat-tui train sft` trains them
             UNTRAINED: sorted(new_ids)}
    save_checkpoint(out, model, chat_tokenizer, IMPORT_DEFAULTS, extra_config=extra)
    load_model(out)  # prove the folder loads
    if log:
        log(f"{config.n_layer} layers, {config.n_head} heads, {config.n_embd} wide, context {config.block_size}; "
            f"{source}; {chat_tokenizer.vocab_size} tokens")
    return out
