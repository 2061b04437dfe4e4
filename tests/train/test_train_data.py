"""Training data: each bad-data case is one clear line; the split; the cache; the character tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from chat_tui.cli import main
from chat_tui.engine import Message, SamplingParams, load_engine
from chat_tui.engine.checkpoint import save_checkpoint
from chat_tui.engine.model import GPT, GPTConfig
from chat_tui.train.chartok import CharEncoder, char_tokenizer, char_tokenizer_from_itos, is_char_tokenizer
from chat_tui.train.data import DataError
from chat_tui.train.dataset import RowSampler, WindowSampler, prepare_pretrain, prepare_sft, token_bytes

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 4


pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.err


def pretrain_args(data, out, *extra):
    return ["train", "pretrain", "--data", *map(str, data), "--out", str(out), "--tokenizer", "char", "--n-layer", "1",
            "--n-head", "1", "--n-embd", "8", "--block-size", "16", "--max-steps", "1", "--quiet", *extra]


# --- every bad-data case: one line on stderr, naming the file (and line or byte) ------------------------------


def test_empty_file(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    code, err = run_cli(pretrain_args([empty], tmp_path / "o"), capsys)
    assert code == 1 and err.count("\n") == 1
    assert str(empty) in err and "empty" in err


def test_bytes_that_are_not_utf8_name_the_file_and_offset(tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café au lait, ".encode() * 3 + "déjà".encode("latin-1"))
    code, err = run_cli(pretrain_args([bad], tmp_path / "o"), capsys)
    offset = len("café au lait, ".encode() * 3) + 1
    assert code == 1 and err.count("\n") == 1
    assert str(bad) in err and "not UTF-8" in err and f"offset {offset}" in err and "0xe9" in err


def test_text_shorter_than_the_context(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here, not enough for any context.")
    code, err = run_cli(pretrain_args([short], tmp_path / "o", "--block-size", "64"), capsys)
    assert code == 1 and err.count("\n") == 1
    assert str(short) in err and "too short for a context of 64" in err and "--block-size" in err


@pytest.mark.parametrize(
    "line,expected",
    [
        ('{"messages": "hello"}', "not a conversation"),
        ('["just", "a", "list"]', "not a conversation"),
        ('{"messages": [{"role": "robot", "content": "hi"}]}', "role"),
        ('{"messages": [{"role": "user", "content": "hi"}', "not JSON"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    ],
)
def test_a_jsonl_line_that_is_not_a_conversation_names_file_and_line(tmp_path, capsys, line, expected):
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    path = tmp_path / "chat.jsonl"
    path.write_text(f"{good}\n\n{good}\n{line}\n{good}\n", encoding="utf-8")
    base = tmp_path / "base"
    _tiny_checkpoint(base)
    code, err = run_cli(["train", "sft", "--from", str(base), "--data", str(path), "--out", str(tmp_path / "o"),
                         "--max-steps", "1", "--quiet"], capsys)
    assert code == 1 and err.count("\n") == 1
    assert f"{path}:4:" in err and expected in err
    # pretraining reads the same file and reports the same line
    code, err = run_cli(pretrain_args([path], tmp_path / "o2"), capsys)
    assert code == 1 and f"{path}:4:" in err


def test_missing_paths_empty_folders_and_text_given_to_sft(tmp_path, capsys):
    code, err = run_cli(pretrain_args([tmp_path / "nope.txt"], tmp_path / "o"), capsys)
    assert code == 1 and "no such file or folder" in err and err.count("\n") == 1
    (tmp_path / "empty_dir").mkdir()
    code, err = run_cli(pretrain_args([tmp_path / "empty_dir"], tmp_path / "o"), capsys)
    assert code == 1 and "folder holds no usable files" in err
    base = tmp_path / "base"
    _tiny_checkpoint(base)
    text = tmp_path / "plain.txt"
    text.write_text(TEXT)
    code, err = run_cli(["train", "sft", "--from", str(base), "--data", str(text), "--out", str(tmp_path / "o3"),
                         "--quiet"], capsys)
    assert code == 1 and "unknown conversation format" in err and err.count("\n") == 1


def test_one_conversation_is_too_few_to_validate(tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}))
    with pytest.raises(DataError, match="at least 2"):
        prepare_sft([path], char_tokenizer(["ab"]), block_size=16)


def _tiny_checkpoint(folder):
    tok = char_tokenizer([TEXT + "hello"])
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=1, n_embd=8))
    save_checkpoint(folder, model, tok)


# --- the split and the cache ------------------------------------------------------------------------------


def test_one_text_file_splits_first_90_percent_last_10_percent(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(TEXT)
    data = prepare_pretrain([path], tokenizer_kind="char", block_size=8, val_fraction=0.1)
    n = int(len(TEXT) * 0.9)
    assert data.tokenizer.decode(data.train.tolist()) == TEXT[:n]
    assert data.tokenizer.decode(data.val.tolist()) == TEXT[n:]


def test_several_documents_are_shuffled_by_the_seed_and_joined_with_bos(tmp_path):
    for i in range(6):
        (tmp_path / "docs").mkdir(exist_ok=True)
        (tmp_path / "docs" / f"{i}.txt").write_text(f"document number {i} " * 3)
    a = prepare_pretrain([tmp_path / "docs"], tokenizer_kind="char", block_size=8, seed=1)
    b = prepare_pretrain([tmp_path / "docs"], tokenizer_kind="char", block_size=8, seed=1)
    c = prepare_pretrain([tmp_path / "docs"], tokenizer_kind="char", block_size=8, seed=2)
    whole = lambda d: np.concatenate([d.train, d.val]).tolist()  # noqa: E731
    assert whole(a) == whole(b) and whole(a) != whole(c)
    assert whole(a).count(a.tokenizer.bos_id) == 5
    assert sorted(whole(a)) == sorted(whole(c))


def test_the_cache_is_reused_and_refreshed_when_the_data_changes(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(TEXT)
    first = prepare_pretrain([path], tokenizer_kind="char", block_size=8, cache_root=tmp_path / "cache")
    second = prepare_pretrain([path], tokenizer_kind="char", block_size=8, cache_root=tmp_path / "cache")
    assert not first.from_cache and second.from_cache
    assert np.array_equal(first.train, second.train) and np.array_equal(first.val, second.val)
    path.write_text(TEXT + "More.\n")
    third = prepare_pretrain([path], tokenizer_kind="char", block_size=8, cache_root=tmp_path / "cache")
    assert not third.from_cache and len(third.train) + len(third.val) == len(TEXT) + 6


def test_batches_depend_only_on_seed_and_step_and_split_across_processes():
    data = np.arange(1000)
    sampler = WindowSampler(data, 8, seed=5)
    a, _ = sampler.rows(7, 6)
    b, _ = WindowSampler(data, 8, seed=5).rows(7, 6)
    assert np.array_equal(a, b) and a.shape == (6, 9)
    assert np.array_equal(a[:, 1:] - a[:, :-1], np.ones((6, 8)))  # contiguous windows
    assert not np.array_equal(a, sampler.rows(8, 6)[0])
    rows = RowSampler(np.arange(10)[:, None].repeat(3, 1), np.ones((10, 3)), seed=1)
    seen = [int(r[0]) for step in range(5) for r in rows.rows(step, 2)[0]]
    assert sorted(seen) == list(range(10))  # one epoch covers every row once


# --- the character tokenizer --------------------------------------------------------------------------------


def test_char_tokenizer_round_trips_and_loads_as_a_chat_tokenizer(tmp_path):
    tok = char_tokenizer([TEXT])
    assert is_char_tokenizer(tok)
    assert tok.special_ids == {"<|bos|>": 0, "<|system|>": 1, "<|user|>": 2, "<|assistant|>": 3, "<|end|>": 4}
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert len(tok.encode(TEXT)) == len(TEXT)
    assert CharEncoder(tok).encode(TEXT).tolist() == tok.encode(TEXT)
    assert tok.encode("<|end|>") != [tok.end_id]  # typed markup is never a turn boundary
    ids, mask, _ = tok.render_conversation([Message("user", "To be"), Message("assistant", "or not")],
                                           add_generation_prompt=False)
    assert tok.decode(ids) == "<|bos|><|user|>To be<|end|><|assistant|>or not<|end|>"
    assert token_bytes(tok).tolist()[:5] == [0] * 5


def test_a_char_checkpoint_loads_in_the_engine_and_chats(tmp_path):
    tok = char_tokenizer([TEXT])
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16))
    save_checkpoint(tmp_path / "ckpt", model, tok)
    engine = load_engine(tmp_path / "ckpt", device="cpu")
    steps = list(engine.stream([Message("user", "To be")], SamplingParams(max_new_tokens=6, seed=0)))
    assert steps and all(len(s.text) <= 1 for s in steps)
    assert engine.token_text(tok.encode("T")[0]) == "T"


def test_nanogpt_vocabulary_keeps_its_ids_and_appends_the_special_tokens():
    itos = {i: ch for i, ch in enumerate("\n !abc")}
    tok = char_tokenizer_from_itos(itos)
    assert tok.encode("ab c\n") == [3, 4, 1, 5, 0]
    assert sorted(tok.special_ids.values()) == [6, 7, 8, 9, 10]
    with pytest.raises(ValueError):
        char_tokenizer_from_itos({0: "a", 2: "b"})
    with pytest.raises(ValueError):
        char_tokenizer_from_itos({0: "ab"})
