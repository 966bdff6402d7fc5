"""The label mask: exactly the assistant turns (with their end-of-turn token) are trained."""

import pytest

from deltatune.data.examples import CHATML_TEMPLATE, IGNORE_INDEX, build_sft_examples, tokenize_conversation
from deltatune.data.formats import Record
from deltatune.errors import UserError

from conftest import make_tokenizer


def trained_text(tokenizer, example) -> list[str]:
    """Decode each contiguous run of trained tokens."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(r) for r in runs]


@pytest.mark.parametrize("template", [None, CHATML_TEMPLATE], ids=["smol-style-default-system", "chatml"])
def test_multi_turn_trains_every_assistant_turn(template):
    tok = make_tokenizer() if template is None else make_tokenizer(template)
    messages = [{"role": "user", "content": "Hello world"}, {"role": "assistant", "content": "Hi there"},
                {"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "It is four."}]
    (ex,) = tokenize_conversation(tok, messages)
    assert trained_text(tok, ex) == ["Hi there<|im_end|>", "It is four.<|im_end|>"]


def test_system_prompt_is_not_trained(tiny_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hello world"}]
    (ex,) = tokenize_conversation(tiny_tokenizer, messages)
    assert trained_text(tiny_tokenizer, ex) == ["Hello world<|im_end|>"]
    assert "Be brief." in tiny_tokenizer.decode(ex.input_ids)


def test_unicode_content(tiny_tokenizer):
    messages = [{"role": "user", "content": "Ünïcödé?"}, {"role": "assistant", "content": "café, naïve, 東京 🙂"}]
    (ex,) = tokenize_conversation(tiny_tokenizer, messages)
    assert trained_text(tiny_tokenizer, ex) == ["café, naïve, 東京 🙂<|im_end|>"]


def test_empty_user_and_system_content(tiny_tokenizer):
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": ""},
                {"role": "assistant", "content": "fox"}]
    (ex,) = tokenize_conversation(tiny_tokenizer, messages)
    assert trained_text(tiny_tokenizer, ex) == ["fox<|im_end|>"]


def test_end_of_turn_token_is_trained_even_though_it_is_the_pad_token(tiny_tokenizer):
    assert tiny_tokenizer.pad_token_id == tiny_tokenizer.eos_token_id  # as in SmolLM2
    (ex,) = tokenize_conversation(tiny_tokenizer,
                               [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    trained = [t for t, label in zip(ex.input_ids, ex.labels) if label != IGNORE_INDEX]
    assert trained[-1] == tiny_tokenizer.eos_token_id


def test_train_on_inputs_trains_everything(tiny_tokenizer):
    (ex,) = tokenize_conversation(tiny_tokenizer,
                               [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                               train_on_inputs=True)
    assert ex.labels == ex.input_ids


def test_truncation_drops_examples_without_labels_and_counts_them(tiny_tokenizer):
    long_prompt = Record(messages=[{"role": "user", "content": "fox " * 200}, {"role": "assistant", "content": "dog"}],
                         source="f:1")
    short = Record(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "dog"}], source="f:2")
    assert len(tokenize_conversation(tiny_tokenizer, short.messages)[0].input_ids) < 80
    examples, stats = build_sft_examples([long_prompt, short], tiny_tokenizer, max_seq_length=80)
    assert len(examples) == 1 and examples[0].source == "f:2"
    assert stats.truncated == 1 and stats.dropped_no_labels == 1
    with pytest.raises(UserError, match="every example lost"):
        build_sft_examples([long_prompt], tiny_tokenizer, max_seq_length=80)


def test_template_whose_generation_prompt_does_not_start_the_turn_is_reported():
    # The turn's rendering does not begin with the prompt rendered for generation: nothing to locate it by.
    odd = ("{% for m in messages %}{% if loop.last %}[last]{% endif %}{{ m['role'] }}: {{ m['content'] }}\n"
           "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    tok = make_tokenizer(odd)
    with pytest.raises(UserError, match="does not render assistant turn 1 after its own generation prompt"):
        tokenize_conversation(tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                              source="x:1")
