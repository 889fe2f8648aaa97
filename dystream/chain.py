"""`dystream chain`: the stage chain's plan before `make train` starts, and one summary line per finished stage.

The Makefile owns the chain (``CHAIN``, ``NEEDS_<stage>``, the file that marks a stage done); it hands the stages
of a run to this tool in order, each as ``NAME=DONE_FILE``::

    dystream chain plan --runs runs --stage vae=runs/vae/checkpoints/last.ckpt ... --train stage1_sid
    dystream chain run --runs runs --stage teacher --of "vae teacher ..." -- dystream fit --config recipes/teacher.yaml
    dystream chain record --runs runs --stage teacher --seconds 734

``plan`` prints which stages are done, which will be built and roughly how long each takes on this machine (the
last measured run of that stage, from ``<runs>/summary.json``). ``run`` says which stage of how many starts, runs
its command, times it and, when it succeeds, records it. ``record`` reads what a finished stage wrote (its last
validation metric from the TensorBoard scalars under ``<runs>/<stage>/``, its export), prints one line and keeps it
in ``<runs>/summary.json`` and the table ``<runs>/summary.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HELP = "the stage chain of make train: print the plan, record a finished stage (runs/summary.md)"

SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
# the metric that says most about a stage, read from its last validation; others fall back to FALLBACK_METRICS
KEY_METRICS = {
    "vae": "val/psnr",  # reconstruction PSNR (dB), higher is better
    "teacher": "val/loss",  # flow-matching velocity loss
    "stage1_ode": "val/loss",  # x0 regression against the teacher's trajectories
    "stage1_sid": "val/teacher_mse",  # student samples vs the teacher's, same noise
    "stage2_gan": "val/psnr",  # generated vs real video
    "metric_syncnet": "val/pair_acc",
    "metric_pose": "val/px_error",
}
FALLBACK_METRICS = ("val/loss", "val/psnr", "train/loss", "train/loss_generator")
# the file a stage hands on, when it writes several (the teacher also writes audio.safetensors)
MAIN_EXPORTS = {"vae": "vae.safetensors", "teacher": "teacher.safetensors", "metric_syncnet": "syncnet.safetensors",
                "metric_pose": "pose.safetensors"}  # fmt: skip


@dataclass(frozen=True)
class Metric:
    tag: str
    value: float
    step: int

    def __str__(self) -> str:
        return f"{self.tag} {self.value:.4g} (step {self.step})"


# ---------------------------------------------------------------------------------------------- reading a run
def read_scalars(run_dir: str | Path) -> dict[str, Metric]:
    """The last value of every scalar in the TensorBoard event files directly under ``run_dir`` (oldest file
    first, so a later run of the stage wins)."""
    files = sorted(Path(run_dir).glob("events.out.tfevents.*"), key=lambda p: (p.stat().st_mtime, p.name))
    if not files:
        return {}
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    last: dict[str, Metric] = {}
    for path in files:
        for event in LegacyEventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    number = float(value.simple_value)
                elif value.HasField("tensor") and len(value.tensor.float_val) == 1:
                    number = float(value.tensor.float_val[0])
                else:
                    continue
                if value.tag != "hp_metric":  # Lightning's placeholder (-1)
                    last[value.tag] = Metric(value.tag, number, int(event.step))
    return last


def logged_seconds(run_dir: str | Path) -> float | None:
    """Wall time from the first to the last event of the newest TensorBoard file under ``run_dir``: a stage's
    duration for runs made before ``summary.json`` recorded it (None without events)."""
    files = sorted(Path(run_dir).glob("events.out.tfevents.*"), key=lambda p: (p.stat().st_mtime, p.name))
    if not files:
        return None
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

    times = [e.wall_time for e in LegacyEventFileLoader(str(files[-1])).Load() if e.HasField("summary")]
    return max(times) - min(times) if len(times) > 1 else None


def key_metric(stage: str, run_dir: str | Path) -> Metric | None:
    """The stage's key metric at its last validation (KEY_METRICS), else a generic one, else None."""
    scalars = read_scalars(run_dir)
    for tag in (KEY_METRICS.get(stage), *FALLBACK_METRICS):
        if tag in scalars:
            return scalars[tag]
    val = sorted(t for t in scalars if t.startswith("val/"))
    return scalars[val[0]] if val else None


def stage_output(run_dir: str | Path, done: str | Path | None = None, stage: str | None = None) -> str:
    """What a stage hands on: its main export (MAIN_EXPORTS, else ``student.safetensors``), else its newest
    ``*.safetensors``, else the file that marks it done."""
    main = Path(run_dir) / MAIN_EXPORTS.get(stage or Path(run_dir).name, "student.safetensors")
    if main.is_file():
        return str(main)
    exports = sorted(Path(run_dir).glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
    if exports:
        return str(exports[-1])
    return str(done) if done else str(run_dir)


# what the samples of a stage without validation are (its done file is the index.json of the shards it writes)
INDEX_NOUNS = {"ode_pairs": "pair samples", "latents": "latent samples"}


def _index_summary(done: Path, stage: str) -> str | None:
    """ODE pairs, cached latents (no validation): how many samples the index of their shards lists."""
    try:
        index = json.loads(done.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    total = index.get("total_samples")
    return None if total is None else f"{total} {INDEX_NOUNS.get(stage, 'samples')}"


# ---------------------------------------------------------------------------------------------- summary files
def load_summary(runs: str | Path) -> dict[str, Any]:
    path = Path(runs) / SUMMARY_JSON
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {"stages": {}}
    return data if isinstance(data.get("stages"), dict) else {"stages": {}}


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def summary_line(stage: str, entry: dict[str, Any]) -> str:
    return f"{stage}: done in {format_duration(entry.get('seconds'))}, {entry.get('metric') or 'no metric'} -> " + str(
        entry.get("output")
    )


def write_summary_md(runs: str | Path, summary: dict[str, Any], order: list[str] | None = None) -> Path:
    """``<runs>/summary.md``: one row per recorded stage, in chain order when known."""
    stages = summary["stages"]
    names = [s for s in (order or []) if s in stages] + sorted(s for s in stages if s not in (order or []))
    rows = [
        "# Stage chain summary",
        "",
        "Written by `dystream chain record` after each stage `make train` builds (times measured on this machine).",
        "",
        "| stage | time | key metric (last logged value) | output | finished |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        e = stages[name]
        rows.append(
            f"| {name} | {format_duration(e.get('seconds'))} | {e.get('metric') or '-'} | `{e.get('output')}` "
            f"| {e.get('finished', '-')} |"
        )
    path = Path(runs) / SUMMARY_MD
    path.write_text("\n".join(rows) + "\n")
    return path


def record(
    runs: str | Path, stage: str, seconds: float, done: str | Path | None = None, order: list[str] | None = None
) -> str:
    """Add a finished stage to ``<runs>/summary.json`` and ``summary.md``; returns its summary line."""
    runs = Path(runs)
    run_dir = runs / stage
    metric = key_metric(stage, run_dir)
    text = str(metric) if metric else None
    if text is None and done is not None and Path(done).suffix == ".json":
        text = _index_summary(Path(done), stage)
    summary = load_summary(runs)
    entry = {
        "seconds": round(float(seconds), 1),
        "metric": text,
        "output": stage_output(run_dir, done, stage),
        "finished": time.strftime("%Y-%m-%d %H:%M", time.localtime()),
    }
    if metric is not None:
        entry["metric_tag"], entry["metric_value"], entry["metric_step"] = metric.tag, metric.value, metric.step
    summary["stages"][stage] = entry
    if order:
        summary["order"] = list(order)
    runs.mkdir(parents=True, exist_ok=True)
    tmp = runs / (SUMMARY_JSON + ".tmp")
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(tmp, runs / SUMMARY_JSON)
    write_summary_md(runs, summary, summary.get("order"))
    return summary_line(stage, entry)


# ---------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class PlannedStage:
    name: str
    done_file: str
    state: str  # "done", "build" (missing, built first) or "train" (the recipe make train runs)
    last_seconds: float | None
    timed_by: str = "last run"  # where last_seconds comes from


def plan(stages: list[tuple[str, str]], train: str | None, runs: str | Path) -> list[PlannedStage]:
    """The stages of a run in order: each (name, done file) is done or to build; ``train`` always runs."""
    measured = load_summary(runs)["stages"]
    names = [name for name, _ in stages] + ([train] if train is not None and train not in dict(stages) else [])
    done_files = dict(stages)
    out = []
    for name in names:
        done = done_files.get(name, "")
        state = "train" if name == train else ("done" if Path(done).exists() else "build")
        seconds, timed_by = measured.get(name, {}).get("seconds"), "last run"
        if seconds is None and state != "done":  # a run from before summary.json: its log's span
            seconds, timed_by = logged_seconds(Path(runs) / name), "TensorBoard log of the last run"
        out.append(PlannedStage(name, done, state, seconds, timed_by))
    return out


def format_plan(planned: list[PlannedStage], runs: str | Path, target: str = "make train") -> str:
    todo = [s for s in planned if s.state != "done"]
    lines = [f"{target}: {len(planned)} stage(s), {len(todo)} to run, outputs under {runs}/"]
    width = max([len(s.name) for s in planned] + [5])
    for i, s in enumerate(planned, 1):
        if s.state == "done":
            what = f"done       {s.done_file}"
        else:
            label = "build" if s.state == "build" else "train"
            took = "time unknown (no run yet)"
            if s.last_seconds:
                took = f"~{format_duration(s.last_seconds)} ({s.timed_by})"
            what = f"{label:<10} {took}"
        lines.append(f"  {i}/{len(planned)} {s.name:<{width}}  {what}")
    known = [s.last_seconds for s in todo if s.last_seconds]
    if todo:
        total = f"about {format_duration(sum(known))}" if known else "unknown"
        unknown = len(todo) - len(known)
        extra = f" + {unknown} stage(s) never timed here" if known and unknown else ""
        lines.append(f"  to run: {total}{extra}; each finished stage is summarised in {Path(runs) / SUMMARY_MD}")
    else:
        lines.append("  nothing to build")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- CLI
def _stage_arg(text: str) -> tuple[str, str]:
    name, sep, done = text.partition("=")
    if not name or not sep:
        raise argparse.ArgumentTypeError(f"expected NAME=DONE_FILE, got {text!r}")
    return name, done


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="chain_command", metavar="plan|run|record", required=True)
    p = sub.add_parser("plan", help="print the stages to build and to train, and their last measured times")
    p.add_argument("--runs", default="runs", help="the runs folder (summary.json with the last measured times)")
    p.add_argument(
        "--stage",
        action="append",
        type=_stage_arg,
        default=[],
        metavar="NAME=DONE_FILE",
        help="a stage this run needs, in chain order, and the file that marks it done (repeat)",
    )
    p.add_argument("--train", default=None, help="the stage that runs in any case (make train's RECIPE)")
    p.add_argument("--target", default="make train", help="what is being run, for the first line")
    c = sub.add_parser("run", help="run one stage's command (after --), timed, and record it when it succeeds")
    c.add_argument("--runs", default="runs", help="the runs folder")
    c.add_argument("--stage", required=True, help="the stage the command builds")
    c.add_argument("--done", default=None, help="the file that marks the stage done (a fallback output)")
    c.add_argument("--order", default="", help="the chain's stage names, space separated (row order of summary.md)")
    c.add_argument("--of", default="", help="the stages of this run, space separated (for 'stage i of n')")
    c.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command that runs the stage")
    r = sub.add_parser("record", help="summarise a finished stage into <runs>/summary.json and summary.md")
    r.add_argument("--runs", default="runs", help="the runs folder")
    r.add_argument("--stage", required=True, help="the stage that finished (its outputs are <runs>/<stage>/)")
    r.add_argument("--seconds", type=float, required=True, help="how long it took")
    r.add_argument("--done", default=None, help="the file that marks the stage done (a fallback output)")
    r.add_argument("--order", default="", help="the chain's stage names, space separated (row order of summary.md)")


def run(args: argparse.Namespace) -> int:
    if args.chain_command == "plan":
        print(format_plan(plan(args.stage, args.train, args.runs), args.runs, args.target), flush=True)
        return 0
    if args.chain_command == "run":
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        if not command:
            print("error: dystream chain run needs a command after --", file=sys.stderr)
            return 2
        return run_stage(command, args.runs, args.stage, args.done, args.order.split(), args.of.split())
    print(record(args.runs, args.stage, args.seconds, args.done, args.order.split()), flush=True)
    return 0


def run_stage(
    command: list[str], runs: str | Path, stage: str, done: str | None, order: list[str], of: list[str]
) -> int:
    """Run a stage's command (output passes through), then record it; returns the command's exit code."""
    position = f" [{of.index(stage) + 1}/{len(of)}]" if stage in of else ""
    print(f"==>{position} {stage}: {shlex.join(command)}", flush=True)
    start = time.monotonic()
    proc = subprocess.Popen(command)
    try:
        code = proc.wait()
    except KeyboardInterrupt:  # the stage got the same Ctrl-C (one process group): let it stop, then stop make
        proc.wait()
        code = 130
    seconds = time.monotonic() - start
    if code != 0:
        print(f"==> {stage}: failed (exit {code}) after {format_duration(seconds)}", file=sys.stderr, flush=True)
        return code
    print(f"==> {record(runs, stage, seconds, done, order)}", flush=True)
    return 0
