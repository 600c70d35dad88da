"""Tests for config.py: defaults, config files, --key=value, every key's type and range, and --help."""
import pytest

import config
import train
from config import DEFAULTS, KEYS, load_config


def test_defaults_are_the_papers_recipe():
    d = DEFAULTS
    assert (d["seq_len"], d["total_batch_size"], d["momentum"], d["weight_decay"]) == (256, 512, 0.9, 0.0)
    assert (d["min_lr_ratio"], d["grad_clip"], d["dtype"], d["compile"]) == (0.1, 0.0, "bfloat16", True)
    assert (d["optimizer"], d["momentum_roles"], d["adam_lr"]) == ("scale", "output", 0.0)


def test_every_default_is_allowed():
    cfg = load_config([f"--{key}={value}" for key, value in DEFAULTS.items()])
    assert vars(cfg) == DEFAULTS


def test_help_lists_every_key_with_default_allowed_values_and_meaning(capsys):
    train.main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith(train.__doc__ + "\nkeys, defaults and allowed values:\n")
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  --")}
    assert list(lines) == [f"--{k}={v!r}" for k, v in DEFAULTS.items()]
    assert lines["--momentum=0.9"].split(None, 1)[1] == KEYS["momentum"][2] + "; 0 <= momentum < 1"
    assert lines["--dim=512"].split(None, 1)[1] == "model width; dim > 0"
    assert lines["--dtype='bfloat16'"].split(None, 1)[1] == KEYS["dtype"][2] + "; one of float32, bfloat16, mixed"
    assert lines["--compile=True"].split(None, 1)[1] == KEYS["compile"][2] + "; a bool"


def test_help_after_a_config_shows_its_values_and_the_defaults_they_change(capsys):
    train.main(["configs/tiny.py", "--dim=96", "--help"])
    out = capsys.readouterr().out
    assert out.startswith(train.__doc__ + "\nkeys, values of configs/tiny.py --dim=96 and allowed values:\n")
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  --")}
    cfg = load_config(["configs/tiny.py", "--dim=96"])
    assert list(lines) == [f"--{k}={getattr(cfg, k)!r}" for k in DEFAULTS]
    assert lines["--dim=96"].split(None, 1)[1] == "model width; dim > 0 (default 512)"
    # tiny's momentum is the default
    assert lines["--momentum=0.9"].split(None, 1)[1] == KEYS["momentum"][2] + "; 0 <= momentum < 1"
    assert lines["--dtype='float32'"].endswith("; one of float32, bfloat16, mixed (default 'bfloat16')")
    with pytest.raises(SystemExit) as e:
        train.main(["configs/tiny.py", "--dim=0", "--help"])
    assert e.value.code == "error: dim must satisfy dim > 0, got 0 in --dim=0"


def test_config_file_then_overrides(tmp_path):
    path = tmp_path / "c.py"
    path.write_text("lr = 3e-3\nmax_steps = 7\noptimizer = 'adamw'\n")
    cfg = load_config([str(path), "--max_steps=9", "--lr=1", "--compile=False", "--out_dir=out/1e3"])
    assert (cfg.lr, cfg.max_steps, cfg.optimizer, cfg.compile, cfg.out_dir) == (1.0, 9, "adamw", False, "out/1e3")
    assert type(cfg.lr) is float and cfg.seq_len == 256 and set(vars(cfg)) == set(DEFAULTS)


def test_config_file_may_import_and_compute(tmp_path):
    path = tmp_path / "c.py"
    path.write_text("import math\nfrom os import path as _p\ndef half(x):\n    return x // 2\n"
                    "class Shapes:\n    pass\n_width = 256\ndim = _width\nffn_dim = half(math.ceil(8 * dim / 3) * 2)\n")
    cfg = load_config([str(path)])
    assert (cfg.dim, cfg.ffn_dim) == (256, 683)
    assert set(config.read_config_file(str(path))) == {"dim", "ffn_dim"}


@pytest.mark.parametrize("argv,message", [
    (["--learning_rate=1e-3"], "unknown config key 'learning_rate' in --learning_rate=1e-3; --help lists the keys"),
    (["--warmup=10"], "unknown config key 'warmup' in --warmup=10; did you mean warmup_steps?"),
    (["--max_steps=1e4"], "max_steps must be of type int, got 10000.0 in --max_steps=1e4"),
    (["--compile=yes"], "compile must be of type bool, got 'yes' in --compile=yes"),
    (["--optimizer=adam"], "optimizer must be one of scale, adamw, muon, sgd, got 'adam' in --optimizer=adam; "
                           "did you mean adamw?"),
    (["--eval_every=0"], "eval_every must satisfy eval_every > 0, got 0 in --eval_every=0"),
    (["--warmup_steps=-5"], "warmup_steps must satisfy warmup_steps >= 0, got -5 in --warmup_steps=-5"),
    (["--optimizer=sgd", "--momentum=1.5"], "momentum must satisfy 0 <= momentum < 1, got 1.5 in --momentum=1.5"),
    (["--momentum=1.0"], "momentum must satisfy 0 <= momentum < 1, got 1.0 in --momentum=1.0"),
    (["--min_lr_ratio=1.5"], "min_lr_ratio must satisfy 0 <= min_lr_ratio <= 1, got 1.5 in --min_lr_ratio=1.5"),
    (["--lr=-1"], "lr must satisfy lr >= 0, got -1.0 in --lr=-1"),
    (["--lr=1e999"], "lr must satisfy lr >= 0, got inf in --lr=1e999"),
    (["--seed=-1"], "seed must satisfy 0 <= seed < 2**32, got -1 in --seed=-1"),
    (["--seed=4294967296"], "seed must satisfy 0 <= seed < 2**32, got 4294967296 in --seed=4294967296"),
    (["--lr", "1e-3"], "options are written --key=value, got '--lr'"),
    (["no/such/config.py"], "cannot read config file no/such/config.py: No such file or directory"),
    (["--fsdp=True", "--optimizer=muon"], "fsdp=True does not run optimizer=muon: torch.optim.Muon's Newton-Schulz "
                                          "iteration needs whole matrices, and on FSDP's row shards its updates are "
                                          "wrong; use fsdp=False (DDP)"),
])
def test_bad_config(argv, message):
    with pytest.raises(ValueError) as e:
        load_config(argv)
    assert str(e.value) == message or str(e.value).startswith(message + ";"), str(e.value)


@pytest.mark.parametrize("key", [k for k, (_, allowed, _) in KEYS.items() if isinstance(allowed, str)])
def test_every_numeric_key_has_its_range_checked(key):
    below = {f"{key} > 0": 0, f"{key} >= 0": -1, f"0 <= {key} < 1": -0.5, f"0 <= {key} <= 1": -0.5,
             f"0 <= {key} < 2**32": -1}[KEYS[key][1]]
    with pytest.raises(ValueError, match=f"^{key} must satisfy "):
        load_config([f"--{key}={below}"])


@pytest.mark.parametrize("text,message", [
    ("dim = 64\nn_layer = 4\n", "unknown config key 'n_layer' in {path} line 2; did you mean n_layers?"),
    ("dim = 64\n\nlr = 'fast'\n", "lr must be of type float, got 'fast' in {path} line 3"),
    ("dim = 64\nlr = 1e-3 +\n", "config file {path} line 2: invalid syntax"),
    ("dim = 64\nlr = 1 / 0\n", "config file {path} line 2 fails: ZeroDivisionError: division by zero"),
])
def test_config_file_errors_name_the_line(tmp_path, text, message):
    path = tmp_path / "c.py"
    path.write_text(text)
    with pytest.raises(ValueError) as e:
        load_config([str(path)])
    assert str(e.value) == message.format(path=path)
