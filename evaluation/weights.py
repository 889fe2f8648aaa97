"""Metric network weight files: where they come from, how they are checked, and the one error a missing file raises.

No metric backbone (InceptionV3, I3D, SyncNet, DWPose) ships in a PyPI wheel (notes/metrics.md §0), and nothing in
dystream downloads at run time. Every metric loader therefore takes an explicit path, checks it here and, when the
file is absent or wrong, raises `MetricWeightsMissing`: table code catches that one type and prints
"n/a (reason)". Numbers are never computed from random weights outside the tests.

The origin URLs below are documentation only; they are never fetched.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dystream.zoo.cache import sha256_file  # one hashing routine for the zoo and the metric weights

__all__ = [
    "METRIC_WEIGHTS",
    "TRAINED_METRIC_WEIGHTS",
    "MetricDependencyMissing",
    "MetricUnavailable",
    "MetricWeightsMissing",
    "MetricWeightsSpec",
    "WeightsInfo",
    "load_state_dict_checked",
    "require_weights",
    "sha256_file",
]


@dataclass(frozen=True)
class MetricWeightsSpec:
    """One metric network weight file.

    `sha256` is set only where a published hash exists; `sha256_prefix` is the torch.hub file-name convention
    (`name-<first 8 hex digits of sha256>.pth`), reported but not enforced because the upstream authors never
    published the full hash.
    """

    name: str  # zoo / error-message name, e.g. "syncnet_v2"
    filename: str  # the file name the upstream code uses
    metric: str  # which metric needs it
    origin: str  # where the file is published (documentation only, never fetched)
    sha256: str | None = None
    sha256_prefix: str | None = None
    note: str = ""
    provide: str = ""  # how to get a file that is not published (our synthetic metric networks are trained here)


_LIGHT_ASD = "https://github.com/Junhua-Liao/Light-ASD/raw/ed38c232de5efe0261dbd68627c0ade7cdfe14eb/weight"

# name -> spec. Sources: notes/metrics.md §1.1 (FID), §2.1 (FVD), §3.1 (SyncNet), §4.1 (DWPose).
METRIC_WEIGHTS: dict[str, MetricWeightsSpec] = {
    spec.name: spec
    for spec in (
        MetricWeightsSpec(
            name="fid_inception",
            filename="pt_inception-2015-12-05-6726825d.pth",
            metric="FID",
            origin="https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
            "pt_inception-2015-12-05-6726825d.pth",
            sha256_prefix="6726825d",
            note="torch-fidelity's weights-inception-2015-12-05-6726825d.pth has the same key names and also loads",
        ),
        MetricWeightsSpec(
            name="i3d_torchscript",
            filename="i3d_torchscript.pt",
            metric="FVD",
            origin="https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt (StyleGAN-V)",
            note="TorchScript: loaded only after its sha256 matches the hash you pass (no published hash exists)",
        ),
        MetricWeightsSpec(
            name="syncnet_v2",
            filename="syncnet_v2.model",
            metric="Sync-C / Sync-D",
            origin="http://www.robots.ox.ac.uk/~vgg/software/lipsync/data/syncnet_v2.model",
        ),
        MetricWeightsSpec(
            name="dwpose_det",
            filename="yolox_l.onnx",
            metric="HKC / HKV / LBKV / LHKV / LFKV (person detector)",
            origin="https://huggingface.co/yzd-v/DWPose (yolox_l.onnx)",
        ),
        MetricWeightsSpec(
            name="dwpose_pose",
            filename="dw-ll_ucoco_384.onnx",
            metric="HKC / HKV / LBKV / LHKV / LFKV (133-keypoint whole-body pose)",
            origin="https://huggingface.co/yzd-v/DWPose (dw-ll_ucoco_384.onnx)",
        ),
        # Active-speaker detection (notes/data_and_vae.md §1.6): speaking masks of real clips, hence the speaking
        # segments Sync-C/D is scored on. Light-ASD ships its weights in its git repository; S3FD's come from the
        # Google Drive link that TalkNet-ASD and Light-ASD download (no hash published for either).
        MetricWeightsSpec(
            name="light_asd_ava",
            filename="pretrain_AVA_CVPR.model",
            metric="speaking masks by active-speaker detection (dystream data pack --asd-weights)",
            origin=f"{_LIGHT_ASD}/pretrain_AVA_CVPR.model",
        ),
        MetricWeightsSpec(
            name="light_asd_talkset",
            filename="finetuning_TalkSet.model",
            metric="speaking masks by active-speaker detection (dystream data pack --asd-weights)",
            origin=f"{_LIGHT_ASD}/finetuning_TalkSet.model",
        ),
        MetricWeightsSpec(
            name="s3fd_face",
            filename="sfd_face.pth",
            metric="face detection for active-speaker masks (dystream data pack --face-detector-weights)",
            origin="https://drive.google.com/uc?id=1KafnHz7ccT-3IyddBsL5yi2xGtxAKypt (the file TalkNet-ASD and "
            "Light-ASD download as model/faceDetector/s3fd/sfd_face.pth)",
        ),
        MetricWeightsSpec(
            name="arcface_iresnet50",
            filename="backbone.pth",
            metric="identity similarity / drift on real video (aligned 112x112 face crops)",
            origin="deepinsight/insightface recognition/arcface_torch model zoo (r50, MS1MV3; OneDrive / Baidu links, "
            "no hash published)",
        ),
    )
}


# Metric networks trained here on the synthetic world (not published; `dystream.evaluation.metric_nets`): kept apart
# from METRIC_WEIGHTS, which lists the published files the zoo provides.
TRAINED_METRIC_WEIGHTS: dict[str, MetricWeightsSpec] = {
    spec.name: spec
    for spec in (
        MetricWeightsSpec(
            name="metric_syncnet",
            filename="syncnet.safetensors",
            metric="Sync-C / Sync-D and FD-sync on the synthetic world",
            origin="not published: trained on the synthetic world by recipes/metric_syncnet.yaml",
            provide="Train it with `dystream fit --config recipes/metric_syncnet.yaml` (a few minutes on a CPU; "
            "`make eval` does this first), or pass another file with --syncnet / the `syncnet` field of "
            "recipes/eval.yaml",
        ),
        MetricWeightsSpec(
            name="metric_pose",
            filename="pose.safetensors",
            metric="HKC / HKV / LBKV / LHKV / LFKV and FD-pose on the synthetic world",
            origin="not published: trained on the synthetic world by recipes/metric_pose.yaml",
            provide="Train it with `dystream fit --config recipes/metric_pose.yaml` (a few minutes on a CPU; "
            "`make eval` does this first), or pass another file with --pose / the `pose` field of recipes/eval.yaml",
        ),
        MetricWeightsSpec(
            name="metric_identity",
            filename="identity.safetensors",
            metric="identity drift (cosine distance to the reference image) on the synthetic world",
            origin="not published: trained on the synthetic world by recipes/metric_identity.yaml",
            provide="Train it with `dystream fit --config recipes/metric_identity.yaml` (a few minutes on a CPU; "
            "`make eval` does this first), or pass another file with the `identity` field of recipes/eval.yaml",
        ),
    )
}


class MetricUnavailable(Exception):
    """A metric cannot be computed here: its weights or its runtime are missing. Tables catch this base type and
    print "n/a (<message>)"."""


class MetricWeightsMissing(MetricUnavailable, FileNotFoundError):
    """A metric network's weights are not available (no path given, file absent, or not the expected file).

    The message names the file and how to provide it. Evaluation tables catch this type (or `MetricUnavailable`) and
    report "n/a (<message>)" instead of a number.
    """

    def __init__(self, name: str, reason: str) -> None:
        spec = METRIC_WEIGHTS.get(name) or TRAINED_METRIC_WEIGHTS.get(name)
        filename = spec.filename if spec else name
        metric = f" for {spec.metric}" if spec else ""
        origin = f" It is published at {spec.origin}." if spec else ""
        self.name = name
        self.reason = reason
        if spec is not None and spec.provide:
            how = f" {spec.provide}; nothing is downloaded at run time."
        else:
            how = (
                f"{origin} Provide the file with the path argument of the loader, or register it with `dystream zoo "
                f"import {name} PATH` and give the entry name (dystream eval resolves it); nothing is downloaded at "
                "run time."
            )
        super().__init__(f"metric weights '{filename}'{metric} unavailable: {reason}.{how}")


class MetricDependencyMissing(MetricUnavailable, ImportError):
    """An optional runtime a metric backend needs (e.g. onnxruntime for DWPose) is not installed."""

    def __init__(self, package: str, needed_for: str) -> None:
        self.package = package
        super().__init__(
            f"{needed_for} needs the Python package '{package}', which is not installed (it is not a dystream "
            f"dependency): install it into the environment, e.g. `pip install {package}`, or use another backend."
        )


@dataclass(frozen=True)
class WeightsInfo:
    """What a metric was computed with; every metric result carries one so tables can print it."""

    name: str
    path: str
    sha256: str
    verification: str  # "published sha256", "user-supplied sha256 (unverified)", "sha256 prefix ...", "not checked"

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "path": self.path, "sha256": self.sha256, "verification": self.verification}


def require_weights(name: str, path: str | os.PathLike | None, expected_sha256: str | None = None) -> WeightsInfo:
    """Check that the weights file `path` for metric network `name` exists (and matches a hash, if given).

    Hash policy: a hash published upstream (in `METRIC_WEIGHTS`) is enforced; a caller-supplied `expected_sha256` is
    enforced and reported as "unverified" (it is the caller's word, not a published value); otherwise the file's
    sha256 is only reported (and compared with the file-name prefix convention where one exists).
    Raises `MetricWeightsMissing` on any failure.
    """
    if path is None:
        raise MetricWeightsMissing(name, "no path was given")
    p = Path(path).expanduser()
    if not p.is_file():
        raise MetricWeightsMissing(name, f"no file at {str(p)!r}")
    digest = sha256_file(p)
    spec = METRIC_WEIGHTS.get(name)
    published = spec.sha256 if spec else None
    if published is not None:
        if digest != published:
            raise MetricWeightsMissing(name, f"{str(p)!r} has sha256 {digest}, expected the published {published}")
        verification = "published sha256"
    elif expected_sha256 is not None:
        expected = expected_sha256.strip().lower()
        if digest != expected:
            raise MetricWeightsMissing(name, f"{str(p)!r} has sha256 {digest}, expected {expected}")
        verification = "user-supplied sha256 (unverified: no published hash)"
    elif spec is not None and spec.sha256_prefix is not None:
        ok = digest.startswith(spec.sha256_prefix)
        verification = f"sha256 prefix {spec.sha256_prefix} of the published file name: {'match' if ok else 'MISMATCH'}"
    else:
        verification = "not checked (no published hash)"
    return WeightsInfo(name=name, path=str(p), sha256=digest, verification=verification)


def load_state_dict_checked(
    net: torch.nn.Module,
    info: WeightsInfo,
    adapt: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> None:
    """Load `info.path` into `net` with `torch.load(weights_only=True)`, strictly.

    `adapt` is the named key adapter of a foreign checkpoint layout (e.g. `light_asd_state_dict`), applied before
    the strict load. The one tolerance: BatchNorm `num_batches_tracked` counters may be absent (files saved by old
    PyTorch versions have none; they do not affect eval-mode outputs). Any other missing or unexpected key raises
    `MetricWeightsMissing` naming the keys.
    """
    try:
        state = torch.load(info.path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with code, a truncated file, ...
        raise MetricWeightsMissing(info.name, f"{info.path!r} is not a loadable state dict ({e})") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MetricWeightsMissing(info.name, f"{info.path!r} does not hold a state dict of tensors")
    if adapt is not None:
        try:
            state = adapt(state)
        except ValueError as e:
            raise MetricWeightsMissing(info.name, f"{info.path!r}: {e}") from e
    result = net.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise MetricWeightsMissing(
            info.name,
            f"{info.path!r} does not match the network: missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected keys {result.unexpected_keys[:8]}{'...' if len(result.unexpected_keys) > 8 else ''}",
        )
