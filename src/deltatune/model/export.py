"""Write a Llama-family model as a GGUF file with the `gguf` package (llama.cpp, Ollama, transformers).

    deltatune export --model runs/sft/final --format gguf --dtype f16 --out model.gguf

Weight matrices are stored as f32, f16, bf16 or q8_0 (blocks of 32 with one scale; a matrix
whose rows do not split into blocks of 32 stays f16); norms stay f32, as llama.cpp expects.
The byte-level BPE tokenizer (vocabulary, merges, special tokens) and the chat template go in
the metadata. An adapter folder is merged into its base first.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from deltatune.errors import UserError
from deltatune.model.load import load_causal_lm
from deltatune.progress import stage

DTYPES = ("f32", "f16", "bf16", "q8_0")


def _permute_rotary(weights: np.ndarray, n_head: int) -> np.ndarray:
    """HF stores each head's rotary pairs as two halves; GGUF (llama.cpp) interleaves them."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _tensor(data: np.ndarray, dtype: str):
    """(array, raw gguf type) for one tensor in the requested precision."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if data.ndim < 2 or dtype == "f32":
        return data.astype(np.float32), Q.F32
    if dtype == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
        return gguf.quants.quantize(data.astype(np.float32), Q.Q8_0), Q.Q8_0
    if dtype == "bf16":
        return gguf.quants.quantize(data.astype(np.float32), Q.BF16), Q.BF16
    return data.astype(np.float16), Q.F16


def _tokenizer_metadata(writer, tokenizer, vocab_size: int) -> None:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    pre = spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(pre):
        raise UserError("export: only byte-level BPE tokenizers (GPT-2/Llama-3/SmolLM style) are supported")
    vocab = dict(model["vocab"])
    special = set()
    for added in spec.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        if added.get("special"):
            special.add(added["id"])
    tokens = [None] * max(vocab_size, max(vocab.values()) + 1)
    for token, index in vocab.items():
        tokens[index] = token
    # llama.cpp needs one token per embedding row; rows past the tokenizer are unused padding.
    types = [3 if i in special else (5 if t is None else 1) for i, t in enumerate(tokens)]
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    plain_gpt2_split = pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2" if plain_gpt2_split else "default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{name}_token_id")
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(False)  # the chat template writes whatever start tokens it needs
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def export_gguf(model_name: str, out: Path, *, dtype: str = "f16", allow_pickle: bool = False) -> Path:
    import gguf

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if out.suffix != ".gguf":
        raise UserError(f"{out}: the output file must end in .gguf")
    model, tokenizer = load_causal_lm(model_name, allow_pickle=allow_pickle)
    if hasattr(model, "merge_and_unload"):  # an adapter: export the merged weights
        model = model.merge_and_unload()
    config = model.config
    if config.model_type != "llama":
        raise UserError(f"{model_name}: export supports Llama-family models; this is '{config.model_type}'")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"{model_name}: rope scaling '{rope.get('rope_type')}' is not supported by this exporter")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    try:
        _write_metadata(writer, config, model_name, dtype, rope)
        _tokenizer_metadata(writer, tokenizer, config.vocab_size)
        _write_tensors(writer, model, model_name, dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _write_metadata(writer, config, model_name: str, dtype: str, rope: dict) -> None:
    import gguf

    n_head = config.num_attention_heads
    writer.add_name(Path(str(config.name_or_path or model_name)).name or "model")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(getattr(config, "head_dim", None) or config.hidden_size // n_head)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_tensors(writer, model, model_name: str, dtype: str) -> None:
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    state = model.state_dict()
    with stage(f"export {dtype}", total=len(state), unit="tensors") as advance:
        for hf_name, tensor in state.items():
            advance(1)
            # state_dict keeps a tied lm_head under its own name; GGUF leaves output.weight out instead.
            if hf_name == "lm_head.weight" and config.tie_word_embeddings:
                continue
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise UserError(f"{model_name}: tensor '{hf_name}' has no GGUF name (unsupported architecture "
                                "variant)")
            data = tensor.detach().to(torch.float32).cpu().numpy()
            if name.endswith("attn_q.weight"):
                data = _permute_rotary(data, config.num_attention_heads)
            elif name.endswith("attn_k.weight"):
                data = _permute_rotary(data, config.num_key_value_heads)
            array, raw_type = _tensor(data, dtype)
            # Quantised arrays come back as bytes; the writer derives their element shape from raw_dtype.
            writer.add_tensor(name, array, raw_dtype=raw_type if array.dtype == np.uint8 else None)
