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


def test_dumped_config_loads_back_to_the_same_config(tmp_path):
    from deltatune.config import FLAT_ORDER, dump_config

    cfg = load_config(write(tmp_path, "train_file: t.jsonl\nmethod: lora\nlora_r: 4\nlearning_rate: 1e-4\n"
                                      "task: sft\nsave_steps: 5\nprobe_files: [p.jsonl]\noutput_dir: out\n"))
    path = tmp_path / "dumped.yaml"
    path.write_text(dump_config(cfg))
    again = load_config(path)
    assert again == cfg and again.flat() == cfg.flat()
    assert list(cfg.flat()) == FLAT_ORDER  # config.yaml lists every key, always in the same order
    assert cfg.model.lora_r == 4 and cfg.train.save_steps == 5 and cfg.delta.probe_files == [str(tmp_path / "p.jsonl")]


def test_groups_hold_every_key_once_and_the_config_never_changes(tmp_path):
    import pydantic

    from deltatune.config import GROUPS, KEY_GROUP

    cfg = load_config(write(tmp_path, "train_file: t.jsonl\n"))
    seen = [key for key, group in KEY_GROUP.items() if group is not None]
    assert len(seen) == len(set(seen)) == sum(len(cls.model_fields) for cls in GROUPS.values())
    assert max(len(cls.model_fields) for cls in GROUPS.values()) <= 15
    with pytest.raises(pydantic.ValidationError):
        cfg.train.learning_rate = 1.0  # frozen: stages read it, nobody writes it
    other = cfg.with_overrides(learning_rate=1e-3)
    assert other.train.learning_rate == 1e-3 and cfg.train.learning_rate == 2e-5


def test_a_removed_key_says_it_was_removed(tmp_path):
    with pytest.raises(UserError, match=r"run.yaml: key 'cpu_heap_trim': it was removed .*delete the line"):
        load_config(write(tmp_path, "train_file: t.jsonl\ncpu_heap_trim: true\n"))
    with pytest.raises(UserError, match="override 'cpu_heap_trim': it was removed"):
        load_config(write(tmp_path, "train_file: t.jsonl\n"), ["cpu_heap_trim=false"])


def test_the_cli_takes_its_defaults_from_the_config():
    from deltatune.cli import build_parser
    from deltatune.config import default

    parser = build_parser()
    for command in (["eval", "--model", "m", "--data", "d"], ["compare", "--base", "b", "--tuned", "t", "--data", "d"],
                    ["lint", "d"]):
        args = parser.parse_args(command)
        assert args.max_seq_length == default("max_seq_length") == 1024
    args = parser.parse_args(["compare", "--base", "b", "--tuned", "t", "--data", "d"])
    assert (args.kl_samples, args.side_by_side, args.batch_size) == (
        default("kl_samples"), default("side_by_side_prompts"), default("per_device_eval_batch_size"))
