"""Tests of the CUDA path: the fused loss (LinearCrossEntropy) in fp32 and bf16 against fp64 and its backward's
memory; train.py in each optimizer and dtype, at the 60M shape in bf16 with torch.compile, resumed on the same and
on the other device, under torchrun (NCCL), and with no host sync in its steps.

A test whose logic runs on CPU too has a "cpu" case, so CI checks it; the "cuda" cases (marker cuda) skip without
a GPU. On a GPU machine: pytest -m cuda, or python -m tools.gpu_check, which runs them and the benchmarks."""
import os
import shutil
import subprocess
import sys
import warnings
from collections import Counter
from contextlib import contextmanager, nullcontext
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from tools import compare
import train
from model import LinearCrossEntropy, peak_flops
from test_train import HERE, events, identical, load_ckpt, param_dtype, read_log, start_record, state_bytes_logged, \
    tiny_args, tiny_model

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = [pytest.mark.cuda, needs_cuda]
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
LRS = dict(scale=1e-2, adamw=1e-2, muon=1e-2, sgd=0.5)  # each learns the byte data in a few steps (test_train.py)
DTYPES = ("float32", "bfloat16", "mixed")
RESUME_TOL_BF16_COMPILED = 0.02  # max |loss difference| of a resumed bf16 + compile run (kernels not deterministic)
CROSS_DEVICE_TOL = 0.02  # max |loss difference| between CPU (fp32) and CUDA (TF32 matmuls, as train.py runs fp32)


def cuda_only(test):
    return pytest.mark.cuda(needs_cuda(test))


@contextmanager
def on(device):
    """Run train.py in this process on device: it trains on the GPU whenever there is one, so "cpu" hides it."""
    with mock.patch("torch.cuda.is_available", return_value=False) if device == "cpu" else nullcontext():
        yield


@contextmanager
def deterministic(device):
    """On CUDA, deterministic kernels (CUDA's memory-efficient attention backward splits its sums over blocks of
    keys, in a varying order, unless told not to); restored after. CPU kernels are deterministic already."""
    if device != "cuda":
        yield
        return
    env = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # what deterministic mode asks of cuBLAS
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)
        if env is None:
            del os.environ["CUBLAS_WORKSPACE_CONFIG"]
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = env


def run_train(args, device, **kw):
    """train.py in its own process on device (CUDA hidden for "cpu") -> CompletedProcess; stdout and stderr kept."""
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {}), **kw.pop("env", {})}
    return subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True, env=env, timeout=900,
                          **kw)


def losses_after(records, step):
    """{step: loss} of the train records after step."""
    return {r["step"]: r["loss"] for r in records if r["event"] == "train" and r["step"] > step}


def without_last_checkpoint(run, tmp_path, name="resumed"):
    """A copy of a finished run's out_dir without ckpt.pt, so that a resume starts from ckpt_prev.pt."""
    out = str(tmp_path / name)
    shutil.copytree(run, out)
    os.remove(os.path.join(out, "ckpt.pt"))
    return out


def rel_error(x, ref):
    """||x - ref|| / ||ref||, in fp64 on the CPU."""
    return ((x.detach().cpu().double() - ref).norm() / ref.norm()).item()


@pytest.fixture
def fp32_matmuls():
    """train.py lets CUDA run fp32 matmuls in TF32; a test of fp32 precision runs them in fp32 (restored after)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


# -----------------------------------------------------------------------------
# the fused output layer and loss

@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("device", DEVICES)
def test_linear_cross_entropy_equals_linear_then_cross_entropy_in_fp64(device, dtype, tol, fp32_matmuls):
    """The value and both gradients against F.linear + F.cross_entropy in fp64 on the same (rounded) inputs, as
    relative errors: fp32 far under 1e-5, bf16 (logits and their gradient rounded to bf16) about 1e-3 to 1e-2."""
    torch.manual_seed(0)
    n, d, v = 1001, 64, 3001  # LOSS_CHUNKS ragged chunks
    h = torch.randn(n, d, device=device).to(dtype).requires_grad_()
    weight = (0.2 * torch.randn(v, d, device=device)).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), device=device)
    logits, loss = LinearCrossEntropy.apply(h, weight, targets)
    grads = torch.autograd.grad(loss, (h, weight))
    h64, weight64 = (t.detach().cpu().double().requires_grad_() for t in (h, weight))
    ref_logits = F.linear(h64, weight64)
    ref = F.cross_entropy(ref_logits, targets.cpu())
    ref_grads = torch.autograd.grad(ref, (h64, weight64))
    assert loss.dtype == torch.float32 and logits.dtype == dtype and loss.device == h.device
    assert all(g.dtype == dtype and g.device == h.device for g in grads)
    assert rel_error(logits, ref_logits) < tol
    assert abs(loss.item() - ref.item()) < tol * ref.item()
    for g, ref_g in zip(grads, ref_grads):
        assert rel_error(g, ref_g) < tol


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bfloat16", "float32"])
def test_linear_cross_entropy_backward_never_holds_the_whole_fp32_gradient(dtype):
    """The backward's peak memory over what the forward left: under the (N, V) fp32 gradient of the logits, while
    F.linear + F.cross_entropy, measured the same way, holds at least that much."""
    n, d, v = 8192, 512, 32000  # LLaMA-60M's output layer on 32 sequences of 256 tokens
    whole = n * v * 4  # 1 GiB

    def backward_peak(loss_fn):
        torch.manual_seed(0)
        h = torch.randn(n, d, device="cuda", dtype=dtype, requires_grad=True)
        weight = (0.02 * torch.randn(v, d, device="cuda")).to(dtype).requires_grad_()
        targets = torch.randint(0, v, (n,), device="cuda")
        loss = loss_fn(h, weight, targets)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss.backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

    ours = backward_peak(lambda h, weight, targets: LinearCrossEntropy.apply(h, weight, targets)[1])
    reference = backward_peak(lambda h, weight, targets: F.cross_entropy(F.linear(h, weight).float(), targets))
    assert reference >= whole, f"the measurement misses the reference's {whole / 2**30:.2f} GiB gradient"
    assert ours < whole, f"backward peak {ours / 2**30:.2f} GiB, the whole fp32 gradient is {whole / 2**30:.2f} GiB"


# -----------------------------------------------------------------------------
# train.py on the device

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("optimizer", LRS)
@pytest.mark.parametrize("device", DEVICES)
def test_each_optimizer_in_each_dtype_trains(device, optimizer, dtype, byte_data, tmp_path):
    with on(device):
        train.main(tiny_args(byte_data, str(tmp_path), optimizer=optimizer, lr=LRS[optimizer], dtype=dtype,
                             max_steps=8, eval_every=8, ckpt_every=8))
    records = read_log(tmp_path)
    val = events(records, "eval", "val_loss")
    assert val[-1] < val[0] - 1.0, val
    device_name = start_record(records)["device"]
    assert (device_name == "cpu") == (device == "cpu")
    if device == "cuda":  # TF32 on, and torch's flags readable (torch raises when its legacy and new ones disagree)
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cuda.matmul.allow_tf32
    peaks = events(records, "train", "peak_mem_bytes")
    assert all(p is None for p in peaks) if device == "cpu" else all(p > 0 for p in peaks)
    ckpt = load_ckpt(tmp_path)  # bfloat16 (bf16="stochastic"): fp32 norm gains and their state (param_dtype)
    assert all(t.dtype == param_dtype(name, dtype, "stochastic") for name, t in ckpt["model"].items())
    state = [(name, t) for opt in ckpt["optimizers"] for name, s in opt["state"].items() for t in s.values()
             if torch.is_tensor(t) and t.ndim > 0]
    assert state and all(t.dtype == param_dtype(name, dtype, "stochastic") for name, t in state)
    assert state_bytes_logged(records) == sum(t.numel() * t.element_size() for _, t in state)
    if dtype != "bfloat16":
        assert state_bytes_logged(records) == 4 * compare.state_numel(tiny_model(), optimizer)


@pytest.fixture(scope="module", params=DEVICES)
def fp32_run(request, byte_data, tmp_path_factory):
    """30 tiny steps in fp32 (eager, deterministic kernels) on a device -> (device, out_dir); checkpoints at steps
    20 (ckpt_prev.pt) and 30."""
    device = request.param
    out = str(tmp_path_factory.mktemp(f"fp32_{device}"))
    with on(device), deterministic(device):
        train.main(tiny_args(byte_data, out, max_steps=30, ckpt_every=10))
    return device, out


def test_fp32_resume_continues_bit_for_bit(fp32_run, byte_data, tmp_path):
    device, whole = fp32_run
    out = without_last_checkpoint(whole, tmp_path)
    with on(device), deterministic(device):
        train.main(tiny_args(byte_data, out, max_steps=30, ckpt_every=10, resume=True))
    a, b = load_ckpt(whole), load_ckpt(out)
    assert identical(a["model"], b["model"]) and identical(a["optimizers"], b["optimizers"])
    assert identical(a["rng"], b["rng"])
    resumed = losses_after(read_log(out), 20)
    assert resumed.keys() == set(range(21, 31)) and resumed == losses_after(read_log(whole), 20)


@pytest.mark.parametrize("fp32_run", [pytest.param("cuda", marks=CUDA)], indirect=True)
def test_a_cuda_checkpoint_resumes_on_cpu_and_a_cpu_checkpoint_on_cuda(fp32_run, byte_data, tmp_path):
    """The CUDA run's step-20 checkpoint continues on CPU, which writes checkpoints at steps 25 and 30; its
    step-25 one continues on CUDA. Both follow the uninterrupted CUDA run within CROSS_DEVICE_TOL."""
    _, whole = fp32_run
    expected = losses_after(read_log(whole), 20)
    on_cpu = without_last_checkpoint(whole, tmp_path, "on_cpu")
    with on("cpu"):
        train.main(tiny_args(byte_data, on_cpu, max_steps=30, ckpt_every=5, resume=True))
    assert losses_after(read_log(on_cpu), 20) == pytest.approx(expected, abs=CROSS_DEVICE_TOL)
    assert [r["device"] for r in read_log(on_cpu) if r["event"] == "start"][-1] == "cpu"
    back_on_cuda = without_last_checkpoint(on_cpu, tmp_path, "back_on_cuda")
    prev = torch.load(os.path.join(back_on_cuda, "ckpt_prev.pt"), weights_only=True)
    assert load_ckpt(on_cpu)["step"] == 30 and prev["step"] == 25
    train.main(tiny_args(byte_data, back_on_cuda, max_steps=30, ckpt_every=5, resume=True))
    records = read_log(back_on_cuda)
    assert [r["device"] for r in records if r["event"] == "start"][-1] != "cpu"
    assert losses_after(records, 25) == pytest.approx(losses_after(read_log(whole), 25), abs=CROSS_DEVICE_TOL)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_torchrun_one_process_matches_plain_python(device, byte_data, tmp_path):
    """torchrun --nproc_per_node=1: a process group (NCCL on CUDA, gloo on CPU) and DDP, the same losses as
    python train.py (to 1e-4: CUDA's attention backward is not deterministic)."""
    args = dict(max_steps=6, eval_every=6, ckpt_every=6)
    p = run_train(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py",
                   *tiny_args(byte_data, str(tmp_path / "ddp"), **args)], device, env={"NCCL_DEBUG": "INFO"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "total_batch_size 8 = grad_accum 2 x batch_size 4 x world_size 1" in p.stdout
    assert ("NCCL INFO" in p.stdout + p.stderr) == (device == "cuda")  # NCCL logs its setup with NCCL_DEBUG=INFO
    with on(device):
        train.main(tiny_args(byte_data, str(tmp_path / "one"), **args))
    ddp, one = read_log(tmp_path / "ddp"), read_log(tmp_path / "one")
    assert events(ddp, "train", "loss") == pytest.approx(events(one, "train", "loss"), abs=1e-4)
    assert events(ddp, "eval", "val_loss") == pytest.approx(events(one, "eval", "val_loss"), abs=1e-4)


@cuda_only
@pytest.mark.parametrize("optimizer", LRS)
def test_training_steps_make_no_host_sync(optimizer, byte_data, tmp_path):
    """Between log lines a step only queues work: no host sync (.item(), a copy to the host or a blocking copy to
    the device) per step. Counted by CUDA's sync debug mode as the syncs of an 8-step run over those of a 4-step
    run with the same evaluations, checkpoints and log lines (at the start and at the end)."""
    def syncs(steps):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train.main(tiny_args(byte_data, str(tmp_path / f"steps{steps}"), optimizer=optimizer,
                                     lr=LRS[optimizer], dtype="bfloat16", max_steps=steps, log_every=1000,
                                     eval_every=1000, ckpt_every=1000))
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return Counter(f"{os.path.basename(w.filename)}:{w.lineno}" for w in caught
                       if "synchronizing CUDA operation" in str(w.message))

    syncs(1)  # first use: lazy initializations
    per_4_steps = syncs(8) - syncs(4)
    assert not per_4_steps, (f"{sum(per_4_steps.values()) / 4:g} host syncs per step, at "
                             + ", ".join(f"{where} x{n / 4:g}" for where, n in per_4_steps.items()))


# -----------------------------------------------------------------------------
# LLaMA-60M's shape in bf16 with torch.compile (last: the slowest, about a minute of compilation on a GPU)

@pytest.fixture(scope="module")
def run_60m(byte_data, tmp_path_factory):
    """LLaMA-60M's shape (with the byte vocab) in bf16 with torch.compile and SCALE, the paper's lr, 30 steps of
    32 x 256 tokens, in its own process as a user runs it; checkpoints at steps 20 (ckpt_prev.pt) and 30."""
    out = str(tmp_path_factory.mktemp("run_60m"))
    args = ["train.py", os.path.join(HERE, "configs", "llama_60m.py"), f"--data_dir={byte_data}", f"--out_dir={out}",
            "--total_batch_size=32", "--batch_size=32", "--max_steps=30", "--warmup_steps=5", "--eval_every=30",
            "--eval_tokens=8192", "--log_every=1", "--ckpt_every=20", "--dtype=bfloat16", "--compile=True"]
    p = run_train(args, "cuda")
    assert p.returncode == 0, p.stderr[-3000:]
    return out, args


@cuda_only
def test_60m_bf16_compiled_run_learns_and_reports_mfu_and_memory(run_60m):
    out, _ = run_60m
    records = read_log(out)
    losses = events(records, "train", "loss")
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    val = events(records, "eval", "val_loss")
    assert val[-1] < val[0] - 0.5, val
    device_name = start_record(records)["device"]
    for r in (r for r in records if r["event"] == "train"):
        assert r["peak_mem_bytes"] > 0 and (r["mfu"] is None) == (peak_flops(device_name) is None)
    assert all(t.dtype == param_dtype(name, "bfloat16", "stochastic") for name, t in load_ckpt(out)["model"].items())


@cuda_only
def test_60m_bf16_compiled_resume_continues_the_run(run_60m, tmp_path):
    """Resumed from step 20, the run's losses to step 30 are the uninterrupted run's within
    RESUME_TOL_BF16_COMPILED (flash attention's backward is not deterministic)."""
    whole, args = run_60m
    out = without_last_checkpoint(whole, tmp_path)
    p = run_train([a.replace(whole, out) for a in args] + ["--resume=True"], "cuda")
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resuming from {out}/ckpt_prev.pt at step 20" in p.stdout
    resumed, expected = losses_after(read_log(out), 20), losses_after(read_log(whole), 20)
    assert resumed.keys() == expected.keys() == set(range(21, 31))
    assert resumed == pytest.approx(expected, abs=RESUME_TOL_BF16_COMPILED)
