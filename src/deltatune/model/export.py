"""Write a causal LM as a GGUF file with the `gguf` package, the way llama.cpp (and transformers' GGUF loader,
Ollama, LM Studio) read it.

    deltatune export --model runs/sft/final --format gguf --dtype q8_0 --out model.gguf

Each architecture's differences live in `ARCHS`: llama.cpp's name for it, the tensor layouts it expects, and the
hyper-parameters only it reads. Tensor names come from the `gguf` package's own map; quantisation is the `gguf`
package's. Weight matrices are stored as f32, f16, bf16, q8_0 or q4_0 (blocks of 32 with one scale; a matrix whose
rows do not split into blocks of 32 stays f16); norms, biases and rope factors stay f32, as llama.cpp expects. An
adapter folder is merged into its base first. What cannot be exported is refused before anything is written.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from deltatune.errors import UserError
from deltatune.model.gguf_vocab import write_vocab
from deltatune.model.load import load_causal_lm
from deltatune.progress import stage

DTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_of(config, layer_type: str = "full_attention") -> dict:
    """The rope parameters of one kind of layer (Gemma 3 keeps one set per layer type)."""
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if layer_type in rope:
        return dict(rope[layer_type])
    return rope or {"rope_type": "default", "rope_theta": getattr(config, "rope_theta", 10000.0)}


def llama3_rope_factors(rope: dict, dim: int) -> np.ndarray:
    """Llama 3.1's frequency scaling as llama.cpp takes it: one divisor per rotary frequency."""
    base, factor = rope["rope_theta"], rope["factor"]
    low, high, original = rope["low_freq_factor"], rope["high_freq_factor"], rope["original_max_position_embeddings"]
    inv_freq = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    ratio = original * inv_freq / (2 * math.pi)  # context length over wavelength
    smooth = np.clip((ratio - low) / (high - low), 0.0, 1.0)  # 0: fully scaled (long waves), 1: untouched
    return (1.0 / ((1 - smooth) / factor + smooth)).astype(np.float32)


def write_rope(writer, config, model_name: str) -> dict[str, np.ndarray]:
    """Rope base and scaling; returns the extra tensors llama.cpp reads it from (Llama 3.1's rope_freqs)."""
    import gguf

    rope = rope_of(config)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", "default")
    if kind == "default":
        return {}
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        return {}
    if kind == "llama3":
        dim = int(head_dim(config) * rope.get("partial_rotary_factor", 1.0))
        return {"rope_freqs.weight": llama3_rope_factors(rope, dim)}
    raise UserError(f"{model_name}: rope scaling '{kind}' is not supported by the GGUF exporter "
                    "(default, linear and llama3 are)")


def attention_lengths(writer, config) -> None:
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))


def llama_hparams(writer, config, model_name) -> None:
    writer.add_rope_dimension_count(head_dim(config))
    if head_dim(config) != config.hidden_size // config.num_attention_heads:
        attention_lengths(writer, config)


def qwen3_hparams(writer, config, model_name) -> None:
    attention_lengths(writer, config)


def gemma_attention_scale(config, model_name: str, large_layer_count: int) -> None:
    """llama.cpp computes Gemma's attention scale itself (1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 27B
    shape); a model that asks for another cannot be run there as trained."""
    wanted = (config.hidden_size // config.num_attention_heads
              if config.num_hidden_layers == large_layer_count else head_dim(config))
    if config.query_pre_attn_scalar != wanted:
        raise UserError(f"{model_name}: query_pre_attn_scalar {config.query_pre_attn_scalar} is not the {wanted} "
                        "llama.cpp uses for this shape; the GGUF would not compute what the model does")


def gemma2_hparams(writer, config, model_name) -> None:
    gemma_attention_scale(config, model_name, large_layer_count=46)
    attention_lengths(writer, config)
    writer.add_sliding_window(config.sliding_window)
    writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping or 0.0))
    writer.add_final_logit_softcapping(float(config.final_logit_softcapping or 0.0))


def gemma3_hparams(writer, config, model_name) -> None:
    gemma_attention_scale(config, model_name, large_layer_count=62)
    attention_lengths(writer, config)
    writer.add_sliding_window(config.sliding_window)
    writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in config.layer_types])
    writer.add_rope_freq_base_swa(float(rope_of(config, "sliding_attention").get("rope_theta", 10000.0)))
    if config.final_logit_softcapping:
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))


def phi3_hparams(writer, config, model_name) -> None:
    writer.add_rope_dimension_count(int(head_dim(config) * rope_of(config).get("partial_rotary_factor", 1.0)))


def gptneox_hparams(writer, config, model_name) -> None:
    writer.add_rope_dimension_count(int(head_dim(config) * rope_of(config).get("partial_rotary_factor", 1.0)))
    writer.add_parallel_residual(bool(config.use_parallel_residual))
    writer.add_layer_norm_eps(config.layer_norm_eps)


def no_hparams(writer, config, model_name) -> None:
    pass


def rotary_halves_to_pairs(weights: np.ndarray, n_head: int) -> np.ndarray:
    """HF stores each head's rotary pairs as two halves; llama.cpp's Llama rope rotates adjacent pairs."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def neox_qkv(weights: np.ndarray, n_head: int) -> np.ndarray:
    """GPT-NeoX fuses q, k, v per head ([head][q|k|v]); llama.cpp reads all q rows, then all k, then all v."""
    return weights.reshape(n_head, 3, -1, *weights.shape[1:]).swapaxes(0, 1).reshape(weights.shape)


@dataclass(frozen=True)
class Arch:
    """How llama.cpp runs one transformers architecture."""

    gguf: str  # the gguf.MODEL_ARCH member
    hparams: Callable  # (writer, config, model_name): what only this architecture reads
    rotary_pairs: bool = False  # q/k rows reordered for llama.cpp's adjacent-pair rope
    norm_plus_one: bool = False  # Gemma scales by (1 + w); llama.cpp multiplies by the stored weight
    output: str = "optional"  # "optional": tied models leave it out; "required": always written; "tied": never
    fused_qkv_per_head: bool = False
    norm_eps: str = "rms"
    grouped_kv: bool = True  # reads num_key_value_heads (GPT-NeoX has none: any value in its config is unused)


ARCHS = {
    "llama": Arch("LLAMA", llama_hparams, rotary_pairs=True),
    "mistral": Arch("LLAMA", llama_hparams, rotary_pairs=True),  # llama.cpp runs Mistral 7B as Llama
    "qwen2": Arch("QWEN2", no_hparams),
    "qwen3": Arch("QWEN3", qwen3_hparams),
    "gemma2": Arch("GEMMA2", gemma2_hparams, norm_plus_one=True, output="tied"),
    "gemma3_text": Arch("GEMMA3", gemma3_hparams, norm_plus_one=True),
    "phi3": Arch("PHI3", phi3_hparams),
    "gpt_neox": Arch("GPTNEOX", gptneox_hparams, output="required", fused_qkv_per_head=True, norm_eps="layer",
                     grouped_kv=False),
    "olmo2": Arch("OLMO2", no_hparams, output="required"),
}


def arch_of(config, model_name: str) -> Arch:
    if config.model_type not in ARCHS:
        raise UserError(f"{model_name}: GGUF export does not support the '{config.model_type}' architecture "
                        f"(supported: {', '.join(sorted(ARCHS))})")
    arch = ARCHS[config.model_type]
    if arch.output == "tied" and not config.tie_word_embeddings:
        raise UserError(f"{model_name}: llama.cpp's {arch.gguf.lower()} always uses the embeddings as the output "
                        "layer, and this model's lm_head is separate (tie_word_embeddings: false)")
    return arch


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
    arch = arch_of(config, model_name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch.gguf]])
    try:
        write_metadata(writer, config, arch, model_name, dtype)
        extra = write_rope(writer, config, model_name)
        for warning in write_vocab(writer, tokenizer, config.vocab_size):
            print(warning, file=sys.stderr)
        write_tensors(writer, model, arch, dtype, extra)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
              "q4_0": "MOSTLY_Q4_0"}


def write_metadata(writer, config, arch: Arch, model_name: str, dtype: str) -> None:
    import gguf

    writer.add_name(Path(str(config.name_or_path or model_name)).name or "model")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    kv_heads = getattr(config, "num_key_value_heads", None) if arch.grouped_kv else None
    writer.add_head_count_kv(kv_heads or config.num_attention_heads)
    if arch.norm_eps == "rms":
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    arch.hparams(writer, config, model_name)
    writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[dtype]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def quantised(data: np.ndarray, dtype: str):
    """(array, raw gguf type) for one tensor in the requested precision."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if data.ndim < 2 or dtype == "f32":
        return data.astype(np.float32), Q.F32
    block = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0}.get(dtype)
    if block is not None and data.shape[-1] % gguf.GGML_QUANT_SIZES[block][0] == 0:
        return gguf.quants.quantize(data.astype(np.float32), block), block
    if dtype == "bf16":
        return gguf.quants.quantize(data.astype(np.float32), Q.BF16), Q.BF16
    return data.astype(np.float16), Q.F16


def write_tensors(writer, model, arch: Arch, dtype: str, extra: dict[str, np.ndarray]) -> None:
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf], config.num_hidden_layers)
    state = model.state_dict()
    for name, data in extra.items():
        writer.add_tensor(name, data)
    with stage(f"export {dtype}", total=len(state), unit="tensors") as advance:
        for hf_name, tensor in state.items():
            advance(1)
            # state_dict keeps a tied lm_head under its own name; llama.cpp reuses token_embd unless it needs both.
            if hf_name.endswith("lm_head.weight") and config.tie_word_embeddings and arch.output != "required":
                continue
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise UserError(f"{config.model_type}: tensor '{hf_name}' has no GGUF name (an architecture "
                                "variant the exporter does not know)")
            data = tensor.detach().to(torch.float32).cpu().numpy()
            if arch.rotary_pairs and name.endswith("attn_q.weight"):
                data = rotary_halves_to_pairs(data, config.num_attention_heads)
            elif arch.rotary_pairs and name.endswith("attn_k.weight"):
                data = rotary_halves_to_pairs(data, config.num_key_value_heads)
            elif arch.fused_qkv_per_head and ".attn_qkv." in name:
                data = neox_qkv(data, config.num_attention_heads)
            elif arch.norm_plus_one and name.endswith("norm.weight"):
                data = data + 1.0
            array, raw_type = quantised(data, dtype)
            # Quantised arrays come back as bytes; the writer derives their element shape from raw_dtype.
            writer.add_tensor(name, array, raw_dtype=raw_type if array.dtype == np.uint8 else None)
