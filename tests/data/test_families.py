"""The model families people fine-tune, each as a tiny random model from its transformers config class
with a chat template in its family's style: the exact mask, full and LoRA training from the CLI,
final/ loading in plain transformers and stopping at the family's end-of-turn token, merge; the
chat_template key and reasoning_content."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from deltatune.cli import main
from deltatune.data.examples import IGNORE_INDEX, end_of_turn_id, tokenize_conversation, trailing_text
from deltatune.data.formats import load_records
from deltatune.data.lint import lint
from deltatune.data.templates import BUILT_IN
from deltatune.errors import UserError
from deltatune.evaluate.generate import stop_ids
from deltatune.model.load import load_causal_lm
from families import FAMILIES, family_model, family_tokenizer

from conftest import write_jsonl

TURNS = [{"role": "user", "content": "say fox"}, {"role": "assistant", "content": "fox fox"},
         {"role": "user", "content": "say dog"}, {"role": "assistant", "content": "dog dog"}]


def trained(tokenizer, ex) -> list[str]:
    """The trained tokens, decoded one by one."""
    return [tokenizer.decode([t]) for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_mask_is_each_answer_and_its_end_of_turn_token(family):
    tokenizer = family_tokenizer(family)
    eot = FAMILIES[family].end_of_turn
    examples = tokenize_conversation(tokenizer, TURNS, trailer=trailing_text(tokenizer))
    assert len(examples) == 1
    assert "".join(trained(tokenizer, examples[0])) == f"fox fox{eot}dog dog{eot}"
    assert trained(tokenizer, examples[0])[-1] == eot  # the end-of-turn token is one token, and trained


def test_phi3_end_of_text_after_the_last_turn_stays_untrained():
    tokenizer = family_tokenizer("phi3")
    assert trailing_text(tokenizer) == "<|endoftext|>"
    (ex,) = tokenize_conversation(tokenizer, TURNS, trailer="<|endoftext|>")
    assert tokenizer.decode(ex.input_ids[-1:]) == "<|endoftext|>" and ex.labels[-1] == IGNORE_INDEX
    for family in set(FAMILIES) - {"phi3"}:
        assert trailing_text(family_tokenizer(family)) == "", family


def test_qwen3_reasoning_turns_are_trained_as_the_model_generates_them():
    tokenizer = family_tokenizer("qwen3")
    turns = [{"role": "user", "content": "say fox"},
             {"role": "assistant", "content": "<think>\nthe word\n</think>\n\nfox fox"},
             {"role": "user", "content": "say dog"},
             {"role": "assistant", "content": "<think>\nagain\n</think>\n\ndog dog"}]
    first, second = tokenize_conversation(tokenizer, turns)
    assert "".join(trained(tokenizer, first)) == "<think>\nthe word\n</think>\n\nfox fox<|im_end|>"
    assert "".join(trained(tokenizer, second)) == "<think>\nagain\n</think>\n\ndog dog<|im_end|>"
    # The second turn's prompt is the history as the template renders it for generation: the first
    # turn's reasoning dropped, nothing of it trained.
    prompt = tokenizer.apply_chat_template(turns[:3], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(second.input_ids).startswith(prompt) and "the word" not in prompt
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert all(lab == IGNORE_INDEX for lab in second.labels[:n_prompt])


def test_lint_counts_and_shows_the_turn_by_turn_examples(tmp_path):
    tokenizer = family_tokenizer("qwen3")
    reasoning = [{"role": "user", "content": "say fox"},
                 {"role": "assistant", "content": "<think>\nw\n</think>\n\nfox"},
                 {"role": "user", "content": "say dog"},
                 {"role": "assistant", "content": "<think>\nv\n</think>\n\ndog"}]
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": TURNS}, {"messages": reasoning}])
    report = lint(str(path), tokenizer, max_seq_length=256)
    assert report["errors"] == [] and report["examples"] == 3
    assert report["turn_by_turn"]["count"] == 1 and report["turn_by_turn"]["records"] == [f"{path}:2"]
    assert report["example"]["plain"].endswith("[[<think>\nw\n</think>\n\nfox<|im_end|>]]\n")
    (second,) = report["example_turns"]
    assert second["plain"].endswith("<|im_start|>assistant\n[[<think>\nv\n</think>\n\ndog<|im_end|>]]\n")
    assert any("trained turn by turn" in w for w in report["warnings"])


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    dirs = {}
    for family in FAMILIES:
        tokenizer = family_tokenizer(family)
        model = family_model(family, tokenizer)
        dirs[family] = root / family
        model.save_pretrained(dirs[family])
        tokenizer.save_pretrained(dirs[family])
    return dirs


CONFIG = """model: {model}
method: {method}
train_file: train.jsonl
validation_split: 0.25
output_dir: out-{method}
max_steps: 3
per_device_train_batch_size: 4
learning_rate: 1.0e-3
logging_steps: 1
bf16: false
report_to: none
delta_report: false
metric: none
"""


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_full_and_lora_train_and_reload(tmp_path, family_dirs, family, method):
    words = ["fox", "dog", "cat", "sun", "sky", "tea"]
    write_jsonl(tmp_path / "train.jsonl", [{"messages": [{"role": "user", "content": f"say {w}"},
                                                         {"role": "assistant", "content": f"{w} {w}"}]}
                                           for w in words * 2])
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG.format(model=family_dirs[family], method=method))
    assert main(["train", str(config)]) == 0
    out = tmp_path / f"out-{method}"
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line and '"event"' not in line]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    tokenizer = family_tokenizer(family)
    eot = tokenizer.convert_tokens_to_ids(FAMILIES[family].end_of_turn)
    assert end_of_turn_id(tokenizer) == eot and eot in stop_ids(tokenizer)  # our generate stops where training did
    ids = torch.tensor([tokenizer("say fox")["input_ids"]])
    if method == "full":  # final/ is a plain model folder: transformers alone loads it, and stops at end of turn
        tuned = AutoModelForCausalLM.from_pretrained(out / "final")
        assert type(tuned).__name__ == type(family_model(family, tokenizer)).__name__
        saved = tuned.generation_config.eos_token_id
        assert eot in (saved if isinstance(saved, list) else [saved])
    else:  # merge folds the adapter in: the merged model's logits are the adapter model's
        assert main(["merge", "--adapter", str(out / "final"), "--out", str(tmp_path / "merged")]) == 0
        adapter, _ = load_causal_lm(str(out / "final"))
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
        with torch.no_grad():
            torch.testing.assert_close(merged(ids).logits, adapter.eval()(ids).logits, rtol=1e-4, atol=1e-5)


REASONING = [{"role": "user", "content": "say fox"},
             {"role": "assistant", "content": "fox fox", "reasoning_content": "the word"},
             {"role": "user", "content": "say dog"},
             {"role": "assistant", "content": "dog dog", "reasoning_content": "again"}]


def test_chat_template_key_replaces_the_models_own_and_is_saved(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "train.jsonl", [{"messages": REASONING}] * 8)
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG.format(model=tiny_model_dir, method="full").replace("out-full", "out")
                      + "chat_template: qwen3\n")
    assert main(["train", str(config)]) == 0
    saved = AutoTokenizer.from_pretrained(tmp_path / "out" / "final")
    assert saved.chat_template == BUILT_IN["qwen3"].jinja


def test_a_template_whose_special_tokens_the_vocabulary_lacks_is_refused(tmp_path, tiny_model_dir, capsys):
    write_jsonl(tmp_path / "train.jsonl", [{"messages": TURNS}] * 4)
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG.format(model=tiny_model_dir, method="full") + "chat_template: llama3\n")
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert "chat_template: llama3 uses <|begin_of_text|>, <|start_header_id|>, <|end_header_id|>, <|eot_id|>" in err
    assert not (tmp_path / "out-full").exists()
    config.write_text(CONFIG.format(model=tiny_model_dir, method="full") + "chat_template: missing.jinja\n")
    assert main(["train", str(config)]) == 2
    assert "is neither a built-in template" in capsys.readouterr().err


def test_a_jinja_file_template_relative_to_the_config(tmp_path, tiny_model_dir):
    (tmp_path / "tpl.jinja").write_text(FAMILIES["qwen2"].template)
    write_jsonl(tmp_path / "train.jsonl", [{"messages": TURNS}] * 8)
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG.format(model=tiny_model_dir, method="lora") + "chat_template: tpl.jinja\n")
    assert main(["train", str(config)]) == 0
    saved = AutoTokenizer.from_pretrained(tmp_path / "out-lora" / "final")
    assert "You are Qwen" in saved.apply_chat_template(TURNS[:1], tokenize=False)


def test_reasoning_content_renders_through_a_template_that_knows_it():
    tokenizer = family_tokenizer("qwen3")
    tokenizer.chat_template = BUILT_IN["qwen3"].jinja
    first, second = tokenize_conversation(tokenizer, REASONING)
    assert "".join(trained(tokenizer, first)) == "<think>\nthe word\n</think>\n\nfox fox<|im_end|>"
    assert "".join(trained(tokenizer, second)) == "<think>\nagain\n</think>\n\ndog dog<|im_end|>"


def test_reasoning_content_is_kept_on_assistant_turns_only(tmp_path):
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": REASONING}])
    assert load_records(path)[0][0].messages[1] == REASONING[1]
    bad = [{"role": "user", "content": "hi", "reasoning_content": "no"}, {"role": "assistant", "content": "ok"}]
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": bad}])
    with pytest.raises(UserError, match=r"bad.jsonl:1: field 'messages\[0\].reasoning_content' is on a user turn"):
        load_records(path)


def test_chat_template_kwargs_become_the_templates_defaults_at_training_and_after(tmp_path, tiny_model_dir):
    from deltatune.data.templates import use_template

    tokenizer = family_tokenizer("qwen3")
    use_template(tokenizer, "qwen3", {"enable_thinking": False})
    prompt = tokenizer.apply_chat_template(TURNS[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    overridden = tokenizer.apply_chat_template(TURNS[:1], tokenize=False, add_generation_prompt=True,
                                               enable_thinking=True)
    assert overridden.endswith("<|im_start|>assistant\n")  # a caller's own value still wins
    with pytest.raises(UserError, match="'bad-name' is not a template variable name"):
        use_template(family_tokenizer("qwen3"), None, {"bad-name": 1})

    write_jsonl(tmp_path / "train.jsonl", [{"messages": TURNS}] * 8)
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG.format(model=tiny_model_dir, method="lora").replace("out-lora", "out")
                      + "chat_template: qwen3\nchat_template_kwargs: {enable_thinking: false}\n")
    assert main(["train", str(config)]) == 0
    saved = AutoTokenizer.from_pretrained(tmp_path / "out" / "final")  # generate/chat on final/ renders the same
    assert saved.apply_chat_template(TURNS[:1], tokenize=False, add_generation_prompt=True) == prompt


@pytest.mark.parametrize("reasoning_format,train_on_reasoning,want", [
    ("auto", True, "<think>\nthe word\n</think>\n\nfox fox<|im_end|>"),  # ChatML ignores the field: folded
    ("think", True, "<think>\nthe word\n</think>\n\nfox fox<|im_end|>"),
    ("auto", False, "fox fox<|im_end|>"),  # the reasoning is in the prompt's view, not trained
    ("template", True, "fox fox<|im_end|>"),  # passed to a template that drops it
])
def test_reasoning_is_folded_into_think_blocks_and_trained_as_asked(reasoning_format, train_on_reasoning, want):
    from deltatune.data.examples import build_sft_examples
    from deltatune.data.formats import Record

    tokenizer = family_tokenizer("qwen2")
    records = [Record(messages=REASONING[:2], source="chats.jsonl:1")]
    (ex,), _ = build_sft_examples(records, tokenizer, max_seq_length=256, reasoning_format=reasoning_format,
                                  train_on_reasoning=train_on_reasoning)
    assert "".join(trained(tokenizer, ex)) == want
    folded = reasoning_format != "template"
    assert ("the word" in tokenizer.decode(ex.input_ids)) == folded


def test_reasoning_left_untrained_on_a_template_that_renders_it_turn_by_turn():
    tokenizer = family_tokenizer("qwen3")
    tokenizer.chat_template = BUILT_IN["qwen3"].jinja
    first, second = tokenize_conversation(tokenizer, REASONING, train_on_reasoning=False)
    assert "".join(trained(tokenizer, first)) == "fox fox<|im_end|>"
    assert "".join(trained(tokenizer, second)) == "dog dog<|im_end|>"
    assert "the word" in tokenizer.decode(first.input_ids)  # shown, not trained


def test_train_on_reasoning_false_refuses_reasoning_it_cannot_find(tmp_path):
    tokenizer = family_tokenizer("qwen2")
    tokenizer.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + "
                               "(m.get('reasoning_content', '') + ' ' if m['role'] == 'assistant' else '') + "
                               "m['content'] + '<|im_end|>\n' }}{% endfor %}"
                               "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    with pytest.raises(UserError, match="renders reasoning_content without <think> tags"):
        tokenize_conversation(tokenizer, REASONING[:2], train_on_reasoning=False, source="c.jsonl:1")


@pytest.mark.parametrize("method", ["full", "lora"])
def test_add_special_tokens_adds_the_templates_tokens_and_trains_their_rows(tmp_path, tiny_model_dir, method):
    write_jsonl(tmp_path / "train.jsonl", [{"messages": TURNS}] * 8)
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG.format(model=tiny_model_dir, method=method).replace(f"out-{method}", "out")
                      + "chat_template: llama3\nadd_special_tokens: true\n")
    assert main(["train", str(config)]) == 0
    before, _ = load_causal_lm(str(tiny_model_dir))
    tuned, tokenizer = load_causal_lm(str(tmp_path / "out" / "final"))  # an adapter reloads onto a grown base
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert eot >= before.get_input_embeddings().num_embeddings and end_of_turn_id(tokenizer) == eot
    if method == "lora":
        tuned = tuned.merge_and_unload()
    rows = tuned.get_output_embeddings().weight
    assert rows.shape[0] == len(tokenizer)
    # The new end-of-turn row trained away from its start (the mean of the old rows); an old row the data never
    # shows as a target kept its value under LoRA.
    old_mean = before.get_output_embeddings().weight.mean(0)
    assert not torch.allclose(rows[eot], old_mean, atol=1e-3)
    if method == "lora":
        torch.testing.assert_close(rows[0], before.get_output_embeddings().weight[0])


def test_add_special_tokens_is_refused_for_methods_that_freeze_the_embeddings(tmp_path, tiny_model_dir, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(CONFIG.format(model=tiny_model_dir, method="head_only") + "add_special_tokens: true\n")
    assert main(["train", str(config)]) == 2
    assert "method head_only keeps them frozen" in capsys.readouterr().err
