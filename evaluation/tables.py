"""Benchmark tables in the layout of StreamAvatar's Table 1 and Table 2, as markdown, CSV and JSON.

- Table 1 (talking): Method | FID | FVD | [ASE | IQA] | FD-pose | FD-sync | Sync-C | Sync-D | HKV | Steps | Res. | Time
  (seconds to generate 5 s of video). ASE and IQA (Q-Align) appear only when some row provides them; FD-pose and
  FD-sync are Fréchet distances in our synthetic metric networks' feature spaces, never called FID/FVD.
- Table 2 (listening): Method | LBKV | LHKV | LFKV | the number of clips each of the three averages.
- Table 3 (identity drift): Method | mean | first bucket | last bucket | slope per minute (distance to the reference).
- Table 4 (mouth and voice): Sync-C, Sync-D and the mouth-voice correlation (`mouth_voice.py`) against the own voice,
  against another clip's voice ("other voice": the floor), and for models driven by another clip's voice ("swapped
  voice": the mouth follows the audio, not only the speaking mask).
- Table 5 (VAE reconstruction): PSNR, SSIM, high-frequency energy ratio, colour error, hand keypoint error and the
  share of the real frames' hand keypoints found on the reconstructions, Sync-C and
  the mouth-voice correlation in speech of the VAE reconstruction row only (`reconstruction.py`): what every
  generator on that VAE inherits.

A cell is a number, "n/a" with its reason (markdown: a lettered footnote; CSV: "n/a (reason)"; JSON:
{"value": null, "na": reason}), or "—" (markdown; empty in CSV, null in JSON) when the metric does not apply to the row.
`write_tables(rows, out_dir, notes)` writes `results.md`, `table1_talking.csv`, `table2_listening.csv`,
`table3_drift.csv`, `table4_voice.csv` and `results.json`.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dystream.evaluation.suite import NA

__all__ = ["TABLE1", "TABLE2", "TABLE3", "TABLE4", "TABLE5", "Row", "format_value", "table_columns", "write_tables"]

# (header, key, decimals)
TABLE1: list[tuple[str, str, int]] = [
    ("FID", "fid", 2),
    ("FVD", "fvd", 2),
    ("ASE", "ase", 2),
    ("IQA", "iqa", 2),
    ("FD-pose", "fd_pose", 2),
    ("FD-sync", "fd_sync", 2),
    ("Sync-C", "sync_c", 2),
    ("Sync-D", "sync_d", 2),
    ("HKV", "hkv", 2),
]
TABLE2: list[tuple[str, str, int]] = [
    ("LBKV", "lbkv", 2),
    ("LHKV", "lhkv", 2),
    ("LFKV", "lfkv", 2),
    # the clips each mean covers (keypoints confident in a listening segment): rows may average different clips
    ("LBKV clips", "lbkv_clips", 0),
    ("LHKV clips", "lhkv_clips", 0),
    ("LFKV clips", "lfkv_clips", 0),
]
TABLE3: list[tuple[str, str, int]] = [
    ("drift mean", "drift_mean", 4),
    ("first bucket", "drift_first", 4),
    ("last bucket", "drift_last", 4),
    ("slope / min", "drift_slope_per_min", 4),
]
TABLE4: list[tuple[str, str, int]] = [
    ("Sync-C", "sync_c", 2),
    ("Sync-C, other voice", "sync_c_other", 2),
    ("Sync-D", "sync_d", 2),
    ("Sync-D, other voice", "sync_d_other", 2),
    ("mouth-voice r", "mouth_voice_r", 3),
    ("r, other voice", "mouth_voice_r_other", 3),
    ("r in speech", "mouth_voice_r_speech", 3),
    ("r in speech, other voice", "mouth_voice_r_speech_other", 3),
    ("r in speech, swapped voice", "mouth_voice_r_speech_swapped", 3),
    ("mouth response in speech", "mouth_response_speech", 4),
    ("unrelated mouth motion in speech", "mouth_unrelated_speech", 4),
]
TABLE5: list[tuple[str, str, int]] = [
    ("PSNR (dB)", "psnr", 2),
    ("SSIM", "ssim", 4),
    ("HF energy ratio", "hf_ratio", 3),
    ("colour error, worst (1/255)", "colour_error_max", 2),
    ("colour error, mean (1/255)", "colour_error_mean", 2),
    ("hand keypoints (px)", "hand_kpt_error", 2),
    ("hand keypoints found", "hand_kpt_found", 3),
    ("Sync-C", "sync_c", 2),
    ("r in speech", "mouth_voice_r_speech", 3),
]
OPTIONAL = ("ase", "iqa")  # shown only if a row provides them (paper: Q-Align)


@dataclass
class Row:
    """One table row: a method (or ground truth) and its values; `values` keys are the metric keys above."""

    name: str
    kind: str  # "ground_truth", "vae_reconstruction", "teacher", "student", ...
    values: dict[str, float | NA] = field(default_factory=dict)
    steps: int | None = None
    resolution: str = ""
    time_per_5s: float | NA | None = None  # seconds to generate 5 s of video
    note: str = ""

    def value(self, key: str) -> float | NA | None:
        if key == "time_per_5s":
            return self.time_per_5s
        return self.values.get(key)


def table_columns(rows: Sequence[Row], table: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    """The columns to print: optional ones (ASE, IQA) only where some row has them."""
    return [c for c in table if c[1] not in OPTIONAL or any(r.values.get(c[1]) is not None for r in rows)]


def format_value(v: float | NA | None, decimals: int) -> str:
    if v is None:
        return "—"
    if isinstance(v, NA):
        return str(v)
    if not math.isfinite(v):
        return "nan"
    return f"{v:.{decimals}f}"


class _Footnotes:
    """n/a reasons -> letters, in order of first use."""

    def __init__(self) -> None:
        self.letters: dict[str, str] = {}

    def mark(self, reason: str) -> str:
        if reason not in self.letters:
            n = len(self.letters)
            self.letters[reason] = chr(ord("a") + n % 26) * (1 + n // 26)
        return self.letters[reason]


def _md_cell(v: float | NA | None, decimals: int, notes: _Footnotes) -> str:
    if isinstance(v, NA):
        return f"n/a [{notes.mark(v.reason)}]"
    return format_value(v, decimals)


def _md_table(rows: Sequence[Row], cols: list[tuple[str, str, int]], notes: _Footnotes, extra: bool) -> list[str]:
    head = ["Method", *(h for h, _, _ in cols)] + (["Steps", "Res.", "Time (5 s)"] if extra else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.name, *(_md_cell(r.value(k), d, notes) for _, k, d in cols)]
        if extra:
            t = r.time_per_5s
            time = f"{t:.1f} s" if isinstance(t, float) else _md_cell(t, 1, notes)
            cells += [str(r.steps) if r.steps is not None else "—", r.resolution or "—", time]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _csv_cell(v: float | NA | None, decimals: int) -> str:
    if v is None:
        return ""
    return str(v) if isinstance(v, NA) else format_value(v, decimals + 2)


def _write_csv(path: Path, rows: Sequence[Row], cols: list[tuple[str, str, int]], extra: bool) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Method", *(h for h, _, _ in cols)] + (["Steps", "Res.", "Time per 5 s (s)"] if extra else []))
        for r in rows:
            cells = [r.name, *(_csv_cell(r.value(k), d) for _, k, d in cols)]
            if extra:
                cells += ["" if r.steps is None else str(r.steps), r.resolution, _csv_cell(r.time_per_5s, 1)]
            w.writerow(cells)


def _json_value(v: float | NA | None) -> Any:
    if v is None:
        return None
    if isinstance(v, NA):
        return {"value": None, "na": v.reason}
    return v if math.isfinite(v) else None


def write_tables(rows: Sequence[Row], out_dir: str | Path, notes: Sequence[str] = (), meta: dict | None = None) -> dict:
    """Write the tables under `out_dir` (Table 5 only with a VAE reconstruction row).

    Returns {"md": path, "csv": [paths], "json": path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t1, t2, t3 = table_columns(rows, TABLE1), TABLE2, TABLE3
    foot = _Footnotes()
    md = ["# Evaluation results", ""]
    md += ["## Table 1: talking (StreamAvatar Table 1 layout)", ""] + _md_table(rows, t1, foot, extra=True)
    md += ["", "## Table 2: listening (StreamAvatar Table 2 layout)", ""] + _md_table(rows, t2, foot, extra=False)
    md += ["", "## Table 3: identity drift (distance of each frame to the reference image)", ""]
    md += _md_table(rows, t3, foot, extra=False)
    md += ["", "## Table 4: does the mouth follow the voice (own voice, another clip's voice, swapped voice)", ""]
    md += _md_table(rows, TABLE4, foot, extra=False)
    vae_rows = [r for r in rows if r.kind == "vae_reconstruction"]
    if vae_rows:
        md += ["", "## Table 5: VAE reconstruction (fidelity, grain, colour, hands, mouth)", ""]
        md += _md_table(vae_rows, TABLE5, foot, extra=False)
    if notes:
        md += ["", "## Protocol", ""] + [f"- {n}" for n in notes]
    if foot.letters:
        md += ["", "## n/a reasons", ""] + [f"- [{letter}] {reason}" for reason, letter in foot.letters.items()]
    paths = {"md": out / "results.md", "json": out / "results.json"}
    paths["md"].write_text("\n".join(md) + "\n")
    csvs = [out / f"{name}.csv" for name in ("table1_talking", "table2_listening", "table3_drift", "table4_voice")]
    for path, cols in zip(csvs, (t1, t2, t3, TABLE4), strict=True):
        _write_csv(path, rows, cols, extra=cols is t1)
    if vae_rows:
        csvs.append(out / "table5_vae.csv")
        _write_csv(csvs[-1], vae_rows, TABLE5, extra=False)
    doc = {
        "columns": {
            "table1": [k for _, k, _ in t1] + ["steps", "resolution", "time_per_5s"],
            "table2": [k for _, k, _ in t2],
            "table3": [k for _, k, _ in t3],
            "table4": [k for _, k, _ in TABLE4],
            "table5": [k for _, k, _ in TABLE5],
        },
        "rows": [
            {
                "name": r.name,
                "kind": r.kind,
                "steps": r.steps,
                "resolution": r.resolution,
                "time_per_5s": _json_value(r.time_per_5s),
                "note": r.note,
                "values": {k: _json_value(v) for k, v in r.values.items()},
            }
            for r in rows
        ],
        "notes": list(notes),
        "meta": meta or {},
    }
    paths["json"].write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    return {"md": str(paths["md"]), "csv": [str(p) for p in csvs], "json": str(paths["json"])}
