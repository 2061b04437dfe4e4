"""Export a mini-GPT checkpoint as a standard Hugging Face model folder.

`export_hf(CHECKPOINT, OUT)` writes a `GPT2LMHeadModel` (model.safetensors, config.json,
generation_config.json) and a `PreTrainedTokenizerFast` with our special tokens and a Jinja chat
template that renders our chat format, so that with plain transformers

    tokenizer = AutoTokenizer.from_pretrained(OUT)
    model = AutoModelForCausalLM.from_pretrained(OUT)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")

gives the same prompt ids, the same logits and the same greedy replies as chat-tui's own engine.
(A reply the model is to continue is rendered with `continue_final_message=True`.)
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from chat_tui.engine.tokenizer import ASSISTANT, BOS, END, SYSTEM, USER, ChatTokenizer
from chat_tui.engine.types import CheckpointError

# Our chat format, `<|bos|><|system|>…<|end|><|user|>…<|end|><|assistant|>…<|end|>`, as a chat template.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('roles must be system, user or assistant, not ' + message['role']) -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|>' + message['content'] + '<|end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)


def hf_tokenizer(tokenizer: ChatTokenizer, context_length: int):
    """Our tokenizer as a `PreTrainedTokenizerFast` with named special tokens and the chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    # a copy: ours encodes special-token strings as text, while the template relies on them being tokens
    inner = Tokenizer.from_str(tokenizer.tokenizer.to_str())
    inner.encode_special_tokens = False
    return PreTrainedTokenizerFast(
        tokenizer_object=inner,
        bos_token=BOS,
        eos_token=END,
        pad_token=END,
        additional_special_tokens=[SYSTEM, USER, ASSISTANT],
        chat_template=CHAT_TEMPLATE,
        model_max_length=context_length,
        clean_up_tokenization_spaces=False,
    )


def generation_config(defaults, tokenizer: ChatTokenizer):
    """Our sampling defaults in `generate`'s terms; it stops where our engine does (at <|end|> or a header)."""
    from transformers import GenerationConfig

    ids = tokenizer.special_ids
    stops = [ids[END], ids[BOS], ids[SYSTEM], ids[USER], ids[ASSISTANT]]
    values: dict = {
        "bos_token_id": ids[BOS],
        "eos_token_id": stops,
        "pad_token_id": ids[END],
        "max_new_tokens": defaults.max_new_tokens,
    }
    if defaults.temperature > 0:
        values.update(do_sample=True, temperature=defaults.temperature)
        values["top_k"] = defaults.top_k  # 0 is off in generate too
        for name in ("top_p", "min_p", "typical_p"):
            if getattr(defaults, name) not in (0.0, 1.0):
                values[name] = getattr(defaults, name)
    else:
        values["do_sample"] = False
    if defaults.repetition_penalty != 1.0:
        values["repetition_penalty"] = defaults.repetition_penalty
    # ours only: chat-tui reads them back, transformers keeps them as plain attributes. (Not as
    # `stop_strings`: generate() then refuses to run unless it is handed the tokenizer.)
    if defaults.stop:
        values["stop"] = list(defaults.stop)
    for name in ("presence_penalty", "frequency_penalty", "repetition_window"):
        if getattr(defaults, name):
            values[name] = getattr(defaults, name)
    return GenerationConfig(**values)


def export_hf(checkpoint_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the mini-GPT at `checkpoint_dir` to `out_dir` as a Hugging Face model; returns `out_dir`.

    `out_dir` must not exist or be empty. The folder is written next to it and renamed into place,
    so a failed export leaves nothing half-written.
    """
    from chat_tui.engine.checkpoint import load_model
    from chat_tui.engine.convert import to_hf_model

    source, out = Path(checkpoint_dir), Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out}: already exists and is not an empty folder (export writes a new folder)")
    if out.resolve() == source.resolve():
        raise CheckpointError(f"{out}: is the checkpoint itself")
    model, tokenizer, defaults = load_model(source, device="cpu")
    ids = tokenizer.special_ids
    hf = to_hf_model(model, bos_token_id=ids[BOS], eos_token_id=ids[END], pad_token_id=ids[END])
    hf.generation_config = generation_config(defaults, tokenizer)

    from transformers.utils import logging as hf_logging

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a one-file save needs no progress bar
    try:
        hf.save_pretrained(staging, safe_serialization=True)
        hf_tokenizer(tokenizer, model.config.block_size).save_pretrained(staging)
        _template_in_tokenizer_config(staging)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return out


def _template_in_tokenizer_config(folder: Path) -> None:
    """Also keep the template in tokenizer_config.json, where transformers before 4.43 looks for it."""
    path = folder / "tokenizer_config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    if "chat_template" not in data:
        data["chat_template"] = CHAT_TEMPLATE
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
