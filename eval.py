"""
Evaluate a train.py checkpoint on any prepared data dir (prepare_c4.py): the mean per-token loss and its perplexity,
computed by train.py's own evaluate over the first ceil(eval_tokens / seq_len) windows of a split.

    python eval.py --ckpt out/tiny/ckpt.pt                                   # the run's val windows, as it logged
    python eval.py --ckpt out/tiny/ckpt.pt --data_dir data/other --split train --eval_tokens all
    torchrun --standalone --nproc_per_node=8 eval.py --ckpt out/llama_1b/ckpt.pt

data_dir, eval_tokens and batch_size default to the run's; seq_len is always the run's. With those and the run's
number of processes, the loss is the val_loss train.py logged for that step (log.jsonl), to the last digit. Each
batch's mean rounds in fp32, so another batch_size or number of processes can change the last few digits.
"""
import os
import sys
from types import SimpleNamespace

import torch.distributed as dist

from data import Windows, check_same_data, load_meta
from sample import ArgumentParser, load_model, pick_device
from train import autocast_for, evaluate, init_distributed


def eval_tokens_of(text, data_dir, split, seq_len):
    """--eval_tokens: a positive int, or "all" (every whole window of the split) -> an int."""
    if text == "all":
        windows = Windows(data_dir, load_meta(data_dir), split, seq_len)  # DataError if it has no window
        return windows.count * seq_len
    if not text.isdigit() or int(text) == 0:
        raise ValueError(f"--eval_tokens must be a positive integer or all, got {text!r}")
    return int(text)


def check_data(info, data_dir):
    """Refuse a data dir tokenized otherwise than the checkpoint's data (ValueError, one line)."""
    meta, tokenizer, vocab = load_meta(data_dir), info["tokenizer"], info["vocab_size"]
    if meta["vocab_size"] != vocab or tokenizer not in (None, meta["tokenizer"]):
        trained = f"{tokenizer} tokens (vocab {vocab})" if tokenizer else f"a vocabulary of {vocab}"
        raise ValueError(f"{data_dir} is tokenized with {meta['tokenizer']} (vocab {meta['vocab_size']}) but "
                         f"{info['path']} was trained on {trained}; prepare it with prepare_c4.py --tokenizer "
                         f"{tokenizer or 'NAME'} (that of its training data)")


def main(argv=None):
    p = ArgumentParser(prog="eval.py", description="Evaluate a train.py checkpoint on a prepared data dir.")
    p.add_argument("--ckpt", required=True, help="a train.py checkpoint, e.g. out/tiny/ckpt.pt, or a run's out_dir")
    p.add_argument("--data_dir", help="a prepared data dir (default: the run's)")
    p.add_argument("--split", default="val", choices=("val", "train"), help="which split's windows (default: val)")
    p.add_argument("--eval_tokens", help="tokens to evaluate, or all (default: the run's eval_tokens)")
    p.add_argument("--batch_size", type=int, help="windows per forward (default: the run's batch_size)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda if available, else cpu); not under "
                                    "torchrun, where each process takes cuda:LOCAL_RANK, or the CPU without GPUs")
    master = os.environ.get("RANK", "0") == "0"
    try:
        args = p.parse_args(argv)
        if args.batch_size is not None and args.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
        if "RANK" in os.environ and args.device:
            raise ValueError("under torchrun each process takes cuda:LOCAL_RANK (or the CPU without GPUs): "
                             "drop --device")
        rank, world_size, device = init_distributed()  # as train.py: the same device and TF32, the same numbers
        device = pick_device(args.device) if args.device else device
        model, info = load_model(args.ckpt, device)
        run = info["config"]
        data_dir = args.data_dir or run["data_dir"]
        check_data(info, data_dir)
        if not args.data_dir:  # the run's: still the data it was trained on?
            check_same_data(info["data"], data_dir, info["path"])
        cfg = SimpleNamespace(data_dir=data_dir, seq_len=run["seq_len"],
                              batch_size=args.batch_size or run["batch_size"],
                              eval_tokens=eval_tokens_of(args.eval_tokens, data_dir, args.split, run["seq_len"])
                              if args.eval_tokens else run["eval_tokens"])
        log = print if master else lambda text: None
        loss, ppl, seconds = evaluate(model, cfg, rank, world_size, device, autocast_for(run["dtype"], device), log,
                                      args.split)
    except ValueError as e:  # bad input (DataError is a ValueError)
        sys.exit(f"error: {e}" if master else 1)  # one line, from rank 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    n_windows = -(-cfg.eval_tokens // cfg.seq_len)
    log(f"{info['path']} (step {info['step']}) on {data_dir} {args.split}: {n_windows * cfg.seq_len:,} tokens "
        f"({n_windows:,} windows of {cfg.seq_len}), batch_size {cfg.batch_size}, {world_size} process(es), "
        f"{seconds:.1f} s")
    log(f"loss {loss!r} | ppl {ppl!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
