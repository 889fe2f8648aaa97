"""Ablation machinery (docs/ablation.md): the no-sink layout (streaming == masked forward), each row's overlay builds
the intended layout, the long-stream inputs and the bucket aggregation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from test_dit import _inputs, _randomize, _stream

from dystream.evaluation.ablation import ROWS, bucket_means, long_stream_inputs
from dystream.models.attention import CausalLayout
from dystream.models.dit import AvatarDiT, DiTConfig


def _overrides(path: str) -> dict:
    return yaml.safe_load(open(path))["model"]["init_args"]["student_overrides"]


# ------------------------------------------------------------------------------------------------ no-sink layout
@pytest.mark.parametrize("n_chunks, rapr", [(5, False), (2, False), (5, True)])
def test_no_reference_sink_streaming_equals_block_causal_forward(n_chunks, rapr):
    torch.set_num_threads(1)
    cfg = DiTConfig.from_preset(
        "tiny", reference_sink=False, sink_chunks=0, window_frames=6, rapr=rapr, rapr_max_distance=6
    )
    model = _randomize(AvatarDiT(cfg).eval())
    x, sigma, talk, listen = _inputs(cfg, n_chunks, hw=4)
    with torch.no_grad():
        full = model(x, sigma, talk, listen, attention="block_causal")
        streamed, cache = _stream(model, x, sigma, talk, listen, denoise_steps=1)
    assert (streamed - full).abs().max() <= 1e-5
    if n_chunks >= 3:  # the window (6 frames) has evicted the reference
        assert 0 not in cache.frame_ids and cache.num_frames == 6


def test_no_reference_sink_needs_sink_chunks_zero():
    with pytest.raises(ValueError, match="reference_sink=False.*sink_chunks=0"):
        CausalLayout(reference_sink=False, sink_chunks=1)
    with pytest.raises(ValueError, match="DiTConfig.reference_sink"):
        DiTConfig.from_preset("tiny", reference_sink=False)  # the preset's sink_chunks is 1


# ------------------------------------------------------------------------------------------------ rows' layouts
def _layout(row: str) -> CausalLayout:
    ode, sid = (_overrides(f"recipes/ablation/{row}_{s}.yaml") for s in ("ode", "sid"))
    assert ode == sid  # both stage-1 runs of a row train the same layout
    return DiTConfig.from_preset("mini", **ode).layout


def _stream_positions(layout: CausalLayout, frames: int) -> list[tuple[list[int], list[int], list[int]]]:
    """(key frames, key RoPE indices, query indices) of every chunk of a `frames`-frame stream."""
    out = []
    for start, size in layout.chunks(frames)[1:]:
        past = layout.visible_frames(start)
        q, k = layout.positions(start, size, past)
        out.append((past + list(range(start, start + size)), k, q))
    return out


def test_baseline_row_evicts_the_reference_and_uses_absolute_indices():
    layout = _layout("baseline")
    assert (layout.reference_sink, layout.sink_frames, layout.window_frames, layout.rapr) == (False, 0, 9, False)
    chunks = _stream_positions(layout, 199)  # 1 + 66 chunks of 3
    last_keys, last_pos, last_q = chunks[-1]
    assert 0 not in last_keys and last_keys == list(range(187, 199))
    assert last_pos == last_keys and last_q == [196, 197, 198]  # absolute
    assert 0 in chunks[2][0] and 0 not in chunks[3][0]  # the reference leaves the window at the 4th chunk


def test_sink_row_keeps_reference_and_first_chunk_with_absolute_indices():
    layout = _layout("sink")
    assert (layout.sink_frames, layout.window_frames, layout.rapr) == (4, 6, False)
    keys, pos, q = _stream_positions(layout, 199)[-1]
    assert keys == [0, 1, 2, 3, *range(190, 199)]
    assert pos == keys and q == [196, 197, 198]


def test_rapr_row_reindexes_the_window():
    layout = _layout("rapr")
    assert (layout.sink_frames, layout.window_frames, layout.rapr, layout.rapr_max_distance) == (4, 6, True, 10)
    keys, pos, q = _stream_positions(layout, 199)[-1]
    assert keys == [0, 1, 2, 3, *range(190, 199)]
    assert pos == list(range(13)) and q == [10, 11, 12]
    assert layout == DiTConfig.from_preset("mini").layout  # today's stage 1 default


def test_stage2_rows_differ_only_in_the_global_branch():
    plain, full = (
        yaml.safe_load(open(f"recipes/ablation/{r}_gan.yaml"))["model"]["init_args"] for r in ("gan_plain", "full")
    )
    assert plain["global_branch"] is False and full["global_branch"] is True
    assert plain["student"] == full["student"] == "runs/ablation/rapr/stage1_sid/student.safetensors"
    from dystream.models.discriminator import ConsistencyAwareDiscriminator, DiscriminatorConfig

    heads = {b: ConsistencyAwareDiscriminator(DiscriminatorConfig(global_branch=b)).global_head for b in (False, True)}
    assert heads[False] is None and heads[True] is not None  # "GAN w/o D_CA": per-frame logits only


def test_teacher_rows_mask_mode():
    pre, post = (
        yaml.safe_load(open(f"recipes/ablation/{r}_teacher.yaml"))["model"]["init_args"]
        for r in ("pre_mask", "post_mask")
    )
    assert (pre["mask_mode"], post["mask_mode"]) == ("waveform", "features")


def test_every_row_has_its_overlays():
    import os

    for row in ROWS:
        for step in row.steps:
            assert os.path.isfile(step.overlay), step.overlay
            assert step.export.startswith(f"runs/ablation/{step.overlay.split('/')[-1].rsplit('_', 1)[0]}/")


# ------------------------------------------------------------------------------------------------ inputs, buckets
def test_long_stream_inputs_are_exact_and_aligned():
    n, t = 3, 100
    rng = np.random.default_rng(0)
    own = rng.standard_normal((n, t * 640)).astype(np.float32)
    other = rng.standard_normal((n, t * 640)).astype(np.float32)
    masks = (rng.random((n, t)) > 0.5).astype(np.float32)
    inp = long_stream_inputs(own, other, masks, seconds=10.3, first=2)  # 257.5 -> 258 frames over 3 pieces
    frames = round(10.3 * 25)
    assert inp.frames == frames and inp.audio_self.shape == inp.audio_other.shape == (frames * 640,)
    assert inp.sources == [2, 0, 1]
    # frame 150 is frame 50 of the second piece (clip 0): mask and both tracks from the same clip and time
    assert inp.mask[150] == masks[0, 50]
    assert np.array_equal(inp.audio_self[150 * 640 : 151 * 640], own[0, 50 * 640 : 51 * 640])
    assert np.array_equal(inp.audio_other[150 * 640 : 151 * 640], other[0, 50 * 640 : 51 * 640])
    assert np.array_equal(inp.audio_self[-640:], own[1, 57 * 640 : 58 * 640])


def test_bucket_means_match_direct_computation():
    v = np.arange(30, dtype=float) ** 2
    got = bucket_means(v, 7)
    want = [v[0:7].mean(), v[7:14].mean(), v[14:21].mean(), v[21:28].mean(), v[28:30].mean()]
    assert np.allclose(got, want) and len(got) == 5


def test_writer_tables_and_json(tmp_path):
    import json

    from dystream.evaluation.ablation import RowResult, write_outputs

    vals = {"identity": 0.9, "sync_c": 2.5, "hkv": 40.0, "fd_pose": 0.1}
    rows = [
        RowResult("rapr", "+ RAPR", "student", "w", short=vals, long={**vals, "identity_last": 0.8},
                  buckets={"time_s": [0.0, 10.0], "identity": [0.9, 0.8], "sync_c": [2.5, 2.4]}, rtf=1.0),
        RowResult("baseline", "Baseline", "student", "w", status="w missing"),
        RowResult("pre_mask", "Pre-Mask", "teacher", "t", short={"sync_c": 1.0, "lbkv": 6.652, "lhkv": 111.448,
                  "lfkv": 0.4376, "hkv": 30.0, "fd_pose": None}),
    ]  # fmt: skip
    real = {"sync_c": 4.2, "lbkv": 17.05, "lhkv": 239.44, "lfkv": 0.76, "hkv": 516.0, "fd_pose": None}
    meta = {"identities": 2, "seconds": 20.0, "bucket_s": 10.0, "short_s": 4.0, "identity_measure": "pixel",
            "real": real, "reference_image": np.zeros((8, 8, 3), np.uint8)}  # fmt: skip
    written = write_outputs(rows, meta, str(tmp_path / "ablation.md"), None, "dystream ablation eval")
    md = (tmp_path / "ablation.md").read_text()
    assert "| + RAPR | 0.900 | 2.50 | 40.0 | 0.10 | 0.900 | 0.800 |" in md
    assert "| Real clips (reference) | 4.20 | 17.05 | 239.4 | 0.76 | 516.0 | n/a |" in md
    assert "| Pre-Mask | 1.00 | 6.65 | 111.4 | 0.44 | 30.0 | n/a |" in md
    assert "- baseline: w missing" in md and "`dystream ablation eval`" in md
    data = json.loads((tmp_path / "ablation.json").read_text())
    assert [r["name"] for r in data["rows"]] == ["rapr", "baseline", "pre_mask"] and len(written) == 2
    assert data["meta"]["real"]["lhkv"] == 239.44 and "reference_image" not in data["meta"]


def test_frame_sheet_shows_reference_and_each_rows_stream(tmp_path):
    from PIL import Image

    from dystream.evaluation.ablation import RowResult, snapshot_frames, write_outputs

    picks = snapshot_frames(3000)  # a 120-s stream: 0, 20, ..., 100 s and its last frame
    assert picks == [0, 500, 1000, 1500, 2000, 2500, 2999] and snapshot_frames(30) == [0, 29]
    vals = {"identity": 0.9, "sync_c": 2.5, "hkv": 40.0, "fd_pose": 0.1}
    colours = [(255, 0, 0), (0, 0, 255)]
    rows = [
        RowResult(n, n, "student", "w", short=vals, long={**vals, "identity_last": 0.8},
                  buckets={"time_s": [0.0], "identity": [0.9], "sync_c": [2.5]},
                  snapshots=np.broadcast_to(np.array(c, np.uint8), (len(picks), 8, 8, 3)).copy())
        for n, c in zip(("baseline", "rapr"), colours, strict=True)
    ]  # fmt: skip
    meta = {"identities": 1, "seconds": 120.0, "bucket_s": 10.0, "short_s": 4.0, "identity_measure": "pixel",
            "reference_image": np.full((8, 8, 3), 255, np.uint8), "sheet_frames": picks}  # fmt: skip
    sheet = tmp_path / "frames.png"
    written = write_outputs(rows, meta, str(tmp_path / "ablation.md"), None, "x", str(sheet))
    assert str(sheet) in written and "frames.png" in (tmp_path / "ablation.md").read_text()
    img = np.asarray(Image.open(sheet).convert("RGB"))
    # each row's colour fills exactly its time columns (8x8 frames drawn at scale 2), in one band of rows
    for colour in colours:
        ys, _ = np.nonzero(np.all(img == colour, axis=-1))
        assert len(ys) == len(picks) * 16 * 16 and ys.max() - ys.min() == 15
    assert np.all(img == (255, 255, 255), axis=-1).sum() > 2 * 16 * 16


def test_writer_drift_plot(tmp_path):
    pytest.importorskip("matplotlib", reason="the drift plot needs matplotlib")
    from dystream.evaluation.ablation import RowResult, write_outputs

    vals = {"identity": 0.9, "sync_c": 2.5, "hkv": 40.0, "fd_pose": 0.1}
    rows = [
        RowResult("rapr", "+ RAPR", "student", "w", short=vals, long={**vals, "identity_last": 0.8},
                  buckets={"time_s": [0.0, 10.0], "identity": [0.9, None], "sync_c": [2.5, 2.4]}, rtf=1.0),
    ]  # fmt: skip
    meta = {"identities": 2, "seconds": 20.0, "bucket_s": 10.0, "short_s": 4.0, "identity_measure": "pixel"}
    png = tmp_path / "images" / "ablation_drift.png"
    written = write_outputs(rows, meta, str(tmp_path / "results" / "ablation.md"), str(png), "dystream ablation eval")
    assert str(png) in written and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "](../images/ablation_drift.png)" in (tmp_path / "results" / "ablation.md").read_text()
