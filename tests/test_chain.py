"""`dystream chain`: make train's plan (done / to build / last measured time) and the per-stage summary lines read
from a run's TensorBoard scalars and exports, kept in runs/summary.json and runs/summary.md."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from torch.utils.tensorboard import SummaryWriter

from dystream import cli
from dystream.chain import format_plan, key_metric, plan, record, run_stage

ROOT = Path(__file__).resolve().parents[1]


def _fake_run(runs: Path, stage: str, scalars: dict[str, list[float]], export: str | None = None) -> Path:
    """A stage folder as Lightning's TensorBoardLogger (save_dir runs, name <stage>, version "") leaves it."""
    run_dir = runs / stage
    writer = SummaryWriter(str(run_dir))
    for tag, values in scalars.items():
        for step, value in enumerate(values, 1):
            writer.add_scalar(tag, value, step * 10)
    writer.close()
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"x")
    if export:
        (run_dir / export).write_bytes(b"x")
    return run_dir


def test_plan_marks_done_stages_and_uses_the_last_measured_times(tmp_path):
    runs = tmp_path / "runs"
    (runs / "vae" / "checkpoints").mkdir(parents=True)
    (runs / "vae" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (runs / "summary.json").write_text(json.dumps({"stages": {"vae": {"seconds": 61}, "teacher": {"seconds": 200}}}))
    stages = [(s, str(runs / s / "checkpoints" / "last.ckpt")) for s in ("vae", "teacher", "stage1_ode")]
    planned = plan(stages, "stage1_ode", runs)
    assert [(s.name, s.state) for s in planned] == [("vae", "done"), ("teacher", "build"), ("stage1_ode", "train")]
    text = format_plan(planned, runs, "make train RECIPE=stage1_ode")
    lines = text.splitlines()
    assert lines[0] == f"make train RECIPE=stage1_ode: 3 stage(s), 2 to run, outputs under {runs}/"
    assert "1/3 vae" in lines[1] and "done" in lines[1] and "last.ckpt" in lines[1]
    assert "2/3 teacher" in lines[2] and "build" in lines[2] and "~3m20s (last run)" in lines[2]
    assert "3/3 stage1_ode" in lines[3] and "train" in lines[3] and "time unknown" in lines[3]
    assert "about 3m20s + 1 stage(s) never timed here" in lines[4] and "summary.md" in lines[4]


def test_record_reads_the_last_validation_metric_and_the_export(tmp_path):
    runs = tmp_path / "runs"
    _fake_run(
        runs, "vae", {"val/psnr": [20.0, 24.5], "val/ssim": [0.5, 0.7], "train/loss": [1.0, 0.5]}, "vae.safetensors"
    )
    metric = key_metric("vae", runs / "vae")
    assert metric is not None and (metric.tag, metric.value, metric.step) == ("val/psnr", 24.5, 20)
    line = record(runs, "vae", 754.0, order=["vae", "teacher"])
    assert line == f"vae: done in 12m34s, val/psnr 24.5 (step 20) -> {runs / 'vae' / 'vae.safetensors'}"
    # a stage without its key metric falls back to val/loss; summary.md keeps the chain order
    _fake_run(runs, "teacher", {"val/loss": [0.3, 0.25]}, "teacher.safetensors")
    (runs / "teacher" / "audio.safetensors").write_bytes(b"x")  # written after the teacher's own export
    assert record(runs, "teacher", 30, order=["vae", "teacher"]).endswith(str(runs / "teacher" / "teacher.safetensors"))
    summary = json.loads((runs / "summary.json").read_text())
    assert summary["stages"]["vae"]["seconds"] == 754.0 and summary["stages"]["teacher"]["metric_tag"] == "val/loss"
    table = (runs / "summary.md").read_text().splitlines()
    rows = [r for r in table if r.startswith("| vae") or r.startswith("| teacher")]
    assert rows[0].startswith("| vae | 12m34s | val/psnr 24.5 (step 20) |") and rows[1].startswith("| teacher | 30s |")
    # the next plan uses the recorded times
    assert plan([("vae", str(runs / "nothing"))], None, runs)[0].last_seconds == 754.0


def test_plan_falls_back_to_the_span_of_the_last_runs_tensorboard_log(tmp_path):
    runs = tmp_path / "runs"
    writer = SummaryWriter(str(runs / "teacher"))
    writer.add_scalar("train/loss", 1.0, 1, walltime=1000.0)
    writer.add_scalar("train/loss", 0.5, 2, walltime=1090.0)
    writer.close()
    (teacher,) = plan([], "teacher", runs)
    assert teacher.state == "train" and teacher.last_seconds == pytest.approx(90.0, abs=1.0)
    assert "~1m30s (TensorBoard log of the last run)" in format_plan([teacher], runs)


def test_record_of_the_ode_pairs_stage_counts_its_pairs(tmp_path):
    runs = tmp_path / "runs"
    index = runs / "ode_pairs" / "pairs" / "index.json"
    index.parent.mkdir(parents=True)
    index.write_text(json.dumps({"total_samples": 96, "shards": []}))
    line = record(runs, "ode_pairs", 5, done=index)
    assert line == f"ode_pairs: done in 5s, 96 pair samples -> {index}"


def test_run_times_the_command_and_records_only_on_success(tmp_path, capsys):
    runs = tmp_path / "runs"
    make_run = f"from torch.utils.tensorboard import SummaryWriter; w = SummaryWriter({str(runs / 'vae')!r}); "
    make_run += "w.add_scalar('val/psnr', 30.0, 7); w.close()"
    code = run_stage([sys.executable, "-c", make_run], runs, "vae", None, [], ["vae", "teacher"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.splitlines()[0].startswith("==> [1/2] vae: ")
    assert out.splitlines()[-1].startswith("==> vae: done in ") and "val/psnr 30 (step 7)" in out
    assert run_stage([sys.executable, "-c", "raise SystemExit(3)"], runs, "teacher", None, [], []) == 3
    assert "teacher" not in json.loads((runs / "summary.json").read_text())["stages"]
    assert "failed (exit 3)" in capsys.readouterr().err


def test_chain_is_a_dystream_subcommand(tmp_path, capsys):
    runs = tmp_path / "runs"
    argv = ["chain", "plan", "--runs", str(runs), "--stage", f"vae={runs}/vae/last.ckpt", "--train", "teacher"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "2 stage(s), 2 to run" in out and "1/2 vae" in out and "2/2 teacher" in out


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_make_train_prints_the_plan_then_runs_each_stage_through_chain_run(tmp_path):
    runs = tmp_path / "runs"
    (runs / "vae" / "checkpoints").mkdir(parents=True)
    (runs / "vae" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    stamp = tmp_path / "installed"  # a fresh venv stamp: make -n lists no install commands
    stamp.write_bytes(b"")
    proc = subprocess.run(
        ["make", "-n", "train", "RECIPE=ode_pairs", f"RUNS={runs}", f"STAMP={stamp}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line.strip() for line in proc.stdout.splitlines() if "dystream chain" in line]
    assert "chain plan" in lines[0] and f"--stage vae={runs}/vae/checkpoints/last.ckpt" in lines[0]
    assert "--train ode_pairs" in proc.stdout
    assert len(lines) == 5  # the plan, then audio, latents and teacher (vae is done), then the recipe itself
    assert "--stage audio" in lines[1] and lines[1].endswith("fit --config recipes/audio.yaml")
    assert "--stage latents" in lines[2] and f"data encode --vae {runs}/vae/vae.safetensors" in lines[2]
    assert "--stage teacher" in lines[3] and lines[3].endswith("fit --config recipes/teacher.yaml")
    assert "--stage ode_pairs" in lines[4] and lines[4].endswith("predict --config recipes/ode_pairs.yaml")
    assert '--of "vae audio latents teacher ode_pairs"' in lines[4]  # the teacher needs the VAE, audio, latents
