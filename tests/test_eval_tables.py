"""Benchmark tables (md/csv/json in the paper's Table 1/2 layout), the metric suite and `dystream eval`."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from dystream.datamodules.synthetic import synthesize
from dystream.evaluation import cli as eval_cli
from dystream.evaluation.networks.pose_small import PRESETS as POSE_PRESETS
from dystream.evaluation.networks.pose_small import PoseRegressor
from dystream.evaluation.networks.syncnet_small import PRESETS, SmallSyncNet
from dystream.evaluation.suite import NA, MetricSuite, SuiteConfig
from dystream.evaluation.tables import Row, write_tables
from dystream.zoo.files import save_model


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny tensors: torch's intra-op threads only add synchronisation here (several times slower on a busy 2-core
    # machine), so these tests run single-threaded and restore the setting afterwards
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TABLE1 = ["Method", "FID", "FVD", "FD-pose", "FD-sync", "Sync-C", "Sync-D", "HKV", "Steps", "Res.", "Time per 5 s (s)"]


def _rows(with_ase: bool = False) -> list[Row]:
    na = NA("metric weights 'pt_inception-2015-12-05-6726825d.pth' for FID unavailable: no path was given")
    values = {"fid": na, "sync_c": 4.5, "sync_d": 2.1, "hkv": 30.0, "lbkv": 1.0, "lhkv": 0.5, "lfkv": 0.25,
              "lbkv_clips": 16.0, "lhkv_clips": 11.0, "lfkv_clips": 16.0}  # fmt: skip
    voice = {"sync_c_other": 0.9, "sync_d_other": 7.0, "mouth_voice_r": 0.9, "mouth_voice_r_other": -0.01}
    gt = Row("Ground truth", "ground_truth", {**values, **voice, "drift_mean": 0.1}, resolution="64x64")
    exact = Row("Ground truth (exact keypoints)", "ground_truth_exact_keypoints", {"hkv": 90.0}, resolution="64x64")
    teacher = Row("Teacher", "teacher", {"fid": na, "fd_pose": 12.0, "sync_c": 1.0, "hkv": float("nan")},
                  steps=20, resolution="64x64", time_per_5s=3.25)  # fmt: skip
    if with_ase:
        teacher.values["ase"] = 4.2
    teacher.values["mouth_voice_r_speech_swapped"] = 0.25
    return [gt, exact, teacher]


def test_tables_writer_layout(tmp_path):
    paths = write_tables(_rows(), tmp_path, notes=["protocol note"], meta={"x": 1})
    md = (tmp_path / "results.md").read_text()
    header = md.splitlines()[4]
    assert header == "| Method | FID | FVD | FD-pose | FD-sync | Sync-C | Sync-D | HKV | Steps | Res. | Time (5 s) |"
    assert "| Method | LBKV | LHKV | LFKV | LBKV clips | LHKV clips | LFKV clips |" in md and "drift mean" in md
    assert "| Ground truth | 1.00 | 0.50 | 0.25 | 16 | 11 | 16 |" in md  # how many clips each mean covers
    assert "ASE" not in md and "IQA" not in md  # only when provided
    assert "n/a [a]" in md and "- [a] metric weights 'pt_inception" in md and "protocol note" in md
    assert "| Teacher | n/a [a] | — | 12.00 | — | 1.00 | — | nan | 20 | 64x64 | 3.2 s |" in md

    with open(tmp_path / "table1_talking.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == TABLE1
    assert rows[1][1].startswith("n/a (metric weights") and rows[1][5] == "4.5000"
    with open(tmp_path / "table2_listening.csv") as f:
        assert next(csv.reader(f)) == ["Method", "LBKV", "LHKV", "LFKV", "LBKV clips", "LHKV clips", "LFKV clips"]

    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["columns"]["table1"] == ["fid", "fvd", "fd_pose", "fd_sync", "sync_c", "sync_d", "hkv", "steps",
                                        "resolution", "time_per_5s"]  # fmt: skip
    assert doc["columns"]["table2"] == ["lbkv", "lhkv", "lfkv", "lbkv_clips", "lhkv_clips", "lfkv_clips"]
    assert doc["columns"]["table4"][-3:] == ["mouth_voice_r_speech_swapped", "mouth_response_speech",
                                              "mouth_unrelated_speech"]  # fmt: skip
    assert "| Ground truth | 4.50 | 0.90 | 2.10 | 7.00 | 0.900 | -0.010 | — | — | — |" in md  # Table 4
    assert "| Teacher | 1.00 | — | — | — | — | — | — | — | 0.250 |" in md
    with open(tmp_path / "table4_voice.csv") as f:
        head = next(csv.reader(f))
    assert head[:3] == ["Method", "Sync-C", "Sync-C, other voice"] and head[-1] == "unrelated mouth motion in speech"
    teacher = doc["rows"][2]
    assert teacher["values"]["fid"] == {"value": None, "na": _rows()[0].values["fid"].reason}
    assert teacher["values"]["hkv"] is None and teacher["time_per_5s"] == 3.25 and doc["meta"] == {"x": 1}
    assert set(paths) == {"md", "csv", "json"}

    write_tables(_rows(with_ase=True), tmp_path)
    with open(tmp_path / "table1_talking.csv") as f:
        assert next(csv.reader(f))[:4] == ["Method", "FID", "FVD", "ASE"]  # IQA still absent


def _clip_videos(n: int = 3, t: int = 40):
    from dystream.datamodules.synthetic import make_clip
    from dystream.evaluation.suite import EvalVideo

    clips = [make_clip(seed=1, split="val", index=i, size=32, seconds=t / 25) for i in range(n)]
    return [EvalVideo(c.key, c.video[1:], c.audio_self[640:], c.mask[1:], c.video[0], c.kpts[1:]) for c in clips]


def test_suite_reports_missing_networks_and_computes_the_rest():
    suite = MetricSuite(SuiteConfig(syncnet=None, pose=None))
    assert set(suite.unavailable) == {"sync", "pose", "fid", "fvd"}
    assert "recipes/metric_syncnet.yaml" in suite.unavailable["sync"]
    videos = _clip_videos()
    res = suite.evaluate(videos)
    assert isinstance(res.values["sync_c"], NA) and "metric_syncnet" in res.values["sync_c"].reason
    assert isinstance(res.values["hkv"], NA) and isinstance(res.values["fd_pose"], NA)
    assert isinstance(res.values["drift_mean"], float)  # identity drift needs no network
    exact = suite.evaluate(videos, exact_keypoints=True)  # ground-truth keypoints need no network
    assert isinstance(exact.values["hkv"], float)


def test_listening_means_report_how_many_clips_they_cover():
    """A clip without a listening segment gives no listening variance: it is left out of the mean and the count."""
    import dataclasses

    suite = MetricSuite(SuiteConfig(syncnet=None, pose=None))
    videos = _clip_videos(n=3, t=200)
    videos[0] = dataclasses.replace(videos[0], mask=np.ones_like(videos[0].mask))  # speaks throughout
    res = suite.evaluate(videos, exact_keypoints=True)
    for key in ("lbkv", "lhkv", "lfkv"):
        finite = [r[key] for r in res.per_video if np.isfinite(r[key])]
        assert res.values[f"{key}_clips"] == len(finite) and 1 <= len(finite) <= 2
        assert res.values[key] == pytest.approx(np.mean(finite))
    assert not np.isfinite(res.per_video[0]["lbkv"])
    assert isinstance(suite.evaluate(videos).values["lhkv_clips"], NA)  # no pose network: n/a, not 0


def test_suite_with_networks_gives_zero_fd_against_itself():
    torch.manual_seed(0)
    suite = MetricSuite(SuiteConfig(), syncnet=SmallSyncNet(PRESETS["tiny"]).eval(),
                        pose=PoseRegressor(POSE_PRESETS["tiny"]).eval())  # fmt: skip
    videos = _clip_videos()
    real = suite.evaluate(videos)
    again = suite.evaluate(videos, real=real.features)
    assert again.values["fd_pose"] == pytest.approx(0.0, abs=1e-6)
    assert again.values["fd_sync"] == pytest.approx(0.0, abs=1e-6)
    for k in ("sync_c", "sync_d", "hkv", "hkc"):
        assert isinstance(again.values[k], float)
    assert real.features["fd_sync"].n == 3 * (39 - 5)  # one lip window per frame but the last 5


def test_eval_config_errors_name_the_field(tmp_path):
    bad = tmp_path / "eval.yaml"
    bad.write_text("clips:\n  count: 4\n  framez: 12\n")
    with pytest.raises(ValueError, match=r"clips: unknown field\(s\) \['framez'\]"):
        eval_cli.load_config(bad)
    bad.write_text("models:\n  - {name: a, kind: wizard, weights: x}\n")
    with pytest.raises(ValueError, match=r"models\[0\].*kind must be 'teacher' or 'student'"):
        eval_cli.load_config(bad)
    assert eval_cli.load_config("recipes/eval.yaml").clips.frames == 96  # the shipped recipe parses


def test_eval_cli_end_to_end_with_a_missing_network_and_a_missing_model(tmp_path, capsys):
    synthesize(tmp_path / "data", clips=1, val_clips=3, size=32, seconds=1.6, workers=1)
    pose = save_model(PoseRegressor(POSE_PRESETS["tiny"]), tmp_path / "pose.safetensors", arch="metric_pose")
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(
        f"out: {tmp_path / 'results'}\n"
        f"clips: {{shards: {tmp_path / 'data' / 'val'}, count: 3, frames: 36, reference_frame: 0}}\n"
        f"metrics: {{syncnet: {tmp_path / 'no_syncnet.safetensors'}, pose: {pose}}}\n"
        "models:\n"
        f"  - {{name: Student SiD, kind: student, weights: {tmp_path / 'none.safetensors'}, recipe: stage1_sid}}\n"
    )
    parser = __import__("argparse").ArgumentParser()
    eval_cli.add_arguments(parser)
    assert eval_cli.run(parser.parse_args(["--config", str(recipe)])) == 0
    out = capsys.readouterr().out
    assert "eval: sync metrics n/a (metric weights 'syncnet.safetensors'" in out
    assert "dystream fit --config recipes/metric_syncnet.yaml" in out
    doc = json.loads((tmp_path / "results" / "results.json").read_text())
    names = [r["name"] for r in doc["rows"]]
    assert names == ["Ground truth", "Ground truth (exact keypoints)", eval_cli.MUTED_PARTNER_ROW,
                     "Ground truth, partner muted (synthetic world, exact keypoints)", "Student SiD"]  # fmt: skip
    gt, exact, muted, muted_exact, sid = doc["rows"]
    assert isinstance(muted["values"]["hkv"], float) and muted["values"]["fd_pose"] > 0  # re-rendered: not the real set
    assert isinstance(muted_exact["values"]["hkv"], float) and "sync_c" not in muted_exact["values"]
    assert "metric_syncnet" in gt["values"]["sync_c"]["na"] and isinstance(gt["values"]["hkv"], float)
    assert "metric_syncnet" in gt["values"]["sync_c_other"]["na"] and "mouth_voice_r_other" in gt["values"]
    assert isinstance(exact["values"]["hkv"], float) and "sync_c" not in exact["values"]
    # the labels' mouth is the own voice's envelope: r ~ 1 with it, far lower against another clip's voice
    assert exact["values"]["mouth_voice_r"] > 0.9 > exact["values"]["mouth_voice_r_other"] + 0.4
    # ... and all but a sliver of its spread in speech is the response to that voice
    assert exact["values"]["mouth_response_speech"] > 5 * exact["values"]["mouth_unrelated_speech"] > 0
    assert "make train RECIPE=stage1_sid" in sid["values"]["hkv"]["na"]
    assert "make train RECIPE=stage1_sid" in sid["values"]["mouth_voice_r_speech_swapped"]["na"]
    assert "Table 4: does the mouth follow the voice" in (tmp_path / "results" / "results.md").read_text()
    assert isinstance(gt["values"]["drift_mean"], float) and len(doc["meta"]["per_video"]["ground_truth"]) == 3


def test_suite_takes_the_published_networks_when_given(tmp_path):
    from dystream.evaluation.networks.syncnet import SyncNetV2

    torch.save(SyncNetV2().state_dict(), tmp_path / "syncnet_v2.model")  # random weights at the real key names
    suite = MetricSuite(SuiteConfig(syncnet=str(tmp_path / "syncnet_v2.model"), pose=None,
                                    dwpose_det=str(tmp_path / "yolox_l.onnx"), dwpose_pose=None))  # fmt: skip
    assert isinstance(suite.scorer.net, SyncNetV2) and suite.weights["sync"].name == "syncnet_v2"
    assert "yolox_l.onnx" in suite.unavailable["pose"]  # DWPose asked for, its files missing: n/a, no fallback


def test_suite_resolves_zoo_entry_names(tmp_path, monkeypatch):
    import dystream.zoo

    path = save_model(SmallSyncNet(PRESETS["tiny"]), tmp_path / "cached.safetensors", arch="metric_syncnet")
    monkeypatch.setattr(dystream.zoo, "is_entry", lambda name: name == "syncnet-small.synthetic")
    monkeypatch.setattr(dystream.zoo, "resolve", lambda name: path)  # what the zoo cache gives for the entry
    suite = MetricSuite(SuiteConfig(syncnet="syncnet-small.synthetic", pose=None))
    assert "sync" not in suite.unavailable and suite.weights["sync"].path == str(path)
    assert "pose" in suite.unavailable


def test_vae_reconstruction_rows(tmp_path):
    """`reconstruction_vae` adds the VAE's reconstructions of the real clips as a row (Fréchet distances against
    the real set), also scored against another clip's voice; batching does not change the reconstructions; a
    missing file is n/a."""
    from dystream.evaluation.generation import reconstruct
    from dystream.models.vae import ReferenceGuidedVAE, VAEConfig

    synthesize(tmp_path / "data", clips=1, val_clips=3, size=32, seconds=1.6, workers=1)
    torch.manual_seed(0)
    vae = save_model(ReferenceGuidedVAE(VAEConfig.from_preset("tiny")), tmp_path / "vae.safetensors", arch="vae")
    # The random pose network is seeded on its own (not after however many parameters the VAE drew); seed 0's
    # network puts every face keypoint on one spot of these frames, a 0.3 px face box that crop_faces refuses.
    torch.manual_seed(1)
    pose = save_model(PoseRegressor(POSE_PRESETS["tiny"]), tmp_path / "pose.safetensors", arch="metric_pose")
    sync = save_model(SmallSyncNet(PRESETS["tiny"]), tmp_path / "sync.safetensors", arch="metric_syncnet")
    recipe = tmp_path / "eval.yaml"
    body = (
        f"out: {tmp_path / 'results'}\n"
        f"clips: {{shards: {tmp_path / 'data' / 'val'}, count: 3, frames: 36, reference_frame: 0}}\n"
        f"metrics: {{syncnet: {sync}, pose: {pose}, min_segment_frames: 6, vshift: 3}}\n"
    )
    recipe.write_text(body + f"reconstruction_vae: {vae}\n")
    cfg = eval_cli.load_config(recipe)
    clips = eval_cli.load_clips(cfg.clips)
    one = reconstruct(str(vae), clips.references, clips.frames, batch_size=1)
    three = reconstruct(str(vae), clips.references, clips.frames, batch_size=3)
    assert one[0].shape == clips.frames[0].shape and one[0].dtype == clips.frames.dtype
    assert max(abs(a.astype(int) - b.astype(int)).max() for a, b in zip(one, three, strict=True)) <= 1
    with pytest.raises(ValueError, match="not a multiple of the VAE's 4 frames"):
        reconstruct(str(vae), clips.references, clips.frames[:, :35])

    rows, _, _ = eval_cli.evaluate(cfg, log=lambda *a: None)
    by_name = {r.name: r for r in rows}
    rec = by_name["VAE reconstruction"]
    assert isinstance(rec.values["fd_pose"], float) and rec.values["fd_pose"] > 0  # against the real clips
    assert isinstance(rec.values["sync_c"], float) and isinstance(rec.values["sync_c_other"], float)
    assert rec.values["sync_c_other"] != rec.values["sync_c"]  # scored against another clip's voice
    assert "mouth_voice_r_speech_swapped" not in rec.values  # only a model can be driven by another voice
    found = rec.values["hand_kpt_found"]  # a share of the real frames' hand keypoints, or NaN if none was seen
    assert isinstance(found, float) and (0.0 <= found <= 1.0 or np.isnan(found))

    recipe.write_text(body + f"reconstruction_vae: {tmp_path / 'none.safetensors'}\n")
    rows, _, _ = eval_cli.evaluate(eval_cli.load_config(recipe), log=lambda *a: None)
    (missing,) = [r for r in rows if r.kind == "vae_reconstruction"]
    assert "make train RECIPE=vae" in missing.values["sync_c"].reason


def test_models_are_driven_by_another_voice_for_the_swapped_column(tmp_path, monkeypatch):
    """With `swapped_voice`, each model generates twice: with its own voice, then with clip i + 1's voice (its own
    reference, mask and partner), and the second set is scored against the voice that drove it."""
    from dystream.evaluation import generation
    from dystream.evaluation.generation import GeneratedSet

    synthesize(tmp_path / "data", clips=1, val_clips=3, size=32, seconds=1.6, workers=1)
    pose = save_model(PoseRegressor(POSE_PRESETS["tiny"]), tmp_path / "pose.safetensors", arch="metric_pose")
    (tmp_path / "dit.safetensors").touch()
    calls = []
    by_voice = {}

    def fake_generate(spec, references, audio_self, audio_other, masks, **kw):
        calls.append((audio_self.copy(), audio_other.copy(), masks.copy(), references.copy()))
        # a model whose mouth is the real one of the clip whose voice drives it
        return GeneratedSet([by_voice[a.tobytes()] for a in audio_self], steps=1, seconds_per_clip=0.1)

    monkeypatch.setattr(generation, "generate", fake_generate)
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(
        f"clips: {{shards: {tmp_path / 'data' / 'val'}, count: 3, frames: 36, reference_frame: 0}}\n"
        f"metrics: {{syncnet: null, pose: {pose}}}\n"
        f"models:\n  - {{name: M, kind: student, weights: {tmp_path / 'dit.safetensors'}, vae: {pose}, "
        f"audio: {pose}}}\n"
    )
    cfg = eval_cli.load_config(recipe)
    clips = eval_cli.load_clips(cfg.clips)
    by_voice.update({a.tobytes(): f for a, f in zip(clips.audio_self, clips.frames, strict=True)})
    rows, _, _ = eval_cli.evaluate(cfg, log=lambda *a: None)
    (own_call, swapped_call) = calls
    assert (own_call[0] == clips.audio_self).all()
    assert (swapped_call[0] == np.roll(clips.audio_self, -1, axis=0)).all()
    for a, b in zip(own_call[1:], swapped_call[1:], strict=True):
        assert (a == b).all()  # partner voice, mask and reference are the clip's own
    gt, model = rows[0], rows[-1]
    assert model.values["mouth_voice_r"] == pytest.approx(gt.values["mouth_voice_r"])  # it reproduces the real clips
    assert isinstance(model.values["mouth_voice_r_speech_swapped"], float)

    recipe.write_text(recipe.read_text() + "swapped_voice: false\n")
    calls.clear()
    rows, _, _ = eval_cli.evaluate(eval_cli.load_config(recipe), log=lambda *a: None)
    assert len(calls) == 1 and "mouth_voice_r_speech_swapped" not in rows[-1].values
    recipe.write_text(recipe.read_text() + "swapped_voice: sometimes\n")
    with pytest.raises(ValueError, match="swapped_voice: expected true or false"):
        eval_cli.load_config(recipe)


def test_other_voice_scores_equal_scoring_against_that_voice():
    """`EvalVideo.other_audio` reuses the video's keypoints and lip embeddings: its `_other` values equal a separate
    evaluation of the same frames with that voice as the audio."""
    import dataclasses

    torch.manual_seed(0)
    suite = MetricSuite(SuiteConfig(vshift=3), syncnet=SmallSyncNet(PRESETS["tiny"]).eval(),
                        pose=PoseRegressor(POSE_PRESETS["tiny"]).eval())  # fmt: skip
    videos = _clip_videos()
    others = [videos[(i + 1) % len(videos)].audio for i in range(len(videos))]
    both = suite.evaluate([dataclasses.replace(v, other_audio=o) for v, o in zip(videos, others, strict=True)])
    direct = suite.evaluate([dataclasses.replace(v, audio=o) for v, o in zip(videos, others, strict=True)])
    for key in ("sync_c", "sync_d", "mouth_voice_r", "mouth_voice_r_speech"):
        assert both.values[f"{key}_other"] == pytest.approx(direct.values[key], rel=1e-9, abs=1e-12), key
    assert both.values["sync_c"] != both.values["sync_c_other"]
    assert "sync_c_other" not in suite.evaluate(videos).values  # only when another voice is given


def test_muted_partner_reference_is_the_shard_clips_rerendered_without_the_partner(tmp_path):
    """The muted-partner row re-renders each synthetic clip from its metadata with the partner muted; a clip the
    generator does not reproduce (here: keypoints that are not this generator's) gives no row."""
    from dystream.datamodules.synthetic import remake_clip

    synthesize(tmp_path / "data", clips=1, val_clips=3, size=32, seconds=2.0, workers=1)
    clips = eval_cli.load_clips(eval_cli.ClipsConfig(shards=str(tmp_path / "data" / "val"), count=3, frames=40))
    muted = eval_cli._muted_partner_clips(clips, log=print)
    assert muted.frames.shape == clips.frames.shape and muted.frames.dtype == np.uint8
    for i, meta in enumerate(clips.metas):
        again = remake_clip(meta, 50, 32, partner_reactions=False)
        np.testing.assert_array_equal(muted.frames[i], again.video[10:])
        np.testing.assert_array_equal(muted.kpts[i], again.kpts[10:])
    assert not np.array_equal(muted.frames, np.stack([remake_clip(m, 50, 32).video[10:] for m in clips.metas]))
    assert not muted.audio_other.any() and clips.audio_other.any()
    np.testing.assert_array_equal(muted.audio_self, clips.audio_self)
    np.testing.assert_array_equal(muted.masks, clips.masks)

    lines = []
    clips.kpts[1] = clips.kpts[1] + 2.0  # not what this generator draws for that clip
    assert eval_cli._muted_partner_clips(clips, log=lines.append) is None
    assert "is not reproduced by this generator" in lines[0] and clips.keys[1] in lines[0]
