"""A run's out_dir: its lock, its log and its checkpoints. A checkpoint holds full (unsharded) state dicts keyed by
parameter name, as torch.distributed.checkpoint.state_dict makes them, so one file serves 1 process, DDP and FSDP on
any number of ranks; plain tensors and Python values only, so it loads with weights_only=True."""
import fcntl
import json
import os
import random
import subprocess
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from config import DEFAULTS
from data import check_same_data, data_identity, write_atomic
from model import SHAPE

CKPT, PREV_CKPT, LOG = "ckpt.pt", "ckpt_prev.pt", "log.jsonl"  # in out_dir
CKPT_KEYS = ("step", "config", "model", "optimizers", "rng")  # what every checkpoint holds
# a resumed run keeps these from its checkpoint and takes every other key from its command line
KEPT_ON_RESUME = SHAPE + ("optimizer", "momentum_roles", "dtype", "bf16", "seq_len", "total_batch_size", "seed")


def save_checkpoint(out_dir, model, optimizers, step, cfg, batches, master):
    """out_dir/ckpt.pt, everything a resume, sample.py or an export needs; the one it replaces is kept as ckpt_prev.pt.
    Every rank calls it (FSDP gathers the full state), rank 0 writes."""
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=full)
    # an optimizer without state tensors (SGD without momentum) is saved as it is: torch.distributed.checkpoint
    # needs a tensor to place the state on
    states = [get_optimizer_state_dict(model, opt, options=full) if state_tensors([opt.state]) else opt.state_dict()
              for opt in optimizers]
    if master:
        name, keys, *rest = np.random.get_state()
        cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
        rng = dict(torch=torch.get_rng_state(), cuda=cuda, numpy=[name, keys.tolist(), *rest], python=random.getstate())
        ckpt = dict(model=weights, optimizers=states, step=step, config=vars(cfg), vocab_size=batches.vocab_size,
                    tokenizer=batches.meta["tokenizer"], eot_id=batches.meta["eot_id"], rng=rng,
                    data=data_identity(batches.meta))
        write_atomic(os.path.join(out_dir, CKPT), lambda f: torch.save(ckpt, f), os.path.join(out_dir, PREV_CKPT))


def latest_checkpoint(out_dir):
    """out_dir/ckpt.pt, or ckpt_prev.pt if a save was cut off between its two renames, or None."""
    return next((p for p in (os.path.join(out_dir, n) for n in (CKPT, PREV_CKPT)) if os.path.exists(p)), None)


def read_checkpoint(path, resuming=True):
    """torch.load a checkpoint -> dict; one that cannot be read or is not a checkpoint is a ValueError that says so and
    what to do (resuming=False: for sample.py, eval.py, export_hf.py), then torch's detail on a second line."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        missing = [key for key in CKPT_KEYS if not isinstance(ckpt, dict) or key not in ckpt]
        if not missing:
            return ckpt
        what, why = "is not a train.py checkpoint", f"it has no {', '.join(map(repr, missing))}"
    except Exception as e:  # truncated, empty, not a checkpoint: torch raises several kinds
        with open(path, "rb") as f:
            head = f.read(4)
        what = "is damaged and cannot be read" if head in (b"PK\x03\x04", b"") else "is not a train.py checkpoint"
        why = {b"PK\x03\x04": f"cut short or corrupted; {type(e).__name__}: {str(e).partition(chr(10))[0]}",
               b"": "it is empty"}.get(head, "not a file torch.save writes")  # PK: a zip, as torch.save writes
    prev = os.path.join(os.path.dirname(path), PREV_CKPT)
    if os.path.basename(path) == CKPT and os.path.exists(prev):  # the run's own, which keeps the one before
        advice = (f"move it away and re-run to resume from the previous checkpoint, {prev}" if resuming else
                  f"use the previous checkpoint, {prev}, instead")
    elif resuming:
        advice = "no earlier checkpoint is kept: start over with --overwrite=True or another --out_dir"
    elif os.path.basename(path) not in (CKPT, PREV_CKPT):
        advice = "pass a train.py checkpoint: a run's ckpt.pt, or its out_dir"
    else:
        advice = "no earlier checkpoint is kept next to it: pass another one"
    raise ValueError(f"{path} {what}; {advice}\n  {why}")


def check_resume(ckpt, path, cfg, vocab_size):
    """Refuse a resume that would change a key of KEPT_ON_RESUME -> {key: (saved, now)} of the others it changes."""
    saved = {**DEFAULTS, "bf16": "paper", **ckpt["config"]}  # a key newer than the checkpoint: its default; bf16: paper
    for key in KEPT_ON_RESUME:
        if saved[key] != getattr(cfg, key) and (key != "bf16" or cfg.dtype == "bfloat16"):
            raise ValueError(f"{path} was saved with {key}={saved[key]!r}, the config says {getattr(cfg, key)!r}; "
                             f"a resumed run keeps {key}: resume with --{key}={saved[key]!r}, or start a new run "
                             "with another --out_dir (or --overwrite=True, which deletes this one)")
    if ckpt["vocab_size"] != vocab_size:
        raise ValueError(f"{path} has a vocabulary of {ckpt['vocab_size']} but {cfg.data_dir} has {vocab_size}; "
                         "resume on the data it was trained on, or start a new run with another --out_dir")
    check_same_data(ckpt.get("data"), cfg.data_dir, path)
    if ckpt["step"] > cfg.max_steps:
        raise ValueError(f"{path} is at step {ckpt['step']}, beyond max_steps={cfg.max_steps}; "
                         f"resume with --max_steps={ckpt['step']} or more")
    return {k: (saved[k], v) for k, v in vars(cfg).items() if k != "resume" and saved[k] != v}


def load_checkpoint(ckpt, path, model, optimizers):
    """Restore the optimizer states, weights and RNGs of a checkpoint (every rank; FSDP keeps its shards), keeping the
    param groups' hyperparameters as the current config set them."""
    full = StateDictOptions(full_state_dict=True, strict=False)  # strict=False: SCALE keeps no state for matrices
    try:
        for opt, state in zip(optimizers, ckpt["optimizers"]):
            current = [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
            if state_tensors([state["state"]]):
                init_state(opt)
                set_optimizer_state_dict(model, opt, state, options=full)
            else:
                opt.load_state_dict(state)
            for group, hyper in zip(opt.param_groups, current):
                group.update(hyper)
        set_model_state_dict(model, ckpt["model"], options=full)  # after init_state's step
    except (RuntimeError, KeyError, ValueError) as e:
        raise ValueError(f"{path} does not fit this model.py and train.py; resume with the code it was written by"
                         f"\n  {type(e).__name__}: {str(e).partition(chr(10))[0]}") from None
    rng = ckpt["rng"]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    name, keys, *rest = rng["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    random.setstate(rng["python"])


def state_tensors(states):
    """The tensors of optimizer states ({param: {name: value}} each): momentum buffers, moments; 0-D counters aside."""
    return [v for state in states for s in state.values() for v in s.values() if torch.is_tensor(v) and v.ndim]


def init_state(opt):
    """Give an optimizer without state its state, which torch.distributed.checkpoint loads into, by a step on zero
    grads: step() without a closure, which a user's may not take; the weights, loaded after, undo the step."""
    if not opt.state:
        for p in (p for group in opt.param_groups for p in group["params"]):
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)


def claim_out_dir(cfg, master):
    """Make out_dir this run's -> a context manager: rank 0's out_dir/.lock, locked until the run ends, so a second
    run there fails at once. Without resume=True, another run there is refused, or with overwrite=True deleted."""
    previous = [] if cfg.resume else [n for n in (CKPT, PREV_CKPT, LOG) if os.path.exists(os.path.join(cfg.out_dir, n))]
    if previous and not cfg.overwrite:
        raise ValueError(f"{cfg.out_dir} holds another run ({', '.join(previous)}); continue it with --resume=True, "
                         "delete it and start over with --overwrite=True, or use another --out_dir")
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
    except OSError as e:  # a file of that name, a parent that is a file, no permission
        raise ValueError(f"cannot use out_dir {cfg.out_dir}: {e.strerror}; pass another --out_dir") from None
    if dist.is_initialized():
        dist.barrier()  # every rank has looked before rank 0 writes there
    if not master:
        return nullcontext()
    lock = open(os.path.join(cfg.out_dir, ".lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise ValueError(f"another run is writing to {cfg.out_dir} (it holds {cfg.out_dir}/.lock); wait for it "
                         "to end or stop it, or use another --out_dir") from None
    for name in previous:  # overwrite=True
        os.remove(os.path.join(cfg.out_dir, name))
    if previous:
        print(f"overwrite=True: deleted the previous run's {', '.join(previous)} in {cfg.out_dir}", flush=True)
    return lock


def kept(line, resumed_step):
    """Whether a log.jsonl line stays when a run resumes at resumed_step: whole (a kill may cut the last short), and
    of an earlier step, or of that step but not the start or resume of a run that resumed there before."""
    try:
        record = json.loads(line) if line.endswith("\n") else None
        return record["step"] < resumed_step or record["step"] == resumed_step and record["event"] not in (
            "start", "resume")
    except (ValueError, KeyError, TypeError):
        return False


class Log:
    """Rank 0's console lines, out_dir/log.jsonl records and, with wandb_project, wandb. A resumed run first drops
    the records written after its checkpoint, so the log reads as one run."""

    def __init__(self, cfg, master, resumed_step):
        self.master, self.path, self.wandb = master, os.path.join(cfg.out_dir, LOG), None
        if not master:
            return
        keep = []
        if resumed_step is not None and os.path.exists(self.path):
            with open(self.path) as f:
                keep = [line for line in f if kept(line, resumed_step)]
        write_atomic(self.path, lambda f: f.write("".join(keep).encode()))
        if cfg.wandb_project:
            try:
                import wandb
            except ImportError:
                print("wandb_project is set but wandb is not installed (pip install wandb): logging to log.jsonl only")
            else:
                self.wandb = wandb.init(project=cfg.wandb_project, name=os.path.basename(cfg.out_dir), config=vars(cfg))

    def __call__(self, text, **record):
        if self.master:
            print(text, flush=True)
            if record:
                with open(self.path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            if self.wandb and record.get("event") in ("train", "eval"):
                self.wandb.log({f"{record['event']}/{k}": v for k, v in record.items() if k != "event"},
                               step=record["step"])


def git_commit():
    """The checkout's commit (+ '-dirty' with uncommitted changes to tracked files), or None outside git."""
    cmd = ["git", "describe", "--always", "--dirty", "--abbrev=40", "--exclude=*"]  # --exclude: no tag names
    try:
        p = subprocess.run(cmd, cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True, text=True)
    except OSError:  # no git
        return None
    return p.stdout.strip() if p.returncode == 0 else None
