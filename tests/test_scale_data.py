"""The SpeakerVid DataModule under real DDP (2 processes, gloo): shards split by rank, equal epochs on every rank
even when the shards do not divide evenly (no rank waits for another at an epoch's end), and too few shards for
ranks x workers fail at startup on every rank instead of hanging.

This file is also the 2-rank worker: ``torchrun --nproc_per_node 2 tests/test_scale_data.py --worker ARGS``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_scale_ddp import finish_ranks, launch  # noqa: E402


def worker(args: dict) -> None:
    import lightning as L

    from dystream.datamodules import SpeakerVidDataModule

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])

    class Probe(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.keys: list[list[str]] = []

        def on_train_epoch_start(self) -> None:
            self.keys.append([])

        def training_step(self, batch, _):
            self.keys[-1] += batch["key"]
            return (self.w * batch["video"].mean()).sum() + (self.w**2).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def module(workers: int) -> SpeakerVidDataModule:
        return SpeakerVidDataModule(
            train_shards=args["train"],
            val_shards=None,
            window_frames=4,
            size=16,
            batch_size=2,
            num_workers=workers,
            synthesize_if_missing=False,
        )

    def trainer() -> L.Trainer:
        return L.Trainer(
            accelerator="cpu",
            devices=2,
            strategy="ddp",
            max_epochs=2,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )

    probe = Probe()
    t = trainer()
    t.fit(probe, datamodule=module(workers=0))
    report = {"keys": probe.keys, "batches": t.num_training_batches}
    try:
        trainer().fit(Probe(), datamodule=module(workers=3))
        report["error"] = None
    except ValueError as exc:
        report["error"] = str(exc)
    Path(args["out"], f"rank{rank}.json").write_text(json.dumps(report))


def test_uneven_shards_give_equal_epochs_and_too_few_shards_fail_on_every_rank(tmp_path):
    from dystream.datamodules.format import read_index
    from dystream.datamodules.synthetic import synthesize

    root = tmp_path / "synth"
    synthesize(root, clips=5, val_clips=1, size=32, seconds=1.0, seed=0, shard_samples=1, workers=1)
    assert len(read_index(root / "train")["shards"]) == 5  # 3 shards for rank 0, 2 for rank 1
    out = tmp_path / "out"
    out.mkdir()
    launch(Path(__file__), 2, {"train": str(root / "train"), "out": str(out)}, timeout=300)  # a hang times out
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for r in reports:
        assert r["batches"] == 2  # ceil(5 clips / (batch 2 x 2 ranks)) on both ranks
        assert [len(epoch) for epoch in r["keys"]] == [4, 4]  # two full epochs of 2 batches on each rank
    for epoch in range(2):
        a, b = (set(r["keys"][epoch]) for r in reports)
        assert not a & b  # each clip lives in one rank's shards
    assert len(set(reports[0]["keys"][0])) == 3 and len(set(reports[1]["keys"][0])) == 2  # rank 1 repeats its own
    for r in reports:  # 5 shards < 2 ranks x 3 workers: both ranks stop at startup with the DataModule's message
        assert r["error"] is not None and "fewer than ranks x workers" in r["error"]


if __name__ == "__main__" and "--worker" in sys.argv:
    worker(json.loads(sys.argv[sys.argv.index("--worker") + 1]))
    finish_ranks()
