"""Built-in chat templates (`chat_template: NAME`), each in its model family's own style.

Used instead of the model's own template when the config names one; the special tokens each
needs are listed, so a vocabulary that lacks them is refused before training instead of
splitting `<|eot_id|>` into a dozen ordinary tokens.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from deltatune.data.examples import CHATML_TEMPLATE
from deltatune.errors import UserError


@dataclass(frozen=True)
class ChatTemplate:
    jinja: str
    special_tokens: tuple[str, ...]  # each must be one token of the vocabulary


CHATML = ChatTemplate(CHATML_TEMPLATE, ("<|im_start|>", "<|im_end|>"))

LLAMA3 = ChatTemplate(
    "{{ '<|begin_of_text|>' }}"
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set rest = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set rest = messages %}{% endif %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\n\n' + system + '<|eot_id|>' }}"
    "{% for m in rest %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim "
    "+ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
    ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))

# Gemma has no system role: a system message opens the first user turn. The assistant is `model`.
GEMMA = ChatTemplate(
    "{{ '<bos>' }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
    "{% set rest = messages[1:] %}{% else %}{% set first = '' %}{% set rest = messages %}{% endif %}"
    "{% for m in rest %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') + m['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}",
    ("<bos>", "<start_of_turn>", "<end_of_turn>"))

# Mistral: user and assistant strictly alternate; a system message is folded into the first [INST].
MISTRAL = ChatTemplate(
    "{{ '<s>' }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] + '\n\n' %}"
    "{% set rest = messages[1:] %}{% else %}{% set system = '' %}{% set rest = messages %}{% endif %}"
    "{% for m in rest %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if m['role'] == 'user' %}{{ '[INST] ' + (system if loop.first else '') + m['content'] + ' [/INST]' }}"
    "{% else %}{{ m['content'] + '</s>' }}{% endif %}{% endfor %}",
    ("<s>", "</s>", "[INST]", "[/INST]"))

# Phi-3: the end-of-text token follows the last message when no generation prompt is asked for.
PHI3 = ChatTemplate(
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ '<|endoftext|>' }}{% endif %}",
    ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"))

# Qwen3: an assistant turn's reasoning (`reasoning_content`, or a leading <think> block) is kept only
# after the last user message, and the last turn always has a block (empty without reasoning), so it
# renders after the `enable_thinking: false` generation prompt, which opens with an empty block.
# Tools are listed in the system turn, calls rendered as <tool_call> JSON, results as <tool_response>.
QWEN3 = ChatTemplate(
    "{% if tools %}{{ '<|im_start|>system\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% endif %}"
    "{{ '# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with "
    "function signatures within <tools></tools> XML tags:\n<tools>' }}"
    "{% for tool in tools %}{{ '\n' + tool | tojson }}{% endfor %}"
    "{{ '\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call><|im_end|>\n' }}"
    "{% elif messages[0]['role'] == 'system' %}{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% set ns = namespace(last_query=-1) %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{% set ns.last_query = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}"
    "{% set content = m['content'] %}{% set reasoning = m.get('reasoning_content', '') or '' %}"
    "{% if '</think>' in content %}{% set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\n') %}"
    "{% set content = content.split('</think>')[-1].lstrip('\n') %}{% endif %}"
    "{{ '<|im_start|>assistant\n' }}"
    "{% if loop.index0 > ns.last_query and (loop.last or reasoning) %}"
    "{{ '<think>\n' + reasoning + '\n</think>\n\n' }}{% endif %}"
    "{{ content }}"
    "{% for call in m.get('tool_calls') or [] %}"
    "{% if content or not loop.first %}{{ '\n' }}{% endif %}"
    "{{ '<tool_call>\n{\"name\": \"' + call['function']['name'] + '\", \"arguments\": ' "
    "+ call['function']['arguments'] | tojson + '}\n</tool_call>' }}"
    "{% endfor %}{{ '<|im_end|>\n' }}"
    "{% elif m['role'] == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{ '<|im_start|>user' }}{% endif %}"
    "{{ '\n<tool_response>\n' + m['content'] + '\n</tool_response>' }}"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{ '<|im_end|>\n' }}{% endif %}"
    "{% elif m['role'] != 'system' %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}",
    ("<|im_start|>", "<|im_end|>"))

BUILT_IN = {"chatml": CHATML, "llama3": LLAMA3, "gemma": GEMMA, "mistral": MISTRAL, "phi3": PHI3, "qwen3": QWEN3}


def read_template(value: str) -> ChatTemplate:
    """A built-in template by name, or a Jinja file (whose special tokens are not known: none are checked)."""
    if value in BUILT_IN:
        return BUILT_IN[value]
    path = Path(value)
    if not path.is_file():
        raise UserError(f"chat_template: '{value}' is neither a built-in template ({', '.join(BUILT_IN)}) nor a "
                        "Jinja file (check the path; relative paths are relative to the config file)")
    try:
        return ChatTemplate(path.read_text(encoding="utf-8"), ())
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"chat_template: {path}: cannot read it as UTF-8 text ({err})") from None


def jinja_literal(value) -> str:
    """A JSON-like value written as a Jinja expression."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)  # numbers as they are; a string double-quoted with escapes Jinja reads too


def with_defaults(jinja: str, kwargs: dict) -> str:
    """The template with `kwargs` as the defaults of its variables: a caller passing one still overrides it."""
    for name in kwargs:
        if not re.fullmatch(r"[A-Za-z_]\w*", name):
            raise UserError(f"chat_template_kwargs: '{name}' is not a template variable name")
    return "".join(f"{{%- if {name} is not defined %}}{{%- set {name} = {jinja_literal(value)} %}}{{%- endif %}}"
                   for name, value in kwargs.items()) + jinja


def use_template(tokenizer, value: str | None, kwargs: dict | None = None, add_missing: bool = False) -> list[str]:
    """Give the tokenizer the configured chat template and template options (saved with it in final/), and
    return the special tokens added for it: those the vocabulary lacks are refused, or added when
    `add_missing` (the caller then grows the embeddings and trains their rows)."""
    added = []
    if value is not None:
        template = read_template(value)
        vocab = tokenizer.get_vocab()
        missing = [t for t in template.special_tokens if t not in vocab]
        if missing and not add_missing:
            raise UserError(f"chat_template: {value} uses {', '.join(missing)}, which the model's vocabulary lacks "
                            "(each would be split into ordinary tokens and never learnt as one); use the template of "
                            "the model's own family, or its own template (delete chat_template), or set "
                            "add_special_tokens: true to add them and train their embeddings")
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
            added = missing
        tokenizer.chat_template = template.jinja
    if kwargs:
        if tokenizer.chat_template is None:
            raise UserError("chat_template_kwargs: the model has no chat template to pass them to")
        tokenizer.chat_template = with_defaults(tokenizer.chat_template, kwargs)
    return added
