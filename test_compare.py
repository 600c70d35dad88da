"""compare.py: the paper's memory estimate, 2 bytes x (parameters + optimizer-state elements), the runs, seeds
and their table, and bad input."""
import importlib
import math
import os
import statistics

import pytest

from tools import compare
from config import load_config

SIZES = compare.PAPER_CONFIGS
HERE = os.path.dirname(os.path.abspath(__file__))


def gb(name, optimizer, vocab_size):
    return round(compare.memory_gb(compare.paper_config(name), optimizer, vocab_size), 2)


def test_scale_memory_matches_the_paper():
    assert [gb(n, "scale", 32000) for n in SIZES] == [0.15, 0.32, 0.80, 2.81, 13.74]


def test_adamw_memory_matches_the_paper_up_to_its_vocab():
    # the paper's 0.81 and 8.04 are 0.805 and 8.037 GB with the T5 tokenizer's 32100 entries; 0.805 and 8.034 with 32000
    assert [gb(n, "adamw", 32000) for n in SIZES[:4]] == [0.35, 0.80, 2.21, 8.03]
    assert [gb(n, "adamw", 32100) for n in SIZES[:4]] == [0.35, 0.81, 2.21, 8.04]
    assert [gb(n, "scale", 32100) for n in SIZES] == [0.15, 0.32, 0.80, 2.81, 13.74]


def test_fp32_vectors_do_not_move_the_memory_table():
    # dtype=bfloat16 with bf16="stochastic" or "fp32_vectors": the 1-D params and their AdamW moments are fp32, 4
    # bytes each instead of 2; the params + SCALE state bytes still round to the paper's GB
    import train
    for name, paper in zip(SIZES, [0.15, 0.32, 0.80, 2.81, 13.74]):
        model = train.set_param_dtypes(compare.meta_model(compare.paper_config(name), 32000), "bfloat16", "stochastic")
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        state = 2 * model.lm_head.weight.numel() + 2 * sum(p.numel() * p.element_size() for p in model.parameters()
                                                           if p.ndim == 1)  # momentum, AdamW's two moments
        assert any(p.dtype.itemsize == 4 for p in model.parameters()) and round((params + state) / 1e9, 2) == paper


def test_state_elements_per_optimizer():
    model = compare.meta_model(load_config(["--dim=64", "--n_layers=2", "--n_heads=4", "--ffn_dim=128"]),
                               vocab_size=100)
    n = model.num_params()
    vectors = (2 * 2 + 1) * 64
    hidden = n - 2 * 100 * 64 - vectors
    assert compare.state_numel(model, "scale") == 100 * 64 + 2 * vectors
    assert compare.state_numel(model, "adamw") == 2 * n
    assert compare.state_numel(model, "muon") == hidden + 2 * (n - hidden)
    assert compare.state_numel(model, "sgd") == n
    with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
        compare.state_numel(model, "lion")


def test_memory_per_gpu_ddp_against_fsdp(capsys):
    # per GPU: DDP holds every param, grad and state element; FSDP an eighth of each on 8 GPUs
    cfg = compare.paper_config("llama_7b")
    model = compare.meta_model(cfg, 32000)
    n, state = model.num_params(), compare.state_numel(model, "scale")
    ddp = compare.memory_gb(cfg, "scale", bytes_per_element=4, grads=True)
    assert ddp == pytest.approx(4 * (2 * n + state) / 1e9) and round(ddp, 2) == 54.43
    assert compare.memory_gb(cfg, "scale", bytes_per_element=4, grads=True, shards=8) == pytest.approx(ddp / 8)
    compare.main(["--memory", "--gpus", "8", "--dtype", "mixed"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| model (mixed, 8 GPUs) | params | scale DDP | scale FSDP | adamw DDP | adamw FSDP |"
    assert lines[-1] == "| llama_7b | 6,738.4M | 54.43 GB | 6.80 GB | 107.81 GB | 13.48 GB |"
    assert len(lines) == 2 + len(SIZES)
    with pytest.raises(ValueError, match=r"^--gpus must be 1 or more, got 0$"):
        compare.main(["--memory", "--gpus", "0"])


TINY = dict(dim=32, n_layers=1, n_heads=2, ffn_dim=64, seq_len=32, total_batch_size=4, batch_size=4, max_steps=4,
            warmup_steps=1, eval_every=2, eval_tokens=1024, log_every=1)


def tiny_args(data, **overrides):
    return [f"--{k}={v}" for k, v in {**TINY, "data_dir": data, **overrides}.items()]


def table_rows(path):
    return [line.split(" | ") for line in path.read_text().splitlines()[2:] if line.startswith("| ")]


@pytest.mark.slow
def test_runs_each_optimizer_and_tabulates_its_log(byte_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths are the caller's, as for train.py
    compare.main([os.path.join(HERE, "configs", "tiny.py"), "--optimizers", "scale,sgd", "--lr", "sgd=0.1",
                  "--out_dir", "cmp", "--", *tiny_args(byte_data)])
    rows = table_rows(tmp_path / "cmp" / "results.md")
    assert [r[:2] for r in rows] == [["| scale", "0.003"], ["| sgd", "0.1"]]
    for row, optimizer in zip(rows, ("scale", "sgd")):
        log = compare.read_log(tmp_path / "cmp" / optimizer / "log.jsonl")
        assert row[2] == f"{log['eval'][-1]['val_loss']:.4f}" and log["eval"][-1]["step"] == 4
        speeds = sorted(r["tokens_per_s"] for r in log["train"][1:])  # the first interval (warmup) aside
        assert len(speeds) == 3 and row[4] == f"{speeds[1]:,.0f}"
    assert "One seed per optimizer" in (tmp_path / "cmp" / "results.md").read_text()


@pytest.mark.slow
def test_seeds_give_mean_std_and_a_noise_verdict(byte_data, tmp_path):
    out = tmp_path / "cmp"
    compare.main([os.path.join(HERE, "configs", "tiny.py"), "--optimizers", "scale,adamw", "--seeds", "0,1",
                  "--out_dir", str(out), "--", *tiny_args(byte_data)])
    text = (out / "results.md").read_text()
    assert "val loss (mean ± std, 2 seeds)" in text
    finals = {}
    for row in table_rows(out / "results.md"):
        optimizer = row[0][2:]
        logs = [compare.read_log(out / optimizer / f"seed{s}" / "log.jsonl") for s in (0, 1)]
        assert [log["start"][-1]["config"]["seed"] for log in logs] == [0, 1]
        finals[optimizer] = [log["eval"][-1]["val_loss"] for log in logs]
        assert finals[optimizer][0] != finals[optimizer][1]
        mean, std = statistics.mean(finals[optimizer]), statistics.stdev(finals[optimizer])
        assert row[2] == f"{mean:.4f} ± {std:.4f}" and row[3] == f"{math.exp(mean):.2f}"
    (best, a), (other, b) = sorted(finals.items(), key=lambda kv: statistics.mean(kv[1]))
    diff = statistics.mean(b) - statistics.mean(a)
    two_se = 2 * math.sqrt(statistics.variance(a) / 2 + statistics.variance(b) / 2)
    verdict = "within" if diff < two_se else "beyond"
    assert (f"{best} is {diff:.4f} below {other} in val loss, {verdict} seed noise "
            f"(2 standard errors: {two_se:.4f})") in text


@pytest.mark.parametrize("argv,message", [
    (["--optimizers", "scale,adma"], "unknown optimizer 'adma' in --optimizers; use scale, adamw, muon, sgd"),
    (["--optimizers", "scale,scale"], "--optimizers takes a comma-separated list without repeats, got 'scale,scale'"),
    (["--seeds", "0,one"], "--seeds takes a comma-separated list without repeats, got '0,one'"),
    (["--lr", "adamw=fast"], "--lr takes optimizer=value, e.g. adamw=3e-3, got 'adamw=fast'"),
    (["--lr", "lion=1e-3"], "--lr names lion, which --optimizers does not run; give an lr for one of scale, adamw"),
    (["--lr", "adamw=-1"], "lr must satisfy lr >= 0, got -1.0 in --lr=-1.0"),
    (["--", "--max_step=3"], "unknown config key 'max_step' in --max_step=3; did you mean max_steps"),
    (["--", "--data_dir=no/such/dir"], "data dir no/such/dir does not exist"),
    (["--", "--seq_len=100000"], "the train split of"),
])
def test_bad_input_fails_before_any_run(byte_data, tmp_path, monkeypatch, argv, message):
    ran = []
    monkeypatch.setattr(compare.subprocess, "run", lambda *a, **k: ran.append(a))
    cut = argv.index("--") if "--" in argv else len(argv)
    with pytest.raises(ValueError) as e:
        compare.main([os.path.join(HERE, "configs", "tiny.py"), "--optimizers", "scale,adamw", *argv[:cut],
                      "--out_dir", str(tmp_path / "cmp"), "--", *tiny_args(byte_data), *argv[cut + 1:]])
    assert str(e.value).startswith(message), str(e.value)
    assert not ran and not (tmp_path / "cmp").exists()


def fake_log(val_loss, tokens_per_s):
    """A run's log as compare.read_log returns it, with one start, two train and one eval record."""
    return {"start": [{"config": {"lr": 3e-4}, "param_bytes": 100}],
            "train": [{"tokens_per_s": 1.0, "opt_state_bytes": 10, "peak_mem_bytes": None},
                      {"tokens_per_s": tokens_per_s, "opt_state_bytes": 10, "peak_mem_bytes": None}],
            "eval": [{"val_loss": val_loss, "tokens": 1000}]}


def test_precision_table_is_against_float32_over_seeds():
    from tools import precision
    results = {"float32": [dict(log=fake_log(2.0, 500.0), unchanged=0.03, gains_moved=1.0),
                           dict(log=fake_log(2.2, 700.0), unchanged=0.05, gains_moved=1.0)],
               "bf16 paper": [dict(log=fake_log(2.2, 100.0), unchanged=0.7, gains_moved=0.0),
                              dict(log=fake_log(2.4, 300.0), unchanged=0.8, gains_moved=0.0)]}
    assert precision.markdown(results, [0, 1]).splitlines() == [
        "| mode | val loss (mean ± std, 2 seeds) | vs float32 | 2-D entries a late step leaves unchanged "
        "| RMSNorm gains != 1.0 | tokens/s |", "|---|---|---|---|---|---|",
        "| float32 | 2.1000 ± 0.1414 | +0.00% | 4.0% | 100.0% | 600 |",  # tokens/s: median of 500, 700
        "| bf16 paper | 2.3000 ± 0.1414 | +9.52% (per seed: +10.00%, +9.09%) | 75.0% | 0.0% | 200 |"]


def test_an_out_dir_compare_did_not_write_is_refused_and_its_own_is_run_over_again(byte_data, tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(compare, "run_one", lambda args, o, lr, seed: ran.append(o) or fake_log(2.0, 100.0))
    argv = lambda out: [os.path.join(HERE, "configs", "tiny.py"), "--optimizers", "scale,adamw", "--out_dir", str(out),
                        "--", *tiny_args(byte_data)]
    mine, other = tmp_path / "mine", tmp_path / "other"
    mine.mkdir()
    (mine / "results.md").write_text("my notes\n")
    other.mkdir()
    (other / ".written_by").write_text("tools.precision")
    for out, what in [(mine, "holds files tools.compare did not write"), (other, "holds tools.precision's output"),
                      (mine / "results.md", "is not a directory")]:
        with pytest.raises(ValueError) as e:
            compare.main(argv(out))
        assert str(e.value) == f"--out_dir {out} {what}; give a new or empty directory"
    assert not ran and os.listdir(mine) == ["results.md"] and (mine / "results.md").read_text() == "my notes\n"
    for _ in range(2):  # a re-run over its own out_dir (the runs' own --resume or --overwrite is train.py's)
        compare.main(argv(tmp_path / "cmp"))
    assert ran == ["scale", "adamw"] * 2
    # the plot: matplotlib's
    assert set(os.listdir(tmp_path / "cmp")) - {"compare.png"} == {".written_by", "results.md"}


def test_runs_already_there_are_refused_before_any_starts_unless_resumed_or_overwritten(byte_data, tmp_path,
                                                                                         monkeypatch):
    ran = []
    monkeypatch.setattr(compare, "run_one", lambda args, o, lr, seed: ran.append(o) or fake_log(2.0, 100.0))
    out = tmp_path / "cmp"
    argv = [os.path.join(HERE, "configs", "tiny.py"), "--optimizers", "scale,adamw", "--out_dir", str(out), "--",
            *tiny_args(byte_data)]
    compare.main(argv)
    (out / "adamw").mkdir()
    (out / "adamw" / "log.jsonl").write_text("{}\n")  # the second run's, from before
    with pytest.raises(ValueError) as e:
        compare.main(argv)
    assert str(e.value) == (f"{out}/adamw holds a run already; pass -- --resume=True to continue the runs, or "
                            "-- --overwrite=True to start them over")
    assert ran == ["scale", "adamw"]  # none started
    compare.main([*argv, "--resume=True"])
    assert ran == ["scale", "adamw"] * 2


def test_precision_refuses_an_out_dir_it_did_not_write_and_reuses_its_own(tmp_path, monkeypatch):
    from tools import precision
    monkeypatch.setattr(precision, "run", lambda *a: dict(log=fake_log(2.0, 100.0), unchanged=0.5, gains_moved=0.0))
    (tmp_path / "float32").write_text("my notes\n")
    with pytest.raises(ValueError) as e:
        precision.main(["--out_dir", str(tmp_path)])
    assert str(e.value) == (f"--out_dir {tmp_path} holds files tools.precision did not write; give a new or empty "
                            "directory")
    assert os.listdir(tmp_path) == ["float32"] and (tmp_path / "float32").read_text() == "my notes\n"
    for modes in ("float32", "float32,mixed"):  # a re-run adds modes to the table
        precision.main(["--modes", modes, "--out_dir", str(tmp_path / "prec")])
    assert sorted(os.listdir(tmp_path / "prec")) == [".written_by", "results.md"]
    assert "| mixed |" in (tmp_path / "prec" / "results.md").read_text()


@pytest.mark.parametrize("tool", ["compare", "precision", "bench", "gpu_check"])
def test_help_shows_the_command_that_runs_the_tool(tool, capsys):
    with pytest.raises(SystemExit):
        importlib.import_module(f"tools.{tool}").main(["--help"])
    assert capsys.readouterr().out.startswith(f"usage: python -m tools.{tool} ")
