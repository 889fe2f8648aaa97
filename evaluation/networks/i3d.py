"""I3D Kinetics-400 TorchScript of StyleGAN-V's FVD (`i3d_torchscript.pt`): 400-d logits per 16-frame clip.

The file is the TF-Hub I3D (`deepmind/i3d-kinetics-400/1`, whose weights differ from the originally released ones)
exported to TorchScript by the StyleGAN-V authors; its FVD matches the TF code to 1e-6 (notes/metrics.md §2.1).

Call convention (StyleGAN-V `frechet_video_distance.py` + `metric_utils.py`): the input is a uint8 tensor
[B, 3, T, H, W] in [0, 255], called with `rescale=True` (the script maps to [-1, 1] itself), `resize=True` (it resizes
to 224x224 itself) and `return_features=True` (raw logits before the softmax, [B, 400]). Passing [-1, 1] floats with
`rescale=True`, or uint8 with `rescale=False`, silently produces garbage, so `I3D_CALL_KWARGS` is the only way this
package calls it.

TorchScript archives can run code when loaded, so the file is hashed first and `torch.jit.load` is reached only when
the sha256 matches. No published hash of this file exists (the notes give none), so the caller must pass the hash
they trust and results are labelled "unverified".
"""

from __future__ import annotations

import os
import warnings

import torch

from dystream.evaluation.weights import MetricWeightsMissing, WeightsInfo, require_weights

__all__ = ["I3D_CALL_KWARGS", "I3D_CLIP_LEN", "I3D_FEATURE_DIM", "load_i3d_torchscript"]

I3D_CALL_KWARGS: dict[str, bool] = {"rescale": True, "resize": True, "return_features": True}
I3D_CLIP_LEN = 16  # StyleGAN-V fvd2048_16f
I3D_FEATURE_DIM = 400  # Kinetics-400 logits


def load_i3d_torchscript(
    path: str | os.PathLike | None,
    sha256: str | None,
    device: str | torch.device = "cpu",
) -> tuple[torch.jit.ScriptModule, WeightsInfo]:
    """Hash-check then load the I3D TorchScript -> (eval-mode module, WeightsInfo).

    `sha256` is required: the file is loaded only if its sha256 equals it. Raises `MetricWeightsMissing` (no path,
    no file, no hash given, hash mismatch, or not a TorchScript archive).
    """
    if sha256 is None:
        if path is None:
            raise MetricWeightsMissing("i3d_torchscript", "no path was given")
        raise MetricWeightsMissing(
            "i3d_torchscript",
            "no expected sha256 was given; the file is TorchScript (loading it can run code), so it is loaded only "
            "after its sha256 matches the hash you pass as sha256=... (no published hash exists to check against)",
        )
    info = require_weights("i3d_torchscript", path, expected_sha256=sha256)  # raises before any deserialisation
    try:
        with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript; the published artefact is one
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(info.path, map_location=device)
    except Exception as e:
        raise MetricWeightsMissing("i3d_torchscript", f"{info.path!r} is not a TorchScript archive ({e})") from e
    module.eval()
    return module, info
