"""Run under torchrun by test_distributed.py: run_fit() the tiny model in several parallel setups.

    torchrun --nproc-per-node 2 tests/e2e/dist_worker.py OUT.pt CASE [CASE ...]

Every rank builds the same model and data; rank 0 saves {case: {history, state, ...}} to OUT.pt.
The single-process reference is computed by the test itself with `train_case(case, world=1)`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest

from deltatune.config import build_config
from deltatune.data.examples import build_sft_examples
from deltatune.data.formats import Record
from deltatune.evaluate.loss import mean_loss
from deltatune.runtime import distributed
from deltatune.train.metrics_log import NullLog

from conftest import chat, make_tiny_llama, make_tokenizer, run_fit  # noqa: E402

GLOBAL_BATCH = 8
N_EXAMPLES = 14  # 8 + 6: the second step of each epoch is short, so one rank gets a blank micro-batch


def examples(tokenizer):
    words = ["fox", "dog", "cat", "sun", "sky", "tea", "hello"]
    records = [Record(messages=chat(f"say {words[i % 7]}", f"{words[i % 7]} " * (1 + i % 3))["messages"],
                      source=f"t:{i}")
               for i in range(N_EXAMPLES)]
    return build_sft_examples(records, tokenizer, max_seq_length=64)[0]


def build_model(tokenizer, lora: bool, tied: bool = False):
    model = make_tiny_llama(tokenizer, seed=1)
    if tied:  # input embeddings = output head, as in SmolLM2: one parameter used twice
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(2)  # same LoRA init on every rank and in the reference
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    return model


def train_case(case: str, world: int, out_dir: Path) -> dict:
    """run_fit() one case; `world` only sets the per-process batch so the global batch stays 8."""
    parallelism = "fsdp" if case.startswith("fsdp") else "ddp"
    tokenizer = make_tokenizer()
    model = build_model(tokenizer, lora="lora" in case, tied="tied" in case)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    # One process: 4 x accumulation 2. Two processes: 2 x accumulation 2 x 2 ranks.
    cfg = build_config(dict(train_file="unused.jsonl", output_dir=str(out_dir), learning_rate=1e-3, num_train_epochs=2,
                            logging_steps=1, bf16=False, per_device_train_batch_size=GLOBAL_BATCH // 2 // world,
                            gradient_accumulation_steps=2, warmup_steps=0, max_grad_norm=1.0, eval_steps=2,
                            parallelism=parallelism, fsdp_cpu_offload=case.endswith("offload")), "test")
    data = examples(tokenizer)
    wrapped = distributed.wrap_model(model, cfg.parallel.parallelism, torch.device("cpu"),
                                     cfg.parallel.fsdp_cpu_offload)
    with torch.no_grad():  # as the pipeline does: evaluate the base model through the wrapper, then train
        base_loss, _ = distributed.call(wrapped, mean_loss, data[:3], 4, tokenizer.pad_token_id, torch.device("cpu"))
    result = run_fit(wrapped, tokenizer, data, data[:3], cfg, out_dir, NullLog(), torch.device("cpu"))
    state = distributed.full_state_dict(wrapped)
    if state is None:
        state = {n: p.detach().clone() for n, p in distributed.unwrap(wrapped).named_parameters()}
    state = {n: state[n] for n in initial if n in state}  # parameters only, same names as `initial`
    return {"base_loss": base_loss, "history": result.history, "state": state, "initial": initial,
            "trained_tokens": result.trained_tokens,
            "seen_tokens": result.seen_tokens, "steps": result.steps, "wrapper": type(wrapped).__name__}


def main() -> None:
    out, cases = Path(sys.argv[1]), sys.argv[2:]
    distributed.init(timeout_seconds=60)
    results = {case: train_case(case, distributed.world_size(), out.parent / case) for case in cases}
    if distributed.is_main():
        torch.save(results, out)
    distributed.shutdown()


if __name__ == "__main__":
    main()
