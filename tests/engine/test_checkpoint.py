"""Checkpoint folders: every bad one gives one line naming the file and the problem."""

import json
import pickle
import shutil

import pytest
import torch

from chat_tui.engine import CheckpointError, load_engine
from chat_tui.engine.checkpoint import load_model, save_checkpoint


@pytest.fixture
def ckpt(tmp_path, tiny_checkpoint):
    folder = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, folder)
    return folder


def _error(folder) -> str:
    with pytest.raises(CheckpointError) as info:
        load_model(folder)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_round_trip_keeps_weights_tokenizer_and_defaults(ckpt, tiny_tokenizer):
    model, tokenizer, defaults = load_model(ckpt)
    assert tokenizer.vocab_size == tiny_tokenizer.vocab_size
    assert defaults.temperature == 0.8 and defaults.top_k == 20 and defaults.max_new_tokens == 20
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    again = ckpt.parent / "again"
    save_checkpoint(again, model, tokenizer, defaults)
    model2, _, _ = load_model(again)
    for (name, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_missing_folder(tmp_path):
    assert "no such checkpoint folder" in _error(tmp_path / "nope")


def test_missing_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    message = _error(ckpt)
    assert "model.safetensors" in message and "missing" in message


def test_truncated_weights(ckpt):
    path = ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    message = _error(ckpt)
    assert "model.safetensors" in message and "truncated" in message


def test_mismatched_config(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["n_embd"] = 64
    (ckpt / "config.json").write_text(json.dumps(config))
    message = _error(ckpt)
    assert "does not match config.json" in message and "shape" in message


def test_insane_config_is_refused_before_allocating(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["n_layer"] = 10**9
    (ckpt / "config.json").write_text(json.dumps(config))
    message = _error(ckpt)
    assert "config.json" in message and "n_layer" in message and "sane range" in message


def test_corrupt_config_json(ckpt):
    (ckpt / "config.json").write_text("{not json")
    assert "config.json: not valid JSON" in _error(ckpt)


def test_missing_tokenizer(ckpt):
    (ckpt / "tokenizer.json").unlink()
    assert "tokenizer.json: missing" in _error(ckpt)


def test_invalid_generation_config(ckpt):
    (ckpt / "generation_config.json").write_text(json.dumps({"temperature": -1}))
    message = _error(ckpt)
    assert "generation_config.json" in message and "temperature" in message


class Boom:
    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_pickle_only_checkpoint_with_code_is_refused(ckpt, capsys):
    (ckpt / "model.safetensors").unlink()
    with open(ckpt / "model.pt", "wb") as f:
        pickle.dump({"x": Boom()}, f)
    message = _error(ckpt)
    assert "model.pt" in message and "refused" in message
    assert "pickle code ran" not in capsys.readouterr().out


def test_plain_tensor_state_dict_in_model_pt_loads_with_weights_only(ckpt):
    from safetensors.torch import load_file

    state = load_file(str(ckpt / "model.safetensors"))
    (ckpt / "model.safetensors").unlink()
    torch.save(state, ckpt / "model.pt")
    model, _, _ = load_model(ckpt)
    assert torch.equal(model.transformer.wte.weight, state["transformer.wte.weight"])


def test_load_engine_reports_missing_path_in_one_line(tmp_path):
    with pytest.raises(Exception) as info:
        load_engine(tmp_path / "missing-model")
    assert "missing-model" in str(info.value)
    assert "\n" not in str(info.value)


def test_bundled_model_is_small_and_loads():
    from chat_tui.engine import bundled_model_path

    folder = bundled_model_path()
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert size <= 25 * 1024 * 1024
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (folder / name).is_file()
    model, _, _ = load_model(folder)
    assert model.config.n_layer >= 2
