"""The GPU check: one command, on a machine with one CUDA GPU (an H100 or H200) and nothing but this repository (no
downloads: the tests build their data), that runs the CUDA tests and the GPU benchmarks and prints one markdown
report, also written to $OUT/gpu_check.md, with each part's output in $OUT/gpu_check_<part>.log, when OUT is set.

    python -m tools.gpu_check                          # at most --budget (440) seconds on one H100 or H200
    python -m tools.gpu_check --parts model --sizes llama_60m --batch_size 512 --loss_chunks 1    # one variation
    python -m tools.gpu_check --device cpu --tiny      # a dry run of every part on tiny shapes, on CPU (as tests do)

The parts, each in its own process with its own time limit (tests and memory side by side, as neither is timed):
  tests      pytest -m cuda (test_cuda.py and any other test marked cuda): each test's result, seconds and reason
  memory     params, grads, optimizer state and peak memory of SCALE and AdamW at 60M and 350M (bf16, as train.py
             makes them), from torch.cuda.memory_allocated, next to compare.py --memory's estimate (compare.memory_gb)
  model      training tokens/s, MFU, peak memory and compile time at 60M, 350M and 1B in bf16 with torch.compile,
             seq_len 256, and LlamaForCausalLM + fused AdamW stepped in turn at 60M and 350M (bench.measure_training)
  optimizer  the compiled SCALE step against fused AdamW at the 60M and 1B shapes, fp32 and bf16 params; in bf16 also
             with stochastic rounding, and its extra time as a share of the model part's training step at 60M and 1B
A measurement that fails is a FAIL row with a one-line reason; one that would not finish in its part's time left is
a skipped row; a part that crashes or overruns is stopped, keeping its finished rows. The report comes last.
"""
import argparse
import datetime
import gc
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from types import SimpleNamespace

import torch

from tools import bench
from tools import compare
import model as model_py
import train
from config import load_config
from tools.compare import paper_config
from data import write_atomic
from model import LLaMA, LLaMAConfig
from scale import SCALE, scale_param_groups

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("tests", "memory", "model", "optimizer")  # in the order they run; memory runs beside tests
LIMIT_S = dict(tests=240, memory=90, model=240, optimizer=120)  # each part's own limit, within --budget
# what each measurement is expected to take on an H100/H200, compilation included (estimates, not yet measured):
# one that would not end before its part's deadline is skipped
EXPECTED_S = {("memory", "llama_60m"): 5, ("memory", "llama_350m"): 10, ("model", "llama_60m"): 60,
              ("model", "llama_350m"): 80, ("model", "llama_1b"): 100, ("optimizer", "llama_60m"): 15,
              ("optimizer", "llama_1b"): 40}
MEMORY_SIZES, OPTIMIZER_SIZES = ("llama_60m", "llama_350m"), ("llama_60m", "llama_1b")
MEMORY_BATCH = 64  # sequences in the training step whose peak memory the memory part reports
TINY = load_config(["--dim=64", "--n_layers=2", "--n_heads=4", "--ffn_dim=160", "--seq_len=32"])  # --tiny's shape
TINY_VOCAB = 512


# -----------------------------------------------------------------------------
# the measurements, each run in its part's process

def run_config(name):
    """The run config (a namespace) of a size: "tiny" (--tiny) or a paper config (seq_len 256)."""
    return TINY if name == "tiny" else paper_config(name)


def vocab_size(name):
    return TINY_VOCAB if name == "tiny" else 32000  # the paper's


def model_config(name):
    return LLaMAConfig.from_config(vars(run_config(name)), vocab_size(name))


def measure_memory(name, optimizer, device):
    """One training step (eager, the run config's dtypes: bf16 by default) with optimizer as train.py makes it: the
    bytes of the params, grads and optimizer state (allocator deltas on CUDA, tensor sizes elsewhere), the step's
    peak (CUDA only), and the estimate of params + state in GB by compare.memory_gb (compare.py --memory)."""
    device, cuda = torch.device(device), device == "cuda"
    cfg = SimpleNamespace(**{**vars(run_config(name)), "optimizer": optimizer, "compile": False})
    batch = 2 if name == "tiny" else MEMORY_BATCH
    allocated = (lambda: torch.cuda.memory_allocated(device)) if cuda else None
    torch.manual_seed(0)
    x, y = (torch.randint(0, vocab_size(name), (batch, cfg.seq_len), device=device) for _ in range(2))
    base = allocated() if cuda else 0
    with device:
        model = train.set_param_dtypes(LLaMA(model_config(name)), cfg.dtype, cfg.bf16)  # bf16, fp32 gains by default
    params = allocated() - base if cuda else sum(p.numel() * p.element_size() for p in model.parameters())
    optimizers = train.make_optimizers(model, cfg)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    model(x, y)[1].backward()
    grads = allocated() - base - params if cuda else sum(p.grad.numel() * p.grad.element_size()
                                                        for p in model.parameters())
    for opt in optimizers:
        opt.step()
    state = allocated() - base - params - grads if cuda else train.state_bytes(optimizers)
    peak = torch.cuda.max_memory_allocated(device) - base if cuda else None
    return dict(params=params, grads=grads, state=state, peak=peak, batch=batch, seq_len=cfg.seq_len,
                estimate_gb=compare.memory_gb(cfg, optimizer, vocab_size(name)))


def measure_optimizer(name, dtype, device, tiny):
    """Fused AdamW's step and the compiled SCALE step (eager with tiny) on the params of a size in dtype, random
    grads, stepped in turn (bench.time_in_turn, bench.optimizer_step: lr changes every step, a recompile after warmup
    is an error); in bf16 also SCALE with stochastic rounding (train.py's default bf16=stochastic) -> dict(adamw_ms,
    scale_ms, sr_ms (None in fp32), first_scale_step_s)."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    warmup, steps = (1, 2) if tiny else (3, 20)
    torch._dynamo.reset()  # each measurement compiles as a fresh process would (and clear of the recompile limit)
    torch.manual_seed(0)
    with device:
        model = LLaMA(model_config(name))
    model.to(getattr(torch, dtype))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    scale = SCALE(scale_param_groups(model), lr=1e-3, compile=not tiny)
    sync()
    t0 = time.perf_counter()
    bench.optimizer_step(scale, warmup)(0)  # compiles
    sync()
    first = time.perf_counter() - t0
    steppers = {"adamw": bench.optimizer_step(adamw, warmup), "scale": bench.optimizer_step(scale, warmup)}
    if dtype == "bfloat16":
        sr = SCALE(scale_param_groups(model), lr=1e-3, compile=not tiny, bf16_rounding="stochastic")
        steppers["sr"] = bench.optimizer_step(sr, warmup)
    times = bench.time_in_turn(steppers, warmup, steps, sync)
    return dict(adamw_ms=1e3 * times["adamw"], scale_ms=1e3 * times["scale"],
                sr_ms=1e3 * times["sr"] if "sr" in times else None, first_scale_step_s=first)


def measure_model(name, batch, peer, args):
    """bench.measure_training at a size (its batch, or --batch_size), with --loss_chunks if given."""
    if args.loss_chunks:
        model_py.LOSS_CHUNKS = args.loss_chunks
    warmup, steps = (1, 2) if args.tiny else (2, 8)
    rows, notes = bench.measure_training(model_config(name), batch, args.device, peer, compile=not args.tiny,
                                         warmup=warmup, steps=steps)
    return dict(rows=rows, notes=notes, seq_len=run_config(name).seq_len)


def measurements(args):
    """The part's measurements: [(row keys, measure(), EXPECTED_S key)]."""
    sizes = lambda default: ["tiny"] if args.tiny else [s for s in default if not args.sizes or s in args.sizes]
    if args.part == "memory":
        return [(dict(size=n, optimizer=o), lambda n=n, o=o: measure_memory(n, o, args.device), ("memory", n))
                for n in sizes(MEMORY_SIZES) for o in ("scale", "adamw")]
    if args.part == "optimizer":
        return [(dict(size=n, dtype=d), lambda n=n, d=d: measure_optimizer(n, d, args.device, args.tiny),
                 ("optimizer", n)) for n in sizes(OPTIMIZER_SIZES) for d in ("float32", "bfloat16")]
    runs = [("tiny", 2, True)] if args.tiny else [r for r in bench.GPU_RUNS if not args.sizes or r[0] in args.sizes]
    return [(dict(size=n, batch=args.batch_size or b, loss_chunks=args.loss_chunks or model_py.LOSS_CHUNKS),
             lambda n=n, b=b, p=p: measure_model(n, args.batch_size or b, p, args), ("model", n)) for n, b, p in runs]


def run_part(args):
    """The part's measurements in turn, each appended to the file args.rows as one json line once done: its keys,
    then "result", or "error" (one line), or "skipped" (it would not end before args.deadline), and "seconds"."""
    for keys, measure, expected in measurements(args):
        left, needed = args.deadline - time.time(), 1 if args.tiny else EXPECTED_S[expected]
        t0 = time.time()
        if left < needed:
            keys["skipped"] = f"{max(left, 0):.0f} s of the part's time left, about {needed} s needed"
        else:
            try:
                keys["result"] = measure()
            except Exception as e:  # one measurement's failure is a row of the report, and the part goes on
                traceback.print_exc()
                keys["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
        keys["seconds"] = time.time() - t0
        with open(args.rows, "a") as f:
            f.write(json.dumps(keys) + "\n")
        print(f"[{args.part}] {json.dumps(keys)[:400]}", flush=True)
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()


# -----------------------------------------------------------------------------
# the tests part: pytest, with this module as a plugin that writes each test's outcome as soon as it is known

def pytest_collection_finish(session):
    write_test_record(dict(collected=[item.nodeid for item in session.items]))


def pytest_runtest_logreport(report):
    reason = ""
    if report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        reason = crash.message if crash else str(report.longrepr)
    elif report.skipped and isinstance(report.longrepr, tuple):
        reason = report.longrepr[2]
    reason = next((line for line in reason.strip().splitlines() if line.strip()), "")
    write_test_record(dict(test=report.nodeid, when=report.when, outcome=report.outcome, seconds=report.duration,
                           reason=reason[:300]))


def write_test_record(record):
    if os.environ.get("GPU_CHECK_TESTS"):
        with open(os.environ["GPU_CHECK_TESTS"], "a") as f:
            f.write(json.dumps(record) + "\n")


def tests_command(tiny):
    selection = ["test_cuda.py", "-m", "not cuda", "-k", "linear_cross_entropy"] if tiny else ["-m", "cuda"]
    return [sys.executable, "-m", "pytest", "-p", "tools.gpu_check", "-p", "no:cacheprovider", "-q", *selection]


def outcomes_of_tests(records):
    """The plugin's records -> [(test, outcome, seconds, reason)] in collection order. A test's outcome is its first
    phase that did not pass ("error in setup" for a failed fixture); a test without records (the part ran out of
    time) is "not run"."""
    collected, results = [], {}
    for record in records:
        if "collected" in record:
            collected = record["collected"]
            continue
        outcome, seconds, reason = results.get(record["test"], ("passed", 0.0, ""))
        if outcome == "passed" and record["outcome"] != "passed":
            outcome, reason = record["outcome"], record["reason"]
            if record["outcome"] == "failed" and record["when"] != "call":
                outcome = f"error in {record['when']}"
        results[record["test"]] = (outcome, seconds + record["seconds"], reason)
    return [(test, *results.get(test, ("not run", 0.0, "the part's time ran out"))) for test in collected]


# -----------------------------------------------------------------------------
# the orchestrator: each part in its own process, then the report

def read_jsonl(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def start_child(cmd, log, env=None):
    """cmd in a new process group, its output to the file log -> the Popen."""
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        return subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def wait_child(p, deadline):
    """Wait for a child until deadline (+ 20 s to end by itself), then stop its process group -> its exit code, or
    None if it was stopped."""
    try:
        return p.wait(timeout=max(1.0, deadline + 20 - time.time()))
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        return None


def device_lines(cuda):
    """The report's lines on the machine: device, versions, and the SDPA backend torch picks for our attention."""
    if cuda:
        props = torch.cuda.get_device_properties(0)
        device = (f"{props.name} ({props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB), "
                  f"CUDA {torch.version.cuda}")
        q = torch.randn(2, 8, 256, 64, device="cuda", dtype=torch.bfloat16)
        try:
            sdpa = torch.nn.attention.SDPBackend(torch._fused_sdp_choice(q, q, q, is_causal=True)).name
        except Exception as e:  # a private function: say so rather than fail
            sdpa = f"unknown ({type(e).__name__})"
    else:
        device, sdpa = f"cpu ({platform.machine()}, {os.cpu_count()} cores)", "n/a"
    try:
        import transformers
        hf = transformers.__version__
    except ImportError:
        hf = "not installed"
    return [f"- device: {device}",
            f"- torch {torch.__version__}, transformers {hf}, python {platform.python_version()}",
            f"- SDPA backend for bf16 causal attention, head dim 64: {sdpa}"]


def status(row):
    """FAIL or skipped with its reason, or None for a row with a result."""
    if "error" in row:
        return f"FAIL: {row['error']}"
    return f"skipped: {row['skipped']}" if "skipped" in row else None


def cell(text):
    return str(text).replace("|", "/")


def tests_section(results):
    counts = {}
    for _, outcome, _, _ in results:
        counts[outcome] = counts.get(outcome, 0) + 1
    lines = ["## CUDA tests (pytest -m cuda)", "", ", ".join(f"{n} {o}" for o, n in counts.items()) or "no tests", ""]
    if results:
        lines += ["| test | result | seconds | reason |", "|---|---|---|---|"]
        lines += [f"| {t} | {'FAIL' if o == 'failed' else o} | {s:.1f} | {cell(r)} |" for t, o, s, r in results]
    return lines


def memory_section(rows, cuda):
    how = "torch.cuda.memory_allocated deltas" if cuda else "tensor sizes, as there is no allocator to ask off CUDA"
    lines = ["## Memory: train.py's default dtypes, each optimizer as train.py makes it", "",
             f"Measured ({how}) with bf16 params, but the 1-D params and their state in fp32 (dtype=bfloat16, "
             "bf16=stochastic), next to compare.py --memory's estimate, 2 bytes x (params + state elements); "
             "peak: one eager training step's. GB = 1e9 bytes.", "",
             "| model | optimizer | params | grads | state | params + state | estimate (compare.py) | peak (batch) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if status(row):
            lines.append(f"| {row['size']} | {row['optimizer']} | {cell(status(row))} | | | | | |")
            continue
        r = row["result"]
        gb = lambda n: f"{n / 1e9:.4g} GB"
        peak = f"{gb(r['peak'])} ({r['batch']} x {r['seq_len']})" if r["peak"] is not None else "n/a"
        lines.append(f"| {row['size']} | {row['optimizer']} | {gb(r['params'])} | {gb(r['grads'])} | {gb(r['state'])} "
                     f"| {gb(r['params'] + r['state'])} | {r['estimate_gb']:.4g} GB | {peak} |")
    return lines


def model_section(rows):
    lines = ["## Training: bf16, torch.compile, one step = forward + backward + optimizer step", "",
             "ours: model.py + compiled SCALE; HF: LlamaForCausalLM (sdpa, eager) + fused AdamW on the same batch, "
             f"stepped in turn with ours; MFU against model.PEAK_BF16_FLOPS (dense bf16); LOSS_CHUNKS "
             f"{', '.join(sorted({str(row['loss_chunks']) for row in rows}))}; peak memory: one step's, each model's "
             "own.", "", *bench.MODEL_TABLE_HEAD]
    notes = []
    for row in rows:
        if status(row):
            lines.append(f"| {row['size']} | {cell(status(row))} | {row['batch']} | | | | | |")
            continue
        r = row["result"]
        lines += bench.model_table_rows(row["size"], r["rows"], r["seq_len"])
        notes += r["notes"]
    return lines + ([""] + notes if notes else [])


def training_step_ms(model_rows):
    """The model part's rows -> {size: ms of our training step (forward, backward, SCALE step)}."""
    step_ms = {}
    for row in model_rows:
        if not status(row):
            ours = row["result"]["rows"][bench.OURS]
            step_ms[row["size"]] = 1e3 * ours["batch_size"] * row["result"]["seq_len"] / ours["tokens_per_s"]
    return step_ms


def optimizer_section(rows, model_rows=()):
    """The optimizer part's table; where the model part measured the size, stochastic rounding's extra time is
    also given as a share of our training step there (its batch)."""
    step_ms = training_step_ms(model_rows)
    lines = ["## Optimizer step: compiled SCALE against fused AdamW, median of steps in turn", "",
             "| shape | params | AdamW step | SCALE step | SCALE / AdamW | SCALE's first step (compile) "
             "| with stochastic rounding (bf16): vs nearest, its extra time in a training step |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        if status(row):
            lines.append(f"| {row['size']} | {row['dtype']} | {cell(status(row))} | | | | |")
            continue
        r = row["result"]
        sr = ""
        if r["sr_ms"] is not None:
            sr = f"{r['sr_ms']:.2f} ms ({r['sr_ms'] / r['scale_ms']:.2f}x nearest)"
            if row["size"] in step_ms:
                sr += f", {(r['sr_ms'] - r['scale_ms']) / step_ms[row['size']]:+.2%} of a training step"
        lines.append(f"| {row['size']} | {row['dtype']} | {r['adamw_ms']:.2f} ms | {r['scale_ms']:.2f} ms | "
                     f"{r['scale_ms'] / r['adamw_ms']:.2f}x | {r['first_scale_step_s']:.1f} s | {sr} |")
    return lines


def report(args, machine, done, started):
    """The markdown report: the machine, then each part's table (or why it is missing)."""
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# GPU check{' (dry run: tiny shapes, no compile)' if args.tiny else ''}", "", *machine,
             f"- {date}, git commit {train.git_commit()}",
             f"- `{' '.join(['python -m tools.gpu_check', *args.argv])}`: {time.time() - started:.0f} s", ""]
    for part in (p for p in PARTS if p in args.parts):
        if part not in done:
            lines += [f"## {part}: not run, out of time", ""]
            continue
        rows, problem = done[part]
        if part == "tests":
            lines += tests_section(rows)
        elif part == "memory":
            lines += memory_section(rows, args.device == "cuda")
        elif part == "model":
            lines += model_section(rows)
        else:  # with the model part's rows, for stochastic rounding's share of a training step
            lines += optimizer_section(rows, done.get("model", ([], ""))[0])
        lines += ["", f"{part}: {problem}"] if problem else []
        lines.append("")
    return "\n".join(lines)


def child_command(part, args, deadline, rows):
    return [sys.executable, "-m", "tools.gpu_check", "--part", part, "--deadline", str(deadline),
            "--rows", rows, "--device", args.device, *(["--tiny"] if args.tiny else []),
            *(["--sizes", *args.sizes] if args.sizes else []),
            *(["--batch_size", str(args.batch_size)] if args.batch_size else []),
            *(["--loss_chunks", str(args.loss_chunks)] if args.loss_chunks else [])]


def run_parts(args, started, out, tmp, machine):
    """Run the parts: tests and memory side by side, then model, then optimizer; after each, the report is
    rewritten to out/gpu_check.md."""
    done = {}
    phases = [[p for p in ("tests", "memory") if p in args.parts]] + [[p] for p in ("model", "optimizer")
                                                                      if p in args.parts]
    for phase in (ph for ph in phases if ph):
        running = {}
        for part in phase:
            deadline = min(time.time() + LIMIT_S[part], started + args.budget)
            if deadline - time.time() < 15:
                continue
            rows = os.path.join(tmp, f"{part}.jsonl")
            log = os.path.join(out, f"gpu_check_{part}.log")
            if part == "tests":
                child = start_child(tests_command(args.tiny), log, env=dict(GPU_CHECK_TESTS=rows))
            else:
                child = start_child(child_command(part, args, deadline, rows), log)
            print(f"[{part}] started, {deadline - time.time():.0f} s at most; log: {log}", flush=True)
            running[part] = child, deadline, rows, time.time()
        for part, (child, deadline, rows, t0) in running.items():
            code = wait_child(child, deadline)
            records = read_jsonl(rows)
            if part == "tests":  # pytest's exit code 1: some tests failed, as the table shows
                records = outcomes_of_tests(records)
                problem = "" if code in (0, 1) else ("stopped: out of time" if code is None else
                                                     f"pytest exited with {code}: see its log")
            else:
                problem = "" if code == 0 else ("stopped: out of time; the rows it had not reached are missing"
                                                if code is None else f"exited with {code}: see its log")
            done[part] = records, problem
            print(f"[{part}] done in {time.time() - t0:.0f} s{'; ' + problem if problem else ''}", flush=True)
            write_report(out, report(args, machine, done, started))
    return done


def check_out(out):
    """Exit in one line if OUT is not a directory, or holds a report or log by this tool's names that it did not
    write (its report's first line is "# GPU check"; a log's, "$ " and the command of a part, naming gpu_check)."""
    if os.path.lexists(out) and not os.path.isdir(out):
        sys.exit(f"error: OUT={out} is not a directory; set OUT to a directory")
    for path in (os.path.join(out, name) for name in ["gpu_check.md", *(f"gpu_check_{p}.log" for p in PARTS)]):
        if not os.path.lexists(path):
            continue
        first = open(path, errors="replace").readline() if os.path.isfile(path) else ""
        if not (first.startswith("# GPU check") or first.startswith("$ ") and "gpu_check" in first):
            sys.exit(f"error: {path} was not written by tools.gpu_check; move it, or set OUT to another directory")


def write_report(out, text):
    write_atomic(os.path.join(out, "gpu_check.md"), lambda f: f.write((text + "\n").encode()))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser("python -m tools.gpu_check", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS, help="default: all")
    p.add_argument("--budget", type=float, default=440, help="seconds for all parts (default 440)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: the dry run, with --tiny")
    p.add_argument("--tiny", action="store_true", help="tiny shapes, 1-2 steps, no compile: checks the code paths")
    p.add_argument("--sizes", nargs="+", choices=[r[0] for r in bench.GPU_RUNS], help="only these model sizes")
    p.add_argument("--batch_size", type=int, help="the model part's batch size (default: bench.GPU_RUNS')")
    p.add_argument("--loss_chunks", type=int, help="model.LOSS_CHUNKS in the model part (default: model.py's)")
    p.add_argument("--part", choices=PARTS[1:], help=argparse.SUPPRESS)  # internal: run one part, in a child
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    p.add_argument("--rows", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = argv
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU here; for a dry run on CPU: python -m tools.gpu_check --device cpu --tiny")
    if args.device == "cpu" and not args.tiny:
        sys.exit("error: --device cpu is the dry run: add --tiny")
    if args.part:
        return run_part(args)
    started = time.time()
    out = os.environ.get("OUT") or tempfile.mkdtemp(prefix="gpu_check_")
    check_out(out)
    os.makedirs(out, exist_ok=True)
    machine = device_lines(args.device == "cuda")
    with tempfile.TemporaryDirectory(prefix="gpu_check_rows_") as tmp:
        done = run_parts(args, started, out, tmp, machine)
    text = report(args, machine, done, started)
    write_report(out, text)
    print(f"\n{text}", flush=True)


if __name__ == "__main__":
    main()
