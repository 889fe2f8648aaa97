"""Zoo loaders for foreign checkpoints (Wan2.2 shards, Wav2Vec2, TorchScript I3D, DWPose), downloads, and the CLI.

Real files are never fetched: each test writes small files with the real key names and swaps the entry's published
hashes for the hashes of those files (``_with_files``), so the real verification path runs end to end.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
import torch

import dystream.zoo.registry as registry
from dystream.models.adapters import Wan22LoadReport
from dystream.models.dit import AvatarDiT, DiTConfig
from dystream.zoo import (
    ChecksumError,
    DownloadError,
    UnverifiedError,
    get_entry,
    load_pretrained,
    resolve,
)
from dystream.zoo.cache import download, import_files, sha256_file, status
from dystream.zoo.loaders import load_wan22_shards

# the wan2.2-ti2v-5b preset with tiny widths: same module tree, same state-dict key names
TINY_WAN = dict(in_channels=16, out_channels=16, dim=64, ffn_dim=128, num_heads=4, num_layers=2, freq_dim=64,
                text_dim=32, text_len=8, audio_dim=32, audio_tokens_per_frame=2)  # fmt: skip


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "zoo-cache"
    monkeypatch.setenv("DYSTREAM_CACHE", str(root))
    return root


def _with_files(monkeypatch, name: str, files: dict[str, Path | None], **changes):
    """Replace entry ``name`` by a copy whose files carry the hashes of ``files`` (None = keep unverified)."""
    entry = get_entry(name)
    remote = tuple(
        dataclasses.replace(rf, sha256=sha256_file(files[rf.basename]) if files.get(rf.basename) else None, size=None)
        for rf in entry.files
    )
    patched = dataclasses.replace(entry, files=remote, **changes)
    monkeypatch.setattr(registry, "ENTRIES", tuple(patched if e.name == entry.name else e for e in registry.ENTRIES))
    return patched


# ------------------------------------------------------------------------------------------------ Wan2.2


def _wan_checkpoint(tmp_path: Path, seed: int = 0, **config) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """Random tensors for exactly the Wan2.2 keys of the preset, sharded like the official files."""
    from safetensors.torch import save_file

    with torch.device("meta"):
        model = AvatarDiT(DiTConfig.from_preset("wan2.2-ti2v-5b", **(config or TINY_WAN)))
    new = set(model.extension_keys())
    g = torch.Generator().manual_seed(seed)
    state = {k: 0.05 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items() if k not in new}
    keys = sorted(state)
    shards = [keys[0::3], keys[1::3], keys[2::3]]
    paths = []
    for i, part in enumerate(shards, start=1):
        path = tmp_path / f"diffusion_pytorch_model-0000{i}-of-00003.safetensors"
        save_file({k: state[k] for k in part}, str(path))
        paths.append(path)
    return state, paths


def test_wan22_entry_maps_the_official_shards_and_reports_only_the_audio_modules(tmp_path, cache, monkeypatch):
    state, paths = _wan_checkpoint(tmp_path)
    _with_files(monkeypatch, "wan2.2-ti2v-5b.base", {p.name: p for p in paths})
    import_files(get_entry("wan2.2-ti2v-5b.base"), [tmp_path], cache)  # a directory: the files found by name
    assert status(get_entry("wan2.2-ti2v-5b.base"), cache) == "cached, verified"
    assert resolve("wan2.2-ti2v-5b.base") == cache / "files" / "wan2.2-ti2v-5b.base"

    model = load_pretrained("wan2.2-ti2v-5b.base", **TINY_WAN)
    report = model.load_report
    assert isinstance(report, Wan22LoadReport) and report.materialized
    assert sorted(report.loaded) == sorted(state)
    audio = ["audio_proj"] + [f"blocks.{i}.{m}" for i in range(2) for m in ("audio_attn", "interact_attn")]
    assert sorted(report.new_modules) == sorted(audio)
    assert not any(p.is_meta for p in model.parameters())
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())

    # the audio modules start at zero output: the model equals the plain Wan2.2 network with these weights
    base = AvatarDiT(DiTConfig.from_preset("wan2.2-ti2v-5b", **TINY_WAN, audio_attention=False))
    base.load_state_dict(state, strict=True)
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, cfg.in_channels, 4, 4, 4, generator=g)
    sigma = torch.tensor([[0.0, 0.5, 0.5, 0.5]])
    context = torch.randn(1, 3, cfg.text_dim, generator=g)
    talk = torch.randn(1, 12, cfg.audio_dim, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(
            model.eval()(x, sigma, talk, talk, context), base.eval()(x, sigma, None, None, context)
        )


def test_teacher_init_from_the_wan22_entry_gets_audio_modules_of_the_encoder_width(tmp_path, cache, monkeypatch):
    from safetensors.torch import save_file

    from dystream.stages.conditioning import build_dit

    widths = {k: v for k, v in TINY_WAN.items() if k not in ("in_channels", "out_channels", "audio_dim")}
    state, paths = _wan_checkpoint(tmp_path, **widths)  # the Wan2.2 VAE's 48 latent channels, as the real file
    _with_files(monkeypatch, "wan2.2-ti2v-5b.base", {p.name: p for p in paths})
    import_files(get_entry("wan2.2-ti2v-5b.base"), paths, cache)
    context = torch.randn(3, widths["text_dim"])
    save_file({"context": context}, str(tmp_path / "ctx.safetensors"))
    cond = dataclasses.make_dataclass("Cond", [("latent_channels", int), ("audio_dim", int)])(48, 24)
    model = build_dit("wan2.2-ti2v-5b", cond, init_weights="wan2.2-ti2v-5b.base",
                      text_context=str(tmp_path / "ctx.safetensors"), **widths)  # fmt: skip
    assert model.config.audio_dim == 24 and model.config.in_channels == 48
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    torch.testing.assert_close(model.fixed_text_context, context)
    x = torch.randn(1, 48, 4, 4, 4)
    with torch.no_grad():
        out = model(x, torch.tensor([[0.0, 0.5, 0.5, 0.5]]), torch.randn(1, 12, 24), None)  # context: the file's
    assert out.shape == x.shape and torch.isfinite(out).all()
    cond.latent_channels = 16  # a VAE the base weights do not fit: one clear error
    with pytest.raises(ValueError, match="DiT expects 48 latent channels"):
        build_dit("wan2.2-ti2v-5b", cond, init_weights="wan2.2-ti2v-5b.base", **widths)


def test_wan22_shards_must_cover_the_layout_exactly(tmp_path):
    from safetensors.torch import save_file

    state, paths = _wan_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="Missing: \\["):
        load_wan22_shards(paths[:2], **TINY_WAN)  # a shard short
    dup = tmp_path / "dup.safetensors"
    save_file({"head.modulation": state["head.modulation"]}, str(dup))
    with pytest.raises(ValueError, match="key 'head.modulation' is in both"):
        load_wan22_shards([*paths, dup], **TINY_WAN)


def test_wan22_download_needs_trust_for_the_unpublished_shards(cache, monkeypatch):
    calls = []
    monkeypatch.setattr("huggingface_hub.hf_hub_download", lambda *a, **k: calls.append(a))
    with pytest.raises(UnverifiedError, match="diffusion_pytorch_model-00001-of-00003.safetensors"):
        download(get_entry("wan2.2-ti2v-5b.base"), cache)
    assert not calls  # refused before anything was fetched


# ------------------------------------------------------------------------------------------------ downloads


def _fake_hub(files: dict[str, bytes], calls: list):
    def hf_hub_download(repo_id, filename, *, revision=None, local_dir=None, **kwargs):
        calls.append((repo_id, filename, revision))
        out = Path(local_dir) / filename
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(files[filename])
        return str(out)

    return hf_hub_download


def test_download_from_the_hub_is_pinned_verified_and_atomic(tmp_path, cache, monkeypatch):
    good, bad = b"syncnet weights", b"something else"
    (tmp_path / "syncnet_v2.model").write_bytes(good)
    entry = _with_files(monkeypatch, "syncnet.v2", {"syncnet_v2.model": tmp_path / "syncnet_v2.model"})
    calls: list = []
    monkeypatch.setattr("huggingface_hub.hf_hub_download", _fake_hub({"auxiliary/syncnet_v2.model": bad}, calls))
    with pytest.raises(ChecksumError, match=hashlib.sha256(bad).hexdigest()):
        download(entry, cache)
    assert calls == [("chunyu-li/LatentSync", "auxiliary/syncnet_v2.model", entry.revision)]
    assert not (cache / "files" / entry.name / "syncnet_v2.model").exists()  # a bad download never lands

    monkeypatch.setattr("huggingface_hub.hf_hub_download", _fake_hub({"auxiliary/syncnet_v2.model": good}, calls))
    [path] = download(entry, cache)
    assert path.read_bytes() == good and status(entry, cache) == "cached, verified"
    assert sorted(p.name for p in path.parent.iterdir()) == ["syncnet_v2.model"]  # no staging left
    download(entry, cache)  # already cached and verified: no second fetch
    assert len(calls) == 2


def test_download_by_url_and_unpinned_revision_warning(tmp_path, cache, monkeypatch):
    payload = tmp_path / "served.pth"
    payload.write_bytes(b"inception weights")
    entry = _with_files(monkeypatch, "inception-v3.fid", {"pt_inception-2015-12-05-6726825d.pth": payload})
    rf = dataclasses.replace(entry.files[0], url=payload.as_uri())
    entry = dataclasses.replace(entry, files=(rf,))
    [path] = download(entry, cache)  # urllib over file://: the same code path as https
    assert path.read_bytes() == payload.read_bytes()

    unpinned = dataclasses.replace(get_entry("dwpose.yolox-l"), revision="main")
    monkeypatch.setattr("huggingface_hub.hf_hub_download", _fake_hub({"yolox_l.onnx": b"x"}, []))
    with pytest.warns(UserWarning, match="not a commit"), pytest.raises(ChecksumError):
        download(unpinned, cache)


def test_download_failure_is_one_clear_error(cache, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", offline)
    with pytest.raises(DownloadError, match="dystream zoo import dwpose.yolox-l PATH"):
        download(get_entry("dwpose_det"), cache)


# ------------------------------------------------------------------------------------------------ other loaders


def test_wav2vec2_entry_loads_an_official_layout_checkpoint(tmp_path, cache, monkeypatch):
    from safetensors.torch import save_file

    from dystream.models.audio import AudioEncoder

    source = AudioEncoder("tiny")
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ckpt = {f"wav2vec2.{k}": v.contiguous() for k, v in source.wav2vec2.state_dict().items()}
    ckpt["lm_head.weight"] = torch.zeros(4, 32)  # Wav2Vec2ForCTC's head: dropped and reported
    save_file(ckpt, str(tmp_path / "model.safetensors"))
    _with_files(monkeypatch, "wav2vec2-base-960h.facebook", {"model.safetensors": tmp_path / "model.safetensors"},
                arch="audio:tiny")  # fmt: skip
    import_files(get_entry("wav2vec2-base-960h.facebook"), [tmp_path / "model.safetensors"], cache)
    encoder = load_pretrained("wav2vec2-base-960h.facebook")
    assert encoder.load_report.dropped == ["lm_head.weight"] and encoder.frozen
    wave = torch.randn(1, 3 * 640)
    with torch.no_grad():
        torch.testing.assert_close(encoder(wave), source.eval()(wave))

    from dystream.stages.conditioning import build_audio_encoder

    filled = build_audio_encoder("tiny", weights="wav2vec2-base-960h.facebook")  # a preset + weights by zoo name
    with torch.no_grad():
        torch.testing.assert_close(filled(wave), encoder(wave))


class _FakeI3D(torch.nn.Module):
    def forward(self, x: torch.Tensor, rescale: bool, resize: bool, return_features: bool) -> torch.Tensor:
        return x.float().mean(dim=(2, 3, 4)).repeat(1, 134)[:, :400]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch deprecates TorchScript; the published file is one
def test_i3d_torchscript_is_loaded_only_after_its_hash_matches(tmp_path, cache, monkeypatch):
    path = tmp_path / "i3d_torchscript.pt"
    torch.jit.save(torch.jit.script(_FakeI3D()), str(path))
    _with_files(monkeypatch, "i3d.kinetics400", {"i3d_torchscript.pt": path})
    import_files(get_entry("i3d_torchscript"), [path], cache)
    module = load_pretrained("i3d_torchscript")
    clips = torch.randint(0, 255, (2, 3, 16, 8, 8), dtype=torch.uint8)
    assert module(clips, rescale=True, resize=True, return_features=True).shape == (2, 400)

    loads = []
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: loads.append(a))
    cached = resolve("i3d_torchscript")
    cached.write_bytes(cached.read_bytes() + b"\0")
    with pytest.raises(ChecksumError):
        load_pretrained("i3d_torchscript")
    assert not loads  # the tampered archive was never deserialised


def test_dwpose_entry_builds_the_backend_from_both_files(tmp_path, cache, monkeypatch):
    det, pose = tmp_path / "yolox_l.onnx", tmp_path / "dw-ll_ucoco_384.onnx"
    det.write_bytes(b"det")
    pose.write_bytes(b"pose")
    _with_files(monkeypatch, "dwpose.yolox-l", {"yolox_l.onnx": det})
    _with_files(monkeypatch, "dwpose.dw-ll-ucoco-384", {"dw-ll_ucoco_384.onnx": pose})
    import_files(get_entry("dwpose_det"), [det], cache)
    import_files(get_entry("dwpose_pose"), [pose], cache)

    class Session:
        def __init__(self, path: str) -> None:
            self.path = path

        def get_inputs(self):
            return [type("Input", (), {"shape": [1, 3, 384, 288], "name": "input"})]

    backend = load_pretrained("dwpose_pose", session_factory=Session)
    assert Path(backend.det.path) == resolve("dwpose_det") and Path(backend.pose.path) == resolve("dwpose_pose")
    assert backend.pose_wh == (288, 384)


def test_text_context_encoding_keeps_only_the_real_tokens():
    from transformers import UMT5Config, UMT5EncoderModel

    from dystream.zoo.text_context import encode_prompt_context

    torch.manual_seed(0)
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2,
                                          relative_attention_num_buckets=8)).eval()  # fmt: skip
    ids = torch.tensor([[5, 9, 17, 1]])  # prompt tokens + EOS
    short = encode_prompt_context(encoder, torch.nn.functional.pad(ids, (0, 4)), torch.tensor([[1] * 4 + [0] * 4]))
    long = encode_prompt_context(encoder, torch.nn.functional.pad(ids, (0, 12)), torch.tensor([[1] * 4 + [0] * 12]))
    assert short.shape == (4, 16) and short.dtype == torch.float32
    torch.testing.assert_close(short, long)  # padding never changes the context the DiT receives
    with torch.no_grad():
        torch.testing.assert_close(short, encoder(input_ids=ids).last_hidden_state[0])


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_list_info_and_import(tmp_path, cache, monkeypatch, capsys):
    from dystream.cli import main

    payload = tmp_path / "syncnet_v2.model"
    payload.write_bytes(b"weights")
    _with_files(monkeypatch, "syncnet.v2", {"syncnet_v2.model": payload})
    assert main(["zoo", "import", "syncnet_v2", str(payload)]) == 0
    assert main(["zoo", "list", "--kind", "metric"]) == 0
    out = capsys.readouterr().out
    assert f"cache: {cache}" in out
    line = next(row for row in out.splitlines() if row.startswith("syncnet.v2 ("))
    assert "cached, verified" in line and "(syncnet_v2)" in line
    assert "i3d.kinetics400 (i3d_torchscript)" in out and "not cached" in out
    assert main(["zoo", "info", "wan2.2-ti2v-5b.base"]) == 0
    out = capsys.readouterr().out
    assert "hf://Wan-AI/Wan2.2-TI2V-5B@921dbaf3f1674a56f47e83fb80a34bac8a8f203e" in out and "--trust" in out
    assert main(["zoo", "download", "no-such.entry"]) == 1
    assert "unknown zoo entry" in capsys.readouterr().err
