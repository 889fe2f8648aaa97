"""AudioEncoder: shapes per video frame, parity with a direct Wav2Vec2 computation, freezing,
the official-checkpoint loader, and the speaking-mask routing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

from dystream.diffusion.sampling import LISTEN_KEY, TALK_KEY
from dystream.models.audio import (
    AUDIO_ENCODER_PRESETS,
    AudioEncoder,
    AudioEncoderConfig,
    audio_conditions,
    load_wav2vec2_weights,
    route_audio_features,
)

SPF = 640


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return AudioEncoder("tiny")


@pytest.mark.parametrize("frame_align,factor", [("mean", 1), ("concat", 2), ("interpolate", 1)])
@pytest.mark.parametrize("t", [1, 2, 5, 12, 13])
def test_output_is_one_feature_per_video_frame(frame_align, factor, t):
    enc = AudioEncoder(AudioEncoderConfig.from_name("tiny", frame_align=frame_align))
    out = enc(torch.randn(2, t * SPF))
    assert out.shape == (2, t, 32 * factor) and enc.feature_dim == 32 * factor


def test_feature_dim_and_presets():
    assert AudioEncoderConfig.from_name("tiny").feature_dim == 32  # = the tiny DiT's audio_dim
    base = AudioEncoderConfig.from_name("wav2vec2-base-960h")
    assert (base.hidden_size, base.num_hidden_layers, base.feature_dim) == (768, 12, 768)
    assert base.layers == tuple(range(1, 13)) and base.hop_length == 320 and base.receptive_field == 400
    cfg = AudioEncoderConfig.from_name("tiny", layers=(0, 1, 2), layer_combine="concat", frame_align="concat")
    assert cfg.feature_dim == 32 * 3 * 2
    assert set(AUDIO_ENCODER_PRESETS) >= {"tiny", "wav2vec2-base-960h"}


def direct_features(model: Wav2Vec2Model, wave: torch.Tensor, layers, pad=40) -> torch.Tensor:
    """Independent computation: HF feature extractor normalisation, 40-sample pads, HF hidden states,
    mean over layers, mean over the two 50 Hz frames of each video frame."""
    fe = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True)
    vals = fe([w.numpy() for w in wave], sampling_rate=16000, return_tensors="np")["input_values"]
    x = torch.from_numpy(np.asarray(vals, dtype=np.float32))
    x = torch.nn.functional.pad(x, (pad, pad))
    with torch.no_grad():
        hs = model(x, output_hidden_states=True).hidden_states
    h = torch.stack([hs[i] for i in layers]).mean(0)
    t = wave.shape[1] // SPF
    return torch.stack([h[:, 2 * i : 2 * i + 2].mean(1) for i in range(t)], dim=1)


def test_parity_with_direct_wav2vec2(tiny):
    wave = torch.randn(2, 7 * SPF) * torch.linspace(0.1, 2.0, 7 * SPF)
    with torch.no_grad():
        ours = tiny(wave)
    torch.testing.assert_close(ours, direct_features(tiny.wav2vec2, wave, tiny.config.layers), rtol=1e-4, atol=1e-5)


def test_frozen_by_default_and_stays_eval(tiny):
    assert tiny.frozen and not any(p.requires_grad for p in tiny.parameters())
    tiny.train()
    assert not tiny.training and not tiny.wav2vec2.training
    out = tiny(torch.randn(1, 3 * SPF))
    assert not out.requires_grad
    enc = AudioEncoder(AudioEncoderConfig.from_name("tiny", frozen=False))
    enc.train()
    assert enc.training and all(p.requires_grad for p in enc.parameters())
    enc.freeze().train()
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())


def test_bad_input_and_config(tiny):
    with pytest.raises(ValueError, match="multiple of 640"):
        tiny(torch.randn(1, 1000))
    with pytest.raises(ValueError, match=r"\[B, samples\]"):
        tiny(torch.randn(640))
    with pytest.raises(ValueError, match="conv_stride"):
        AudioEncoderConfig.from_name("tiny", conv_stride=(5, 2, 2, 2, 2, 2, 1))
    assert AudioEncoderConfig.from_name("tiny", conv_stride=(5, 2, 2, 2, 2, 2, 1), frame_align="interpolate")
    with pytest.raises(ValueError, match="layers"):
        AudioEncoderConfig.from_name("tiny", layers=(3,))
    with pytest.raises(ValueError, match="unknown preset"):
        AudioEncoderConfig.from_name("wav2vec2-huge")
    with pytest.raises(ValueError, match="unknown fields"):
        AudioEncoderConfig.from_name("tiny", hiden_size=3)


# ---------------------------------------------------------------------------------------------
# Loader
# ---------------------------------------------------------------------------------------------


def official_layout(model: Wav2Vec2Model, vocab: int = 32) -> dict[str, torch.Tensor]:
    """A Wav2Vec2ForCTC checkpoint as published: `wav2vec2.` prefix, weight_g/weight_v, lm_head."""
    out = {}
    for k, v in model.state_dict().items():
        k = k.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v"
        )
        out["wav2vec2." + k] = v.clone().contiguous()
    hidden = model.config.hidden_size
    out["lm_head.weight"] = torch.randn(vocab, hidden)
    out["lm_head.bias"] = torch.randn(vocab)
    return out


def test_loader_maps_the_official_base_layout(tmp_path):
    torch.manual_seed(1)
    source = Wav2Vec2Model(Wav2Vec2Config()).eval()  # the real wav2vec2-base layout, random weights
    state = official_layout(source)
    assert "wav2vec2.encoder.pos_conv_embed.conv.weight_g" in state and "wav2vec2.masked_spec_embed" in state
    save_file(state, str(tmp_path / "model.safetensors"))
    torch.manual_seed(2)
    enc = AudioEncoder("wav2vec2-base-960h")
    report = load_wav2vec2_weights(enc, tmp_path)  # a snapshot directory
    assert report.dropped == ["lm_head.bias", "lm_head.weight"]
    assert len(report.loaded) == len(source.state_dict())
    for k, v in source.state_dict().items():
        assert torch.equal(enc.wav2vec2.state_dict()[k], v), k
    # the loaded encoder computes the direct Wav2Vec2 features of the source model
    wave = torch.randn(1, 4 * SPF)
    with torch.no_grad():
        torch.testing.assert_close(enc(wave), direct_features(source, wave, range(1, 13)), rtol=1e-4, atol=1e-4)


def test_loader_bin_file_unprefixed_and_strict(tmp_path, tiny):
    torch.manual_seed(3)
    source = AudioEncoder("tiny")
    state = {k: v.clone() for k, v in source.wav2vec2.state_dict().items()}  # no prefix, parametrized names
    torch.save(state, tmp_path / "pytorch_model.bin")
    enc = AudioEncoder("tiny")
    report = load_wav2vec2_weights(enc, tmp_path / "pytorch_model.bin")
    assert report.dropped == []
    x = torch.randn(1, 2 * SPF)
    assert torch.equal(enc(x), source(x))

    missing = dict(state)
    missing.pop("encoder.layers.0.attention.q_proj.weight")
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match=r"missing \(1\).*q_proj"):
        load_wav2vec2_weights(enc, tmp_path / "missing.safetensors")
    extra = dict(state, **{"quantizer.codevectors": torch.zeros(1)})
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ValueError, match="unexpected.*quantizer"):
        load_wav2vec2_weights(enc, tmp_path / "extra.safetensors")
    wrong = dict(state, masked_spec_embed=torch.zeros(768))  # a base-size tensor in the tiny layout
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ValueError, match="shape mismatch.*masked_spec_embed"):
        load_wav2vec2_weights(enc, tmp_path / "wrong.safetensors")
    with pytest.raises(FileNotFoundError, match="wav2vec2-base-960h"):
        load_wav2vec2_weights(enc, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_wav2vec2_weights(enc, tmp_path / "empty")


# ---------------------------------------------------------------------------------------------
# Speaking-mask routing
# ---------------------------------------------------------------------------------------------


def test_mask_routes_features():
    own, partner = torch.randn(2, 6, 4), torch.randn(2, 6, 4)
    mask = torch.tensor([[1, 1, 0, 0, 1, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.uint8)
    talk, listen = route_audio_features(own, partner, mask)
    speaking = mask.bool()
    assert talk[~speaking].eq(0).all()  # a listening frame sees no talk features ...
    assert torch.equal(listen[~speaking], partner[~speaking])  # ... and the partner's features in listen
    assert torch.equal(talk[speaking], own[speaking]) and listen[speaking].eq(0).all()
    soft = torch.full((2, 6), 0.25)
    talk, listen = route_audio_features(own, partner, soft)
    torch.testing.assert_close(talk, 0.25 * own)
    torch.testing.assert_close(listen, 0.75 * partner)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        route_audio_features(own, partner, soft * 5)
    with pytest.raises(ValueError, match="mask must be"):
        route_audio_features(own, partner, soft[:, :5])


def test_audio_conditions_mask_features_not_waveform(tiny):
    t = 6
    audio_self, audio_other = torch.randn(2, t * SPF), torch.randn(2, t * SPF)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 1, 0, 1, 0, 1]], dtype=torch.float32)
    cond = audio_conditions(tiny, audio_self, audio_other, mask)
    own, partner = tiny(audio_self), tiny(audio_other)
    speaking = mask.bool()
    # speaking frames carry the features of the *unmasked* own waveform (muting the waveform would change them)
    torch.testing.assert_close(cond[TALK_KEY][speaking], own[speaking], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cond[LISTEN_KEY][~speaking], partner[~speaking], rtol=1e-5, atol=1e-6)
    assert cond[TALK_KEY][~speaking].eq(0).all() and cond[LISTEN_KEY][speaking].eq(0).all()
    muted = tiny(audio_self * mask.repeat_interleave(SPF, dim=1))
    assert not torch.allclose(muted[speaking], own[speaking], atol=1e-3)
