"""The preference losses against float64 references written from the papers' formulas, their gradient,
and the reference model: LoRA's adapters switched off give the base's log-probabilities exactly."""

import math

import numpy as np
import pytest
import torch

from deltatune.config import ModelArgs
from deltatune.data.batching import collate
from deltatune.data.examples import IGNORE_INDEX, build_preference_examples
from deltatune.data.formats import Record
from deltatune.evaluate.preference import (
    Objective,
    pair_terms,
    pairs_in,
    preference_loss,
    reference_logps,
    response_logps,
)
from deltatune.model.methods import apply_method

from conftest import make_tiny_llama


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# The per-pair losses, from the papers (DPO: Rafailov et al. 2023, eq. 7; IPO: Azar et al. 2023, eq. 17;
# SimPO: Meng et al. 2024, eq. 6; ORPO: Hong et al. 2024, eqs. 6-7), in plain float64 Python.
def dpo(beta, pc, pr, rc, rr, nc, nr):
    return -log_sigmoid(beta * ((pc - rc) - (pr - rr)))


def ipo(tau, pc, pr, rc, rr, nc, nr):
    return (((pc - rc) - (pr - rr)) - 1 / (2 * tau)) ** 2


def simpo(beta, gamma, pc, pr, nc, nr):
    return -log_sigmoid(beta / nc * pc - beta / nr * pr - gamma)


def orpo(lam, pc, pr, nc, nr):
    def odds(logp, n):
        p = math.exp(logp / n)
        return math.log(p / (1 - p))
    return -pc / nc - lam * log_sigmoid(odds(pc, nc) - odds(pr, nr))


@pytest.fixture
def pairs_data():
    rng = np.random.default_rng(0)
    n_c, n_r = rng.integers(1, 40, 16), rng.integers(1, 40, 16)
    logp_c, logp_r = -rng.uniform(0.05, 3.0, 16) * n_c, -rng.uniform(0.05, 3.0, 16) * n_r
    ref_c, ref_r = logp_c + rng.normal(0, 2, 16), logp_r + rng.normal(0, 2, 16)
    return logp_c, logp_r, ref_c, ref_r, n_c, n_r


@pytest.mark.parametrize("objective, reference", [
    (Objective("dpo", beta=0.1), lambda pc, pr, rc, rr, nc, nr: dpo(0.1, pc, pr, rc, rr, nc, nr)),
    (Objective("dpo", beta=2.5), lambda pc, pr, rc, rr, nc, nr: dpo(2.5, pc, pr, rc, rr, nc, nr)),
    (Objective("ipo", beta=0.3), lambda pc, pr, rc, rr, nc, nr: ipo(0.3, pc, pr, rc, rr, nc, nr)),
    (Objective("simpo", beta=2.0, simpo_gamma=1.0, reference="none"),
     lambda pc, pr, rc, rr, nc, nr: simpo(2.0, 1.0, pc, pr, nc, nr)),
    (Objective("orpo", orpo_lambda=0.25, reference="none"),
     lambda pc, pr, rc, rr, nc, nr: orpo(0.25, pc, pr, nc, nr)),
])
def test_each_loss_equals_its_formula(pairs_data, objective, reference):
    tensors = [torch.tensor(x, dtype=torch.float64) for x in pairs_data]
    logp_c, logp_r, ref_c, ref_r, n_c, n_r = tensors
    losses, reward_c, reward_r = pair_terms(objective, logp_c, logp_r, n_c, n_r, ref_c, ref_r)
    want = [reference(*(float(t[i]) for t in tensors[:4]), int(n_c[i]), int(n_r[i])) for i in range(16)]
    assert losses.tolist() == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert reward_c.shape == reward_r.shape == (16,)


def tiny_pairs(tokenizer, n=4):
    words = ["fox", "dog", "cat", "sun", "sky", "tea"]
    records = [Record(messages=[{"role": "user", "content": f"say {w}"}], chosen=[{"role": "assistant",
                      "content": f"{w} {w}"}], rejected=[{"role": "assistant", "content": f"no {w} at all"}],
                      source=f"pairs.jsonl:{i + 1}") for i, w in enumerate(words[:n])]
    return build_preference_examples(records, tokenizer, max_seq_length=128)[0]


def plain_logps(model, batch):
    """Each row's summed log-probability of its labels, from the model's full logits (no shortcut)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    logp = logits[:, :-1].log_softmax(-1)
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    picked = logp.gather(2, targets.clamp(min=0)[..., None])[..., 0]
    return (picked * keep).sum(1)


def test_response_logps_equal_the_full_logits(tiny_tokenizer):
    model = make_tiny_llama(tiny_tokenizer).eval()
    batch = collate(tiny_pairs(tiny_tokenizer), tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        sums, counts = response_logps(model, batch)
    assert sums.tolist() == pytest.approx(plain_logps(model, batch).tolist(), rel=1e-5)
    assert counts.tolist() == (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1).tolist()


def test_dpo_at_the_reference_is_log2_with_the_formula_gradient(tiny_tokenizer):
    model = make_tiny_llama(tiny_tokenizer).eval()
    pairs = tiny_pairs(tiny_tokenizer)
    batch = collate(pairs, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        batch["reference_logps"] = response_logps(model, batch)[0].double()  # the policy is its own reference
    beta = 0.5
    loss, n, stats = preference_loss(model, batch, Objective("dpo", beta=beta, reference="stored"))
    assert n == 4 and loss.item() == pytest.approx(4 * math.log(2), rel=1e-9)
    assert stats["reward_margin"].item() == pytest.approx(0.0, abs=1e-9)
    loss.backward()
    got = {name: p.grad.clone() for name, p in model.named_parameters()}
    # At zero margin, d/dθ −log σ(β·m) = −β/2 · dm/dθ, with m = log π(c) − log π(r) (the reference is constant).
    model.zero_grad()
    logps = plain_logps(model, batch)
    (-beta / 2 * (logps[0::2] - logps[1::2]).sum()).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-6 * p.grad.abs().max().item(), msg=name)


def test_lora_reference_is_the_base_exactly(tiny_tokenizer):
    model = make_tiny_llama(tiny_tokenizer).eval()
    batch = collate(tiny_pairs(tiny_tokenizer), tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        base = response_logps(model, batch)[0].double()
    tuned = apply_method(model, ModelArgs(method="lora", lora_r=4))
    with torch.no_grad():  # adapters that have learnt something: B is no longer zero
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    tuned.eval()
    with torch.no_grad():
        policy = response_logps(tuned, batch)[0].double()
        reference = reference_logps(tuned, batch, Objective("dpo", reference="adapters_off"))
    assert torch.equal(reference, base)
    assert not torch.allclose(policy, base)  # the policy did move
    # And the adapters are back on afterwards.
    with torch.no_grad():
        assert torch.equal(response_logps(tuned, batch)[0].double(), policy)


def test_a_blank_micro_batch_adds_no_pair_and_no_loss(tiny_tokenizer):
    model = make_tiny_llama(tiny_tokenizer)
    batch = collate(tiny_pairs(tiny_tokenizer, 2), tiny_tokenizer.pad_token_id)
    assert pairs_in(batch) == 2
    blank = {k: v[:2] for k, v in batch.items()}  # runtime.distributed.local_share's blank
    blank["labels"] = torch.full_like(blank["labels"], IGNORE_INDEX)
    assert pairs_in(blank) == 0
    loss, n, stats = preference_loss(model, blank, Objective("simpo", reference="none"))
    assert loss.item() == 0.0 and n == 0 and all(v.item() == 0.0 for v in stats.values())
