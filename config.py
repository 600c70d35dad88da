"""The run config: every key train.py reads, with its default, allowed values and meaning. A config is DEFAULTS (the
paper's shared recipe, with LLaMA-60M's shape and schedule), then each config file (Python assignments, e.g.
configs/llama_60m.py), then each --key=value, later ones winning; a bad value is a one-line ValueError."""
import ast
import difflib
import math
import traceback
import types

# key: (default, allowed values, meaning). Allowed values: a Python condition on the key ("lr >= 0"; the value must
# be finite too), a tuple of choices, or None (any value of the default's type).
KEYS = {
    # model; the vocabulary size comes from data_dir/meta.json
    "dim": (512, "dim > 0", "model width"),
    "n_layers": (8, "n_layers > 0", "transformer blocks"),
    "n_heads": (8, "n_heads > 0", "attention heads; the head dim, dim / n_heads, must be an even integer"),
    "ffn_dim": (1376, "ffn_dim > 0", "hidden width of the SwiGLU MLP"),
    # optimizer
    "optimizer": ("scale", ("scale", "adamw", "muon", "sgd"), "the optimizer"),
    "lr": (1e-3, "lr >= 0", "peak learning rate (for Muon: of both its parts)"),
    "adam_lr": (0.0, "adam_lr >= 0", "SCALE's AdamW lr for 1-D params; 0 = lr"),
    "momentum": (0.9, "0 <= momentum < 1", "SCALE's and SGD's momentum (Muon keeps its own 0.95)"),
    "momentum_roles": ("output", None, "SCALE's roles with momentum, comma-separated, from output,matrix,embedding"),
    "weight_decay": (0.0, "weight_decay >= 0", "weight decay (decoupled for SCALE, AdamW and Muon)"),
    "grad_clip": (0.0, "grad_clip >= 0", "max global gradient norm; 0 = off"),
    # schedule: linear warmup, then cosine decay to min_lr_ratio * lr at max_steps
    "max_steps": (11000, "max_steps > 0", "optimizer steps of the run"),
    "warmup_steps": (1100, "warmup_steps >= 0", "steps of linear warmup"),
    "min_lr_ratio": (0.1, "0 <= min_lr_ratio <= 1", "the lr at max_steps, over the peak lr"),
    # batch: total_batch_size sequences per optimizer step over all ranks, batch_size per rank per micro-step
    "seq_len": (256, "seq_len > 0", "tokens per sequence"),
    "total_batch_size": (512, "total_batch_size > 0", "sequences per optimizer step, over all ranks"),
    "batch_size": (64, "batch_size > 0", "sequences per rank per micro-step (grad_accum makes up total_batch_size)"),
    # evaluation, logging, checkpoints
    "eval_every": (1000, "eval_every > 0", "steps between evaluations"),
    "eval_tokens": (10_000_000, "eval_tokens > 0", "validation tokens per evaluation"),
    "log_every": (10, "log_every > 0", "steps between log lines"),
    "ckpt_every": (1000, "ckpt_every > 0", "steps between checkpoints (out_dir/ckpt.pt)"),
    "data_dir": ("data/c4", None, "prepared data (prepare_c4.py); data/kjv_byte, the bundled one, is made when used"),
    "out_dir": ("out", None, "where log.jsonl and ckpt.pt go"),
    "wandb_project": ("", None, "also log to this wandb project; empty = no wandb"),
    # system
    "dtype": ("bfloat16", ("float32", "bfloat16", "mixed"),
              "bfloat16: params, grads and optimizer state in bf16 (the paper; see bf16); mixed: bf16 autocast"),
    "bf16": ("stochastic", ("stochastic", "fp32_vectors", "paper"),
             "with dtype=bfloat16: paper = every param bf16 (the paper); fp32_vectors = 1-D params fp32; stochastic = "
             "fp32_vectors and SCALE's bf16 writes rounded stochastically (docs/precision.md)"),
    "compile": (True, None, "torch.compile the model and the SCALE update"),
    "fsdp": (False, None, "shard params, grads and optimizer state over the ranks (FSDP2), not copy them (DDP)"),
    "seed": (0, "0 <= seed < 2**32", "seed of the initialization and the data order"),
    "resume": (False, None, "continue the run in out_dir from its checkpoint (start it if there is none yet)"),
    "overwrite": (False, None, "start over in an out_dir that holds another run, deleting its checkpoints and log"),
}
DEFAULTS = {key: default for key, (default, _, _) in KEYS.items()}


def load_config(argv):
    """Config files and --key=value strings, in order, over DEFAULTS -> a namespace with every key. Raises ValueError
    naming the argument, or the file and line."""
    cfg = dict(DEFAULTS)
    for arg in argv:
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if not eq:
                raise ValueError(f"options are written --key=value, got {arg!r}")
            try:  # as given for string keys, else a Python literal (1e-3, 512, True)
                value = text if isinstance(DEFAULTS.get(key), str) else ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # set_key reports the wrong type
            set_key(cfg, key, value, arg)
        else:
            for key, (value, line) in read_config_file(arg).items():
                set_key(cfg, key, value, f"{arg} line {line}")
    if cfg["fsdp"] and cfg["optimizer"] == "muon":
        raise ValueError("fsdp=True does not run optimizer=muon: torch.optim.Muon's Newton-Schulz iteration needs "
                         "whole matrices, and on FSDP's row shards its updates are wrong; use fsdp=False (DDP)")
    if cfg["resume"] and cfg["overwrite"]:
        raise ValueError("resume=True continues the run in out_dir and overwrite=True deletes it: set one of them")
    return types.SimpleNamespace(**cfg)


def read_config_file(path):
    """A config file's assignments -> {key: (value, line number)}. It is Python, so it may import and compute: modules,
    functions, classes and names starting with _ are not keys."""
    try:
        with open(path) as f:
            source = f.read()
    except OSError as e:
        raise ValueError(f"cannot read config file {path}: {e.strerror}") from None
    namespace = {}
    try:
        exec(compile(source, path, "exec"), namespace)
    except SyntaxError as e:
        raise ValueError(f"config file {path} line {e.lineno}: {e.msg}") from None
    except Exception as e:  # a config file is Python: any error in it is a bad config
        line = [frame.lineno for frame in traceback.extract_tb(e.__traceback__) if frame.filename == path][-1]
        raise ValueError(f"config file {path} line {line} fails: {type(e).__name__}: {e}") from None
    lines = {target.id: node.lineno for node in ast.walk(ast.parse(source))
             if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign))
             for target in getattr(node, "targets", [getattr(node, "target", None)]) if isinstance(target, ast.Name)}
    return {key: (value, lines.get(key, "?")) for key, value in namespace.items()
            if not key.startswith("_") and not isinstance(value, types.ModuleType) and not callable(value)}


def set_key(cfg, key, value, source):
    """cfg[key] = value after checking the key, the value's type and its allowed values; source: where it came from."""
    if key not in KEYS:
        hint = did_you_mean(key, KEYS) or "; --help lists the keys"
        raise ValueError(f"unknown config key {key!r} in {source}{hint}")
    default, allowed, _ = KEYS[key]
    want = type(default)
    if want is float and type(value) is int:
        value = float(value)
    if type(value) is not want:
        raise ValueError(f"{key} must be of type {want.__name__}, got {value!r} in {source}")
    if isinstance(allowed, str) and not (math.isfinite(value) and eval(allowed, {key: value})):
        raise ValueError(f"{key} must satisfy {allowed}, got {value!r} in {source}")
    if isinstance(allowed, tuple) and value not in allowed:
        raise ValueError(f"{key} must be one of {', '.join(allowed)}, got {value!r} in {source}"
                         f"{did_you_mean(value, allowed)}")
    cfg[key] = value


def in_words(default, allowed):
    """A key's allowed values in words: "one of a, b", a condition ("dim > 0"), or "a bool" (any of its type)."""
    return "one of " + ", ".join(allowed) if isinstance(allowed, tuple) else allowed or "a " + type(default).__name__


def did_you_mean(word, options):
    close = difflib.get_close_matches(word, options)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def help_text(cfg):
    """Every key as --key=value with cfg's value, its meaning and allowed values, and the default where cfg differs."""
    return "\n".join(f"  {f'--{key}={getattr(cfg, key)!r}':28s} {meaning}; {in_words(default, allowed)}"
                     + (f" (default {default!r})" if getattr(cfg, key) != default else "")
                     for key, (default, allowed, meaning) in KEYS.items())
