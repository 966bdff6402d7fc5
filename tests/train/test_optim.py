"""optimizer_state_dtype: bfloat16: AdamW's update with its moments stored in half the memory."""

import copy

import pytest
import torch
from safetensors.torch import load_file
from test_optimizer_in_backward import killed_and_resumed_ends_as_whole, train, write_cli_run

from deltatune.config import build_config
from deltatune.errors import UserError
from deltatune.train import optim as optimizers
from deltatune.train.optim import AdamWBf16Moments, build_optimizer

from conftest import make_tiny_llama, make_tokenizer

CPU = torch.device("cpu")
SHAPES = [(40, 30), (700,), (3, 5, 7)]


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 256 elements, so every parameter above spans several (and ends in a partial one)."""
    monkeypatch.setattr(optimizers, "CHUNK", 256)


def twin_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    ours = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in SHAPES]
    return ours, [torch.nn.Parameter(p.detach().clone()) for p in ours]


def set_grads(params, step):
    g = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 0.01 + 0.003


def test_first_step_is_adamws_and_later_ones_stay_close(small_chunks):
    ours, ref = twin_params()
    opt = AdamWBf16Moments(ours, lr=1e-2, weight_decay=0.1)
    adamw = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1, fused=True)
    for step in range(40):
        set_grads(ours, step)
        set_grads(ref, step)
        opt.step()
        adamw.step()
        if step == 0:
            assert all(torch.equal(p, q) for p, q in zip(ours, ref))
    for p, q, p0 in zip(ours, ref, twin_params()[0]):
        moved = (q - p0).abs().mean()
        assert moved > 0.05  # 40 steps of 1e-2 went somewhere
        assert (p - q).abs().max() < 0.02 * moved  # and the bfloat16 moments went the same way
    state = opt.state[ours[0]]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    assert int(state["step"]) == 40


def test_stochastic_rounding_follows_the_second_moment_where_nearest_stalls(monkeypatch):
    """Under a constant gradient of 1, AdamW's exp_avg_sq climbs to 1 - 0.999^t. Each step adds
    ~0.1% of it, under half of bfloat16's spacing: rounding to nearest drops the addition and
    the moment freezes; stochastic rounding follows it on average."""
    def final_second_moment():
        p = torch.nn.Parameter(torch.zeros(4096))
        opt = AdamWBf16Moments([p], lr=1e-6)
        for _ in range(2000):
            p.grad = torch.ones_like(p)
            opt.step()
        return opt.state[p]["exp_avg_sq"].float().mean().item()

    exact = 1 - 0.999 ** 2000
    assert final_second_moment() == pytest.approx(exact, rel=0.01)
    monkeypatch.setattr(optimizers, "round_stochastically_", lambda dst, src, noise: dst.copy_(src))
    assert final_second_moment() < 0.5 * exact


def test_round_stochastically_is_exact_in_expectation_for_either_sign():
    value = 1 + 2 ** -9  # between two bfloat16 values, a quarter of the way up from 1
    for sign in (1.0, -1.0):
        src = torch.full((1 << 16,), sign * value)
        dst = torch.empty_like(src, dtype=torch.bfloat16)
        optimizers.round_stochastically_(dst, src, torch.arange(1 << 16, dtype=torch.int32))
        assert set(dst.float().abs().unique().tolist()) == {1.0, 1 + 2 ** -7}
        assert dst.double().mean().item() == pytest.approx(sign * value, rel=1e-7)


def test_a_loaded_state_continues_bit_for_bit(small_chunks):
    ours, _ = twin_params()
    opt = AdamWBf16Moments(ours, lr=1e-2)
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for step in range(6):
        if step == 3:  # copy weights and optimizer into a fresh one, as a resumed run does
            with torch.no_grad():
                for p, q in zip(resumed_params, ours):
                    p.copy_(q)
            resumed = AdamWBf16Moments(resumed_params, lr=1e-2)
            resumed.load_state_dict(copy.deepcopy(opt.state_dict()))  # as read from disk
            assert resumed.state[resumed_params[0]]["exp_avg"].dtype == torch.bfloat16
        set_grads(ours, step)
        opt.step()
        if step >= 3:
            set_grads(resumed_params, step)
            resumed.step()
    assert all(torch.equal(p, q) for p, q in zip(ours, resumed_params))


def test_inside_backward_it_makes_the_same_updates(tmp_path, small_chunks):
    """optimizer_in_backward narrows the optimizer to one parameter at a time: the noise each
    parameter draws must not depend on that."""
    ordinary, a = train(tmp_path / "a", optimizer_state_dtype="bfloat16")
    in_backward, b = train(tmp_path / "b", optimizer_state_dtype="bfloat16", optimizer_in_backward=True)
    for (name, p), q in zip(ordinary.named_parameters(), in_backward.parameters()):
        assert torch.equal(p, q), name
    losses = [r["loss"] for r in a.history if "loss" in r]
    assert losses[-1] < losses[0]


def test_build_and_refusals():
    tokenizer = make_tokenizer()
    model = make_tiny_llama(tokenizer)
    cfg = build_config(dict(train_file="t.jsonl", optimizer_state_dtype="bfloat16"), "run.yaml")
    assert isinstance(build_optimizer(model, cfg.train, cfg.memory.optimizer_state_dtype, cfg.seed, CPU),
                      AdamWBf16Moments)
    with pytest.raises(UserError, match="parallelism: fsdp"):
        build_config(dict(train_file="t.jsonl", optimizer_state_dtype="bfloat16", parallelism="fsdp"), "run.yaml")
    with pytest.raises(UserError, match="optimizer_state_dtype"):
        build_config(dict(train_file="t.jsonl", optimizer_state_dtype="float16"), "run.yaml")


def test_cli_full_fine_tuning_with_clipping_and_exact_resume(tmp_path, tiny_model_dir, monkeypatch):
    write_cli_run(tmp_path, tiny_model_dir, monkeypatch, "max_grad_norm: 0.5\noptimizer_state_dtype: bfloat16\n")
    got = killed_and_resumed_ends_as_whole(tmp_path, monkeypatch)
    base = load_file(tiny_model_dir / "model.safetensors")
    assert all(not torch.equal(base[k], got[k]) for k in got if "layers" in k and k.endswith("proj.weight"))
    saved = load_file(next((tmp_path / "cut").glob("checkpoint-*")) / "optimizer.safetensors")
    assert {t.dtype for k, t in saved.items() if "exp_avg" in k} == {torch.bfloat16}
