"""`dystream demo`: what the trained chain learnt, as one picture and one short animation.

    dystream demo [--out outputs/demo] [--sheet <out>/demo_sheet.png] [--gif <out>/demo.gif]
                  [--checkpoint runs/stage1_sid/student.safetensors] [--val-shards data/synthetic/val]

(`make demo` writes the sheet to docs/images/demo_sheet.png, the picture at the top of the README.)

From the validation shards (identities never seen in training) it takes clip A and a clip B of another identity,
writes a DyStream sample file with both scenarios of docs/streaming.md and renders it with ``dystream generate``:

* ``own_voices``: A's first frame as the reference, driven by A's own voice and A's partner (so the real clip A is
  the ground truth for the generated one);
* ``other_voices``: the same reference driven by B's voices (the same person, another conversation).

The contact sheet has one column per time point and the rows: real A, generated with A's voices, generated with
B's voices, real B (whose voices drive the third row). Under every row a bar marks each column's phase from the
speaking mask of the voices that drive it: speaking (the avatar's own voice, talk attention) or listening (the
partner's voice, listen attention). The GIF plays the first rows side by side with the same bars.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HELP = "render both DyStream scenarios for a validation identity and write a contact sheet PNG and a GIF"

DEFAULT_VAL_SHARDS = "data/synthetic/val"
SPEAKING = (232, 122, 38)  # orange: the avatar speaks (own voice -> talk attention)
LISTENING = (52, 118, 214)  # blue: the avatar listens (partner's voice -> listen attention)
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
# layout of the sheet, in pixels (sheet_size computes the result from these)
LABEL_W = 150
HEADER_H = 18
BAR_H = 14
PAD = 4
LEGEND_H = 34
GIF_LABEL_H = 14


@dataclass(frozen=True)
class DemoClip:
    """A validation clip, decoded: frames uint8 [T, H, W, 3], 16 kHz tracks of T * 640 samples, mask uint8 [T]."""

    key: str
    identity: str
    frames: np.ndarray
    audio_self: np.ndarray
    audio_other: np.ndarray
    mask: np.ndarray


# ---------------------------------------------------------------------------------------------- inputs
def pick_clips(val_shards: str | Path, index: int = 0, seconds: float | None = None) -> tuple[DemoClip, DemoClip]:
    """Clip number ``index`` of the validation shards and the next clip of another identity, cut to ``seconds``."""
    from dystream.datamodules.format import read_shards, resolve_shards, sample_to_clip

    first: Any = None
    seen = 0
    for sample in read_shards(resolve_shards(str(val_shards)).urls):
        identity = str(json.loads(sample["json"]).get("identity", sample["__key__"]))
        if first is None:
            if seen == index:
                first = (sample, identity)
            seen += 1
            continue
        if identity != first[1]:
            a, b = (_demo_clip(sample_to_clip(s), i, seconds) for s, i in (first, (sample, identity)))
            n = min(a.frames.shape[0], b.frames.shape[0])
            return _cut(a, n), _cut(b, n)
    where = f"clip {index} and a later clip of another identity" if first is not None else f"{index + 1} clips"
    raise ValueError(f"{val_shards}: needs {where} for the demo")


def _demo_clip(clip: Any, identity: str, seconds: float | None) -> DemoClip:
    demo = DemoClip(clip.key, identity, clip.video, clip.audio_self, clip.audio_other, clip.mask)
    return _cut(demo, demo.frames.shape[0] if seconds is None else max(1, round(seconds * 25)))


def _cut(clip: DemoClip, n: int) -> DemoClip:
    n = min(n, clip.frames.shape[0])
    return DemoClip(
        clip.key, clip.identity, clip.frames[:n], clip.audio_self[: n * 640], clip.audio_other[: n * 640], clip.mask[:n]
    )


def write_sample_file(a: DemoClip, b: DemoClip, folder: str | Path) -> Path:
    """A DyStream sample file (docs/streaming.md) with the two scenarios, its image and wav files under ``folder``."""
    from PIL import Image

    from dystream.datamodules.format import encode_wav

    folder = Path(folder)
    (folder / "img_files").mkdir(parents=True, exist_ok=True)
    (folder / "wav_files").mkdir(parents=True, exist_ok=True)
    Image.fromarray(a.frames[0]).save(folder / "img_files" / "reference.png")
    for name, audio in (("a_self", a.audio_self), ("a_other", a.audio_other), ("b_self", b.audio_self),
                        ("b_other", b.audio_other)):  # fmt: skip
        (folder / "wav_files" / f"{name}.wav").write_bytes(encode_wav(audio))

    def entry(video_id: str, voices: str) -> dict[str, Any]:
        return {
            "resampled_video_path": "img_files/reference.png",
            "audio_self_path": f"wav_files/{voices}_self.wav",
            "audio_other_path": f"wav_files/{voices}_other.wav",
            "video_id": video_id,
        }

    path = folder / "samples.json"
    path.write_text(json.dumps([entry("own_voices", "a"), entry("other_voices", "b")], indent=1) + "\n")
    return path


# ---------------------------------------------------------------------------------------------- pictures
def sheet_size(frame_hw: tuple[int, int], columns: int, rows: int, scale: int) -> tuple[int, int]:
    """(width, height) of a contact sheet of ``rows`` x ``columns`` frames of ``frame_hw`` pixels, each ``scale``d."""
    cell_h, cell_w = frame_hw[0] * scale, frame_hw[1] * scale
    return LABEL_W + columns * (cell_w + PAD) + PAD, HEADER_H + rows * (cell_h + BAR_H + PAD) + LEGEND_H


def column_frames(n_frames: int, columns: int) -> list[int]:
    """The frame index of each column: evenly spread from the first frame to the last."""
    return [int(round(i)) for i in np.linspace(0, n_frames - 1, min(columns, n_frames))]


def contact_sheet(
    rows: list[tuple[str, np.ndarray, np.ndarray]], columns: int = 8, scale: int = 2, caption: str = ""
) -> Any:
    """A PIL image: one row per (label, frames uint8 [T, H, W, 3], speaking mask [T]), one column per time point,
    each frame with its phase bar (speaking / listening) underneath."""
    from PIL import Image, ImageDraw

    n_frames = min(frames.shape[0] for _, frames, _ in rows)
    height, width = rows[0][1].shape[1:3]
    picks = column_frames(n_frames, columns)
    size = sheet_size((height, width), len(picks), len(rows), scale)
    sheet = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    cell_w, cell_h = width * scale, height * scale
    for c, t in enumerate(picks):
        draw.text((LABEL_W + PAD + c * (cell_w + PAD), 3), f"{t / 25:.2f} s", fill=INK)
    for r, (label, frames, mask) in enumerate(rows):
        y = HEADER_H + r * (cell_h + BAR_H + PAD)
        draw.multiline_text((PAD, y + 4), label, fill=INK, spacing=2)
        for c, t in enumerate(picks):
            x = LABEL_W + PAD + c * (cell_w + PAD)
            frame = Image.fromarray(frames[t]).resize((cell_w, cell_h), Image.NEAREST)
            sheet.paste(frame, (x, y))
            speaking = bool(mask[t])
            draw.rectangle(
                (x, y + cell_h, x + cell_w - 1, y + cell_h + BAR_H - 1), fill=SPEAKING if speaking else LISTENING
            )
            if cell_w >= 64:  # room for the word inside the bar
                draw.text((x + 3, y + cell_h + 1), "speaking" if speaking else "listening", fill=BACKGROUND)
    y = size[1] - LEGEND_H + 4
    draw.rectangle((PAD, y + 2, PAD + 10, y + 12), fill=SPEAKING)
    draw.text((PAD + 14, y), "speaking: own voice", fill=INK)
    draw.rectangle((PAD + 150, y + 2, PAD + 160, y + 12), fill=LISTENING)
    draw.text((PAD + 164, y), "listening: partner's voice", fill=INK)
    if caption:
        draw.text((PAD, y + 15), caption, fill=INK)
    return sheet


def animation(rows: list[tuple[str, np.ndarray, np.ndarray]], scale: int = 2, max_frames: int = 100) -> list[Any]:
    """GIF frames: the rows side by side under their labels (first line), each with its phase bar, at most
    ``max_frames`` frames (4 s at 25 fps)."""
    from PIL import Image, ImageDraw

    n_frames = min(min(frames.shape[0] for _, frames, _ in rows), max_frames)
    height, width = rows[0][1].shape[1:3]
    cell_w, cell_h = width * scale, height * scale
    out = []
    for t in range(n_frames):
        canvas = Image.new("RGB", gif_size((height, width), len(rows), scale), BACKGROUND)
        draw = ImageDraw.Draw(canvas)
        for r, (label, frames, mask) in enumerate(rows):
            x = PAD + r * (cell_w + PAD)
            draw.text((x, 2), label.split("\n")[0], fill=INK)
            canvas.paste(Image.fromarray(frames[t]).resize((cell_w, cell_h), Image.NEAREST), (x, GIF_LABEL_H))
            colour = SPEAKING if mask[t] else LISTENING
            y = GIF_LABEL_H + cell_h
            draw.rectangle((x, y, x + cell_w - 1, y + BAR_H - 1), fill=colour)
        out.append(canvas)
    return out


def gif_size(frame_hw: tuple[int, int], rows: int, scale: int) -> tuple[int, int]:
    """(width, height) of the animation of ``rows`` side by side."""
    return rows * (frame_hw[1] * scale + PAD) + PAD, GIF_LABEL_H + frame_hw[0] * scale + BAR_H + PAD


def save_gif(frames: list[Any], path: str | Path, fps: float = 25.0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(round(1000 / fps)), loop=0)
    return path


def _read_video(path: Path) -> np.ndarray:
    from dystream.datamodules.format import decode_video

    return decode_video(path.read_bytes())


def _resized(frames: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Real frames at the generated size (a checkpoint may generate at another size than the shards hold)."""
    if frames.shape[1:3] == hw:
        return frames
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(f).resize((hw[1], hw[0]), Image.BILINEAR)) for f in frames])


# ---------------------------------------------------------------------------------------------- the command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dystream.streaming.cli import add_model_arguments

    parser.add_argument("--out", default="outputs/demo", help="folder of the sample file, its inputs and the mp4s")
    parser.add_argument("--sheet", default=None, help="contact sheet PNG (default <out>/demo_sheet.png)")
    parser.add_argument("--gif", default=None, help="animation (default <out>/demo.gif)")
    parser.add_argument(
        "--val-shards", default=DEFAULT_VAL_SHARDS, help="validation shards the clips come from (folder with index)"
    )
    parser.add_argument("--clip", type=int, default=0, help="which validation clip is the identity (its index)")
    parser.add_argument("--seconds", type=float, default=None, help="cut the clips to this length (default: whole)")
    parser.add_argument("--columns", type=int, default=8, help="time points on the contact sheet")
    parser.add_argument("--scale", type=int, default=2, help="pixel scale of the frames on the sheet and the GIF")
    parser.add_argument("--seed", type=int, default=0, help="generation seed (the same for both scenarios)")
    parser.add_argument("--size", default=None, help="generation size H or HxW (default: what the export records)")
    add_model_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from dystream.streaming.cli import CliError

    try:
        return _run(args)
    except (CliError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from dystream import cli

    for name in ("columns", "scale"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.clip < 0:
        raise ValueError(f"--clip must be >= 0, got {args.clip}")
    if args.seconds is not None and args.seconds <= 0:
        raise ValueError(f"--seconds must be > 0, got {args.seconds}")
    if args.pretrained is None:  # name the export on the sheet: the one `dystream generate` would pick
        from dystream.streaming.cli import _checkpoint_path

        args.checkpoint = _checkpoint_path(args.checkpoint)
    val = Path(args.val_shards)
    if not (val / "index.json").exists() and str(args.val_shards) == DEFAULT_VAL_SHARDS:
        from dystream.datamodules.speakervid import DEFAULT_SYNTH, synthesize_default

        print(f"{val} is missing: writing the embedded synthetic dataset ({DEFAULT_SYNTH['clips']} clips)", flush=True)
        synthesize_default(val.parent, size=64, seed=0)
    a, b = pick_clips(val, args.clip, args.seconds)
    out = Path(args.out)
    samples = write_sample_file(a, b, out)
    print(f"demo: identity {a.identity} (clip {a.key}), other voices from {b.identity} (clip {b.key}) -> {samples}")

    argv = ["generate", "--samples", str(samples), "--root", str(out), "--out", str(out), "--quiet"]
    argv += ["--seed", str(args.seed), "--vae", args.vae, "--audio", args.audio, "--device", args.device]
    for flag, value in (("--checkpoint", args.checkpoint), ("--pretrained", args.pretrained),
                        ("--size", args.size), ("--vae-device", args.vae_device)):  # fmt: skip
        if value is not None:
            argv += [flag, str(value)]
    code = cli.main(argv)
    if code != 0:
        return code
    own, other = _read_video(out / "own_voices.mp4"), _read_video(out / "other_voices.mp4")
    hw = own.shape[1:3]
    rows = [
        (f"real\n{a.identity}", _resized(a.frames, hw), a.mask),
        ("generated,\nits own voices", own, a.mask),
        (f"generated,\nvoices of\n{b.identity}", other, b.mask),
        (f"real\n{b.identity}\n(whose voices\ndrive row 3)", _resized(b.frames, hw), b.mask),
    ]
    model = args.pretrained or args.checkpoint
    caption = f"{model}, seed {args.seed}; reference: the first real frame of {a.identity}"
    sheet = contact_sheet(rows, args.columns, args.scale, caption)
    sheet_path = Path(args.sheet) if args.sheet else out / "demo_sheet.png"
    sheet_path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(sheet_path)
    gif_rows = [("real", *rows[0][1:]), ("own voices", *rows[1][1:]), ("other voices", *rows[2][1:])]
    gif_path = save_gif(animation(gif_rows, args.scale), Path(args.gif) if args.gif else out / "demo.gif")
    print(f"wrote {sheet_path} ({sheet.size[0]}x{sheet.size[1]}) and {gif_path}")
    return 0
