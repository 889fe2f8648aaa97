"""Shards, the synthetic dyadic world and LightningDataModules (installed as dystream.datamodules).

    format.py      the shard format: fields, codecs, shard writer, index.json
    keypoints.py   the dwpose134 keypoint layout of KEY.kpts.npy
    synthetic.py   the procedurally rendered dyadic world (the embedded default dataset)
    pack.py        packing real clips (re-encode, resample, VAD masks) into shards
    speakervid.py  SpeakerVidDataModule (WebDataset + decord windows)
    latents.py     cached-latent shards (`dystream data encode`)
    latent_windows.py  LatentDataModule: training windows from cached latents, validation from clips
    cli.py         `dystream data synth|pack|index|encode`

The DataModules are imported lazily, so the tools above do not pull in Lightning.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LatentDataModule", "SpeakerVidDataModule"]


def __getattr__(name: str) -> Any:
    if name == "SpeakerVidDataModule":
        from dystream.datamodules.speakervid import SpeakerVidDataModule

        return SpeakerVidDataModule
    if name == "LatentDataModule":
        from dystream.datamodules.latent_windows import LatentDataModule

        return LatentDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
