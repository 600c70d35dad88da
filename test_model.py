"""Tests for model.py and the model shapes in configs/ (offline, CPU)."""

import os

import pytest
import torch
import torch.nn.functional as F

import config
from export_hf import hf_config, hf_name
from model import SHAPE, LinearCrossEntropy, LLaMA, LLaMAConfig, peak_flops

HERE = os.path.dirname(os.path.abspath(__file__))


def config_path(name):
    return os.path.join(HERE, "configs", name + ".py")


def load_config(name):
    """The config train.py runs: its defaults, then the file (unknown keys and wrong types are errors)."""
    return vars(config.load_config([config_path(name)]))


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(dim=64, n_layers=2, n_heads=4, ffn_dim=160, vocab_size=97, max_seq_len=64)
    cfg.update(kw)
    return LLaMA(LLaMAConfig(**cfg))


@pytest.mark.parametrize("name,expected", [
    ("llama_60m", 58_073_600), ("llama_130m", 134_105_856), ("llama_350m", 367_969_280),
    ("llama_1b", 1_339_082_752), ("llama_7b", 6_738_415_616)])
def test_paper_param_counts(name, expected):
    cfg = load_config(name)
    with torch.device("meta"):
        model = LLaMA(LLaMAConfig.from_config(cfg, vocab_size=32000))
    assert model.num_params() == expected
    assert model.flops_per_token(256) == 6 * (expected - 32000 * cfg["dim"]) + 12 * cfg["n_layers"] * cfg["dim"] * 256


def test_config_files_use_only_known_keys():
    # a paper config sets only what differs between sizes; train.py's defaults are the shared recipe
    own_keys = set(SHAPE) | {"lr", "adam_lr", "max_steps", "warmup_steps", "batch_size", "data_dir", "out_dir"}
    recipe = {"llama_60m": (11000, 1e-3, 0.02), "llama_130m": (20000, 1e-3, 0.02), "llama_350m": (60000, 1e-3, 0.02),
              "llama_1b": (100000, 2e-4, 1e-3), "llama_7b": (150000, 1e-4, 1e-3)}
    for name, (steps, lr, adam_lr) in recipe.items():
        assert set(config.read_config_file(config_path(name))) <= own_keys, name
        cfg = load_config(name)
        assert (cfg["optimizer"], cfg["max_steps"], cfg["lr"], cfg["adam_lr"]) == ("scale", steps, lr, adam_lr)
        assert cfg["warmup_steps"] == steps // 10 and cfg["min_lr_ratio"] == 0.1
        assert (cfg["seq_len"], cfg["total_batch_size"], cfg["momentum"], cfg["weight_decay"]) == (256, 512, 0.9, 0.0)
        assert (cfg["grad_clip"], cfg["dtype"], cfg["compile"]) == (0.0, "bfloat16", True)
        assert cfg["total_batch_size"] % cfg["batch_size"] == 0 and cfg["out_dir"] == f"out/{name}"
    tiny = load_config("tiny")
    assert tiny["dtype"] == "float32" and tiny["compile"] is False
    # CPU: 1 or 2 processes
    assert all(tiny["total_batch_size"] % (tiny["batch_size"] * ranks) == 0 for ranks in (1, 2))
    LLaMAConfig.from_config(tiny, vocab_size=257)


def test_structure_and_init():
    model = tiny_model(n_layers=3)
    assert isinstance(model.tok_embeddings, torch.nn.Embedding)
    assert isinstance(model.lm_head, torch.nn.Linear) and model.lm_head.bias is None
    assert model.lm_head.weight.data_ptr() != model.tok_embeddings.weight.data_ptr()
    for name, p in model.named_parameters():
        if p.ndim == 1:
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert abs(p.std().item() - 0.02) < 0.003 and abs(p.mean().item()) < 0.002, name
    big = LLaMA(LLaMAConfig(dim=256, n_layers=1, n_heads=4, ffn_dim=512, vocab_size=1000))
    assert abs(big.lm_head.weight.std().item() - 0.02) < 2e-4


def test_forward_shapes_and_loss():
    model = tiny_model()
    idx = torch.randint(0, 97, (3, 17))
    logits, loss = model(idx)
    assert logits.shape == (3, 17, 97) and loss is None
    targets = torch.randint(0, 97, (3, 17))
    logits, loss = model(idx, targets)
    assert loss.shape == () and torch.allclose(loss, F.cross_entropy(logits.view(-1, 97), targets.view(-1)))
    # small init: logits near zero, so the initial loss is close to log(vocab)
    assert abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.05
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("n_tokens", [37, 2])  # 4 ragged chunks; fewer tokens than chunks
def test_linear_cross_entropy_value_and_gradients_equal_torch(n_tokens):
    h = torch.randn(n_tokens, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(97, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 97, (n_tokens,))
    logits, loss = LinearCrossEntropy.apply(h, weight, targets)
    grads = torch.autograd.grad(3.0 * loss, (h, weight))
    ref_logits = F.linear(h, weight)
    ref = F.cross_entropy(ref_logits, targets)
    ref_grads = torch.autograd.grad(3.0 * ref, (h, weight))
    torch.testing.assert_close(logits, ref_logits, rtol=1e-14, atol=0)
    torch.testing.assert_close(loss, ref, rtol=1e-14, atol=0)
    for g, ref_g in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref_g, rtol=1e-12, atol=1e-15)


def test_linear_cross_entropy_bf16_saves_bf16_logits_and_matches_fp32():
    torch.manual_seed(0)
    h, weight = torch.randn(64, 32, dtype=torch.bfloat16), (0.1 * torch.randn(97, 32)).bfloat16()
    h.requires_grad_(), weight.requires_grad_()
    targets = torch.randint(0, 97, (64,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        logits, loss = LinearCrossEntropy.apply(h, weight, targets)
    assert {t.dtype for t in saved if t.shape == (64, 97)} == {torch.bfloat16}  # no fp32 copy of the logits kept
    loss.backward()
    h32, w32 = h.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    ref = F.cross_entropy(F.linear(h32, w32), targets)
    ref.backward()
    assert loss.dtype == torch.float32 and abs(loss.item() - ref.item()) < 1e-2
    assert h.grad.dtype == weight.grad.dtype == torch.bfloat16
    for g, ref_g in ((h.grad, h32.grad), (weight.grad, w32.grad)):  # bf16 rounding of the logits and their grad
        torch.testing.assert_close(g.float(), ref_g, rtol=0.02, atol=0.01 * ref_g.abs().max().item())


def test_logits_are_detached_when_a_loss_is_computed():
    model = tiny_model()
    idx = torch.randint(0, 97, (2, 5))
    assert model(idx)[0].requires_grad
    logits, loss = model(idx, idx)
    assert not logits.requires_grad and loss.requires_grad


def test_lm_head_bias_is_an_error_not_silently_ignored_by_the_loss():
    model = tiny_model()
    model.lm_head = torch.nn.Linear(64, 97, bias=True)
    idx = torch.randint(0, 97, (2, 5))
    assert model(idx)[0].shape == (2, 5, 97)  # without targets lm_head itself runs: no error
    with pytest.raises(ValueError, match="lm_head has a bias"):
        model(idx, idx)


def test_causal():
    model = tiny_model()
    idx = torch.randint(0, 97, (2, 20))
    changed = idx.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % 97
    a, _ = model(idx)
    b, _ = model(changed)
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("kw,message", [
    (dict(dim=100, n_heads=8), "dim (100) must be divisible by n_heads (8); change dim or n_heads"),
    (dict(dim=96, n_heads=32), "head dim dim/n_heads = 3 must be even for rotary embeddings; change dim or n_heads"),
])
def test_bad_config(kw, message):
    cfg = dict(dim=64, n_layers=2, n_heads=4, ffn_dim=160, vocab_size=97)
    cfg.update(kw)
    with pytest.raises(ValueError) as e:
        LLaMAConfig(**cfg)
    assert str(e.value) == message


def test_too_long_sequence():
    model = tiny_model(max_seq_len=16)
    model(torch.zeros(1, 16, dtype=torch.long))
    with pytest.raises(ValueError) as e:
        model(torch.zeros(1, 17, dtype=torch.long))
    assert str(e.value) == "sequence length 17 exceeds max_seq_len 16; use shorter sequences or raise max_seq_len"


def test_bf16_and_autocast():
    model = tiny_model()
    idx, targets = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    ref_logits, ref_loss = model(idx, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, targets)
    assert loss.dtype == torch.float32 and abs(loss.item() - ref_loss.item()) < 0.02
    model.to(torch.bfloat16)
    logits, loss = model(idx, targets)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert abs(loss.item() - ref_loss.item()) < 0.02
    loss.backward()
    assert all(p.grad.dtype == torch.bfloat16 for p in model.parameters())
    # fp32 norm gains (train.py's bf16 runs) are cast at use: the activations, logits and numbers stay bf16's
    for p in model.parameters():
        p.grad = None
        if p.ndim == 1:
            p.data = p.data.float()
    assert model.norm(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
    logits_fp32_gains, loss_fp32_gains = model(idx, targets)
    assert torch.equal(logits_fp32_gains, logits) and torch.equal(loss_fp32_gains, loss)
    loss_fp32_gains.backward()
    assert all(p.grad.dtype == p.dtype for p in model.parameters()) and model.norm.weight.grad.dtype == torch.float32


@pytest.mark.slow
def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = tiny_model()
    idx, targets = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    ref_logits, ref_loss = model(idx, targets)
    ref_loss.backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    logits, loss = compiled(idx, targets)
    loss.backward()
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    for p, g in zip(model.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-4)


@pytest.mark.optional
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_same_as_hf_llama(attn):
    transformers = pytest.importorskip("transformers",
                                       reason="transformers not installed: parity with LlamaForCausalLM")
    torch.manual_seed(0)
    ours = tiny_model(n_layers=3, max_seq_len=128)
    hf_cfg = hf_config(ours.config, attn_implementation=attn)  # export_hf.py's config and names
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf_params = dict(hf.named_parameters())
    assert len(hf_params) == len(list(ours.parameters())) and hf.num_parameters() == ours.num_params()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            hf_params[hf_name(name)].copy_(p)
    idx, targets = torch.randint(0, 97, (2, 100)), torch.randint(0, 97, (2, 100))
    logits, loss = ours(idx, targets)
    out = hf(input_ids=idx)
    hf_loss = F.cross_entropy(out.logits.view(-1, 97), targets.view(-1))
    torch.testing.assert_close(logits, out.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, hf_loss, atol=1e-6, rtol=1e-6)
    # and HF's own shifted-label loss equals ours on the shifted targets
    hf_shift = hf(input_ids=idx, labels=idx).loss
    _, our_shift = ours(idx[:, :-1], idx[:, 1:])
    torch.testing.assert_close(our_shift, hf_shift, atol=1e-5, rtol=1e-5)


def test_peak_flops_table_first_match_and_unknown():
    assert peak_flops("NVIDIA H100 PCIe") == 756e12 and peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12 and peak_flops("Tesla T4") is None
