"""VAE reconstruction quality: PSNR equals the direct formula, grain and blur move the HF ratio, tints show as colour
error, keypoint error over confident points; the `vae-report` command end to end on a tiny VAE export."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from dystream.evaluation.reconstruction import (
    keypoint_error,
    keypoints_found,
    laplacian_energy,
    reconstruction_quality,
)


def _clips(n: int = 2, t: int = 4, size: int = 32, seed: int = 0) -> np.ndarray:
    """Cartoon-like uint8 clips: flat discs on a vertical gradient (the synthetic world's kind of frame)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size]
    out = np.zeros((n, t, size, size, 3), np.uint8)
    for i in range(n):
        colour = rng.integers(40, 220, size=3)
        for j in range(t):
            frame = np.stack([60 + 2 * ys, 80 + ys, 160 + ys], axis=-1).astype(np.float64)
            cy, cx = size / 2 + j, size / 2 - j
            frame[(ys - cy) ** 2 + (xs - cx) ** 2 < (size / 4) ** 2] = colour
            out[i, j] = frame.clip(0, 255)
    return out


def test_identical_clips_are_perfect():
    real = _clips()
    q = reconstruction_quality(real.copy(), real)
    assert q["psnr"] > 100 and q["ssim"] == pytest.approx(1.0, abs=1e-5)
    assert q["hf_ratio"] == pytest.approx(1.0) and q["colour_error_max"] == 0.0


def test_psnr_is_the_per_clip_formula_averaged():
    real = _clips(n=3)
    rng = np.random.default_rng(1)
    recon = (real.astype(np.int16) + rng.integers(-6, 7, size=real.shape)).clip(0, 255).astype(np.uint8)
    direct = [10 * np.log10(255.0**2 / np.mean((recon[i].astype(np.float64) - real[i]) ** 2)) for i in range(len(real))]
    assert reconstruction_quality(recon, real)["psnr"] == pytest.approx(np.mean(direct), abs=1e-3)


def test_a_tint_is_a_colour_error_in_units_of_one_255th():
    real = _clips()
    recon = real.copy()
    recon[1, ..., 0] = (real[1, ..., 0].astype(np.int16) + 3).clip(0, 255)  # clip 1 redder by 3/255
    q = reconstruction_quality(recon, real)
    assert 2.5 < q["colour_error_max"] <= 3.0  # a few pixels saturate at 255
    assert q["colour_error_mean"] == pytest.approx(q["colour_error_max"] / 6, rel=0.05)  # 1 of 2 x 3 channels


def test_grain_raises_and_blur_lowers_the_high_frequency_ratio():
    real = _clips(size=48)
    checker = ((np.indices(real.shape[2:4]).sum(0) % 2) * 2 - 1)[None, None, :, :, None] * 10
    grainy = (real.astype(np.int16) + checker).clip(0, 255).astype(np.uint8)
    blurred = gaussian_filter(real.astype(np.float64), sigma=(0, 0, 1.2, 1.2, 0)).round().astype(np.uint8)
    assert reconstruction_quality(grainy, real)["hf_ratio"] > 1.25
    assert reconstruction_quality(blurred, real)["hf_ratio"] < 0.8
    assert laplacian_energy(np.full((2, 8, 8, 3), 77, np.uint8)) == 0.0


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="differ"):
        reconstruction_quality(_clips(n=2), _clips(n=3))


def test_keypoint_error_over_confident_points_only():
    real = np.zeros((5, 10, 3), np.float32)
    real[..., 2] = 1.0
    recon = real.copy()
    recon[..., 0] += 3.0
    recon[..., 1] += 4.0  # every point 5 px away
    recon[:, 0, :2] += 100.0
    recon[:, 0, 2] = 0.1  # ... except one the network is unsure of on the reconstruction: left out
    assert keypoint_error(recon, real, slice(0, 10)) == pytest.approx(5.0)
    real[..., 2] = 0.0
    assert np.isnan(keypoint_error(recon, real, slice(0, 10)))
    real[..., 2] = 1.0
    real[4, :, 2] = 0.1  # a frame where the network does not see the hands on the real frame: not counted
    assert keypoints_found(recon, real, slice(0, 10)) == (4 * 9, 4 * 10)  # the unsure point is not found
    assert keypoints_found(recon, real, slice(0, 1)) == (0, 4)
    with pytest.raises(ValueError, match="keypoints_found"):
        keypoints_found(recon[:, :5], real, slice(0, 10))


def test_vae_report_end_to_end(tmp_path):
    from dystream.evaluation import vae_report
    from dystream.models.vae import ReferenceGuidedVAE, VAEConfig
    from dystream.zoo.files import load_model, save_model

    torch.manual_seed(0)
    vae = ReferenceGuidedVAE(VAEConfig.from_preset("tiny", copy_warp=True))
    with torch.no_grad():
        vae.decoder.copy_head.to_flow.bias.copy_(torch.tensor([0.3, -0.4]))  # a warp 0.5 px long everywhere
    path = save_model(vae, tmp_path / "vae.safetensors", arch="vae")
    parser = argparse.ArgumentParser()
    vae_report.add_arguments(parser)
    out = tmp_path / "q.json"
    args = parser.parse_args([*_report_args(path, out), "--sheet", str(tmp_path / "s.png")])
    assert vae_report.run(args) == 0
    figures = json.loads(out.read_text())
    assert figures["clips"] == 2 and figures["frames"] == 8 and np.isfinite(figures["psnr"])
    # a fresh copy head's gate is sigmoid(-2) everywhere: the hook saw every decoded pixel of every region
    for region in ("moving", "still", "lips", "hands"):
        assert figures["copy_gate"][region] == pytest.approx(1 / (1 + np.exp(2.0)), abs=1e-5), region
        assert figures["copy_flow_px"][region] == pytest.approx(0.5, abs=1e-5), region
    where = figures["error_where_changed"]
    assert where["changed"]["pixels"] + where["unchanged"]["pixels"] == pytest.approx(1.0)
    assert where["changed"]["error_share"] + where["unchanged"]["error_share"] == pytest.approx(1.0)
    assert {"rmse_output", "rmse_estimate", "rmse_copy"} <= set(where["changed"])  # the tiny preset has a copy head
    assert {"hf_ratio_output", "hf_ratio_estimate", "hf_ratio_copy"} <= set(where["changed"])
    assert (tmp_path / "s.png").stat().st_size > 0
    # decoded with a sharper gate: the gate read off the hook is the scaled one, and the rewritten export carries it
    sharp = tmp_path / "sharp.safetensors"
    scaled = ["--copy-gate-scale", "1.5", "--copy-logit-scale", "2", "--write-export", str(sharp)]
    assert vae_report.run(parser.parse_args([*_report_args(path, out), *scaled])) == 0
    figures = json.loads(out.read_text())
    assert figures["copy_gate"]["still"] == pytest.approx(1 / (1 + np.exp(3.0)), abs=1e-5)
    assert (figures["copy_logit_scale"], figures["copy_gate_scale"]) == (2.0, 1.5)
    rewritten = load_model(sharp, arch="vae")
    assert (rewritten.config.copy_logit_scale, rewritten.config.copy_gate_scale) == (2.0, 1.5)
    for name, tensor in vae.state_dict().items():
        torch.testing.assert_close(rewritten.state_dict()[name], tensor, rtol=0, atol=0)
    assert vae_report.run(parser.parse_args([*_report_args(path, out), "--copy-gate-scale", "0"])) == 2
    args.vae = str(tmp_path / "missing.safetensors")
    assert vae_report.run(args) == 2


def _report_args(path, out) -> list[str]:
    """vae-report's arguments for two 8-frame clips of `path`, the figures written to `out`."""
    return ["--vae", str(path), "--clips", "2", "--frames", "8", "--json", str(out)]


def test_mean_by_region_averages_the_gate_inside_each_region():
    """A gate open exactly where the real video moves reads 1 there and 0 where it is still; one open exactly in the
    lips' box reads 1 there; a hand without confident keypoints has no box (NaN)."""
    from dystream.datamodules.keypoints import MOUTH
    from dystream.evaluation.vae_report import mean_by_region

    frames = _clips(n=2, t=4)
    luma = frames.astype(np.float32).mean(-1) / 255.0
    moving = np.zeros(luma.shape, bool)
    moving[:, 1:] = np.abs(np.diff(luma, axis=1)) > 0.05
    assert moving.any()
    kpts = np.zeros((4, 134, 3), np.float32)
    kpts[:, MOUTH, 0] = np.linspace(10, 14, MOUTH.stop - MOUTH.start)  # x 10-14, y 20-22, confident
    kpts[:, MOUTH, 1] = np.linspace(20, 22, MOUTH.stop - MOUTH.start)
    kpts[:, MOUTH, 2] = 1.0
    by_motion = mean_by_region(moving.astype(np.float32), frames, [kpts, kpts])
    assert by_motion["moving"] == 1.0 and by_motion["still"] == 0.0
    lips = np.zeros(luma.shape, np.float32)
    lips[:, :, 19:24, 9:16] = 1.0  # the box with a quarter of its size as padding: x 9-15, y 19.5-22.5
    by_box = mean_by_region(lips, frames, [kpts, kpts])
    assert by_box["lips"] == 1.0 and np.isnan(by_box["hands"])
    with pytest.raises(ValueError, match="do not match"):
        mean_by_region(lips[:, :3], frames, [kpts, kpts])


def test_error_where_changed_splits_the_error_by_where_the_frame_left_the_reference():
    """A block that differs from the reference is the changed region; an output wrong only there puts all of its
    squared error there, with the RMSE of the direct formula; a second video is scored on the same split."""
    from dystream.evaluation.vae_report import error_where_changed

    reference = np.full((1, 8, 8, 3), 100, np.uint8)
    real = np.repeat(reference[:, None], 2, axis=1)  # [1, 2, 8, 8, 3]
    real[0, 1, :2, :4] = 200  # 8 of the 128 pixels move
    output = real.copy()
    output[0, 1, :2, :4] = 170  # wrong by 30 where it moved, right elsewhere
    other = real.copy()
    other[..., 0] += 3  # wrong by 3 in one channel everywhere
    f = error_where_changed(real, reference, {"output": output, "other": other})
    assert f["changed"]["pixels"] == pytest.approx(8 / 128) and f["unchanged"]["pixels"] == pytest.approx(120 / 128)
    assert f["changed"]["error_share"] == pytest.approx(1.0) and f["unchanged"]["error_share"] == 0.0
    assert f["changed"]["rmse_output"] == pytest.approx(30.0) and f["unchanged"]["rmse_output"] == 0.0
    assert f["changed"]["rmse_other"] == pytest.approx(np.sqrt(9 / 3)) == f["unchanged"]["rmse_other"]


def test_error_where_changed_hf_ratio_matches_a_direct_laplacian():
    """The HF ratio of each region equals a hand-written 5-point Laplacian of the luma summed over the pixels it is
    centred on; an output flattened where the frame moved reads blur there, and a little outside, where the
    Laplacian of the block's rim reaches."""
    from dystream.evaluation.vae_report import error_where_changed

    rng = np.random.default_rng(0)
    reference = rng.integers(60, 120, (2, 10, 12, 3)).astype(np.uint8)
    real = np.repeat(reference[:, None], 3, axis=1)  # [2, 3, 10, 12, 3]
    real[:, 1:, 2:7, 3:9] = rng.integers(150, 250, (2, 2, 5, 6, 3))  # a textured block moves in
    output = real.copy()
    output[:, 1:, 2:7, 3:9] = real[:, 1:, 2:7, 3:9].mean(axis=(2, 3), keepdims=True).astype(np.uint8)  # drawn flat

    def energy(v: np.ndarray) -> np.ndarray:
        luma = (v.astype(np.float64) / 255.0) @ np.array([0.299, 0.587, 0.114])
        lap = luma[..., :-2, 1:-1] + luma[..., 2:, 1:-1] + luma[..., 1:-1, :-2] + luma[..., 1:-1, 2:]
        return (lap - 4 * luma[..., 1:-1, 1:-1]) ** 2

    changed = np.abs(real.astype(np.float32) - reference[:, None]).mean(-1) > 0.05 * 255
    f = error_where_changed(real, reference, {"output": output})
    for region, mask in (("changed", changed), ("unchanged", ~changed)):
        inner = mask[..., 1:-1, 1:-1]
        expected = energy(output)[inner].sum() / energy(real)[inner].sum()
        assert f[region]["hf_ratio_output"] == pytest.approx(expected, rel=1e-4), region
    assert f["changed"]["hf_ratio_output"] < 0.8  # only the flat block's own edges are left
    assert f["unchanged"]["hf_ratio_output"] < 1.0  # the block's rim: its Laplacian reaches one pixel outside


def test_psnr_over_time_is_the_psnr_of_each_run_of_frames():
    from dystream.evaluation.vae_report import psnr_over_time

    real = np.zeros((2, 6, 4, 4, 3), np.uint8)
    recon = real.copy()
    recon[0, 3:] = 10  # wrong by 10 in the second half of one clip
    # direct formula: the second bin's mean squared error is 100 over half of its clips
    expected = [10 * np.log10(255**2 / 1e-12), 10 * np.log10(255**2 / 50)]  # a perfect bin: the 1e-12 floor
    assert psnr_over_time(recon, real, frames_per_bin=3) == pytest.approx(expected)
