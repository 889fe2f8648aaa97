"""`make gpu-check DEVICE=cpu`: the GPU check's code runs end to end on a CPU at the tiny presets (a smoke run)."""

from __future__ import annotations

import re

import torch

from dystream.bench import gpu_check


def test_gpu_check_runs_on_cpu(tmp_path):
    threads = torch.get_num_threads()
    out = tmp_path / "gpu.md"
    try:
        assert gpu_check.main(["--device", "cpu", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    report = out.read_text()
    assert "- device: CPU (`cpu`)" in report
    statuses = dict(re.findall(r"^\| ([^|]+?) \| (ok|skipped|FAILED[^|]*) \|$", report, re.M))
    ran = ("training steps (teacher, SiD, GAN), bf16", "student chunk", "streaming, 20 chunks", "FSDP, one device")
    ran += ("teacher training step, 81 frames",)
    for check in ran:
        assert statuses[check] == "ok", (check, report)
    for check in ("FlexAttention vs SDPA", "CUDA graphs (StreamingConfig.compile)"):
        assert statuses[check] == "skipped"


def test_gpu_check_without_cuda_says_how_to_run_it(capsys, tmp_path):
    if torch.cuda.is_available():
        return
    assert gpu_check.main(["--device", "cuda", "--out", str(tmp_path / "gpu.md")]) == 2
    assert "make gpu-check DEVICE=cpu" in capsys.readouterr().out
