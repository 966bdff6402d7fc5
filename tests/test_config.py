import pytest

from deltatune.config import load_config
from deltatune.errors import UserError


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_overrides_and_relative_paths(tmp_path):
    path = write(tmp_path, "train_file: data/train.jsonl\nlearning_rate: 1e-4\n")
    cfg = load_config(path, ["learning_rate=3e-5", "num_train_epochs=2", "bf16=false"])
    assert cfg.train.learning_rate == 3e-5 and cfg.train.num_train_epochs == 2 and cfg.memory.bf16 is False
    assert cfg.data.train_file == str(tmp_path / "data/train.jsonl")  # relative to the config file


def test_unknown_key_suggests_the_right_one(tmp_path):
    with pytest.raises(UserError, match=r"unknown key 'learning_rat' \(did you mean 'learning_rate'\?\)"):
        load_config(write(tmp_path, "train_file: t.jsonl\nlearning_rat: 1e-4\n"))
    with pytest.raises(UserError, match=r"did you mean 'num_train_epochs'"):
        load_config(write(tmp_path, "train_file: t.jsonl\n"), ["num_epochs=3"])


@pytest.mark.parametrize("line,message", [
    ("learning_rate: -1", "key 'learning_rate': got -1"),
    ("per_device_train_batch_size: 0", "key 'per_device_train_batch_size': got 0"),
    ("lr_scheduler_type: wobbly", "key 'lr_scheduler_type': got 'wobbly'"),
])
def test_out_of_range_values_name_the_key(tmp_path, line, message):
    with pytest.raises(UserError, match=message):
        load_config(write(tmp_path, f"train_file: t.jsonl\n{line}\n"))


def test_invalid_yaml_names_the_line(tmp_path):
    with pytest.raises(UserError, match=r"run.yaml:2: invalid YAML"):
        load_config(write(tmp_path, "train_file: t.jsonl\nfoo: bar: baz\nseed: 1\n"))


def test_train_file_is_required(tmp_path):
    with pytest.raises(UserError, match="train_file is required"):
        load_config(write(tmp_path, "learning_rate: 1e-4\n"))
