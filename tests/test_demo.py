"""`dystream demo` end to end on tiny random networks and a tiny synthetic validation set: the DyStream sample file
with both scenarios, the mp4s from `dystream generate`, a contact sheet of the documented size and a GIF."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dystream import cli
from dystream.datamodules.synthetic import synthesize
from dystream.models.audio import AudioEncoder
from dystream.models.dit import AvatarDiT, DiTConfig
from dystream.models.vae import ReferenceGuidedVAE, VAEConfig
from dystream.streaming.demo import column_frames, contact_sheet, gif_size, sheet_size
from dystream.zoo.files import save_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_demo_renders_both_scenarios_a_sheet_and_a_gif(tmp_path):
    torch.manual_seed(0)
    dit = AvatarDiT(DiTConfig.from_preset("tiny"))
    with torch.no_grad():  # zero-initialised tensors (head, audio outputs) random, as after some training
        for p in dit.parameters():
            if not p.abs().any():
                p.normal_(0.0, 0.05)
    exports = {
        "--checkpoint": save_model(dit, tmp_path / "student.safetensors", "dit"),
        "--vae": save_model(ReferenceGuidedVAE(VAEConfig.from_preset("tiny")), tmp_path / "vae.safetensors", "vae"),
        "--audio": save_model(AudioEncoder("tiny"), tmp_path / "audio.safetensors", arch="audio"),
    }
    world = tmp_path / "world"
    synthesize(world, clips=1, val_clips=2, size=32, seconds=1.2, clips_per_identity=1, shard_samples=2, workers=1)
    out, sheet = tmp_path / "demo", tmp_path / "images" / "demo_sheet.png"
    argv = ["demo", "--out", str(out), "--sheet", str(sheet), "--val-shards", str(world / "val"), "--size", "32",
            "--columns", "5", "--scale", "2"]  # fmt: skip
    for flag, path in exports.items():
        argv += [flag, str(path)]
    assert cli.main(argv) == 0

    entries = json.loads((out / "samples.json").read_text())
    assert [e["video_id"] for e in entries] == ["own_voices", "other_voices"]
    assert entries[0]["resampled_video_path"] == entries[1]["resampled_video_path"]  # the same identity
    assert entries[0]["audio_self_path"] != entries[1]["audio_self_path"]  # driven by other voices
    image = Image.open(sheet)
    assert image.size == sheet_size((32, 32), columns=5, rows=4, scale=2)
    gif = Image.open(out / "demo.gif")
    assert gif.n_frames == 30 and gif.size == gif_size((32, 32), rows=3, scale=2) == (
        3 * (64 + 4) + 4,
        14 + 64 + 14 + 4,
    )

    from dystream.streaming.demo import _read_video

    own, other = _read_video(out / "own_voices.mp4"), _read_video(out / "other_voices.mp4")
    assert own.shape == other.shape == (30, 32, 32, 3)
    assert np.abs(own.astype(int) - other.astype(int)).mean() > 0.5  # other voices, other frames
    # the sheet shows the generated frames: its own-voices row, first column, is the first generated frame
    sheet_rgb = np.asarray(image.convert("RGB"))
    y, x = 18 + 1 * (64 + 14 + 4), 150 + 4
    assert np.abs(sheet_rgb[y : y + 64 : 2, x : x + 64 : 2].astype(int) - own[0].astype(int)).max() <= 1


def test_sheet_layout_and_phase_bars():
    frames = np.zeros((10, 16, 16, 3), np.uint8)
    mask = np.array([1] * 5 + [0] * 5, np.uint8)
    assert column_frames(10, 4) == [0, 3, 6, 9] and column_frames(3, 8) == [0, 1, 2]
    sheet = np.asarray(contact_sheet([("a", frames, mask)], columns=4, scale=1))
    assert sheet.shape[:2][::-1] == sheet_size((16, 16), 4, 1, 1)
    bar_y = 18 + 16 + 13  # the last pixel row of the bar under the first row
    first, last = sheet[bar_y, 150 + 4 + 12], sheet[bar_y, 150 + 4 + 3 * 20 + 12]
    assert tuple(first) == (232, 122, 38) and tuple(last) == (52, 118, 214)  # speaking, then listening
