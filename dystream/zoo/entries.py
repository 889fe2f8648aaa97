"""The pretrained-entry table: every weight file dystream knows by name, where it comes from, and its sha256.

Notable:

- Names are ``arch.tag`` (timm / open_clip style); the metric networks keep the names the evaluation code already
  prints in its errors (``fid_inception``, ``i3d_torchscript``, ``syncnet_v2``, ``dwpose_det``, ``dwpose_pose``) as
  aliases.
- A hash is written here only where it is published in public material (the Hugging Face LFS pointer of the file at
  the pinned revision, or independent re-hosts that agree); the comment above each entry says where. ``sha256=None``
  means unverified: the file is refused unless the user passes ``--trust`` / ``trust=True``, and its actual hash is
  then printed (and recorded as the user's pin in the cache) so it can be pinned here.
- Local entries (``export=...``) are produced by our own recipes; ``dystream zoo build-local`` (``make zoo``) copies
  the stage exports under ``runs/`` into the cache and records their sha256 in ``<cache>/local.json``.
- This module only declares data: nothing is read, built or downloaded when it is imported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

__all__ = ["ENTRIES", "KINDS", "PretrainedEntry", "RemoteFile"]

Kind = Literal["base", "teacher", "student", "vae", "audio", "text-context", "metric"]
KINDS: tuple[str, ...] = ("base", "teacher", "student", "vae", "audio", "text-context", "metric")

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.+-]*\.[a-z0-9][a-z0-9_+-]*$")  # arch.tag; the tag has no dot


@dataclass(frozen=True)
class RemoteFile:
    """One file of an entry.

    Attributes:
        filename: path of the file in its source (inside the Hugging Face repo, or the last part of the URL); it is
            stored in the cache under its base name.
        sha256: full lowercase hex sha256 of the file, as published; None = no published hash (unverified).
        url: where the file is published, for URL entries (None for Hugging Face and manual entries).
        size: published size in bytes, where known (reported in messages only).
    """

    filename: str
    sha256: str | None
    url: str | None = None
    size: int | None = None

    def __post_init__(self) -> None:
        parts = self.filename.split("/")
        if not self.filename or self.filename.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"RemoteFile.filename must be a relative path without '..', got {self.filename!r}")
        if self.sha256 is not None and not _SHA256.match(self.sha256):
            raise ValueError(
                f"RemoteFile({self.filename!r}).sha256 must be 64 lowercase hex digits (a full sha256), "
                f"got {self.sha256!r}"
            )
        if self.url is not None and not re.match(r"^(https?|file)://", self.url):
            raise ValueError(
                f"RemoteFile({self.filename!r}).url must be an http(s):// or file:// URL, got {self.url!r}"
            )

    @property
    def basename(self) -> str:
        return self.filename.rsplit("/", 1)[-1]


@dataclass(frozen=True, kw_only=True)
class PretrainedEntry:
    """One zoo entry.

    Attributes:
        name: ``arch.tag``, unique; what ``load_pretrained`` and the ``dystream zoo`` commands take.
        arch: ``family`` or ``family:preset``: the file family of :mod:`dystream.zoo.files` (``dit``, ``vae``,
            ``audio``) or of the foreign network (``inception``, ``i3d``, ``syncnet``, ``dwpose``, ``text-context``),
            and the preset its loader builds (local entries take the preset from the file's own metadata).
        kind: what the weights are for.
        loader: key of :data:`dystream.zoo.loaders.LOADERS`, the function that turns the verified files into a model.
        files: the files of a remote or manual entry (several for sharded checkpoints).
        hf_repo: Hugging Face repository the files are downloaded from (``hf_hub_download``).
        revision: the repository revision: a pinned 40-digit commit, or a branch name, which ``download`` warns about.
        export: local entries: the stage export, relative to the runs directory (``teacher/teacher.safetensors``).
        produced_by: the recipe that produced the weights (``recipes/<produced_by>.yaml``), for local entries and
            for files made by a dystream script.
        license: the licence the weights are published under.
        aliases: other names accepted for this entry.
        notes: provenance of the hash and anything a user must know.
    """

    name: str
    arch: str
    kind: Kind
    loader: str
    files: tuple[RemoteFile, ...] = ()
    hf_repo: str | None = None
    revision: str | None = None
    export: str | None = None
    produced_by: str | None = None
    license: str
    aliases: tuple[str, ...] = ()
    notes: str = ""

    def __post_init__(self) -> None:
        where = f"PretrainedEntry({self.name!r})"
        if not _NAME.match(self.name):
            raise ValueError(f"{where}.name must be 'arch.tag' in lowercase (e.g. 'avatar-dit.sid'), got {self.name!r}")
        if self.kind not in KINDS:
            raise ValueError(f"{where}.kind must be one of {KINDS}, got {self.kind!r}")
        if not self.arch or not self.loader or not self.license:
            raise ValueError(f"{where}: arch, loader and license must be non-empty")
        if self.export is not None:
            if self.files or self.hf_repo or self.revision:
                raise ValueError(f"{where}: a local entry (export=...) has no files, hf_repo or revision")
            if self.produced_by is None:
                raise ValueError(f"{where}: a local entry must name the recipe that produces it (produced_by)")
            return
        if not self.files:
            raise ValueError(f"{where}: needs files (remote or manual entry) or export (local entry)")
        names = [f.basename for f in self.files]
        if len(set(names)) != len(names):
            raise ValueError(f"{where}.files: base names must be unique in the cache, got {names}")
        with_url = [f.url is not None for f in self.files]
        if self.hf_repo is not None:
            if any(with_url):
                raise ValueError(f"{where}: Hugging Face entries take no per-file url")
            if not self.revision:
                raise ValueError(f"{where}.revision is required for a Hugging Face entry (a commit, or 'main')")
        elif self.revision is not None:
            raise ValueError(f"{where}.revision is only meaningful with hf_repo")
        elif any(with_url) and not all(with_url):
            raise ValueError(f"{where}: either every file has a url or none (a manual entry)")

    # ------------------------------------------------------------------ derived
    @property
    def family(self) -> str:
        return self.arch.split(":", 1)[0]

    @property
    def preset(self) -> str | None:
        return self.arch.split(":", 1)[1] if ":" in self.arch else None

    @property
    def source(self) -> Literal["local", "hf", "url", "manual"]:
        """local: built from runs/; hf / url: downloadable; manual: produced by a script, then imported."""
        if self.export is not None:
            return "local"
        if self.hf_repo is not None:
            return "hf"
        return "url" if self.files[0].url is not None else "manual"

    @property
    def verified(self) -> bool:
        """Every file has a published sha256 (local entries are verified against the local manifest)."""
        return self.export is not None or all(f.sha256 is not None for f in self.files)

    @property
    def pinned(self) -> bool:
        """The Hugging Face revision is a commit hash (downloads are reproducible)."""
        return self.revision is not None and bool(_COMMIT.match(self.revision))

    def where(self) -> str:
        """Where the files come from, in one line."""
        if self.source == "local":
            return f"runs/{self.export} (recipe {self.produced_by}; `dystream zoo build-local`)"
        if self.source == "hf":
            return f"hf://{self.hf_repo}@{self.revision}"
        if self.source == "url":
            return ", ".join(f.url for f in self.files if f.url)
        return f"made locally ({self.produced_by}), then `dystream zoo import {self.name} PATH`"


_WAN_REPO = "Wan-AI/Wan2.2-TI2V-5B"
_WAN_SHARD = "diffusion_pytorch_model-0000{}-of-00003.safetensors"
_LATENTSYNC = "chunyu-li/LatentSync"
_LATENTSYNC_REV = "e305e1b2d0718ff87e616b184a1bbc5747ae3124"  # commit "Upload checkpoints" that adds auxiliary/*
_DWPOSE_REV = "f7c16a3d45ad3783db41471848c80fbc281cabac"  # yzd-v/DWPose commit "support all dwpose models"
_LIGHT_ASD = "https://github.com/Junhua-Liao/Light-ASD/raw/ed38c232de5efe0261dbd68627c0ade7cdfe14eb/weight"

ENTRIES: tuple[PretrainedEntry, ...] = (
    # ==========================================================================================================
    # Base weights
    # ==========================================================================================================
    # Wan2.2-TI2V-5B DiT (Wan-Video/Wan2.2 WanModel, fp32 safetensors in 3 shards, 4,999,787,712 parameters). Loaded
    # into the `wan2.2-ti2v-5b` AvatarDiT by the strict adapter `load_wan22_state_dict`; the talk/listen audio modules
    # are new (zero output projections, reported). Revision 921dbaf3 is the commit whose blob page publishes shard 3's
    # sha256 (huggingface.co/Wan-AI/Wan2.2-TI2V-5B/blob/921dbaf3.../diffusion_pytorch_model-00003-of-00003.safetensors);
    # no public copy of shards 1-2's hashes was found: they need --trust once, which prints and pins them.
    PretrainedEntry(
        name="wan2.2-ti2v-5b.base",
        arch="dit:wan2.2-ti2v-5b",
        kind="base",
        loader="wan22",
        hf_repo=_WAN_REPO,
        revision="921dbaf3f1674a56f47e83fb80a34bac8a8f203e",
        files=(
            RemoteFile(_WAN_SHARD.format(1), None),
            RemoteFile(_WAN_SHARD.format(2), None),
            RemoteFile(_WAN_SHARD.format(3), "6306f7894c345de9093ad588771c2abfaeb668a81f7a6d9a918bd26ba3568e49"),
        ),
        license="apache-2.0",
        notes="teacher init: `--model.init_weights wan2.2-ti2v-5b.base` with the `wan2.2-ti2v-5b` DiT preset; "
        "latents must come from the Wan2.2 VAE (48 channels)",
    ),
    # The umT5-XXL encoding of the paper's fixed prompt "a person is speaking and listening" (StreamAvatar §3.2),
    # [L, 4096] float32 (the prompt's tokens + EOS; the DiT zero-pads to text_len 512 as Wan2.2 does). Made by
    # `dystream zoo text-context --out FILE` (dystream/zoo/text_context.py; downloads the Wan2.2 umT5 encoder when run),
    # then imported. Depends on the encoder's numerics (bf16), so no hash can be published: unverified.
    PretrainedEntry(
        name="wan2.2-ti2v-5b.prompt-context",
        arch="text-context:umt5-xxl",
        kind="text-context",
        loader="text-context",
        files=(RemoteFile("prompt_context.safetensors", None),),
        produced_by="dystream zoo text-context",
        license="apache-2.0",
        notes="teacher/student `text_context` for the wan2.2-ti2v-5b preset",
    ),
    # facebook/wav2vec2-base-960h (transformers Wav2Vec2ForCTC; `wav2vec2.*` prefix and `lm_head.*` handled by
    # `load_wav2vec2_weights`). Revision 22aad52d = "Adding `safetensors` variant of this model (#7)"; sha256 from the
    # LFS details of model.safetensors at that commit (huggingface.co/facebook/wav2vec2-base-960h/blob/main/...).
    PretrainedEntry(
        name="wav2vec2-base-960h.facebook",
        arch="audio:wav2vec2-base-960h",
        kind="audio",
        loader="wav2vec2",
        hf_repo="facebook/wav2vec2-base-960h",
        revision="22aad52d435eb6dbaf354bdad9b0da84ce7d6156",
        files=(RemoteFile("model.safetensors", "8aa76ab2243c81747a1f832954586bc566090c83a0ac167df6f31f0fa917d74a"),),
        license="apache-2.0",
        notes="audio encoder of the real recipes (`--model.audio wav2vec2-base-960h --model.audio_weights "
        "wav2vec2-base-960h.facebook`, or `--model.audio wav2vec2-base-960h.facebook`)",
    ),
    # ==========================================================================================================
    # Metric networks (evaluation/; notes/metrics.md)
    # ==========================================================================================================
    # FID InceptionV3, pytorch-fid's port of the TF 2015-12-05 graph (pool3, 2048-d). Published by pytorch-fid as a
    # GitHub release asset without a hash; the sha256 is the LFS oid of two independent re-hosts of this exact file
    # name (huggingface.co/RaphaelLiu/EvalCrafter-Models commit 6040b4d, huggingface.co/JamesHujy/EMABench commit
    # f246ee5, both 95,628,359 bytes) and starts with the 6726825d that torch.hub puts in the file name.
    PretrainedEntry(
        name="inception-v3.fid",
        arch="inception:pt_inception-2015-12-05",
        kind="metric",
        loader="fid-inception",
        files=(
            RemoteFile(
                "pt_inception-2015-12-05-6726825d.pth",
                "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2",
                url="https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                "pt_inception-2015-12-05-6726825d.pth",
                size=95628359,
            ),
        ),
        license="apache-2.0",
        aliases=("fid_inception",),
        notes="FID (dystream.evaluation.fid); weights converted from TF inception-2015-12-05.tgz",
    ),
    # FVD I3D (Kinetics-400, the TF-Hub I3D exported to TorchScript by StyleGAN-V; 400-d logits). Originally on
    # Dropbox (www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt) without a hash; the LatentSync authors re-host it
    # on Hugging Face, whose commit e305e1b2 publishes its LFS sha256 (51,235,320 bytes). A TorchScript archive can
    # run code when loaded, so it is deserialised only after this hash matches.
    PretrainedEntry(
        name="i3d.kinetics400",
        arch="i3d:torchscript",
        kind="metric",
        loader="i3d",
        hf_repo=_LATENTSYNC,
        revision=_LATENTSYNC_REV,
        files=(
            RemoteFile(
                "auxiliary/i3d_torchscript.pt",
                "bec6519f66ea534e953026b4ae2c65553c17bf105611c746d904657e5860a5e2",
                size=51235320,
            ),
        ),
        license="apache-2.0",
        aliases=("i3d_torchscript",),
        notes="FVD (dystream.evaluation.fvd); the Dropbox original imports too if it is byte-identical",
    ),
    # SyncNet v2 (joonson/syncnet_python, syncnet_v2.model; originally www.robots.ox.ac.uk/~vgg/software/lipsync/
    # data/syncnet_v2.model without a hash). sha256 from the LFS details of the LatentSync re-host (commit e305e1b2,
    # auxiliary/syncnet_v2.model); huggingface.co/Hyathi/Preprocess lists the same hash for its copy.
    PretrainedEntry(
        name="syncnet.v2",
        arch="syncnet:syncnet_v2",
        kind="metric",
        loader="syncnet",
        hf_repo=_LATENTSYNC,
        revision=_LATENTSYNC_REV,
        files=(
            RemoteFile(
                "auxiliary/syncnet_v2.model", "961e8696f888fce4f3f3a6c3d5b3267cf5b343100b238e79b2659bff2c605442"
            ),
        ),
        license="mit (syncnet_python code; the weights carry no separate licence statement)",
        aliases=("syncnet_v2",),
        notes="Sync-C / Sync-D (dystream.evaluation.sync)",
    ),
    # DWPose person detector (YOLOX-L, ONNX). sha256 from the LFS details of yolox_l.onnx at yzd-v/DWPose commit
    # f7c16a3d ("support all dwpose models").
    PretrainedEntry(
        name="dwpose.yolox-l",
        arch="dwpose:yolox_l",
        kind="metric",
        loader="dwpose",
        hf_repo="yzd-v/DWPose",
        revision=_DWPOSE_REV,
        files=(RemoteFile("yolox_l.onnx", "7860ae79de6c89a3c1eb72ae9a2756c0ccfbe04b7791bb5880afabd97855a411"),),
        license="apache-2.0",
        aliases=("dwpose_det",),
        notes="keypoint metrics; loading returns the DWPose backend (needs dwpose_pose too and onnxruntime)",
    ),
    # DWPose whole-body pose (distilled RTMPose-l, 133 keypoints, ONNX). sha256 and size from the LFS pointer added by
    # yzd-v/DWPose commit f7c16a3d.
    PretrainedEntry(
        name="dwpose.dw-ll-ucoco-384",
        arch="dwpose:dw-ll_ucoco_384",
        kind="metric",
        loader="dwpose",
        hf_repo="yzd-v/DWPose",
        revision=_DWPOSE_REV,
        files=(
            RemoteFile(
                "dw-ll_ucoco_384.onnx",
                "724f4ff2439ed61afb86fb8a1951ec39c6220682803b4a8bd4f598cd913b1843",
                size=134399116,
            ),
        ),
        license="apache-2.0",
        aliases=("dwpose_pose",),
        notes="keypoint metrics; loading returns the DWPose backend (needs dwpose_det too and onnxruntime)",
    ),
    # ==========================================================================================================
    # Active-speaker detection (dystream.datamodules.active_speaker; notes/data_and_vae.md §1.6): speaking masks of
    # real clips, `dystream data pack --asd-weights ... --face-detector-weights ...`. Kind "metric": the masks pick
    # the speaking segments Sync-C/D is scored on, and S3FD is the reference box source of Sync-C/D.
    # ==========================================================================================================
    # Light-ASD (Junhua-Liao/Light-ASD, CVPR 2023, MIT) keeps its two checkpoints in its git repository (weight/,
    # plain git objects, 4,175,289 bytes each; unchanged since commit 283f9a5 of 2023-05-31). No sha256 is published:
    # the URL is pinned to commit ed38c232, whose tree gives the git blob ids dbc9703e3a5132a54278c784117076ca612e1e66
    # (pretrain_AVA_CVPR.model) and d613ee7152c0b8757dae7a9650c6bf1b7c836934 (finetuning_TalkSet.model).
    PretrainedEntry(
        name="light-asd.ava",
        arch="light-asd:light-asd",
        kind="metric",
        loader="light-asd",
        files=(RemoteFile("pretrain_AVA_CVPR.model", None, url=f"{_LIGHT_ASD}/pretrain_AVA_CVPR.model", size=4175289),),
        license="mit",
        aliases=("light_asd_ava",),
        notes="Light-ASD trained on AVA-ActiveSpeaker (94.06 mAP on its validation set, per the authors); "
        "--asd-weights of `dystream data pack`",
    ),
    PretrainedEntry(
        name="light-asd.talkset",
        arch="light-asd:light-asd",
        kind="metric",
        loader="light-asd",
        files=(
            RemoteFile("finetuning_TalkSet.model", None, url=f"{_LIGHT_ASD}/finetuning_TalkSet.model", size=4175289),
        ),
        license="mit",
        aliases=("light_asd_talkset",),
        notes="Light-ASD fine-tuned on TalkSet (Columbia ASD F1 95.5 against 81.1 for the AVA weights, per the "
        "authors): the better choice for in-the-wild talking-head clips",
    ),
    # S3FD face detector `sfd_face.pth` (cs-giung/face-detection-pytorch, trained on WIDER FACE), the file TalkNet-ASD
    # and Light-ASD download from Google Drive into model/faceDetector/s3fd/. No hash is published (Hugging Face
    # re-hosts such as alibabasglab/face_detection exist, none pinned with a published sha256 we could read); Google
    # Drive may answer a script with a confirmation page instead of the file: then download it in a browser and
    # `dystream zoo import s3fd.sfd-face sfd_face.pth --trust`.
    PretrainedEntry(
        name="s3fd.sfd-face",
        arch="s3fd:s3fd",
        kind="metric",
        loader="s3fd",
        files=(
            RemoteFile("sfd_face.pth", None, url="https://drive.google.com/uc?id=1KafnHz7ccT-3IyddBsL5yi2xGtxAKypt"),
        ),
        license="unspecified (cs-giung/face-detection-pytorch publishes no licence; TalkNet-ASD code is MIT)",
        aliases=("s3fd_face",),
        notes="face detector in front of Light-ASD (--face-detector-weights of `dystream data pack`); also a Sync-C/D "
        "box source (dystream.evaluation.networks.s3fd.S3FDFaceBoxes)",
    ),
    # ArcFace IResNet-50 face embedding (deepinsight/insightface, recognition/arcface_torch model zoo: `backbone.pth`
    # of r50 trained on MS1MV3 or Glint360K; 112x112 aligned faces -> 512-d). The files are published on OneDrive /
    # Baidu links without a hash or a stable URL, so this is a manual entry: download it, then
    # `dystream zoo import arcface-iresnet50.ms1mv3 backbone.pth --trust` (its sha256 is printed and pinned in the
    # cache). Architecture and key names: dystream.evaluation.networks.iresnet (loaded strictly).
    PretrainedEntry(
        name="arcface-iresnet50.ms1mv3",
        arch="arcface:iresnet50",
        kind="metric",
        loader="arcface-iresnet",
        files=(RemoteFile("backbone.pth", None),),
        license="non-commercial research only (insightface model zoo terms; the code is MIT)",
        aliases=("arcface_iresnet50",),
        notes="identity similarity / drift on real video (dystream.evaluation.identity with ArcFaceEmbedder; "
        "feed aligned 112x112 face crops)",
    ),
    # ==========================================================================================================
    # Local entries: produced by our recipes (`make zoo` trains what is missing, then collects runs/ into the cache).
    # The file records its recipe ("stage") and the source commit in its metadata (dystream.zoo.files); the sha256
    # is recorded in <cache>/local.json when it is collected. On the embedded default these are tiny CPU models
    # trained on the synthetic dyadic world: for tests and demos, not for quality.
    # ==========================================================================================================
    PretrainedEntry(
        name="video-vae.synthetic",
        arch="vae",
        kind="vae",
        loader="dystream",
        export="vae/vae.safetensors",
        produced_by="vae",
        license="apache-2.0 (dystream)",
        notes="reference-guided causal VAE with its latent statistics",
    ),
    PretrainedEntry(
        name="avatar-dit.teacher",
        arch="dit",
        kind="teacher",
        loader="dystream",
        export="teacher/teacher.safetensors",
        produced_by="teacher",
        license="apache-2.0 (dystream)",
        notes="bidirectional teacher (EMA)",
    ),
    PretrainedEntry(
        name="audio-encoder.teacher",
        arch="audio",
        kind="audio",
        loader="dystream",
        export="teacher/audio.safetensors",
        produced_by="teacher",
        license="apache-2.0 (dystream)",
        notes="the audio encoder the teacher was trained with (every later stage must use the same one)",
    ),
    PretrainedEntry(
        name="avatar-dit.ode-init",
        arch="dit",
        kind="student",
        loader="dystream",
        export="stage1_ode/student.safetensors",
        produced_by="stage1_ode",
        license="apache-2.0 (dystream)",
        notes="block-causal student after ODE regression (EMA)",
    ),
    PretrainedEntry(
        name="avatar-dit.sid",
        arch="dit",
        kind="student",
        loader="dystream",
        export="stage1_sid/student.safetensors",
        produced_by="stage1_sid",
        license="apache-2.0 (dystream)",
        notes="few-step student after SiD with student forcing (EMA)",
    ),
    PretrainedEntry(
        name="avatar-dit.rgan",
        arch="dit",
        kind="student",
        loader="dystream",
        export="stage2_gan/student.safetensors",
        produced_by="stage2_gan",
        license="apache-2.0 (dystream)",
        notes="student after relativistic GAN refinement (EMA)",
    ),
    # The synthetic world's SyncNet (dystream.evaluation.train_syncnet), trained with SyncNet's contrastive loss on
    # the synthetic dyadic world, where lip motion follows the speech envelope: Sync-C/D for the embedded default,
    # where the real syncnet_v2 (trained on real faces) does not apply.
    PretrainedEntry(
        name="syncnet-small.synthetic",
        arch="metric_syncnet",
        kind="metric",
        loader="dystream",
        export="metric_syncnet/syncnet.safetensors",
        produced_by="metric_syncnet",
        license="apache-2.0 (dystream)",
        notes="Sync-C / Sync-D on the synthetic world only; not comparable with syncnet_v2 numbers",
    ),
    # The synthetic world's identity embedding (dystream.stages.metric_identity): CosFace over the train identities
    # on whole 64x64 frames; identity drift for the embedded default, where ArcFace (real faces) does not apply.
    PretrainedEntry(
        name="identity-small.synthetic",
        arch="metric_identity",
        kind="metric",
        loader="dystream",
        export="metric_identity/identity.safetensors",
        produced_by="metric_identity",
        license="apache-2.0 (dystream)",
        notes="identity drift (cosine) on the synthetic world only",
    ),
)
