"""torch.compile of the hot paths equals eager: the streaming chunk step and a training step (tiny presets, CPU).

The inductor CPU backend needs a C++ compiler; without one these tests skip with that reason. CUDA graphs
(``mode="reduce-overhead"``, used by ``StreamingConfig.compile`` on CUDA) are checked only where CUDA exists.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from dystream.callbacks.compile import CompileModules, CompileOptions, compile_in_place
from dystream.models.audio import AudioEncoder
from dystream.models.dit import AvatarDiT, DiTConfig
from dystream.models.vae import ReferenceGuidedVAE, VAEConfig
from dystream.streaming.avatar import StreamingAvatar

needs_compiler = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None,
    reason="torch.compile's inductor CPU backend needs a C++ compiler (c++/g++ not found)",
)


def _chunk_inputs(cfg: DiTConfig, c: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, cfg.in_channels, c, 8, 8, generator=g)
    audio = torch.randn(1, cfg.chunk_audio_frames(c), cfg.audio_dim, generator=g)
    return x, torch.full((1, c), 0.5), audio


@needs_compiler
@torch.inference_mode()
def test_compiled_streaming_chunk_step_equals_eager():
    torch.manual_seed(0)
    dit = AvatarDiT(DiTConfig.from_preset("tiny")).eval()
    cfg = dit.config
    cache = dit.new_kv_cache(1)
    dit.forward_chunk(torch.randn(1, cfg.in_channels, 1, 8, 8), torch.zeros(1, 1), None, None, cache)
    x, sigma, audio = _chunk_inputs(cfg, cfg.chunk_frames)
    while cache.num_frames < cfg.layout.max_cached_frames:  # the fixed-shape steady state
        dit.forward_chunk(x, sigma, audio, audio, cache)
    step = torch.compile(dit.forward_chunk, dynamic=False)  # what StreamingConfig.compile does on a CPU
    for seed in (1, 2):  # a second call reuses the compiled graph
        x, sigma, audio = _chunk_inputs(cfg, cfg.chunk_frames, seed)
        eager = dit.forward_chunk(x, sigma, audio, audio, cache, write_cache=False)
        compiled = step(x, sigma, audio, audio, cache, write_cache=False)
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_streaming_config_compile_selects_the_compiled_step():
    torch.manual_seed(0)
    nets = (AvatarDiT(DiTConfig.from_preset("tiny")), ReferenceGuidedVAE(VAEConfig.from_preset("tiny")))
    ref = np.zeros((64, 64, 3), np.uint8)
    plain = StreamingAvatar(*nets, AudioEncoder("tiny"), ref, threaded=False)
    compiled = StreamingAvatar(*nets, AudioEncoder("tiny"), ref, threaded=False, compile=True)
    assert plain._forward_chunk == plain.generator.forward_chunk
    assert compiled._forward_chunk != compiled.generator.forward_chunk  # compiled lazily, on the first chunk


@needs_compiler
def test_compile_callback_training_step_equals_eager():
    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.dit = AvatarDiT(DiTConfig.from_preset("tiny")).train()
    eager = AvatarDiT(holder.dit.config).train()
    eager.load_state_dict(holder.dit.state_dict())
    keys = list(holder.dit.state_dict())
    assert compile_in_place(holder, CompileOptions(modules=["dit"])) == ["dit"]
    assert list(holder.dit.state_dict()) == keys  # in place: checkpoints and exports keep their names
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 4, 8, 8, generator=g)
    sigma = torch.rand(2, 4, generator=g)
    audio = torch.randn(2, 12, 32, generator=g)
    losses = []
    for net in (holder.dit, eager):
        loss = net(x, sigma, audio, audio).square().mean()
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-6)
    for (name, a), b in zip(holder.dit.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_compile_callback_names_a_missing_network():
    with pytest.raises(ValueError, match="has no network 'student'"):
        compile_in_place(torch.nn.Module(), CompileOptions(modules=["student"]))
    with pytest.raises(ValueError, match="CompileModules.mode"):
        CompileModules(mode="fast")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs (mode reduce-overhead) need a CUDA device")
def test_cuda_graph_stream_equals_eager():
    torch.manual_seed(0)
    nets = (AvatarDiT(DiTConfig.from_preset("tiny")), ReferenceGuidedVAE(VAEConfig.from_preset("tiny")))
    ref = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    rng = np.random.default_rng(1)
    own, other = (rng.standard_normal(12 * 640 * 8).astype(np.float32) * 0.1 for _ in range(2))
    frames = []
    for compile in (False, True):
        session = StreamingAvatar(*nets, AudioEncoder("tiny"), ref, device="cuda", threaded=False, compile=compile)
        frames.append(np.stack(session.push(own, other, 1.0) + session.flush()).astype(int))
    assert np.abs(frames[0] - frames[1]).max() <= 2
