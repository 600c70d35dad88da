"""
Pretrain LLaMA on C4 with SCALE, AdamW, Muon or SGD. The same file runs one process or many, on one machine or more:

    python train.py configs/tiny.py
    python train.py configs/llama_60m.py --optimizer=adamw --lr=1e-3
    torchrun --standalone --nproc_per_node=8 train.py configs/llama_1b.py
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:PORT train.py ... --fsdp=True

The config is config.py's DEFAULTS, then each config file, then each --key=value (--help lists them). Many processes
run DDP, or with fsdp=True FSDP2. resume=True continues from out_dir/ckpt.pt (the same file for any ranks), or starts;
a resumed run ends bit for bit as an uninterrupted one. Ctrl-C or SIGTERM saves a checkpoint and says how to resume.
"""
import gc
import math
import os
import random
import shlex
import signal
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import (CKPT, Log, check_resume, claim_out_dir, git_commit, latest_checkpoint, load_checkpoint,
                        read_checkpoint, save_checkpoint, state_tensors)
from config import help_text, load_config
from data import TrainBatches, bundled_source, val_batches
from model import LLaMA, LLaMAConfig, peak_flops
from prepare_c4 import prepare_once
from scale import SCALE, local, scale_param_groups


# -----------------------------------------------------------------------------
# optimizers: --optimizer=NAME calls NAME(model, cfg), which returns an optimizer or a list of them (add yours here
# and its name to config.py's optimizer choices); and the lr schedule

def scale(model, cfg):
    stochastic = cfg.dtype == "bfloat16" and cfg.bf16 == "stochastic"
    return SCALE(scale_param_groups(model), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                 adam_lr=cfg.adam_lr or None, momentum_roles=tuple(cfg.momentum_roles.split(",")),
                 compile=cfg.compile, bf16_rounding="stochastic" if stochastic else "nearest", seed=cfg.seed)


def adamw(model, cfg, params=None):
    params = model.parameters() if params is None else params
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, fused=True)


def muon(model, cfg):
    """Muon on the blocks' hidden matrices, AdamW on the rest; match_rms_adamw lets one lr serve both."""
    hidden = [p for p in model.layers.parameters() if p.ndim == 2]
    rest = [p for p in model.parameters() if all(p is not h for h in hidden)]
    return [torch.optim.Muon(hidden, lr=cfg.lr, weight_decay=cfg.weight_decay, adjust_lr_fn="match_rms_adamw"),
            adamw(model, cfg, rest)]


def sgd(model, cfg):
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def make_optimizers(model, cfg):
    """The run's optimizers, a list; each group keeps its peak lr in group["initial_lr"] for the schedule."""
    optimizers = globals()[cfg.optimizer](model, cfg)
    optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
    for group in (g for opt in optimizers for g in opt.param_groups):
        group["initial_lr"] = group["lr"]
    return optimizers


def lr_factor(step, warmup_steps, max_steps, min_lr_ratio):
    """The lr of optimizer step `step` (0-based) over the peak: linear warmup (step+1)/warmup_steps, as nanoGPT, then
    cosine down to min_lr_ratio at max_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_param_dtypes(model, dtype, bf16):
    """dtype=bfloat16: the model in bf16 and, unless bf16="paper", its 1-D params (norm gains, whose updates are below
    bf16's spacing at 1.0) back in fp32, so their optimizer state is fp32 too. -> model."""
    if dtype == "bfloat16":
        model.to(torch.bfloat16)
        for p in model.parameters():
            if p.ndim < 2 and bf16 != "paper":
                p.data = p.data.float()
    return model


# -----------------------------------------------------------------------------
# the parts of a training run

def init_distributed(fsdp=False):
    """-> (rank, world_size, device): a process group under torchrun, or for FSDP one of this process; the device is
    cuda:LOCAL_RANK, with fp32 matmuls in TF32, or the CPU."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{os.environ['LOCAL_RANK'] if 'RANK' in os.environ else 0}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # the API that keeps torch's legacy and new TF32 flags consistent
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if cuda else "gloo")
    elif fsdp:
        dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    return rank, world_size, device


def autocast_for(dtype, device):
    """dtype=mixed: bf16 autocast over fp32 params; other dtypes compute in the params' dtype."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "mixed" else nullcontext()


def shard_model(model, cfg):
    """FSDP2, in place: fully_shard each block, then the root (embedding, final norm, lm_head). dtype=mixed keeps fp32
    params and computes in bf16 by FSDP's MixedPrecisionPolicy instead of autocast."""
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cfg.dtype == "mixed"
              else MixedPrecisionPolicy())
    weights = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    embedding = model.tok_embeddings.weight  # by columns: SCALE's norms over the vocabulary then stay on each rank
    if embedding.shape[1] % dist.get_world_size():
        raise ValueError(f"fsdp=True shards the embedding by its {embedding.shape[1]} columns (dim), which "
                         f"{dist.get_world_size()} ranks do not divide; use a dim divisible by the number of ranks")
    for module in [*model.layers, model]:
        # FSDP all-gathers a group's params in one buffer of one dtype: submodules of another dtype (fp32 norm gains
        # among bf16 weights) are a group of their own
        apart = [m for m in module.modules() if m is not module and any(
            p.dtype != weights and not isinstance(p, DTensor) for p in m.parameters(recurse=False))]
        if apart:
            fully_shard(apart, mp_policy=policy)
        fully_shard(module, mp_policy=policy, shard_placement_fn=lambda p: Shard(1) if p is embedding else None)


def train_step(model, batches, step, device, autocast, world_size, fsdp_root=None):
    """Forward and backward over grad_accum micro-batches -> the step's mean loss over all ranks, a 0-D tensor on
    device. fsdp_root: the FSDP-sharded model under model, if any."""
    loss_sum = torch.zeros((), device=device)
    for micro in range(batches.grad_accum):
        x, y = (to_device(t, device) for t in batches.get(step, micro))
        last = micro == batches.grad_accum - 1  # only the last micro-step reduces the gradients over ranks
        if fsdp_root is not None:
            fsdp_root.set_requires_gradient_sync(last)
        with model.no_sync() if isinstance(model, DDP) and not last else nullcontext():
            with autocast:
                _, loss = model(x, y)
            (loss / batches.grad_accum).backward()
        loss_sum += loss.detach()
    if world_size > 1:
        dist.all_reduce(loss_sum)
    return loss_sum / (batches.grad_accum * batches.world_size)


def to_device(t, device):
    """A CPU batch on device; to a GPU from pinned memory, so the host does not wait."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


@torch.no_grad()
def evaluate(model, cfg, rank, world_size, device, autocast, log, split="val"):
    """-> mean per-token loss over a split's first eval_tokens tokens, its perplexity, and the seconds it took; the
    windows are split over ranks. A long eval logs its progress every 10 s."""
    t0 = last_report = time.time()
    batches = iter(val_batches(cfg.data_dir, cfg.seq_len, cfg.batch_size, cfg.eval_tokens, rank, world_size, split))
    total = torch.zeros(2, dtype=torch.float64, device=device)  # sum of token losses, tokens
    while True:
        batch = next(batches, None)
        if isinstance(model, FSDPModule):
            # every forward all-gathers the weights, so every rank runs as many: one without a batch left runs an
            # uncounted one of zeros until none has one (ranks differ by at most one batch)
            left = torch.tensor(batch is not None, dtype=torch.int32, device=device)
            dist.all_reduce(left, op=dist.ReduceOp.MAX)
            if not left:
                break
        elif batch is None:
            break
        x, y = batch if batch is not None else (torch.zeros(1, cfg.seq_len, dtype=torch.long),) * 2
        with autocast:
            _, loss = model(to_device(x, device), to_device(y, device))
        if batch is not None:
            total[0] += loss.double() * y.numel()
            total[1] += y.numel()
        if time.time() - last_report > 10:
            done = total[1].item() * world_size  # about: ranks hold the same number of windows, give or take one
            log(f"  evaluating: about {done:,.0f} of {cfg.eval_tokens:,} tokens, {time.time() - t0:.0f} s")
            last_report = time.time()
    if world_size > 1:
        dist.all_reduce(total)
    loss = total[0] / total[1]
    return loss.item(), loss.exp().item(), time.time() - t0


def check_losses(losses, first_step, saved, ckpt_path):
    """The losses (0-D tensors) of steps first_step+1, ... -> floats, after one wait for the device; raises
    FloatingPointError at the first that is not finite."""
    values = torch.stack(losses).tolist() if losses else []
    for step, loss in enumerate(values, first_step + 1):
        if not math.isfinite(loss):
            raise diverged(f"loss is {loss}", step, saved, ckpt_path)
    return values


def diverged(what, step, saved, ckpt_path):
    kept = "no checkpoint was written" if saved is None else f"{ckpt_path} (step {saved}) is the last good checkpoint"
    return FloatingPointError(f"{what} at step {step}: training diverged, stopped; {kept}. Lower lr or set grad_clip")


def state_bytes(optimizers):
    return sum(t.numel() * t.element_size() for t in state_tensors(opt.state for opt in optimizers))


def most_on_a_rank(value, world_size, device, op=dist.ReduceOp.MAX):
    """A Python number's maximum over ranks (op=MIN: minimum), every rank calling."""
    value = torch.tensor(value, device=device)
    if world_size > 1:
        dist.all_reduce(value, op=op)
    return value.item()


def bytes_held(tensors, world_size, device):
    """The most bytes of these tensors that any rank holds: of its local shards under FSDP, of all under DDP."""
    return most_on_a_rank(sum(t.numel() * t.element_size() for t in local(tensors)), world_size, device)


def check_inputs(cfg, rank=0, world_size=1):
    """Check a config's schedule, data and model shape before anything runs -> (TrainBatches, LLaMAConfig); a bundled
    sample's data_dir (data/kjv_byte) is prepared on first use. Raises ValueError (DataError is one), one line."""
    if cfg.warmup_steps > cfg.max_steps:
        raise ValueError(f"warmup_steps={cfg.warmup_steps} is more than max_steps={cfg.max_steps}: the lr would never "
                         f"reach its peak; pass --warmup_steps={cfg.max_steps // 10} (10%, as the paper) or fewer")
    source = bundled_source(cfg.data_dir)
    if source:  # runs and ranks at once take turns (on one host; across hosts if the filesystem's flock works)
        prepare_once(cfg.data_dir, source)
    batches = TrainBatches(cfg.data_dir, cfg.seq_len, cfg.batch_size, cfg.total_batch_size, rank, world_size, cfg.seed)
    val_batches(cfg.data_dir, cfg.seq_len, cfg.batch_size, cfg.eval_tokens, rank, world_size)  # checks when called
    return batches, LLaMAConfig.from_config(vars(cfg), batches.vocab_size)


class StopSignals:
    """SIGINT and SIGTERM (Ctrl-C; a cluster's preemption) ask the loop to stop at the next step where the ranks agree,
    save and exit 128 + the signal. A second signal 1 s or more later exits at once (sooner, it is the same
    one: torchrun forwards to its ranks the Ctrl-C they also got)."""

    def __init__(self):
        self.signum, self.at = 0, 0.0
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) is not signal.SIG_IGN:  # as nohup and a shell's background jobs leave SIGINT
                signal.signal(signum, self.handle)

    def handle(self, signum, frame):
        if not self.signum:
            self.signum, self.at = signum, time.time()
        elif time.time() - self.at >= 1:
            print(f"{signal.Signals(signum).name} again: exiting without saving", file=sys.stderr, flush=True)
            os._exit(128 + signum)


# -----------------------------------------------------------------------------
# training

def train(cfg):
    """Run the config's training -> None, or (signal number, step, checkpoint path) if a signal stopped it."""
    rank, world_size, device = init_distributed(cfg.fsdp)
    master = rank == 0
    autocast = autocast_for(cfg.dtype, device) if not cfg.fsdp else nullcontext()  # FSDP: its MixedPrecisionPolicy
    batches, model_cfg = check_inputs(cfg, rank, world_size)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    with device:
        model = LLaMA(model_cfg)
    set_param_dtypes(model, cfg.dtype, cfg.bf16)
    if cfg.fsdp:
        shard_model(model, cfg)  # before the optimizers, which then hold the sharded params
    optimizers = make_optimizers(model, cfg)
    if master:  # the inputs checked
        print("config:\n" + "\n".join(f"  {k} = {v!r}" for k, v in vars(cfg).items()), flush=True)

    with claim_out_dir(cfg, master):
        ckpt_path = os.path.join(cfg.out_dir, CKPT)
        resume_path = latest_checkpoint(cfg.out_dir) if cfg.resume else None
        start_step, resumed = 0, resume_path is not None
        if resumed:
            ckpt = read_checkpoint(resume_path)
            changed = check_resume(ckpt, resume_path, cfg, batches.vocab_size)
            start_step = ckpt["step"]
            if start_step == cfg.max_steps:
                if master:
                    print(f"{resume_path} is at step {start_step} = max_steps: the run is finished; raise --max_steps "
                          "to train it further", flush=True)
                return
            load_checkpoint(ckpt, resume_path, model, optimizers)
            del ckpt
        log = Log(cfg, master, start_step if resumed else None)
        if resumed:
            changes = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()) or "nothing"
            log(f"resuming from {resume_path} at step {start_step}; changed since the checkpoint: {changes}",
                event="resume", step=start_step, changed={k: list(v) for k, v in changed.items()})
        elif cfg.resume:
            log(f"resume=True but there is no {ckpt_path} yet: starting from scratch")
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # of the whole model
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        held = bytes_held(model.parameters(), world_size, device)
        sharded = f"; fsdp: at most {held / 2**20:,.1f} MiB on a rank" if cfg.fsdp else ""
        log(f"{model.num_params():,} parameters ({param_bytes / 2**20:,.1f} MiB{sharded}), vocab {batches.vocab_size}, "
            f"{device}; total_batch_size {cfg.total_batch_size} = grad_accum {batches.grad_accum} x batch_size "
            f"{cfg.batch_size} x world_size {world_size}", event="start", step=start_step, config=vars(cfg),
            params=model.num_params(), param_bytes=param_bytes, rank_param_bytes=held, world_size=world_size,
            device=device_name, torch=torch.__version__, git_commit=git_commit())

        train_model = torch.compile(model) if cfg.compile else model
        if world_size > 1 and not cfg.fsdp:
            train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None)
        tokens_per_step = cfg.total_batch_size * cfg.seq_len
        peak = peak_flops(device_name)  # None for a device it does not know, as the CPU
        sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
        saved = start_step if resumed else None
        losses, logged_step, train_seconds, t0 = [], start_step, 0.0, time.time()  # the steps since the last log line
        signum, stop = 0, StopSignals()
        for step in range(start_step, cfg.max_steps + 1):
            # evaluate and save the weights after `step` optimizer steps (a resumed run's first step: the run that
            # saved it did; a signal: save at once); their time is not training time
            last_step = step == cfg.max_steps
            first = resumed and step == start_step
            evaluating = (step % cfg.eval_every == 0 and not signum or last_step) and not first
            saving = step > start_step and (step % cfg.ckpt_every == 0 or last_step or signum)
            if evaluating or saving:
                sync()
                train_seconds += time.time() - t0
                if evaluating:  # the eager model: no recompiles for no_grad or the shorter last batch
                    val_loss, val_ppl, seconds = evaluate(model, cfg, rank, world_size, device, autocast, log)
                    log(f"step {step} | val loss {val_loss:.4f} | val ppl {val_ppl:.2f} | eval {seconds:.1f} s",
                        event="eval", step=step, tokens=step * tokens_per_step, val_loss=val_loss, val_ppl=val_ppl,
                        eval_seconds=seconds)
                if saving:  # never over the last good checkpoint: finite losses can come with non-finite weights
                    check_losses(losses, logged_step, saved, ckpt_path)
                    finite = all(torch.isfinite(p).all() for p in local(model.parameters()))
                    if not most_on_a_rank(finite, world_size, device, op=dist.ReduceOp.MIN):
                        raise diverged("the weights are not finite", step, saved, ckpt_path)
                    save_checkpoint(cfg.out_dir, model, optimizers, step, cfg, batches, master)
                    saved = step
                t0 = time.time()
            if last_step:
                break
            if signum:
                return signum, step, ckpt_path  # main prints how to resume

            # one optimizer step, from `step` to step + 1; its loss stays on the device until the next log line
            for group in (g for opt in optimizers for g in opt.param_groups):
                group["lr"] = group["initial_lr"] * lr_factor(step, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
            losses.append(train_step(train_model, batches, step, device, autocast, world_size,
                                     model if cfg.fsdp else None))
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            for opt in optimizers:
                opt.step()
            done = step + 1  # optimizer steps taken
            if step == start_step:  # the optimizer state exists now, and the grads still do
                grads, state = [p.grad for p in model.parameters() if p.grad is not None], [o.state for o in optimizers]
                memory = {f"rank_{name}_bytes": bytes_held(tensors, world_size, device) for name, tensors in (
                    ("param", model.parameters()), ("grad", grads), ("state", state_tensors(state)))}
                who = "" if world_size == 1 else f" (the most any of the {world_size} ranks holds)"
                log(f"memory{who}: params {memory['rank_param_bytes']:,}, grads {memory['rank_grad_bytes']:,}, "
                    f"optimizer state {memory['rank_state_bytes']:,} bytes (AdamW's: "
                    f"{2 * memory['rank_param_bytes']:,})", event="memory", step=done, **memory)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)

            if done % cfg.log_every == 0 or done == cfg.max_steps:  # wait for the device once per log line
                loss = check_losses(losses, logged_step, saved, ckpt_path)[-1]
                train_seconds += time.time() - t0
                tokens_per_s = (done - logged_step) * tokens_per_step / train_seconds
                mfu = model.flops_per_token(cfg.seq_len) * tokens_per_s / (peak * world_size) if peak else None
                peak_mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
                lr = optimizers[0].param_groups[0]["lr"]
                text = f"step {done} | loss {loss:.4f} | lr {lr:.2e} | {tokens_per_s:,.0f} tok/s"
                text += f" | mfu {mfu:.1%}" if mfu else ""
                text += f" | peak mem {peak_mem / 2**30:.2f} GiB" if peak_mem else ""
                log(text, event="train", step=done, tokens=done * tokens_per_step, loss=loss, lr=lr, mfu=mfu,
                    tokens_per_s=tokens_per_s, peak_mem_bytes=peak_mem, opt_state_bytes=state_bytes(optimizers))
                losses, logged_step, train_seconds, t0 = [], done, 0.0, time.time()
            if world_size == 1:
                signum = stop.signum
            elif done % cfg.log_every == 0:  # the ranks agree on the signal any got, where they wait anyway
                signum = most_on_a_rank(stop.signum, world_size, device)


def main(argv):
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    master = os.environ.get("RANK", "0") == "0"
    try:
        if {"-h", "--help"} & set(argv):  # with the values of the config files and keys given with it
            given = [arg for arg in argv if arg not in ("-h", "--help")]
            print(__doc__ + f"\nkeys, {'values of ' + ' '.join(given) if given else 'defaults'} and allowed values:\n"
                  + help_text(load_config(given)))
            return
        stopped = train(load_config(argv))
        if stopped:  # by a signal
            signum, step, path = stopped
            if master:
                launcher = "torchrun [its options] train.py" if "RANK" in os.environ else "python train.py"
                argv = [a for a in argv if not a.startswith(("--resume=", "--overwrite="))] + ["--resume=True"]
                print(f"{signal.Signals(signum).name}: stopped at step {step}, saved {path}; resume with: {launcher} "
                      f"{shlex.join(argv)}", flush=True)
            sys.exit(128 + signum)
    except (ValueError, FloatingPointError) as e:  # bad input (DataError is a ValueError) or divergence
        sys.exit(f"error: {e}" if master else 1)  # from rank 0
    except KeyboardInterrupt:  # before the loop, which saves
        print("interrupted before the first step: nothing was saved", file=sys.stderr)
        sys.exit(130)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)  # None: a handler set from C
        if dist.is_initialized():
            gc.collect()  # FSDP's modules hold the process group in cycles: free them while Python still runs
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
