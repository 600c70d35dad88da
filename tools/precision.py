"""
What each precision costs in loss: train.py on the bundled King James Bible (configs/tiny.py, byte tokens) at a
1B-like low lr, once per precision mode, then a markdown table (out_dir/results.md):

    python -m tools.precision                                   # the 5 modes, seed 0
    python -m tools.precision --modes "bf16 paper,bf16 stochastic" --seeds 0,1,2
    python -m tools.precision -- --max_steps=400 --total_batch_size=8    # shorter: bf16 matmuls are slow on
                                                                   # CPUs without bf16 units (~10x float32 on AVX2)

Modes: float32; dtype=bfloat16 with bf16=paper (the paper's pure bf16), fp32_vectors or stochastic; mixed. Each
runs train.py as its own process into out_dir/<mode>/seed<s> with --resume=True, so a re-run reuses finished runs
(add seeds or modes to a table later). Arguments after `--` go to every train.py run, after the recipe's.
Columns: the final val loss (mean over seeds), its difference from float32's,
the share of the 2-D weight entries (matrices, embedding, lm_head) that one more step, late in the schedule, leaves
unchanged, and the share of RMSNorm gains that moved from their initial 1.0. The late step is train.py's own: the
final checkpoint resumed, in a copy, with --max_steps one more (that step runs at lr ~ min_lr_ratio * lr), and
its weights compared with the checkpoint's.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys

import torch

from checkpoint import CKPT
from data import write_atomic
from tools import compare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the runs: configs/tiny.py's shape and data at the 1B/7B recipe's lrs (warmup 10% and cosine to 0.1, as the paper)
RECIPE = ["--lr=3e-4", "--adam_lr=1e-3", "--max_steps=1000", "--warmup_steps=100", "--min_lr_ratio=0.1",
          "--eval_every=250", "--ckpt_every=1000"]
MODES = {"float32": ["--dtype=float32"],
         "bf16 paper": ["--dtype=bfloat16", "--bf16=paper"],
         "bf16 fp32_vectors": ["--dtype=bfloat16", "--bf16=fp32_vectors"],
         "bf16 stochastic": ["--dtype=bfloat16", "--bf16=stochastic"],
         "mixed": ["--dtype=mixed"]}


def train(args, out_dir):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), os.path.join(ROOT, "configs", "tiny.py"), *args,
           f"--out_dir={out_dir}", "--resume=True"]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def run(mode, seed, out_dir, extra):
    """One mode's run and its late step -> dict(log (compare.read_log's), unchanged, gains_moved) (shares in
    [0, 1]). extra: more train.py arguments."""
    out = os.path.join(out_dir, mode.replace(" ", "_"), f"seed{seed}")
    args = [*RECIPE, *MODES[mode], f"--seed={seed}", *extra]
    train(args, out)
    late = out + "_late_step"
    shutil.rmtree(late, ignore_errors=True)
    shutil.copytree(out, late)
    steps = torch.load(os.path.join(out, CKPT), weights_only=True)["step"]
    train([*args, f"--max_steps={steps + 1}"], late)
    before, after = (torch.load(os.path.join(d, CKPT), weights_only=True)["model"] for d in (out, late))
    matrices = [name for name, t in before.items() if t.ndim == 2]
    unchanged = sum((before[n] == after[n]).sum().item() for n in matrices) / sum(before[n].numel() for n in matrices)
    gains = torch.cat([t.float() for name, t in before.items() if "norm" in name])
    return dict(log=compare.read_log(os.path.join(out, "log.jsonl")), unchanged=unchanged,
                gains_moved=(gains != 1.0).float().mean().item())


def markdown(results, seeds):
    """results: {mode: [run's dict per seed]} -> the table, with float32's row (if run) as the reference: each mode's
    mean against float32's, and with several seeds each seed's run against float32's of that seed (the same init
    and data order). The val loss (mean and std over the seeds) and tokens/s are compare.summarize's, as
    compare.py's table has them."""
    rows = {mode: compare.summarize(mode, [r["log"] for r in runs]) for mode, runs in results.items()}
    base = rows.get("float32")
    head = f"val loss (mean ± std, {len(seeds)} seeds)" if len(seeds) > 1 else "val loss"
    lines = [f"| mode | {head} | vs float32 | 2-D entries a late step leaves unchanged | RMSNorm gains != 1.0 | "
             "tokens/s |", "|---|---|---|---|---|---|"]
    for mode, runs in results.items():
        loss, std = rows[mode]["val_loss"], rows[mode]["val_loss_std"]
        vs = f"{loss / base['val_loss'] - 1:+.2%}" if base else "n/a"
        if base and len(seeds) > 1 and mode != "float32":  # paired: the same seed's init and data order
            paired = (f"{a / b - 1:+.2%}" for a, b in zip(rows[mode]["val_losses"], base["val_losses"]))
            vs += f" (per seed: {', '.join(paired)})"
        lines.append(f"| {mode} | {loss:.4f}{f' ± {std:.4f}' if std is not None else ''} | {vs} | "
                     f"{statistics.mean(r['unchanged'] for r in runs):.1%} | "
                     f"{statistics.mean(r['gains_moved'] for r in runs):.1%} | {rows[mode]['tokens_per_s']:,.0f} |")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser("python -m tools.precision", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from: {', '.join(MODES)}")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--out_dir", default="out/precision")
    args = p.parse_args(argv)
    modes = compare.parse_list(args.modes, "--modes")
    if set(modes) - set(MODES):
        raise ValueError(f"unknown mode(s) {', '.join(sorted(set(modes) - set(MODES)))}; use {', '.join(MODES)}")
    seeds = compare.parse_list(args.seeds, "--seeds", int)
    compare.claim_out_dir(args.out_dir, "tools.precision")
    results = {mode: [run(mode, seed, args.out_dir, extra) for seed in seeds] for mode in modes}
    report = (markdown(results, seeds) + f"\n\nconfigs/tiny.py {' '.join(RECIPE + extra)}; unchanged: the share of the "
              "matrix, embedding and lm_head entries equal before and after one more train.py step resumed from "
              "the final checkpoint (lr ~ 0.1 * lr)")
    write_atomic(os.path.join(args.out_dir, "results.md"), lambda f: f.write((report + "\n").encode()))
    print(report)


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        sys.exit(f"error: {e}")
    except subprocess.CalledProcessError as e:
        sys.exit(f"error: a training run failed (exit {e.returncode}): {' '.join(e.cmd)}")
