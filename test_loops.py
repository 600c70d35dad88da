"""SCALE outside this repo's train.py: installed with pip, in a plain PyTorch loop under torch's lr schedulers, and in
Hugging Face's Trainer (resume_from_checkpoint). CPU, offline; the Trainer tests are skipped without transformers
and accelerate."""
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from scale import SCALE, scale_param_groups

HERE = os.path.dirname(os.path.abspath(__file__))

# a model with every role, trained in another directory by the installed module alone
TRAIN_ELSEWHERE = """
import importlib.util, os, sys
import torch
from scale import SCALE, scale_param_groups
assert os.path.dirname(sys.modules["scale"].__file__) == sys.argv[1]
assert [name for name in ("config", "data", "model", "train") if importlib.util.find_spec(name)] == []
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Embedding(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 32),
                            torch.nn.ReLU(), torch.nn.Linear(32, 16))
groups = scale_param_groups(model, output=model[4])
opt = SCALE(groups, lr=0.02, momentum=0.9, adam_lr=0.01)
x = torch.arange(16)
losses = []
for _ in range(30):
    loss = torch.nn.functional.cross_entropy(model(x), (x + 1) % 16)
    loss.backward()
    opt.step()
    opt.zero_grad()
    losses.append(loss.item())
print(sorted(g["role"] for g in groups), losses[-1] < losses[0] / 4)
"""


def test_pip_install_holds_scale_alone_and_it_trains_from_another_dir(tmp_path):
    pytest.importorskip("setuptools", reason="setuptools not installed: pip cannot build offline without it")
    clone, site, elsewhere = tmp_path / "clone", tmp_path / "site", tmp_path / "elsewhere"
    shutil.copytree(HERE, clone, ignore=shutil.ignore_patterns(".*", "__pycache__", "out*", "data", "hf", "build",
                                                                "*.egg-info"))
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
                          "--target", str(site), str(clone)], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stdout[-2000:] + pip.stderr[-2000:]
    names = sorted(os.listdir(site))
    assert len(names) == 3 and names[:2] == ["__pycache__", "scale.py"], names
    assert re.fullmatch(r"scale_optimizer-[\d.]+\.dist-info", names[2]), names
    assert [name.split(".")[0] for name in os.listdir(site / "__pycache__")] == ["scale"]
    assert (site / names[2] / "top_level.txt").read_text() == "scale\n"
    assert "Requires-Dist: torch>=2.5\n" in (site / names[2] / "METADATA").read_text()
    elsewhere.mkdir()
    run = subprocess.run([sys.executable, "-c", TRAIN_ELSEWHERE, str(site)], cwd=elsewhere, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout == "['embedding', 'matrix', 'output', 'vector'] True\n"


# -----------------------------------------------------------------------------
# torch's lr schedulers

def toy():
    """A model with every role: an embedding, a norm (vector), a matrix, the output layer."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 8, bias=False),
                               torch.nn.Linear(8, 16, bias=False))


def reference_step(p, g, state, role, lr, wd=0.1, beta=0.9, adam_lr=0.004, lr0=0.02, betas=(0.9, 0.99), eps=1e-8):
    """SCALE's step of one param by its rule (scale.py's docstring), in float64: row- (matrix, output, after the
    output's momentum) or column-normalized (embedding) G, or AdamW at adam_lr * lr / lr0 (vector)."""
    p, g = p.double(), g.double()
    if role == "vector":
        lr, t = adam_lr * lr / lr0, state.get("t", 0) + 1
        m = state["m"] = betas[0] * state.get("m", 0) + (1 - betas[0]) * g
        v = state["v"] = betas[1] * state.get("v", 0) + (1 - betas[1]) * g * g
        state["t"] = t
        return p * (1 - lr * wd) - lr * (1 - betas[1] ** t) ** 0.5 / (1 - betas[0] ** t) * m / (v.sqrt() + eps)
    if role == "output":
        g = state["m"] = beta * state.get("m", 0) + (1 - beta) * g
    rms = g.square().mean(dim=0 if role == "embedding" else 1, keepdim=True).sqrt().clamp_min(1e-8)
    return p * (1 - lr * wd) - lr * g / rms


SCHEDULERS = {
    "LambdaLR": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(step + 1, 8 - step) / 4),
    "OneCycleLR": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.02, total_steps=8,
                                                                  cycle_momentum=False),
    "SequentialLR": lambda opt: torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=3),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)], milestones=[3]),
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
}


@pytest.mark.parametrize("name", SCHEDULERS)
def test_a_torch_scheduler_drives_every_roles_lr(name):
    model = toy()
    groups = scale_param_groups(model, output=model[3])
    opt = SCALE(groups, lr=0.02, momentum=0.9, weight_decay=0.1, adam_lr=0.004, adam_betas=(0.9, 0.99))
    sched = SCHEDULERS[name](opt)
    states, lrs = {p: {} for p in model.parameters()}, []
    for step in range(8):
        x = torch.randint(0, 16, (32,), generator=torch.Generator().manual_seed(step))
        torch.nn.functional.cross_entropy(model(x), (x + 1) % 16).backward()
        lrs.append([group["lr"] for group in opt.param_groups])
        expected = {p: reference_step(p, p.grad, states[p], group["role"], group["lr"])
                    for group in opt.param_groups for p in group["params"]}
        opt.step()
        opt.zero_grad()
        sched.step()
        for p, new in expected.items():
            torch.testing.assert_close(p.double(), new, rtol=1e-6, atol=1e-7)
    assert all(len(set(per_group)) == 1 for per_group in lrs) and len({lr for lr, *_ in lrs}) >= 4  # it moved
    if name == "LambdaLR":
        assert [lr for lr, *_ in lrs] == [0.02 * (min(step + 1, 8 - step) / 4) for step in range(8)]


@pytest.mark.parametrize("cycle_momentum", [True, False])
def test_one_cycle_lr_cycles_scales_momentum_unless_told_not_to(cycle_momentum):
    model = toy()
    opt = SCALE(scale_param_groups(model, output=model[3]), lr=0.02, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.02, total_steps=8, cycle_momentum=cycle_momentum)
    output = model[3].weight
    output.grad = torch.ones_like(output)
    momenta = []
    for _ in range(7):
        momenta.append(opt.param_groups[0]["momentum"])
        opt.step()
        sched.step()
    buf = opt.state[output]["momentum_buffer"]  # m <- beta_t*m + (1 - beta_t)*1 at each step: the momenta it used
    assert torch.equal(buf, buf[0, 0].expand_as(buf)) and buf[0, 0].item() == pytest.approx(1 - math.prod(momenta))
    if cycle_momentum:  # as SGD's: from max_momentum (0.95) down as the lr rises, and back
        assert momenta[0] == 0.95 and min(momenta) < 0.9
    else:
        assert momenta == [0.9] * 7


# -----------------------------------------------------------------------------
# Hugging Face's Trainer

def trainer_run(transformers, out_dir, lrs, resume=None):
    """A tiny LlamaForCausalLM trained 6 steps by Trainer with SCALE and a LambdaLR schedule (checkpoints every 3
    steps), from resume if given; appends the lr of every group at each optimizer step to lrs; -> the model."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=16))
    opt = SCALE(scale_param_groups(model, output=model.lm_head), lr=0.01, momentum=0.9, weight_decay=0.1,
                adam_lr=0.003)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(step + 1, 6 - step) / 3)
    ids = torch.randint(0, 64, (40, 16), generator=torch.Generator().manual_seed(0))

    class Record(transformers.TrainerCallback):
        def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            lrs.append([group["lr"] for group in optimizer.param_groups])

    args = transformers.TrainingArguments(output_dir=str(out_dir), max_steps=6, save_steps=3, seed=0, use_cpu=True,
                                          per_device_train_batch_size=4, report_to="none", disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=[{"input_ids": x, "labels": x} for x in ids],
                                   optimizers=(opt, sched), callbacks=[Record()])
    trainer.train(resume_from_checkpoint=resume)
    return model


@pytest.mark.optional
def test_trainer_follows_the_schedule_and_resumes_exactly(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers not installed: Trainer tests skipped")
    pytest.importorskip("accelerate", reason="accelerate not installed (Trainer needs it): Trainer tests skipped")
    straight_lrs, resumed_lrs = [], []
    straight = trainer_run(transformers, tmp_path / "straight", straight_lrs)
    resumed = trainer_run(transformers, tmp_path / "resumed", resumed_lrs, tmp_path / "straight" / "checkpoint-3")
    assert straight_lrs == [[0.01 * (min(step + 1, 6 - step) / 3)] * 4 for step in range(6)]  # 4 roles, 1 schedule
    assert resumed_lrs == straight_lrs[3:]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
