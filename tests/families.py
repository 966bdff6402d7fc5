"""Chat templates written in each model family's style, with the special tokens each needs, for tiny
random models built from the family's transformers config class (no download)."""

from dataclasses import dataclass, field

LLAMA3 = (
    "{{ '<|begin_of_text|>' }}"
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set rest = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set rest = messages %}{% endif %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: "
    "26 Jul 2024\n\n' + system + '<|eot_id|>' }}"
    "{% for m in rest %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim "
    "+ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

QWEN2 = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. "
    "You are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen3: reasoning is kept only for the assistant turns after the last user message; earlier turns
# lose their <think> block, so the history is rewritten as the conversation grows.
QWEN3 = (
    "{% set ns = namespace(last_query=-1) %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{% set ns.last_query = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}"
    "{% set content = m['content'] %}{% set reasoning = m.get('reasoning_content', '') %}"
    "{% if '</think>' in content %}{% set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\n') %}"
    "{% set content = content.split('</think>')[-1].lstrip('\n') %}{% endif %}"
    "{% if loop.index0 > ns.last_query and reasoning %}"
    "{{ '<|im_start|>assistant\n<think>\n' + reasoning + '\n</think>\n\n' + content + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>assistant\n' + content + '<|im_end|>\n' }}{% endif %}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
    "{% endif %}"
)

MISTRAL = (
    "{{ '<s>' }}{% for m in messages %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ m['content'] + '</s>' }}{% endif %}{% endfor %}"
)

GEMMA = (
    "{{ '<bos>' }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
    "{% set rest = messages[1:] %}{% else %}{% set first = '' %}{% set rest = messages %}{% endif %}"
    "{% for m in rest %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') + m['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# Phi-3: the end-of-text token follows the last message whenever no generation prompt is asked for.
PHI3 = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

PHI4 = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '<|im_sep|>' + m['content'] + '<|im_end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)

NEOX = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|endoftext|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

OLMO2 = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Family:
    config: str  # the transformers config class
    template: str
    specials: tuple[str, ...]  # special tokens of its tokenizer (the first is the unknown token)
    end_of_turn: str  # what closes an assistant turn
    eos: str
    pad: str
    bos: str | None = None
    extra: dict = field(default_factory=dict)  # config arguments the family needs


CHATML = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# As the released Gemma models are: embeddings tied to the output, attention scaled by 1/sqrt(head_dim).
GEMMA_SHAPE = {"tie_word_embeddings": True, "query_pre_attn_scalar": 8}
SENTENCEPIECE = {"mistral", "gemma2", "gemma3", "phi3"}  # families whose released tokenizers are SentencePiece BPE
FAMILIES = {
    "llama3": Family("LlamaConfig", LLAMA3, ("<|end_of_text|>", "<|begin_of_text|>", "<|start_header_id|>",
                                             "<|end_header_id|>", "<|eot_id|>"), "<|eot_id|>", "<|eot_id|>",
                     "<|end_of_text|>", "<|begin_of_text|>"),
    "qwen2": Family("Qwen2Config", QWEN2, CHATML, "<|im_end|>", "<|im_end|>", "<|endoftext|>"),
    "qwen3": Family("Qwen3Config", QWEN3, CHATML, "<|im_end|>", "<|im_end|>", "<|endoftext|>"),
    "mistral": Family("MistralConfig", MISTRAL, ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"), "</s>", "</s>",
                      "<unk>", "<s>"),
    "gemma2": Family("Gemma2Config", GEMMA, ("<unk>", "<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"),
                     "<end_of_turn>", "<eos>", "<pad>", "<bos>", GEMMA_SHAPE),
    "gemma3": Family("Gemma3TextConfig", GEMMA, ("<unk>", "<bos>", "<eos>", "<pad>", "<start_of_turn>",
                                                 "<end_of_turn>"), "<end_of_turn>", "<eos>", "<pad>", "<bos>",
                     GEMMA_SHAPE),
    "phi3": Family("Phi3Config", PHI3, ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
                   "<|end|>", "<|endoftext|>", "<|endoftext|>"),
    "phi4": Family("Phi3Config", PHI4, ("<|endoftext|>", "<|im_start|>", "<|im_sep|>", "<|im_end|>"), "<|im_end|>",
                   "<|im_end|>", "<|endoftext|>"),
    "gpt_neox": Family("GPTNeoXConfig", NEOX, ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>"),
                       "<|endoftext|>", "<|endoftext|>", "<|endoftext|>"),
    "olmo2": Family("Olmo2Config", OLMO2, ("<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"),
                    "<|endoftext|>", "<|endoftext|>", "<|pad|>", "<|endoftext|>"),
}


def family_tokenizer(name: str):
    """A byte-level BPE tokenizer (~400 tokens) with the family's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from conftest import CORPUS

    family = FAMILIES[name]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(family.specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=family.bos, eos_token=family.eos,
                                   pad_token=family.pad, unk_token=family.specials[0])
    fast.chat_template = family.template
    return fast


def sentencepiece_tokenizer(name: str):
    """A SentencePiece-style BPE tokenizer (byte fallback, "▁" for spaces) with the family's special tokens and
    chat template, built by the transformers class the family's released tokenizer loads as."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GemmaTokenizer, LlamaTokenizer

    from conftest import CORPUS

    family = FAMILIES[name]
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False)
    trainer_tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    trained = __import__("json").loads(trainer_tok.to_str())["model"]
    pieces = list(family.specials) + [f"<0x{b:02X}>" for b in range(256)]
    pieces += [p for p in sorted(trained["vocab"], key=trained["vocab"].get) if p not in pieces]
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    kind = GemmaTokenizer if name.startswith("gemma") else LlamaTokenizer
    names = {"unk_token": family.specials[0], "bos_token": family.bos, "eos_token": family.eos,
             "pad_token": family.pad}
    tok = kind(vocab=vocab, merges=merges, **names, **({"mask_token": None} if kind is GemmaTokenizer else {}))
    tok.add_special_tokens({"additional_special_tokens": [t for t in family.specials if t not in names.values()]})
    if name == "phi3":  # Phi-3's tokenizer.json prefixes the space with a normalizer instead of Metaspace
        from tokenizers import normalizers

        tok.backend_tokenizer.normalizer = normalizers.Sequence(
            [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.backend_tokenizer.pre_tokenizer = None
    tok.chat_template = family.template
    return tok


def family_model(name: str, tokenizer, seed: int = 0):
    """A 2-layer random-init causal LM of the family, from its transformers config class."""
    import torch
    import transformers

    family = FAMILIES[name]
    torch.manual_seed(seed)
    config = getattr(transformers, family.config)(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, head_dim=8, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids(family.end_of_turn), pad_token_id=tokenizer.pad_token_id,
        **{"tie_word_embeddings": False, **family.extra})
    return transformers.AutoModelForCausalLM.from_config(config)
