"""A pinned loss curve: a refactor must not change what training computes.

Tiny Llama, seed 0, 4 optimizer steps in float32 (bf16 off), SFT and preference (DPO with the
stored reference, SimPO). The numbers were recorded before
the re-layering; CPU kernels differ in the last bits between AVX2 and AVX512/AMX machines, so
they are compared at rtol=1e-4 rather than bit for bit.
"""

import pytest
import torch

from deltatune.config import build_config
from deltatune.data.examples import build_preference_examples, build_sft_examples
from deltatune.data.formats import Record
from deltatune.evaluate.preference import attach_reference, objective_of
from deltatune.tasks import TASKS
from deltatune.train.metrics_log import MetricsLog

from conftest import chat, make_tiny_llama, run_fit

PINNED = {  # (training loss, gradient norm) per step, and the validation loss at the end
    "packed": {"curve": [(6.011531575520833, 2.1848535537719727), (5.804279581705729, 2.477386951446533),
                         (5.75796565303096, 2.0428736209869385), (5.402508006376379, 2.2681193351745605)],
               "eval": [5.100854006680575]},
    "unpacked": {"curve": [(6.011531575520833, 2.1848535537719727), (5.80427983601888, 2.477386951446533),
                           (5.75796565303096, 2.0428733825683594), (5.402508006376379, 2.2681195735931396)],
                 "eval": [5.100854006680575]},
}


def records(n=16):
    words = ["fox", "dog", "cat", "sun", "sky", "tea", "hello", "world"]
    return [Record(messages=chat(f"say {words[i % 8]}", f"{words[i % 8]} " * (1 + i % 3))["messages"], source=f"t:{i}")
            for i in range(n)]


@pytest.mark.parametrize("layout", ["packed", "unpacked"])
def test_four_steps_give_the_pinned_losses(tiny_tokenizer, tmp_path, layout):
    torch.manual_seed(0)
    model = make_tiny_llama(tiny_tokenizer, seed=0)
    examples, _ = build_sft_examples(records(), tiny_tokenizer, max_seq_length=64)
    cfg = build_config(dict(train_file="unused.jsonl", output_dir=str(tmp_path), learning_rate=1e-2, max_steps=4,
                            logging_steps=1, bf16=False, seed=0, per_device_train_batch_size=2,
                            gradient_accumulation_steps=2, warmup_steps=1, max_grad_norm=1.0, weight_decay=0.01,
                            packing=layout == "packed"), "test")
    log = MetricsLog(tmp_path)
    result = run_fit(model, tiny_tokenizer, examples, examples[:4], cfg, tmp_path, log, torch.device("cpu"))
    log.close()
    curve = [(r["loss"], r["grad_norm"]) for r in result.history if "loss" in r]
    evals = [r["eval_loss"] for r in result.history if "eval_loss" in r]
    assert len(curve) == 4
    expected = PINNED[layout]
    flat = [x for pair in curve for x in pair]
    assert flat == pytest.approx([x for pair in expected["curve"] for x in pair], rel=1e-4)
    assert evals == pytest.approx(expected["eval"], rel=1e-4)


PINNED_PREFERENCE = {  # loss_type -> ((training loss, gradient norm, reward accuracy) per step, validation losses)
    "dpo": ([(0.6931471805599453, 1.0566527843475342, 0.0), (0.6618336233101327, 0.8852301239967346, 1.0),
             (0.6060198854805057, 0.9220345616340637, 0.75), (0.4861309241712813, 1.1116565465927124, 1.0)],
            [0.48593600630248496, 0.43091413260530265]),
    "simpo": ([(0.958927618078268, 4.332490921020508, 0.75), (0.7301707223185305, 3.329690456390381, 1.0),
               (0.5225319037934041, 2.641632080078125, 1.0), (0.26586558356208356, 1.9838494062423706, 1.0)],
              [0.20866825379433757, 0.15526292266342165]),
}


def pairs(n=12):
    words = ["fox", "dog", "cat", "sun", "sky", "tea", "hello", "world"]
    return [Record(messages=[{"role": "user", "content": f"say {words[i % 8]}"}],
                   chosen=[{"role": "assistant", "content": f"{words[i % 8]} " * (1 + i % 3)}],
                   rejected=[{"role": "assistant", "content": f"no {words[(i + 3) % 8]}"}], source=f"t:{i}")
            for i in range(n)]


@pytest.mark.parametrize("loss_type", ["dpo", "simpo"])
def test_four_preference_steps_give_the_pinned_losses(tiny_tokenizer, tmp_path, loss_type):
    torch.manual_seed(0)
    model = make_tiny_llama(tiny_tokenizer, seed=0)
    examples, _ = build_preference_examples(pairs(), tiny_tokenizer, max_seq_length=64)
    cfg = build_config(dict(train_file="unused.jsonl", output_dir=str(tmp_path), task="preference",
                            loss_type=loss_type, learning_rate=1e-2, max_steps=4, logging_steps=1, bf16=False,
                            seed=0, per_device_train_batch_size=2, gradient_accumulation_steps=2, warmup_steps=1,
                            max_grad_norm=1.0, weight_decay=0.01, beta=0.1 if loss_type == "dpo" else 2.0), "test")
    attach_reference(model, {"train": examples}, objective_of(cfg.preference, "full"), fingerprint="00",
                     out_dir=tmp_path, reuse=False, batch_size=4, pad_id=tiny_tokenizer.pad_token_id,
                     device=torch.device("cpu"))
    log = MetricsLog(tmp_path)
    result = run_fit(model, tiny_tokenizer, examples, examples[:4], cfg, tmp_path, log, torch.device("cpu"),
                     loss_fn=TASKS["preference"].loss(cfg))
    log.close()
    curve = [(r["loss"], r["grad_norm"], r["reward_accuracy"]) for r in result.history if "loss" in r]
    evals = [r["eval_loss"] for r in result.history if "eval_loss" in r]
    assert len(curve) == 4
    expected = PINNED_PREFERENCE[loss_type]
    assert [x for row in curve for x in row] == pytest.approx([x for row in expected[0] for x in row], rel=1e-4)
    assert evals == pytest.approx(expected[1], rel=1e-4)
