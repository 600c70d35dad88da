"""Tests for scale.py against an independent float64 transcription of the paper's update rule."""
import contextlib
import gc
import io
import math
import os
import warnings
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

import scale
import train
from model import LLaMA, LLaMAConfig
from scale import SCALE, scale_param_groups


class Toy(nn.Module):
    """Every role and shape case: embedding, a 3-D conv weight, Linear weights and biases, norm gains, lm_head."""

    def __init__(self, tied=False):
        super().__init__()
        self.emb = nn.Embedding(50, 12)
        self.conv = nn.Conv1d(12, 8, 3)
        self.fc = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.lm_head = nn.Linear(16, 50, bias=False)
        if tied:
            self.lm_head = nn.Linear(12, 50, bias=False)
            self.lm_head.weight = self.emb.weight


def roles_of(groups):
    return {id(p): g["role"] for g in groups for p in g["params"]}


def reference_step(params, roles, state, lr, wd, lr0, adam_lr, beta=0.9, momentum_roles=("output",),
                   betas=(0.9, 0.999), eps=1e-8):
    """The method as written in the paper's code, one tensor at a time, in float64; returns new params."""
    out = []
    for p in params:
        role, g, x = roles[id(p)], p.grad.double(), p.detach().double()
        s = state.setdefault(id(p), {})
        if role == "vector":
            b1, b2 = betas
            s["t"] = s.get("t", 0) + 1
            s["m"] = b1 * s.get("m", 0) + (1 - b1) * g
            s["v"] = b2 * s.get("v", 0) + (1 - b2) * g * g
            a_lr = adam_lr * lr / lr0
            u = s["m"] / (s["v"].sqrt() + eps) / ((1 - b1 ** s["t"]) / math.sqrt(1 - b2 ** s["t"]))
            out.append(x * (1 - a_lr * wd) - a_lr * u)
            continue
        if beta > 0 and role in momentum_roles:
            s["m"] = beta * s.get("m", 0) + (1 - beta) * g
            g = s["m"]
        g2 = g.reshape(g.shape[0], -1)
        dim = 0 if role == "embedding" else 1
        r = torch.sqrt(torch.mean(g2 ** 2, dim=dim, keepdim=True)).clamp(min=1e-8)
        out.append(x * (1 - lr * wd) - lr * (g2 / r).reshape(x.shape))
    return out


def random_grads(model, seed, dtype=None):
    gen = torch.Generator().manual_seed(seed)
    for i, p in enumerate(model.parameters()):
        g = torch.randn(p.shape, generator=gen) * (10.0 ** (i % 3 - 1))
        p.grad = g.to(p.device, dtype or p.dtype)


SCHEDULE = [(1e-2, 0.0), (3e-3, 0.1), (5e-4, 0.05), (2e-2, 0.0)]  # (lr, weight decay) per step
ROLE_MESSAGE = (r"^a group needs a role \(matrix/embedding/output/vector; 1-D: 'vector'\): "
                r"use scale_param_groups\(model\)$")


@pytest.mark.parametrize("kwargs", [dict(), dict(momentum=0.0), dict(momentum=0.8, adam_lr=0.02),
                                    dict(momentum_roles=("matrix", "embedding", "output"))])
def test_matches_reference_fp32(kwargs):
    torch.manual_seed(0)
    model = Toy()
    groups = scale_param_groups(model)
    opt = SCALE(groups, lr=1e-2, **kwargs)
    params, roles, state = list(model.parameters()), roles_of(groups), {}
    for step, (lr, wd) in enumerate(SCHEDULE):
        random_grads(model, step)
        for group in opt.param_groups:
            group["lr"], group["weight_decay"] = lr, wd
        expected = reference_step(params, roles, state, lr, wd, lr0=1e-2, adam_lr=kwargs.get("adam_lr", 1e-2),
                                  beta=kwargs.get("momentum", 0.9),
                                  momentum_roles=kwargs.get("momentum_roles", ("output",)))
        opt.step()
        for p, e in zip(params, expected):
            torch.testing.assert_close(p.detach().double(), e, rtol=2e-6, atol=1e-7)


def test_bf16_reduces_in_fp32_and_keeps_bf16_state():
    torch.manual_seed(0)
    model = Toy().to(torch.bfloat16)
    groups = scale_param_groups(model)
    opt = SCALE(groups, lr=1e-2, weight_decay=0.1)
    params, roles, state = list(model.parameters()), roles_of(groups), {}
    for step in range(3):
        random_grads(model, step)
        expected = reference_step(params, roles, state, 1e-2, 0.1, lr0=1e-2, adam_lr=1e-2)
        opt.step()
        for p, e in zip(params, expected):
            assert p.dtype == torch.bfloat16
            # one rounding to bf16 per step (the reference keeps fp64 state, so allow a couple of bf16 ulps)
            torch.testing.assert_close(p.detach().double(), e, rtol=2e-2, atol=1e-3)
    for p in params:
        for t in opt.state[p].values():
            assert not torch.is_tensor(t) or t.dtype == torch.bfloat16


def test_bf16_update_rounds_once_from_fp32():
    p = nn.Parameter(torch.randn(64, 32).bfloat16())
    p.grad = torch.randn(64, 32).bfloat16()
    g = p.grad.float()
    expected = (p.float() * (1 - 1e-3 * 0.1) - 1e-3 * g / g.square().mean(1, keepdim=True).sqrt()).bfloat16()
    SCALE([{"params": [p], "role": "matrix"}], lr=1e-3, weight_decay=0.1).step()
    assert (p.detach().float() - expected.float()).abs().max() <= 2 ** -8 * expected.float().abs().max()


def test_bf16_state_is_updated_in_fp32():
    # m <- beta*m + (1-beta)*g with 1 - beta in fp32, rounded once into bf16 (a bf16 lerp_ would round 1 - beta)
    model = Toy().to(torch.bfloat16)
    opt = SCALE(scale_param_groups(model), lr=1e-2)
    random_grads(model, 0)
    opt.step()
    first = lambda w, x: (torch.tensor(w) * x.float()).bfloat16()  # from zero state: lerp(0, x, w) = w*x
    g_out, g_norm = model.lm_head.weight.grad, model.norm.weight.grad
    assert torch.equal(opt.state[model.lm_head.weight]["momentum_buffer"], first(1 - 0.9, g_out))
    assert torch.equal(opt.state[model.norm.weight]["exp_avg"], first(1 - 0.9, g_norm))
    assert torch.equal(opt.state[model.norm.weight]["exp_avg_sq"], first(1 - 0.999, g_norm.float().square()))


# -----------------------------------------------------------------------------
# stochastic rounding of bf16 writes (bf16_rounding="stochastic")

def round_stochastic(x, compile):
    """scale.round_stochastic, eager or compiled (inductor draws its random bits its own way)."""
    torch.manual_seed(12345)
    return (torch.compile(scale.round_stochastic, dynamic=False) if compile else scale.round_stochastic)(x)


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("value", [1 + 2 ** -10, -(1 + 2 ** -10), 0.02 + 3e-6, -3.3e-3, 1e-39])  # 1e-39: subnormal
def test_stochastic_rounding_is_unbiased(value, compile):
    # many rounded writes of one value (each element its own bits): their mean is the value, within 4 standard
    # errors; each write is one of the two bf16 neighbours
    n = 200_000
    x = torch.full((n,), value)
    rounded = round_stochastic(x, compile).double()
    neighbours = rounded.unique()
    assert len(neighbours) == 2 and neighbours[0] < value < neighbours[1]
    assert torch.equal(neighbours.float().bfloat16().double(), neighbours)
    share_up = (value - neighbours[0]) / (neighbours[1] - neighbours[0])
    standard_error = (neighbours[1] - neighbours[0]) * math.sqrt(share_up * (1 - share_up) / n)
    assert abs(rounded.mean() - value) < 4 * standard_error


@pytest.mark.parametrize("compile", [False, True])
def test_stochastic_rounding_leaves_bf16_values_unchanged(compile):
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(10_000, generator=gen) * 10.0 ** torch.randint(-40, 30, (10_000,), generator=gen),
                   torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 2 ** -133])]).bfloat16()
    rounded = round_stochastic(x.float(), compile)
    assert rounded.dtype == torch.bfloat16 and torch.equal(rounded.view(torch.int16), x.view(torch.int16))


@pytest.mark.parametrize("compile", [False, True])
def test_stochastic_rounding_bits_spread_evenly(compile):
    # 1 + j * 2^-23 for every j in [0, 2^16), 64 times: x's low 16 bits are j, so it rounds up to 1 + 2^-7 with
    # probability j / 2^16, for every j (the random bits uniform over [0, 2^16)); checked in 64 bands of j, each
    # within 5 standard errors, and never up for j = 0 (a bf16 value)
    j = torch.arange(2 ** 16).repeat(64)
    up = (round_stochastic(1 + j.float() * 2 ** -23, compile).float() > 1).double().view(64, 64, 1024)
    p = (torch.arange(2 ** 16).double() / 2 ** 16).view(64, 1024)
    expected, sd = 64 * p.sum(1), (64 * (p * (1 - p)).sum(1)).sqrt()
    assert ((up.sum((0, 2)) - expected).abs() <= 5 * sd.clamp_min(1)).all()
    assert up[:, 0, 0].sum() == 0


def test_stochastic_steps_below_bf16_spacing_move_weights_in_expectation():
    # a unit-RMS update of lr 2^-12 on weights at 1.0 (bf16 spacing there: 2^-7 above, 2^-8 below): nearest
    # rounding loses every step, stochastic rounding moves each weight by -lr per step in expectation
    moved = {}
    for rounding in ("nearest", "stochastic"):
        p = nn.Parameter(torch.ones(64, 256, dtype=torch.bfloat16))
        opt = SCALE([{"params": [p], "role": "matrix"}], lr=2 ** -12, bf16_rounding=rounding, seed=1)
        for _ in range(64):
            p.grad = torch.ones_like(p)
            opt.step()
        moved[rounding] = (p.detach().double() - 1).mean().item()
    assert moved["nearest"] == 0.0
    assert moved["stochastic"] == pytest.approx(-64 * 2 ** -12, rel=0.02)


def sr_run(seed=0, steps=3, draw=False):
    """A bf16 Toy after `steps` SCALE steps with stochastic rounding -> (model, opt). draw: between steps, draw from
    torch's global generator, as the rest of a training step may."""
    torch.manual_seed(0)
    model = Toy().to(torch.bfloat16)
    opt = SCALE(scale_param_groups(model), lr=1e-3, bf16_rounding="stochastic", seed=seed)
    for step in range(steps):
        random_grads(model, step)
        if draw:
            torch.rand(step + 1)
        opt.step()
    return model, opt


def test_stochastic_rounding_depends_on_seed_and_steps_alone():
    base, opt = sr_run()
    # every bf16 param of the normalized roles counts its steps; the vector role keeps AdamW's state only
    assert all(opt.state[p]["step"] == 3 for g in opt.param_groups if g["role"] != "vector" for p in g["params"])
    assert [set(opt.state[p]) for p in base.parameters()] == [
        {"step"}, {"step"}, {"exp_avg", "exp_avg_sq", "step"}, {"step"}, {"exp_avg", "exp_avg_sq", "step"},
        {"exp_avg", "exp_avg_sq", "step"}, {"exp_avg", "exp_avg_sq", "step"}, {"momentum_buffer", "step"}]
    drawn, drawn_opt = sr_run(draw=True)  # the bits are (seed, step)'s, not the global generator's
    assert all(torch.equal(a, b) for a, b in zip(base.parameters(), drawn.parameters()))
    rng = torch.get_rng_state()
    drawn_opt.step()  # and a step leaves the global generator as it was
    assert torch.equal(torch.get_rng_state(), rng)
    again, _ = sr_run()  # what DDP's ranks do: the same values and steps round alike
    assert all(torch.equal(a, b) for a, b in zip(base.parameters(), again.parameters()))
    other, _ = sr_run(seed=1)
    assert not torch.equal(base.lm_head.weight, other.lm_head.weight)
    nearest = Toy().to(torch.bfloat16)  # and nearest rounding keeps no step count for them
    opt = SCALE(scale_param_groups(nearest), lr=1e-3)
    random_grads(nearest, 0)
    opt.step()
    assert "step" not in opt.state[nearest.lm_head.weight] and nearest.emb.weight not in opt.state


def test_a_group_added_after_construction_steps_as_one_given_at_construction():
    base, _ = sr_run()
    torch.manual_seed(0)
    model = Toy().to(torch.bfloat16)
    groups = scale_param_groups(model)
    opt = SCALE(groups[:1], lr=1e-3, bf16_rounding="stochastic")
    for group in groups[1:]:
        opt.add_param_group(group)  # the defaults fill the rest, as in __init__
    for step in range(3):
        random_grads(model, step)
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(base.parameters(), model.parameters()))
    with pytest.raises(ValueError, match=ROLE_MESSAGE):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(4, 4))]})
    with pytest.raises(ValueError, match=ROLE_MESSAGE):
        opt.add_param_group({"params": nn.Parameter(torch.randn(4)), "role": "output"})
    assert len(opt.param_groups) == len(groups)  # none added


def test_stochastic_rounding_has_no_effect_on_fp32_params():
    models = [Toy() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [SCALE(scale_param_groups(m), lr=1e-2, bf16_rounding=r) for m, r in zip(models, ("nearest", "stochastic"))]
    for m, opt in zip(models, opts):
        random_grads(m, 0)
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(*(m.parameters() for m in models)))
    assert "step" not in opts[1].state[models[1].lm_head.weight]


def test_rms_is_clamped_at_1e_minus_8():
    p = nn.Parameter(torch.zeros(3, 4))
    p.grad = torch.tensor([[0.0] * 4, [1e-10] * 4, [1e-7, -1e-7, 1e-7, -1e-7]])
    SCALE([{"params": [p], "role": "matrix"}], lr=1.0, momentum=0.0).step()
    # row 0: zero stays zero; row 1: rms 1e-10 < 1e-8 so u = g / 1e-8; row 2: rms 1e-7, u = sign(g)
    torch.testing.assert_close(p.detach(), -torch.tensor([[0.0] * 4, [0.01] * 4, [1.0, -1.0, 1.0, -1.0]]))


@pytest.mark.slow
def test_compiled_equals_eager_and_does_not_recompile_on_lr_change():
    torch._dynamo.reset()
    cfg = LLaMAConfig(dim=32, n_layers=2, n_heads=4, ffn_dim=64, vocab_size=100)
    models = [LLaMA(cfg) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [SCALE(scale_param_groups(m), lr=1e-2, weight_decay=0.1, compile=c) for m, c in zip(models, (False, True))]
    for step in range(4):
        for m in models:
            random_grads(m, step)
        for opt in opts:
            for group in opt.param_groups:
                group["lr"] = 1e-2 / (step + 1)
        opts[0].step()
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            opts[1].step()
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def record_scalars(opt):
    """Wraps opt's two updates; returns the list that gets the keyword arguments (the 0-D tensors) of each call."""
    calls = []
    for name in ("_normalized_update", "_adamw_update"):
        update = getattr(opt, name)
        setattr(opt, name, lambda *args, update=update, **scalars: calls.append(scalars) or update(*args, **scalars))
    return calls


def fp32(x):
    return torch.tensor(x, dtype=torch.float32).item()


@pytest.mark.parametrize("compile", [False, True])
def test_hyperparameters_are_0d_tensors_made_once_and_filled_in_place(compile):
    # each step fills the same 0-D fp32 tensors with this step's values, so a compiled step sees the same inputs
    # and a GPU step makes no host-to-device copy; after the first step, step builds no tensor from Python numbers
    torch._dynamo.reset()
    model = Toy()
    opt = SCALE(scale_param_groups(model), lr=1e-2, momentum=0.8, adam_lr=0.03, adam_betas=(0.8, 0.99),
                adam_eps=1e-6, compile=compile)
    calls = record_scalars(opt)
    for step, (lr, wd) in enumerate(SCHEDULE[:3]):
        random_grads(model, step)
        for group in opt.param_groups:
            group["lr"], group["weight_decay"] = lr, wd
        with contextlib.ExitStack() as stack:
            if step > 0:
                stack.enter_context(torch._dynamo.config.patch(error_on_recompile=True))
                for fn in ("tensor", "as_tensor"):
                    stack.enter_context(mock.patch.object(torch, fn, side_effect=AssertionError(f"torch.{fn} in step")))
            opt.step()
    assert len(calls) == 3 * 4  # matrix, embedding, output, vector at each step
    flat = lambda kwargs: [t for v in kwargs.values() for t in (v if isinstance(v, list) else [v])]
    for first, last in zip(calls[:4], calls[-4:]):
        assert len(flat(first)) == len(flat(last)) and all(a is b for a, b in zip(flat(first), flat(last)))
        assert all(t.shape == () and t.dtype == torch.float32 and t.device.type == "cpu" for t in flat(last))
    lr, wd = SCHEDULE[2]
    for kwargs in calls[-4:-1]:
        assert {k: t.item() for k, t in kwargs.items()} == dict(lr=fp32(lr), decay=fp32(1 - lr * wd),
                                                               one_minus_beta=fp32(1 - 0.8))
    adam_lr = 0.03 * lr / 1e-2
    kwargs = dict(calls[-1])
    assert [t.item() for t in kwargs.pop("step_sizes")] == 4 * [fp32(adam_lr * (1 - 0.99 ** 3) ** 0.5 / (1 - 0.8 ** 3))]
    assert {k: t.item() for k, t in kwargs.items()} == dict(
        decay=fp32(1 - adam_lr * wd), eps=fp32(1e-6), one_minus_beta1=fp32(1 - 0.8), one_minus_beta2=fp32(1 - 0.99))
    sd = opt.state_dict()  # derived from the param groups: not saved
    assert not any(torch.is_tensor(v) for g in sd["param_groups"] for v in g.values())
    assert {k for s in sd["state"].values() for k in s} == {"momentum_buffer", "step", "exp_avg", "exp_avg_sq"}


def test_adamw_bias_correction_counts_each_parameters_own_steps():
    model = Toy()
    opt = SCALE(scale_param_groups(model), lr=1e-2, adam_betas=(0.8, 0.99))
    calls = record_scalars(opt)
    for step in range(3):
        random_grads(model, step)
        if step == 1:
            model.norm.bias.grad = None  # skipped at the second step
        opt.step()
    vectors = [p for g in opt.param_groups if g["role"] == "vector" for p in g["params"]]
    steps = [opt.state[p]["step"] for p in vectors]
    assert steps == [3 - (p is model.norm.bias) for p in vectors] and 2 in steps
    expected = [fp32(1e-2 * (1 - 0.99 ** t) ** 0.5 / (1 - 0.8 ** t)) for t in steps]
    assert [t.item() for t in calls[-1]["step_sizes"]] == expected


def test_state_holds_exactly_output_momentum_and_vector_moments():
    cfg = LLaMAConfig(dim=32, n_layers=2, n_heads=4, ffn_dim=64, vocab_size=100)
    model = LLaMA(cfg)
    opt = SCALE(scale_param_groups(model), lr=1e-3)
    random_grads(model, 0)
    opt.step()
    for name, p in model.named_parameters():
        keys = set(opt.state[p]) if p in opt.state else set()
        vector = {"step", "exp_avg", "exp_avg_sq"} if p.ndim == 1 else set()
        expected = {"lm_head.weight": {"momentum_buffer"}}.get(name, vector)
        assert keys == expected, name
    state_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                      if torch.is_tensor(t))
    n_vector = sum(p.numel() for p in model.parameters() if p.ndim == 1)
    assert state_bytes == 4 * (100 * 32 + 2 * n_vector) == train.state_bytes([opt])
    adamw = torch.optim.AdamW(model.parameters(), fused=True)
    adamw.step()  # its 0-d step tensors are counters, not state memory
    assert train.state_bytes([opt, adamw]) == state_bytes + 8 * sum(p.numel() for p in model.parameters())
    assert not SCALE(scale_param_groups(model), lr=1e-3, momentum=0.0).state  # momentum=0: nothing before a step


def test_momentum_zero_is_column_normalized_sgd_with_no_matrix_state():
    model = Toy()
    opt = SCALE(scale_param_groups(model), lr=0.1, momentum=0.0)
    random_grads(model, 0)
    before, g = model.lm_head.weight.detach().clone(), model.lm_head.weight.grad.clone()
    opt.step()
    expected = before - 0.1 * g / g.square().mean(1, keepdim=True).sqrt()
    torch.testing.assert_close(model.lm_head.weight.detach(), expected)
    assert all(p.ndim == 1 for p in opt.state)


@pytest.mark.parametrize("dtype,rounding", [(torch.float32, "nearest"), (torch.bfloat16, "stochastic")])
def test_state_dict_round_trip_continues_bit_identically(dtype, rounding):
    torch.manual_seed(0)
    a, b = Toy().to(dtype), Toy().to(dtype)
    opt_a = SCALE(scale_param_groups(a), lr=1e-2, weight_decay=0.1, bf16_rounding=rounding, seed=3)
    for step in range(3):
        random_grads(a, step)
        opt_a.step()
    buf = io.BytesIO()  # through bytes as a checkpoint would go (and weights_only=True must read it)
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    b.load_state_dict(ckpt["model"])
    opt_b = SCALE(scale_param_groups(b), lr=5.0)  # hyperparameters (rounding, seed) come back from the state dict
    opt_b.load_state_dict(ckpt["opt"])
    for step in range(3, 6):
        for model, opt in ((a, opt_a), (b, opt_b)):
            random_grads(model, step)
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_roles_of_project_llama():
    model = LLaMA(LLaMAConfig(dim=32, n_layers=2, n_heads=4, ffn_dim=64, vocab_size=100))
    roles = {name: roles_of(scale_param_groups(model))[id(p)] for name, p in model.named_parameters()}
    assert roles.pop("tok_embeddings.weight") == "embedding" and roles.pop("lm_head.weight") == "output"
    assert {n for n, r in roles.items() if r == "vector"} == {n for n in roles if n.endswith("norm.weight")}
    assert {n for n, r in roles.items() if r == "matrix"} == {n for n in roles if n.endswith("proj.weight")}


def test_roles_of_tied_toy_and_explicit_output():
    tied = Toy(tied=True)
    groups = scale_param_groups(tied)
    roles = roles_of(groups)
    assert roles[id(tied.emb.weight)] == "output"
    assert sum(len(g["params"]) for g in groups) == len(list(tied.parameters()))
    assert [g["role"] for g in groups] == ["matrix", "output", "vector"]
    seq = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
    with pytest.raises(ValueError, match=r"^cannot find the output layer: .* pass output=<the output module>$"):
        scale_param_groups(seq)
    roles = roles_of(scale_param_groups(seq, output=seq[1]))
    assert [roles[id(p)] for p in seq.parameters()] == ["embedding", "output", "vector"]


def test_params_without_roles_raise_naming_scale_param_groups():
    # an embedding or output layer guessed as 'matrix' would be row-normalized with no momentum: not SCALE
    model = Toy()
    for params in (model.parameters(), [model.norm.weight, model.fc.bias],
                   [{"params": [model.lm_head.weight], "role": "output"}, {"params": [model.fc.weight]}]):
        with pytest.raises(ValueError, match=ROLE_MESSAGE):
            SCALE(params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # roles given: no warning
        SCALE(scale_param_groups(model))
        SCALE([{"params": [model.lm_head.weight], "role": "matrix"}])


def test_closure_none_grads_zero_grad_and_lr_scheduler():
    model = Toy()
    opt = SCALE(scale_param_groups(model), lr=1e-2, adam_lr=0.02)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    x = torch.randint(0, 50, (3, 7))
    frozen = model.fc.weight.detach().clone()
    model.fc.weight.requires_grad_(False)  # grad stays None: skipped, no state
    gain = model.norm.weight.detach().clone()

    def closure():
        opt.zero_grad()
        h = model.conv(model.emb(x).transpose(1, 2)).transpose(1, 2)
        loss = model.lm_head(model.norm(nn.functional.pad(h, (0, 8)))).logsumexp(-1).mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and torch.equal(model.fc.weight, frozen) and model.fc.weight not in opt.state
    # first AdamW step: adam_lr * lr_t / lr_0 (= 0.02 * 0.5) times g / (|g| + eps / sqrt(1 - beta2))
    g = model.norm.weight.grad
    torch.testing.assert_close(model.norm.weight.detach(), gain - 0.01 * g / (g.abs() + 1e-8 / math.sqrt(1e-3)))
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    sched.step()


@pytest.mark.parametrize("kwargs,message", [
    (dict(lr=-1.0), "lr (-1.0), weight_decay (0.0) must be >= 0, momentum (0.9) in [0, 1)"),
    (dict(weight_decay=-0.1), "lr (0.001), weight_decay (-0.1) must be >= 0, momentum (0.9) in [0, 1)"),
    (dict(momentum=1.0), "lr (0.001), weight_decay (0.0) must be >= 0, momentum (1.0) in [0, 1)"),
    (dict(momentum=-0.5), "lr (0.001), weight_decay (0.0) must be >= 0, momentum (-0.5) in [0, 1)"),
    (dict(momentum_roles=("vector",)), "momentum_roles must be among matrix, embedding, output; got ('vector',)"),
    (dict(bf16_rounding="up"), "bf16_rounding must be 'nearest' or 'stochastic', got 'up'"),
])
def test_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError) as e:
        SCALE(scale_param_groups(Toy()), **{"lr": 1e-3, **kwargs})
    assert str(e.value) == message


def test_bad_roles_and_gradients():
    p = nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match=ROLE_MESSAGE):
        SCALE([{"params": [p], "role": "hidden"}])
    with pytest.raises(ValueError, match=ROLE_MESSAGE):
        SCALE([{"params": [nn.Parameter(torch.randn(4))], "role": "matrix"}])
    emb = nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match=r"^SCALE does not support sparse or complex gradients"):
        SCALE([{"params": [emb.weight], "role": "embedding"}]).step()
    c = nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))
    c.grad = torch.randn(4, 4, dtype=torch.complex64)
    with pytest.raises(ValueError, match=r"^SCALE does not support sparse or complex gradients"):
        SCALE([{"params": [c], "role": "matrix"}]).step()


# -----------------------------------------------------------------------------
# compiled against eager, and on a GPU (skipped without CUDA)

# gpu_check.py runs these
CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def cuda(test):
    for mark in CUDA:
        test = mark(test)
    return test


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.slow), pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("dtype,rounding", [(torch.float32, "nearest"), (torch.bfloat16, "nearest"),
                                            (torch.bfloat16, "stochastic")])
def test_compiled_equals_eager_at_each_step(device, dtype, rounding):
    torch._dynamo.reset()
    torch.manual_seed(0)
    models = [Toy().to(device, dtype) for _ in range(2)]  # all four roles
    models[1].load_state_dict(models[0].state_dict())
    # stochastic: eager and compiled draw different random bits, so their bf16 writes may differ by a bf16 spacing
    opts = [SCALE(scale_param_groups(m), lr=1e-2, compile=c, bf16_rounding=rounding)
            for m, c in zip(models, (False, True))]
    for step, (lr, wd) in enumerate(SCHEDULE):
        for m, opt in zip(models, opts):
            random_grads(m, step)
            for group in opt.param_groups:
                group["lr"], group["weight_decay"] = lr, wd
        opts[0].step()
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            opts[1].step()
        for a, b in zip(*(m.parameters() for m in models)):
            state_a, state_b = ({k: t for k, t in o.state[p].items() if torch.is_tensor(t)}
                                for o, p in zip(opts, (a, b)))
            assert state_a.keys() == state_b.keys()
            # params and state, from the same ones at each step: fp32 math a few fp32 ulps apart (8 ulps of the
            # tensor's largest element for near-zero results), which in bf16 may round to neighbouring bf16 values
            for t_b, t_a in zip([b, *state_b.values()], [a, *state_a.values()]):
                torch.testing.assert_close(t_b.float(), t_a.float(), rtol=1e-6 if dtype == torch.float32 else 2 ** -7,
                                           atol=2 ** -20 * t_a.abs().max().item())
            with torch.no_grad():
                b.copy_(a)
                for k, t in state_b.items():
                    t.copy_(state_a[k])


def host_to_device_copies(fn):
    """Names of the host-to-device copies the GPU made while fn() ran, as torch.profiler records them."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if "HtoD" in e.name]


@cuda
@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("dtype,rounding", [(torch.float32, "nearest"), (torch.bfloat16, "stochastic")])
def test_cuda_step_makes_no_sync_and_no_host_to_device_copy(compile, dtype, rounding):
    # stochastic: seeding the GPU's generator and drawing its bits queue work too
    torch._dynamo.reset()
    model = Toy().to("cuda", dtype)
    opt = SCALE(scale_param_groups(model), lr=1e-2, weight_decay=0.1, compile=compile, bf16_rounding=rounding)

    def step_raising_on_sync():
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")

    assert host_to_device_copies(lambda: torch.ones(3).cuda())  # the profiler sees one
    for step in range(3):
        random_grads(model, step)
        for group in opt.param_groups:
            group["lr"] = 1e-2 / (step + 1)
        torch.cuda.synchronize()
        if step == 0:
            opt.step()  # makes the state and the 0-D hyperparameter tensors (and compiles)
        else:
            assert host_to_device_copies(step_raising_on_sync) == []


# -----------------------------------------------------------------------------
# sharded params (FSDP2's fully_shard): 2 gloo processes on CPU

class UnevenToy(nn.Module):
    """Every role. Sharded over 2 ranks as SCALE needs (rows; the embeddings' columns, 12: 6 + 6 and 4: 2 + 2), the row
    shards are uneven (7 rows: 4 + 3; 3: 2 + 1; 5: 3 + 2) and empty on rank 1 for a 1-row Linear and its bias."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 12)
        self.small_emb = nn.Embedding(1, 4)
        self.conv = nn.Conv1d(12, 3, 3)  # a (3, 12, 3) matrix, viewed as (3, 36)
        self.one_row = nn.Linear(12, 1)
        self.norm = nn.LayerNorm(5)
        self.lm_head = nn.Linear(16, 7, bias=False)


SHARDED_CASES = [dict(), dict(momentum=0.0), dict(momentum_roles=("matrix", "embedding", "output")),
                 dict(dtype=torch.bfloat16, weight_decay=0.1), dict(dtype=torch.bfloat16, bf16_rounding="stochastic")]


def sharded_step_worker(rank, init_file, cases, compile):
    """On each of 2 ranks: SCALE on two fully_shard'ed UnevenToys against SCALE on a plain copy, for each case (SCALE's
    kwargs, and dtype), over SCHEDULE; asserts at each step that the gathered params and state match the plain ones
    and that the two sharded runs are bit for bit the same; then that a norm split over ranks is refused."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        for case in cases:
            kwargs = dict(case)
            dtype = kwargs.pop("dtype", torch.float32)
            torch.manual_seed(0)
            plain = UnevenToy().to(dtype)
            shardeds = [UnevenToy().to(dtype) for _ in range(2)]
            for sharded in shardeds:
                sharded.load_state_dict(plain.state_dict())
                embeddings = (sharded.emb.weight, sharded.small_emb.weight)
                fully_shard(sharded, shard_placement_fn=lambda p: Shard(1) if any(p is e for e in embeddings) else None)
            local = [sharded.emb.weight, sharded.small_emb.weight, sharded.conv.weight, sharded.one_row.weight]
            shapes = [tuple(p.to_local().shape) for p in local]
            assert shapes == [(7, 6), (1, 2), [(2, 12, 3), (1, 12, 3)][rank], [(1, 12), (0, 12)][rank]]
            models = [plain, *shardeds]
            opts = [SCALE(scale_param_groups(m), lr=1e-2, compile=compile, **kwargs) for m in models]
            for step, (lr, wd) in enumerate(SCHEDULE):
                random_grads(plain, step)  # the same on both ranks; each rank's sharded grad is its shard of it
                for p, *qs in zip(*(m.parameters() for m in models)):
                    for q in qs:
                        q.grad = distribute_tensor(p.grad, q.device_mesh, q.placements)
                for opt in opts:
                    for group in opt.param_groups:
                        group["lr"], group["weight_decay"] = lr, wd
                    opt.step()
                for (name, p), q, again in zip(plain.named_parameters(), *(m.parameters() for m in shardeds)):
                    # each rank updates whole rows (columns) as unsharded: the same numbers, but for compiled code's
                    # vectorization, a few fp32 ulps apart, and stochastic rounding's bits, a bf16 spacing
                    tol = dict(rtol=2 ** -7, atol=1e-5) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-7)
                    states = [[t, *opt.state[t].values()] for t, opt in zip((p, q, again), opts)]
                    for a, b, c in zip(*states):
                        assert torch.is_tensor(a) or a == b == c, (case, step, name)
                        if torch.is_tensor(a):
                            assert b.dtype == a.dtype and torch.equal(b.to_local(), c.to_local()), (case, name)
                            torch.testing.assert_close(b.full_tensor(), a.detach(), **tol,
                                                       msg=lambda m: f"{case} {step} {name}: {m}")
                            with torch.no_grad():  # the next step from the same values: each step compared alone
                                for t in (b, c):
                                    t.to_local().copy_(distribute_tensor(a.detach(), t.device_mesh,
                                                                         t.placements).to_local())
            assert all(isinstance(t, DTensor) for s in opts[1].state.values() for t in s.values() if torch.is_tensor(t))
        # a matrix sharded by columns, or an embedding by rows, would need its norms from both ranks: refused
        for role, placement, message in (
                ("matrix", Shard(1), "matrix norms span dim 1: shard dim 0, not (Shard(dim=1),)"),
                ("embedding", Shard(0), "embedding norms span dim 0: shard dim 1, not (Shard(dim=0),)")):
            p = nn.Parameter(distribute_tensor(torch.randn(4, 6), sharded.lm_head.weight.device_mesh, [placement]))
            p.grad = distribute_tensor(torch.randn(4, 6), p.device_mesh, [placement])
            with pytest.raises(ValueError) as e:
                SCALE([{"params": [p], "role": role}]).step()
            assert str(e.value) == message
    finally:
        gc.collect()  # FSDP's reference cycles hold the process group (see train.main)
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_sharded_step_equals_unsharded_on_each_role(tmp_path, compile):
    torch._dynamo.reset()
    cases = SHARDED_CASES[:1] if compile else SHARDED_CASES  # compiled: one case (8 graphs to compile on each rank)
    torch.multiprocessing.spawn(sharded_step_worker, args=(str(tmp_path / "pg"), cases, compile), nprocs=2)



def test_fsdp_shards_the_embedding_by_columns_that_the_ranks_divide(monkeypatch):
    # train.py's FSDP shards the embedding by columns (SCALE normalizes it over the vocabulary); FSDP2 shards a dim
    # other than 0 only evenly, so a dim the ranks do not divide is refused in one line, before anything is sharded
    model = LLaMA(LLaMAConfig(dim=8, n_layers=1, n_heads=2, ffn_dim=16, vocab_size=11))
    monkeypatch.setattr(train.dist, "get_world_size", lambda: 3)
    with pytest.raises(ValueError) as e:
        train.shard_model(model, SimpleNamespace(dtype="float32"))
    assert str(e.value) == ("fsdp=True shards the embedding by its 8 columns (dim), which 3 ranks do not divide; use a "
                            "dim divisible by the number of ranks")
    assert not any(isinstance(p, DTensor) for p in model.parameters())


def test_the_readmes_rule_is_scale_pys_code():
    """README's "What SCALE is" quotes normalized_update_'s lines (with comments added): they must stay scale.py's."""
    here = os.path.dirname(os.path.abspath(__file__))
    readme, source = (open(os.path.join(here, name)).read() for name in ("README.md", "scale.py"))
    quoted = readme.split("comments added):\n\n```python\n")[1].split("```")[0].splitlines()
    assert len(quoted) == 4
    for line in quoted:
        assert line.split("  # ")[0].strip() + "\n" in source, line
