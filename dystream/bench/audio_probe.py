"""Do the frozen audio features carry what the avatar needs? Linear probes, random-init vs pretrained encoder.

For each encoder, the per-video-frame features of the avatar's own voice (``AudioEncoder(audio_self)``,
``[T, D]``) of training clips fit three linear probes, scored on held-out validation clips:

- **mouth opening**: ridge regression onto the ground-truth inner-lip gap over the face scale (the clips' keypoint
  labels, :func:`dystream.evaluation.mouth_voice.mouth_opening`); R² over all frames and over the speaking frames
  only (syllable-level information: the speaking mask alone explains much of the variance over all frames);
- **speech envelope**: ridge regression onto the per-frame RMS of the voice; R²;
- **speaking vs silent**: logistic regression onto the speaking mask; accuracy;
- **the listener's reaction** (synthetic clips, which the generator can re-render with the partner muted,
  :func:`dystream.datamodules.synthetic.remake_clip`): ridge regression of the face keypoints' vertical offset
  between the clip and its muted-partner counterfactual (the nods and the attentive motion, in pixels) onto the
  *partner's* features (``AudioEncoder(audio_other)`` x (1 - mask), as the DiT's listen condition), over the listening
  frames; R² for windows of frames ``t + a .. t + b`` (the features of each frame in the window concatenated). The
  DiT's latent frame hears its own 4 video frames plus the look-ahead (``t - 3 .. t + 5`` at best) and
  ``audio_lookbehind_frames`` more before them: this row says how much of a reaction each window can explain.

Features are standardised with the training clips' statistics; ridge weight ``1e-2`` per feature and frame.
Encoders: the chain's random tiny encoder (preset ``tiny``, seed 0, what the teacher used before the audio stage)
and the audio stage's export ``runs/audio/audio.safetensors`` when it exists (`make train RECIPE=audio`).

    dystream bench audio-probe
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

PRETRAINED = "runs/audio/audio.safetensors"
RIDGE = 1e-2


REACTION_WINDOWS = ((0, 0), (-3, 5), (-8, 5), (-16, 5))  # frames t + a .. t + b of the partner's features


def probe_data(shards: str, clips: int) -> list[dict[str, np.ndarray]]:
    """The first ``clips`` clips of ``shards``: voice, partner's voice, speaking mask, mouth opening, envelope, and
    for synthetic clips the listener's reaction (face keypoints' y with the partner minus with the partner muted)."""
    from dystream.datamodules.format import frame_rms, read_shards, resolve_shards, sample_to_clip
    from dystream.datamodules.keypoints import FACE
    from dystream.datamodules.speakervid import synthesize_default
    from dystream.datamodules.synthetic import remake_clip
    from dystream.evaluation.keypoints import DWPOSE_134
    from dystream.evaluation.mouth_voice import mouth_opening

    if not Path(shards).is_dir() and shards.startswith("data/synthetic"):
        synthesize_default(Path(shards).parent, size=64, seed=0)  # the embedded default, as the DataModule writes it
    out = []
    for sample in read_shards(resolve_shards(shards).urls):
        clip = sample_to_clip(sample)
        if clip.kpts is None:
            raise ValueError(f"audio probe: clip {clip.key} of {shards} has no keypoint labels (mouth opening)")
        t = clip.n_frames
        item = dict(
            voice=clip.audio_self[: t * 640].astype(np.float32),
            partner=clip.audio_other[: t * 640].astype(np.float32),
            mask=clip.mask[:t].astype(np.float64),
            mouth=mouth_opening(clip.kpts[:t], DWPOSE_134),
            envelope=frame_rms(clip.audio_self, t),
        )
        if clip.meta.get("source") == "synthetic":
            try:
                muted = remake_clip(clip.meta, t, clip.video.shape[1], partner_reactions=False)
            except ValueError as e:
                raise ValueError(f"audio probe: clip {clip.key} of {shards}: {e}; regenerate the synthetic data") from e
            item["reaction"] = (clip.kpts[:t, FACE, 1] - muted.kpts[:t, FACE, 1]).mean(1).astype(np.float64)
        out.append(item)
        if len(out) == clips:
            break
    return out


@torch.no_grad()
def features(encoder: torch.nn.Module, data: list[dict[str, np.ndarray]], track: str = "voice") -> list[np.ndarray]:
    return [encoder(torch.from_numpy(d[track])[None])[0].double().cpu().numpy() for d in data]


def windowed(feats: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """``[T, D]`` -> ``[T, (hi - lo + 1) D]``: frame t carries the features of frames ``t + lo .. t + hi``, zeros
    outside the clip (no audio, as the DiT's padding)."""
    t = len(feats)
    padded = np.concatenate([np.zeros((max(-lo, 0), feats.shape[1])), feats, np.zeros((max(hi, 0), feats.shape[1]))])
    start = max(-lo, 0) + lo
    return np.concatenate([padded[start + k : start + k + t] for k in range(hi - lo + 1)], axis=1)


def reaction_probe(encoder: torch.nn.Module, train: list[dict], test: list[dict]) -> dict[str, float]:
    """R² of the listener's reaction over the listening frames from the partner's masked features, per window."""
    if not all("reaction" in d for d in train + test):
        return {}
    out = {}
    f_train, f_test = (
        [f * (1.0 - d["mask"][: len(f), None]) for f, d in zip(features(encoder, ds, "partner"), ds, strict=True)]
        for ds in (train, test)
    )
    y_train, y_test = (np.concatenate([d["reaction"] for d in ds]) for ds in (train, test))
    l_train, l_test = (np.concatenate([d["mask"] for d in ds]) < 0.5 for ds in (train, test))
    for lo, hi in REACTION_WINDOWS:
        x_train = np.concatenate([windowed(f, lo, hi) for f in f_train])
        x_test = np.concatenate([windowed(f, lo, hi) for f in f_test])
        mu, sd = x_train.mean(0), x_train.std(0) + 1e-8
        x_train, x_test = (x_train - mu) / sd, (x_test - mu) / sd
        r2 = ridge_r2(x_train[l_train], y_train[l_train], x_test[l_test], y_test[l_test])
        out[f"listener's reaction R² from partner frames t{lo:+d}..t{hi:+d}"] = r2
    return out


def ridge_r2(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> float:
    """R² on the test set of a ridge regression (with intercept) fitted on the training set."""
    a = np.c_[x_train, np.ones(len(x_train))]
    reg = RIDGE * len(x_train) * np.eye(a.shape[1])
    reg[-1, -1] = 0.0  # no penalty on the intercept
    w = np.linalg.solve(a.T @ a + reg, a.T @ y_train)
    pred = np.c_[x_test, np.ones(len(x_test))] @ w
    return float(1.0 - ((y_test - pred) ** 2).sum() / ((y_test - y_test.mean()) ** 2).sum())


def logistic_accuracy(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> float:
    """Test accuracy of an L2-regularised logistic regression fitted with L-BFGS."""
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    w = torch.zeros(xt.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = xt @ w[:-1] + w[-1]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, yt) + RIDGE * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    logits = torch.from_numpy(x_test) @ w[:-1].detach() + w[-1].detach()
    return float(((logits > 0).double() == torch.from_numpy(y_test)).double().mean())


def probe(encoder: torch.nn.Module, train: list[dict], test: list[dict]) -> dict[str, float]:
    """The three probes of one encoder (module docstring)."""
    f_train, f_test = np.concatenate(features(encoder, train)), np.concatenate(features(encoder, test))
    mu, sd = f_train.mean(0), f_train.std(0) + 1e-8
    f_train, f_test = (f_train - mu) / sd, (f_test - mu) / sd
    cat = {k: (np.concatenate([d[k] for d in train]), np.concatenate([d[k] for d in test])) for k in train[0]}
    (m_tr, m_te), (s_tr, s_te) = cat["mouth"], cat["mask"]
    ok_tr, ok_te = np.isfinite(m_tr), np.isfinite(m_te)
    speech_tr, speech_te = ok_tr & (s_tr > 0.5), ok_te & (s_te > 0.5)
    return {
        "mouth opening R2": ridge_r2(f_train[ok_tr], m_tr[ok_tr], f_test[ok_te], m_te[ok_te]),
        "mouth opening R2 in speech": ridge_r2(f_train[speech_tr], m_tr[speech_tr], f_test[speech_te], m_te[speech_te]),
        "speech envelope R2": ridge_r2(f_train, cat["envelope"][0], f_test, cat["envelope"][1]),
        "speaking accuracy": logistic_accuracy(f_train, s_tr, f_test, s_te),
        **reaction_probe(encoder, train, test),
    }


def render_table(table: dict[str, dict[str, float]]) -> str:
    """Markdown table: one row per probe, one column per encoder."""
    names = list(table)
    lines = ["| probe (val clips) | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for figure in next(iter(table.values())):
        lines.append(f"| {figure} | " + " | ".join(f"{table[n][figure]:.3f}" for n in names) + " |")
    return "\n".join(lines)


def encoders(pretrained: str | None = PRETRAINED) -> dict[str, torch.nn.Module]:
    from dystream.stages.conditioning import build_audio_encoder

    out = {"random init (tiny, seed 0)": build_audio_encoder("tiny", seed=0)}
    if pretrained and Path(pretrained).is_file():
        out[f"pretrained ({pretrained})"] = build_audio_encoder(pretrained)
    return out


def run(quick: bool = True, device: str = "cpu") -> dict[str, Any]:
    train = probe_data("data/synthetic/train", 16 if quick else 64)
    test = probe_data("data/synthetic/val", 16)
    figures: dict[str, Any] = {"clips (train / test)": f"{len(train)} / {len(test)}"}
    table: dict[str, dict[str, float]] = {}
    for name, encoder in encoders().items():
        table[name] = probe(encoder.to(device), train, test)
        for figure, value in table[name].items():
            figures[f"{name}: {figure}"] = value
    print(render_table(table), flush=True)
    if len(table) == 1:  # only the random encoder: no pretrained export yet
        figures["note"] = f"no {PRETRAINED}: train it with `make train RECIPE=audio` to compare"
    return figures
