"""Zoo: entry table invariants, cache resolution, local builds, verification, and the errors that replace downloads."""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch

from dystream.models.audio import AudioEncoder
from dystream.models.dit import AvatarDiT, DiTConfig
from dystream.models.vae import ReferenceGuidedVAE, VAEConfig
from dystream.zoo import (
    ENTRIES,
    ChecksumError,
    NotCachedError,
    PretrainedEntry,
    RemoteFile,
    UnknownEntryError,
    UnverifiedError,
    ZooError,
    cache_dir,
    get_entry,
    list_pretrained,
    load_pretrained,
    resolve,
)
from dystream.zoo.cache import build_local, import_files, local_manifest, sha256_file, status
from dystream.zoo.files import save_model
from dystream.zoo.loaders import LOADERS

ROOT = Path(__file__).resolve().parents[1]

# local entry -> (family, how the test model is built)
LOCAL = {
    "video-vae.synthetic": "vae",
    "avatar-dit.teacher": "dit",
    "audio-encoder.teacher": "audio",
    "avatar-dit.ode-init": "dit",
    "avatar-dit.sid": "dit",
    "avatar-dit.rgan": "dit",
}


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere (fresh inits have zero heads, which would make output parity trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _build(family: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    if family == "vae":
        return _perturb(ReferenceGuidedVAE(VAEConfig.from_preset("tiny")), seed)
    if family == "audio":
        return _perturb(AudioEncoder("tiny"), seed)
    return _perturb(AvatarDiT(DiTConfig.from_preset("tiny")), seed)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, dict[str, torch.nn.Module]]:
    """A runs/ directory with every local export, as the stages write them (save_model + extra stage)."""
    root = tmp_path_factory.mktemp("runs")
    models = {}
    for i, (name, family) in enumerate(LOCAL.items()):
        entry = get_entry(name)
        model = _build(family, seed=10 + i)
        save_model(model, root / entry.export, arch=family, extra={"stage": entry.produced_by, "step": 7})
        models[name] = model
    return root, models


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "zoo-cache"
    monkeypatch.setenv("DYSTREAM_CACHE", str(root))
    return root


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to reach the network fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the zoo tried to use the network")

    import huggingface_hub

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)


# ------------------------------------------------------------------------------------------------ the table


def test_table_names_aliases_loaders_and_hashes_are_consistent():
    names = [e.name for e in ENTRIES]
    keys = names + [a for e in ENTRIES for a in e.aliases]
    assert len(keys) == len(set(keys))
    assert list_pretrained() == names
    for entry in ENTRIES:
        assert entry.loader in LOADERS, entry.name
        assert get_entry(entry.name) is entry
        for alias in entry.aliases:
            assert get_entry(alias) is entry
        if entry.source == "hf" and any(f.sha256 for f in entry.files):
            assert entry.pinned, f"{entry.name}: a published hash needs the pinned revision it was read at"
    wan = get_entry("wan2.2-ti2v-5b.base")
    assert [f.filename for f in wan.files] == [
        f"diffusion_pytorch_model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)
    ]
    assert wan.preset == "wan2.2-ti2v-5b" and not wan.verified  # shards 1-2 have no published hash
    assert list_pretrained("metric") == [e.name for e in ENTRIES if e.kind == "metric"]


def test_metric_aliases_are_the_names_the_evaluation_errors_print():
    from dystream.evaluation.weights import METRIC_WEIGHTS

    aliases = {a for e in ENTRIES if e.kind == "metric" for a in e.aliases}
    assert aliases == set(METRIC_WEIGHTS)
    for name, spec in METRIC_WEIGHTS.items():
        assert get_entry(name).files[0].basename == spec.filename


def test_docs_list_every_entry_with_source_and_license():
    text = (ROOT / "docs" / "zoo.md").read_text()
    for entry in ENTRIES:
        assert f"`{entry.name}`" in text, entry.name
        for alias in entry.aliases:
            assert f"`{alias}`" in text, alias
        for f in entry.files:
            if f.sha256:
                assert f.sha256 in text, (entry.name, f.basename)
    assert "dystream zoo import" in text and "--trust" in text and "DYSTREAM_CACHE" in text


def test_entry_validation_names_the_field():
    with pytest.raises(ValueError, match="sha256 must be 64 lowercase hex"):
        RemoteFile("a.bin", "ABC")
    with pytest.raises(ValueError, match="relative path"):
        RemoteFile("../a.bin", None)
    with pytest.raises(ValueError, match="name must be 'arch.tag'"):
        PretrainedEntry(name="nodot", arch="dit", kind="teacher", loader="dystream", export="a", produced_by="x",
                        license="x")  # fmt: skip
    with pytest.raises(ValueError, match="revision is required"):
        PretrainedEntry(name="a.b", arch="dit", kind="base", loader="wan22", hf_repo="x/y",
                        files=(RemoteFile("f", None),), license="x")  # fmt: skip
    with pytest.raises(ValueError, match="produced_by"):
        PretrainedEntry(name="a.b", arch="dit", kind="teacher", loader="dystream", export="t/t.safetensors",
                        license="x")  # fmt: skip


def test_unknown_names_suggest_close_entries():
    with pytest.raises(UnknownEntryError, match="did you mean avatar-dit.sid"):
        get_entry("avatar-dit.sdi")


def test_importing_the_zoo_builds_reads_and_downloads_nothing(tmp_path):
    code = (
        "import sys, dystream.zoo as z; z.list_pretrained(); z.get_entry('avatar-dit.sid');"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env={"DYSTREAM_CACHE": str(tmp_path / "c"), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert out.stdout.strip() == "False"  # not even torch is imported
    assert not (tmp_path / "c").exists()


def test_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DYSTREAM_CACHE", raising=False)
    assert cache_dir() == tmp_path / "home" / ".cache" / "dystream"
    monkeypatch.setenv("DYSTREAM_CACHE", str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env"
    assert cache_dir(tmp_path / "arg") == tmp_path / "arg"


# ------------------------------------------------------------------------------------------------ empty cache


@pytest.mark.parametrize("name", [e.name for e in ENTRIES])
def test_empty_cache_raises_the_documented_error_instead_of_downloading(name, cache, no_network):
    entry = get_entry(name)
    with pytest.raises(NotCachedError) as err:
        load_pretrained(name, trust=True)
    message = str(err.value)
    assert "Nothing is downloaded at run time" in message or entry.source == "local"
    if entry.source in ("hf", "url"):
        assert f"dystream zoo download {name}" in message and f"dystream zoo import {name} PATH" in message
    elif entry.source == "manual":
        assert f"dystream zoo import {name} PATH" in message
    else:
        assert "make zoo" in message and entry.produced_by in message
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, ZooError)
    assert not cache.exists() or not any(cache.rglob("*.safetensors"))


def test_interrupted_download_is_reported_as_such(cache):
    entry = get_entry("syncnet.v2")
    partial = cache / "files" / entry.name / "syncnet_v2.model.partial"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"half a file")
    with pytest.raises(NotCachedError, match="download was interrupted"):
        load_pretrained("syncnet_v2")
    assert status(entry, cache) == "partial download"


# ------------------------------------------------------------------------------------------------ local entries


def test_build_local_then_every_local_entry_loads_a_working_identical_model(runs, cache, no_network):
    root, models = runs
    report = build_local(ENTRIES, root, cache)
    assert {name for name, what, _ in report if what == "built"} == set(LOCAL)
    manifest = local_manifest(cache)
    for name, original in models.items():
        record = manifest[name]
        src = root / get_entry(name).export
        assert record["sha256"] == sha256_file(src) == sha256_file(cache / record["file"])
        assert record["recipe"] == get_entry(name).produced_by and record["step"] == 7
        assert record["commit"] == json.loads(_meta(src)["dystream.extra"])["commit"]
        assert status(get_entry(name), cache) == "cached, verified"

        model = load_pretrained(name)
        assert type(model) is type(original) and model.config == original.config
        loaded, ref = model.state_dict(), original.state_dict()
        assert loaded.keys() == ref.keys() and all(torch.equal(loaded[k], ref[k]) for k in ref)
        if name in ("video-vae.synthetic", "audio-encoder.teacher", "avatar-dit.sid"):  # one forward per family
            with torch.no_grad():
                torch.testing.assert_close(_run(model), _run(original), rtol=0, atol=0)
        assert model.file_extra["stage"] == get_entry(name).produced_by  # the file records its recipe


def _meta(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def _run(model: torch.nn.Module) -> torch.Tensor:
    """A forward pass of each family on tiny fixed inputs."""
    g = torch.Generator().manual_seed(0)
    if isinstance(model, ReferenceGuidedVAE):
        ref = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
        return model.encode(ref[:, :, None], references=ref[:, None])
    if isinstance(model, AudioEncoder):
        return model(torch.randn(1, 4 * 640, generator=g))
    cfg = model.config
    x = torch.randn(1, cfg.in_channels, 4, 8, 8, generator=g)
    sigma = torch.tensor([[0.0, 0.7, 0.7, 0.7]])
    talk = torch.randn(1, 12, cfg.audio_dim, generator=g)
    return model(x, sigma, talk, torch.zeros_like(talk))


def test_synthetic_syncnet_entry_collects_the_metric_export(tmp_path, cache):
    syncnet_small = pytest.importorskip("dystream.evaluation.networks.syncnet_small")
    from dystream.zoo.files import ARCHITECTURES

    if "metric_syncnet" not in ARCHITECTURES:
        pytest.skip("the synthetic SyncNet is not a registered file architecture yet")
    net = _perturb(syncnet_small.SmallSyncNet(syncnet_small.PRESETS["tiny"]), 3)
    save_model(net, tmp_path / "metric_syncnet" / "syncnet.safetensors", arch="metric_syncnet",
               extra={"stage": "metric_syncnet"})  # fmt: skip
    assert [n for n, what, _ in build_local(ENTRIES, tmp_path, cache) if what == "built"] == ["syncnet-small.synthetic"]
    loaded = load_pretrained("syncnet-small.synthetic")
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_load_overrides_rebuild_the_config_and_keep_the_weights(runs, cache):
    build_local(ENTRIES, runs[0], cache)
    model = load_pretrained("avatar-dit.sid", window_frames=None, rapr=False)
    assert model.config.window_frames is None and not model.config.rapr
    ref = runs[1]["avatar-dit.sid"].state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_pretrained("avatar-dit.sid", ffn_dim=128)  # changes a shape: strict loading refuses


def test_one_byte_change_in_a_cached_file_is_refused(runs, cache, capsys):
    build_local(ENTRIES, runs[0], cache)
    path = cache / local_manifest(cache)["avatar-dit.teacher"]["file"]
    expected = sha256_file(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError) as err:
        load_pretrained("avatar-dit.teacher")
    assert expected in str(err.value) and sha256_file(path) in str(err.value) and "make zoo" in str(err.value)
    assert status(get_entry("avatar-dit.teacher"), cache) == "cached, changed since verified"
    from dystream.cli import main

    assert main(["zoo", "verify", "avatar-dit.teacher", "avatar-dit.sid"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  avatar-dit.teacher" in out and "OK    avatar-dit.sid" in out
    build_local(ENTRIES, runs[0], cache)  # rebuilding repairs it
    assert load_pretrained("avatar-dit.teacher") is not None


def test_build_local_refuses_a_file_from_another_stage(tmp_path, cache):
    model = _build("dit", 0)
    save_model(model, tmp_path / "stage1_sid" / "student.safetensors", arch="dit", extra={"stage": "stage1_ode"})
    with pytest.raises(ZooError, match="exported by stage 'stage1_ode'"):
        build_local(ENTRIES, tmp_path, cache)
    save_model(model, tmp_path / "stage1_sid" / "student.safetensors", arch="dit", extra={"stage": "stage1_sid"})
    save_model(_build("audio", 0), tmp_path / "vae" / "vae.safetensors", arch="audio", extra={"stage": "vae"})
    with pytest.raises(ZooError, match="holds a 'audio' model"):
        build_local(ENTRIES, tmp_path, cache)


# ------------------------------------------------------------------------------------------------ import / resolve


def test_import_of_a_wrong_file_is_refused_with_expected_and_actual_hash(tmp_path, cache, no_network):
    wrong = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    wrong.write_bytes(b"not the inception weights")
    entry = get_entry("fid_inception")
    with pytest.raises(ChecksumError) as err:
        import_files(entry, [wrong], cache)
    assert entry.files[0].sha256 in str(err.value) and sha256_file(wrong) in str(err.value)
    assert not (cache / "files" / entry.name / wrong.name).exists()
    assert not list((cache / "files" / entry.name).iterdir())  # no temporary left behind either

    from dystream.cli import main

    assert main(["zoo", "import", "fid_inception", str(wrong)]) == 1


def test_unverified_entry_needs_trust_then_its_pin_guards_it(tmp_path, cache, capsys):
    context = torch.randn(5, 32)
    src = tmp_path / "ctx.safetensors"
    from safetensors.torch import save_file

    save_file({"context": context}, str(src))
    name = "wan2.2-ti2v-5b.prompt-context"
    with pytest.raises(UnverifiedError, match=sha256_file(src)):
        import_files(get_entry(name), [src], cache)
    import_files(get_entry(name), [src], cache, trust=True)
    assert sha256_file(src) in capsys.readouterr().out  # printed so the user can pin it in the table
    assert json.loads((cache / "trusted.json").read_text())[name] == {"prompt_context.safetensors": sha256_file(src)}
    torch.testing.assert_close(load_pretrained(name), context)
    assert status(get_entry(name), cache) == "cached, verified (your pin)"

    cached = resolve(name)
    cached.write_bytes(cached.read_bytes()[:-1])  # truncated after the fact
    with pytest.raises(ChecksumError, match="the hash you pinned|your --trust pin"):
        load_pretrained(name, trust=True)  # trust does not override a pin


def test_resolve_paths_entries_and_nonsense(runs, cache, tmp_path):
    plain = tmp_path / "x.safetensors"
    plain.write_bytes(b"")
    assert resolve(plain) == plain and resolve(str(plain)) == plain
    build_local(ENTRIES, runs[0], cache)
    assert resolve("avatar-dit.sid") == cache / "local" / "avatar-dit.sid.safetensors"
    with pytest.raises(UnknownEntryError) as err:
        resolve("runs/nothing/here.safetensors")
    assert isinstance(err.value, FileNotFoundError) and "neither an existing file nor a zoo entry" in str(err.value)


def test_stages_accept_zoo_names_wherever_they_accept_paths(runs, cache):
    from dystream.stages.common import load_frozen
    from dystream.stages.conditioning import AvatarConditioner, build_audio_encoder, build_dit

    build_local(ENTRIES, runs[0], cache)
    vae = load_frozen("video-vae.synthetic", "vae")
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    cond = AvatarConditioner(vae="video-vae.synthetic", audio="audio-encoder.teacher")
    teacher = build_dit("tiny", cond, init_weights="avatar-dit.teacher")
    ref = runs[1]["avatar-dit.teacher"].state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in teacher.state_dict().items())
    audio = build_audio_encoder("audio-encoder.teacher")
    assert not audio.training and audio.feature_dim == cond.audio_dim
    # plain paths keep working exactly as before
    path = runs[0] / "vae" / "vae.safetensors"
    assert load_frozen(path, "vae").config == vae.config
    with pytest.raises(ZooError, match="holds a 'vae' network, expected a 'dit'"):
        build_dit("tiny", cond, init_weights="video-vae.synthetic")


def test_dit_text_context_from_a_zoo_entry(tmp_path, cache):
    from safetensors.torch import save_file

    from dystream.stages.conditioning import build_dit

    context = torch.randn(3, 32)
    save_file({"context": context}, str(tmp_path / "ctx.safetensors"))
    import_files(get_entry("wan2.2-ti2v-5b.prompt-context"), [tmp_path / "ctx.safetensors"], cache, trust=True)
    cond = dataclasses.make_dataclass("Cond", [("latent_channels", int), ("audio_dim", int)])(16, 32)
    model = build_dit("tiny", cond, text_context="wan2.2-ti2v-5b.prompt-context", learned_text_context=False)
    torch.testing.assert_close(model.fixed_text_context, context)
    torch.save(context * 2, tmp_path / "ctx.pt")  # the old .pt path form still works
    model = build_dit("tiny", cond, text_context=str(tmp_path / "ctx.pt"), learned_text_context=False)
    torch.testing.assert_close(model.fixed_text_context, context * 2)
