"""gpu_check.py, the GPU check command: its dry run on CPU runs every part end to end (so the command cannot rot
between GPU sessions), and its report shows failures, skipped rows and parts out of time as such."""
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from tools import compare
from tools import gpu_check
from model import LLaMA

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.slow
@pytest.mark.optional
def test_dry_run_runs_every_part_and_writes_the_report(tmp_path):
    pytest.importorskip("transformers", reason="transformers not installed: the model part's peer is LlamaForCausalLM")
    p = subprocess.run([sys.executable, "-m", "tools.gpu_check", "--device", "cpu", "--tiny"], cwd=HERE,
                       capture_output=True, text=True, env={**os.environ, "OUT": str(tmp_path)}, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    report = (tmp_path / "gpu_check.md").read_text()
    assert p.stdout.endswith(report)  # printed last, as written
    assert sorted(os.listdir(tmp_path)) == ["gpu_check.md"] + [f"gpu_check_{part}.log" for part in sorted(
        gpu_check.PARTS)]
    for heading in ("## CUDA tests", "## Memory", "## Training", "## Optimizer step"):
        assert report.count(heading) == 1, heading
    assert "\n2 passed\n" in report and "FAIL" not in report and "skipped" not in report and "not run" not in report
    lines = report.splitlines()
    assert sum(line.startswith("| tiny | ") for line in lines) == 2 + 2 + 2  # memory, training, optimizer rows
    assert sum(line.startswith("| tiny | bfloat16 |") and line.endswith("of a training step |") for line in lines) == 1
    for line in (line for line in lines if line.startswith("| tiny | scale |") or line.startswith("| tiny | adamw |")):
        measured, estimate = (float(cell.split()[0]) for cell in line.split(" | ")[5:7])
        assert estimate < measured < 1.01 * estimate  # the estimate, but for the fp32 1-D params and their state


def test_memory_measurement_is_what_compare_estimates():
    row = gpu_check.measure_memory("tiny", "scale", "cpu")
    vectors = sum(p.numel() for p in LLaMA(gpu_check.model_config("tiny")).parameters() if p.ndim == 1)
    # the estimate counts 2 bytes an element; train.py's default bf16=stochastic keeps the 1-D params and their two
    # AdamW moments in fp32: 2 bytes more for each
    assert row["params"] + row["state"] == pytest.approx(row["estimate_gb"] * 1e9 + 2 * 3 * vectors, rel=1e-12)
    assert row["estimate_gb"] == compare.memory_gb(gpu_check.TINY, "scale", gpu_check.TINY_VOCAB)
    assert row["grads"] == row["params"] and row["peak"] is None


def test_measurements_that_would_not_end_in_time_are_skipped_rows(tmp_path):
    args = SimpleNamespace(part="model", tiny=False, sizes=None, batch_size=None, loss_chunks=None, device="cuda",
                           deadline=time.time() + 50, rows=str(tmp_path / "rows.jsonl"))
    gpu_check.run_part(args)  # none fits in 50 s, so none runs (nor needs the GPU)
    rows = gpu_check.read_jsonl(args.rows)
    assert [(r["size"], r["batch"]) for r in rows] == [("llama_60m", 256), ("llama_350m", 128), ("llama_1b", 64)]
    for row, needed in zip(rows, (60, 80, 100)):
        left, rest = row["skipped"].split(" s of the part's time left, ")
        assert 45 <= int(left) <= 50 and rest == f"about {needed} s needed" and "result" not in row


def test_a_test_s_outcome_is_its_first_phase_that_did_not_pass_and_tests_never_reached_are_not_run():
    records = [dict(collected=["t::a", "t::b", "t::c", "t::d"]),
               dict(test="t::a", when="setup", outcome="passed", seconds=1.0, reason=""),
               dict(test="t::a", when="call", outcome="passed", seconds=2.0, reason=""),
               dict(test="t::a", when="teardown", outcome="passed", seconds=0.5, reason=""),
               dict(test="t::b", when="setup", outcome="failed", seconds=3.0, reason="AssertionError: bad fixture"),
               dict(test="t::b", when="teardown", outcome="passed", seconds=0.0, reason=""),
               dict(test="t::c", when="setup", outcome="passed", seconds=0.0, reason=""),
               dict(test="t::c", when="call", outcome="failed", seconds=1.5, reason="assert 1 == 2")]
    assert gpu_check.outcomes_of_tests(records) == [
        ("t::a", "passed", 3.5, ""), ("t::b", "error in setup", 3.0, "AssertionError: bad fixture"),
        ("t::c", "failed", 1.5, "assert 1 == 2"), ("t::d", "not run", 0.0, "the part's time ran out")]


def test_report_shows_failures_skips_and_parts_out_of_time():
    args = SimpleNamespace(tiny=False, argv=[], parts=list(gpu_check.PARTS), device="cuda")
    done = {"tests": ([("t::a", "failed", 2.0, "assert x | y")], ""),
            "memory": ([dict(size="llama_60m", optimizer="scale", error="OutOfMemoryError: CUDA out of memory")], ""),
            "model": ([dict(size="llama_1b", batch=64, loss_chunks=4, skipped="30 s of the part's time left, about "
                            "100 s needed")], "stopped: out of time; the rows it had not reached are missing")}
    text = gpu_check.report(args, ["- device: test"], done, time.time())
    assert "| t::a | FAIL | 2.0 | assert x / y |" in text
    assert "| llama_60m | scale | FAIL: OutOfMemoryError: CUDA out of memory |" in text
    assert "| llama_1b | skipped: 30 s of the part's time left, about 100 s needed | 64 |" in text
    assert "model: stopped: out of time" in text and "## optimizer: not run, out of time" in text


def test_stochastic_rounding_s_extra_time_is_given_as_a_share_of_the_training_step_of_the_same_size():
    ours = dict(batch_size=4, tokens_per_s=4 * 256 / 8e-3, mfu=None, peak_bytes=None, first_step_s=1.0)  # 8 ms a step
    model = [dict(size="llama_60m", batch=4, loss_chunks=4,
                  result=dict(rows={gpu_check.bench.OURS: ours}, notes=[], seq_len=256))]
    step = dict(adamw_ms=1.0, scale_ms=0.5, sr_ms=0.6, first_scale_step_s=2.0)
    optimizer = [dict(size=size, dtype="bfloat16", result=step) for size in ("llama_60m", "llama_1b")]
    row = "| {} | bfloat16 | 1.00 ms | 0.50 ms | 0.50x | 2.0 s | 0.60 ms (1.20x nearest){} |"
    # 0.1 ms more of an 8 ms step; llama_1b has no model row to compare with
    assert gpu_check.optimizer_section(optimizer, model)[-2:] == [
        row.format("llama_60m", ", +1.25% of a training step"), row.format("llama_1b", "")]
    assert gpu_check.optimizer_section(optimizer)[-2:] == [row.format("llama_60m", ""), row.format("llama_1b", "")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_without_a_gpu_the_check_is_a_one_line_error():
    with pytest.raises(SystemExit) as e:
        gpu_check.main([])
    assert e.value.code == ("error: no CUDA GPU here; for a dry run on CPU: "
                            "python -m tools.gpu_check --device cpu --tiny")
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--device", "cpu"])
    assert e.value.code == "error: --device cpu is the dry run: add --tiny"


def test_a_report_it_did_not_write_is_refused_and_its_own_is_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(gpu_check, "run_parts", lambda *a: {})
    (tmp_path / "gpu_check.md").write_text("my notes\n")
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--device", "cpu", "--tiny"])
    assert e.value.code == (f"error: {tmp_path / 'gpu_check.md'} was not written by tools.gpu_check; move it, or set "
                            "OUT to another directory")
    assert os.listdir(tmp_path) == ["gpu_check.md"] and (tmp_path / "gpu_check.md").read_text() == "my notes\n"
    (tmp_path / "gpu_check.md").unlink()
    (tmp_path / "gpu_check_tests.log").write_text(f"$ {' '.join(gpu_check.tests_command(True))}\n")  # as a run starts
    for _ in range(2):
        gpu_check.main(["--device", "cpu", "--tiny"])
    assert (tmp_path / "gpu_check.md").read_text().startswith("# GPU check (dry run")
    assert sorted(os.listdir(tmp_path)) == ["gpu_check.md", "gpu_check_tests.log"]
