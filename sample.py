"""
Read what a trained model writes: sample text from a train.py checkpoint.

    python sample.py --ckpt out/tiny/ckpt.pt --prompt "And God said"
    python sample.py --ckpt out/tiny/ckpt.pt --temperature=0 --max_new_tokens=100     # greedy
    python sample.py --ckpt out/llama_60m --num_samples 5 --top_k 50 --seed 1          # a run's out_dir works too

The prompt is encoded with the checkpoint's own tokenizer as the start of a document (<|endoftext|> + its
tokens, as documents are in the training data); the default prompt is empty: a new document. Each step runs
the model on the last seq_len tokens (the run's context; no KV cache, as nanoGPT). The text is printed to stdout,
a line about the checkpoint to stderr. This file also holds the loader of checkpoints that eval.py and
export_hf.py use.
"""
import argparse
import os
import sys

import torch

from checkpoint import CKPT, latest_checkpoint, read_checkpoint
from model import LLaMA, LLaMAConfig
from prepare_c4 import get_encoding
from train import set_param_dtypes


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one-line error instead of usage + exit
        raise ValueError(f"{message}; see python {self.prog} --help")


# -----------------------------------------------------------------------------
# the checkpoint loader of sample.py, eval.py and export_hf.py

def load_model(path, device):
    """A train.py checkpoint (a file, or a run's out_dir) -> (model, info): the LLaMA on device in eval mode, its
    params in the run's dtypes (set_param_dtypes); info holds the checkpoint's path, step, config (a dict),
    vocab_size, tokenizer, eot_id and data (None where it predates them). Raises ValueError (a line, and maybe one of
    detail) for a missing, damaged or mismatched checkpoint."""
    if os.path.isdir(path):
        found = latest_checkpoint(path)
        if found is None:
            raise ValueError(f"{path} holds no {CKPT}; pass a train.py checkpoint or the out_dir of a run that "
                             "wrote one")
        path = found
    elif not os.path.exists(path):
        raise ValueError(f"no checkpoint at {path}; pass a train.py checkpoint, e.g. --ckpt out/tiny/{CKPT}")
    ckpt = read_checkpoint(path, resuming=False)  # on the CPU: any device wrote it
    cfg = ckpt["config"]
    with device:
        model = LLaMA(LLaMAConfig.from_config(cfg, ckpt["vocab_size"]))
    # as train.py (the rotary tables too, so the numbers are the run's); a checkpoint older than the bf16 key ran
    # the paper's pure bf16
    set_param_dtypes(model, cfg["dtype"], cfg.get("bf16", "paper"))
    try:
        model.load_state_dict(ckpt["model"])  # the uncompiled model's: no _orig_mod. prefix, with or without compile
    except RuntimeError as e:
        raise ValueError(f"{path} does not fit this model.py ({str(e).splitlines()[0]}); "
                         "use the code it was written by") from None
    info = dict(path=path, step=ckpt["step"], config=cfg, vocab_size=ckpt["vocab_size"],
                tokenizer=ckpt.get("tokenizer"), eot_id=ckpt.get("eot_id"), data=ckpt.get("data"))
    return model.eval(), info


def checkpoint_tokenizer(info, name=None):
    """The tiktoken Encoding a checkpoint was trained with and its eot id -> (Encoding, int). name (the --tokenizer
    flag) stands in for a checkpoint that records none. Raises ValueError (one line) if neither says which, if name
    contradicts the checkpoint, or if the tokenizer's vocabulary is not the model's."""
    path, recorded = info["path"], info["tokenizer"]
    if recorded is None and name is None:
        raise ValueError(f"{path} does not record its tokenizer (it predates checkpoints that do); pass "
                         "--tokenizer=NAME, the \"tokenizer\" in the meta.json of the data it was trained on "
                         "(e.g. byte)")
    if recorded is not None and name not in (None, recorded):
        raise ValueError(f"{path} was trained with tokenizer {recorded}, not {name}: drop --tokenizer")
    enc = get_encoding(recorded or name)
    if enc.n_vocab != info["vocab_size"]:
        raise ValueError(f"tokenizer {enc.name} has {enc.n_vocab} tokens but {path} has a vocabulary of "
                         f"{info['vocab_size']}; pass the tokenizer of the data it was trained on")
    return enc, enc.eot_token if info["eot_id"] is None else info["eot_id"]


def pick_device(name=None):
    """'cpu', 'cuda', 'cuda:N' or 'mps' -> torch.device; None: cuda if available, else cpu. Raises ValueError
    (one line) for another name or a device this machine lacks."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device {name!r}; use cpu, cuda, cuda:N or mps")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ValueError(f"device {name} is not here: this machine has {count} CUDA device(s) "
                             f"({', '.join(f'cuda:{i}' for i in range(count)) or 'none'}); use --device=cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device mps is not available on this machine; use --device=cpu")
    return device


# -----------------------------------------------------------------------------
# generation

@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=0, generator=None):
    """Continue idx, (B, T) int64 token ids on the model's device, by max_new_tokens tokens -> (B, T + max_new_tokens).
    Each step runs the model on the last max_seq_len tokens and takes the most likely token (temperature 0: greedy)
    or samples from softmax(logits / temperature) over the top_k most likely tokens (0: all), drawing from generator
    (a torch.Generator on the model's device; None: torch's global one)."""
    for _ in range(max_new_tokens):
        logits = model(idx[:, -model.config.max_seq_len:])[0][:, -1].float()
        if temperature == 0:
            next_id = logits.argmax(-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, -float("inf"))
            next_id = torch.multinomial(logits.softmax(-1), 1, generator=generator)
        idx = torch.cat((idx, next_id), dim=1)
    return idx


def encode_prompt(enc, eot_id, prompt, context):
    """A prompt -> its token ids as a document start: [eot_id] + tokens (special tokens such as <|endoftext|> in the
    text are those tokens). Raises ValueError if they exceed the model's context (its max_seq_len)."""
    ids = [eot_id] + enc.encode(prompt, allowed_special="all")
    if len(ids) > context:
        raise ValueError(f"the prompt is {len(ids)} tokens (with the <|endoftext|> that starts a document), more than "
                         f"the model's context of {context} tokens (the run's seq_len); shorten it")
    return ids


def main(argv=None):
    p = ArgumentParser(prog="sample.py", description="Sample text from a train.py checkpoint.")
    p.add_argument("--ckpt", required=True, help="a train.py checkpoint, e.g. out/tiny/ckpt.pt, or a run's out_dir")
    p.add_argument("--prompt", default="", help="text to continue (default: none, a new document)")
    p.add_argument("--max_new_tokens", type=int, default=256, help="tokens to generate per sample")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 = greedy (argmax)")
    p.add_argument("--top_k", type=int, default=200, help="sample from the k most likely tokens; 0 = all")
    p.add_argument("--num_samples", type=int, default=1, help="samples to print")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (the same seed, the same samples)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda if available, else cpu)")
    p.add_argument("--tokenizer",
                   help="for a checkpoint that does not record it: the tokenizer of its data (byte, gpt2)")
    try:
        args = p.parse_args(argv)
        for name, low in (("max_new_tokens", 0), ("top_k", 0), ("num_samples", 1), ("seed", 0)):
            if getattr(args, name) < low:
                raise ValueError(f"--{name} must be >= {low}, got {getattr(args, name)}")
        if not args.temperature >= 0 or args.temperature == float("inf"):
            raise ValueError(f"--temperature must be >= 0 and finite (0 = greedy), got {args.temperature}")
        device = pick_device(args.device)
        model, info = load_model(args.ckpt, device)
        enc, eot_id = checkpoint_tokenizer(info, args.tokenizer)
        ids = encode_prompt(enc, eot_id, args.prompt, model.config.max_seq_len)
    except ValueError as e:  # bad input (DataError is a ValueError)
        sys.exit(f"error: {e}")
    dtype = next(model.parameters()).dtype
    print(f"{info['path']}: step {info['step']}, {model.num_params():,} parameters in {dtype}, tokenizer {enc.name}, "
          f"on {device}", file=sys.stderr)
    generator = torch.Generator(device).manual_seed(args.seed)
    for i in range(args.num_samples):
        out = generate(model, torch.tensor([ids], device=device), args.max_new_tokens, args.temperature, args.top_k,
                       generator)
        if args.num_samples > 1:
            print(f"---------- sample {i + 1} of {args.num_samples} ----------")
        print(enc.decode(out[0, 1:].tolist(), errors="replace"), flush=True)  # without the leading eot


if __name__ == "__main__":
    main(sys.argv[1:])
