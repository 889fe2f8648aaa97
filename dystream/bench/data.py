"""Data benchmark: synthetic-world generation speed and SpeakerVidDataModule throughput.

Figures:
- synth: seconds to render and encode the synthetic world (quick mode: 90 clips of 4 s at
  64x64, extrapolated linearly to the 900-clip, one-hour target; full mode: 900 clips measured);
- DataModule windows/s and decoded frames/s (window + references) with 0 and 2 workers;
- a bare decord decode of the same mp4 bytes and the same frame pattern (a window of T frames
  plus R frames outside it, one `get_batch` each), and the ratio DataModule / bare decode.
The ratio shows what the pipeline adds on top of decoding (tar reading, audio, resize, collate).
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from dystream.bench.timing import summarize

WINDOW, REFS, BATCH, SIZE = 12, 1, 4, 64


def _synth(root: Path, clips: int) -> float:
    from dystream.datamodules.synthetic import synthesize

    start = time.perf_counter()
    synthesize(root, clips=clips, size=SIZE, seconds=4.0, seed=0, shard_samples=8, workers=min(2, os.cpu_count() or 1))
    return time.perf_counter() - start


def _datamodule_rate(root: Path, workers: int, batches: int, repeats: int) -> tuple[list[float], list[float]]:
    """Windows/s and decoded frames/s over `batches` batches, `repeats` times (after one warm-up batch)."""
    from dystream.datamodules import SpeakerVidDataModule

    dm = SpeakerVidDataModule(
        train_shards=str(root / "train"),
        val_shards=None,
        window_frames=WINDOW,
        num_references=REFS,
        size=SIZE,
        batch_size=BATCH,
        num_workers=workers,
        samples_per_epoch=BATCH * (batches * repeats + 1),
        synthesize_if_missing=False,
    )
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    next(it)  # workers started, first shards opened
    windows, frames = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        dt = time.perf_counter() - start
        windows.append(batches * BATCH / dt)
        frames.append(batches * BATCH * (WINDOW + REFS) / dt)
    for _ in it:  # finish the epoch so the workers shut down cleanly
        pass
    return windows, frames


def _bare_decord_rate(root: Path, n_windows: int, repeats: int) -> list[float]:
    import decord

    from dystream.datamodules.format import read_index, read_shards

    folder = root / "train"
    videos = [s["mp4"] for s in read_shards([str(folder / e["name"]) for e in read_index(folder)["shards"]])]
    rng = np.random.default_rng(0)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(n_windows):
            reader = decord.VideoReader(io.BytesIO(videos[i % len(videos)]), ctx=decord.cpu(0), num_threads=1)
            n = len(reader)
            s = int(rng.integers(0, n - WINDOW + 1))
            outside = np.concatenate([np.arange(0, s), np.arange(s + WINDOW, n)])
            idx = np.unique(np.concatenate([np.arange(s, s + WINDOW), rng.choice(outside, REFS)]))
            reader.get_batch(idx.tolist()).asnumpy()
            del reader
        rates.append(n_windows * (WINDOW + REFS) / (time.perf_counter() - start))
    return rates


def run(quick: bool = True, device: str = "cpu") -> dict[str, Any]:
    del device  # data loading runs on the CPU
    clips = 30 if quick else 900  # quick: the 2-minute budget of `make bench QUICK=1`
    batches, repeats = (10, 3) if quick else (40, 5)
    with tempfile.TemporaryDirectory(prefix="dystream-bench-data-") as tmp:
        root = Path(tmp)
        synth_s = _synth(root, clips)
        figures: dict[str, Any] = {
            f"synth {clips} clips x 4 s, 64x64 (2 workers)": summarize([synth_s], "s"),
            "synth clips/s": summarize([clips / synth_s], "clips/s"),
            "synth 900 clips (1 h) estimate": summarize([synth_s * 900 / clips], "s"),
            "synth note": "measured" if clips == 900 else "extrapolated linearly from the 90-clip run",
        }
        results = {}
        for workers in (0, 2):
            windows, frames = _datamodule_rate(root, workers, batches, repeats)
            results[workers] = summarize(frames, "frames/s")
            figures[f"DataModule windows/s ({workers} workers)"] = summarize(windows, "windows/s")
            figures[f"DataModule decoded frames/s ({workers} workers)"] = results[workers]
        bare = summarize(_bare_decord_rate(root, batches * BATCH, repeats), "frames/s")
        figures["bare decord decoded frames/s (1 thread)"] = bare
        for workers in (0, 2):
            figures[f"ratio DataModule ({workers} workers) / bare decord"] = results[workers]["median"] / bare["median"]
        figures["window"] = f"T={WINDOW} frames + R={REFS} reference, {SIZE}x{SIZE}, batch {BATCH}"
    return figures


if __name__ == "__main__":
    import json

    print(json.dumps(run(quick=True), indent=1))
