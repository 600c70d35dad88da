"""SCALE outside this repo's train.py: installed with pip, in a plain PyTorch loop under torch's lr schedulers, and in
Hugging Face's Trainer (resume_from_checkpoint). CPU, offline; the Trainer tests are skipped without transformers
and accelerate."""
import os
import re
import shutil
import subprocess
import sys

import pytest

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
    assert "Requires-Dist: torch\n" in (site / names[2] / "METADATA").read_text()
    elsewhere.mkdir()
    run = subprocess.run([sys.executable, "-c", TRAIN_ELSEWHERE, str(site)], cwd=elsewhere, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout == "['embedding', 'matrix', 'output', 'vector'] True\n"
