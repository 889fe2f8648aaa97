"""`dystream ablation {plan,run,eval}`: the paper's ablations in miniature on long streams (docs/ablation.md).

    dystream ablation plan                 # which rows exist, which will be trained, and the expected time of each
    dystream ablation run                  # train the missing rows (dystream fit, as make train), then eval
    dystream ablation eval                 # stream / sample every row and write docs/results/ablation.md

Each row's runs go through the same Lightning CLI path as `make train`:
``dystream fit --config recipes/<stage>.yaml --config recipes/ablation/<row>_<stage>.yaml [--train-args ...]``.
Outputs live under runs/ablation/<row>/<stage>/; a row whose export exists is reused. The `rapr` row's stage 1 is the
chain's default layout: runs/stage1_ode and runs/stage1_sid stand in for it when their saved config.yaml equals the
row's resolved recipe (compared field by field, output paths excepted), and the `post_mask` teacher is runs/teacher
under the same rule. Nothing is written under runs/<stage>/ of the chain.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dystream.evaluation.ablation import ROWS, AblationEvalConfig, AblationStep, evaluate_rows, get_rows, write_outputs

HELP = "the paper's ablations in miniature on long streams: plan, train the missing rows, evaluate (docs/ablation.md)"

# a chain export that may stand in for an ablation run, with the chain run's saved config
CHAIN_EQUIVALENT = {
    "runs/ablation/rapr/stage1_ode/student.safetensors": "runs/stage1_ode",
    "runs/ablation/rapr/stage1_sid/student.safetensors": "runs/stage1_sid",
    "runs/ablation/post_mask/teacher/teacher.safetensors": "runs/teacher",
    "runs/ablation/full/stage2_gan/student.safetensors": "runs/stage2_gan",
}
# minutes per stage on 2 CPU cores with the recipes' budgets (the chain's last measured runs), used when
# runs/summary.json has no time for the stage (stage2_gan: the two runs of `make ablation`, 5.6 and 5.3 min)
DEFAULT_MINUTES = {"teacher": 8.3, "stage1_ode": 1.5, "stage1_sid": 6.8, "stage2_gan": 5.5}
# seconds of work per second of stream for the mini student at 64x64 on 2 uncontended CPU cores, measured by
# `make ablation` (2026-12-04): StreamingAvatar runs at a real-time factor of 0.18-0.21, and scoring (Sync-C, pose,
# identity) brings a row's total to 128 s for 4 x 120 s of stream
STREAM_RTF = 0.2
EVAL_S_PER_STREAM_S = 0.27
# keys whose values are output locations, not part of what a run computes
PATH_KEYS = {"export_dir", "default_root_dir", "dirpath", "save_dir", "name", "callbacks", "logger", "student"}


# ------------------------------------------------------------------------------------------------------------ plan
def _fit_command(step: AblationStep, train_args: list[str]) -> list[str]:
    exe = Path(sys.executable).with_name("dystream")  # the console script of this environment (as make train)
    return [str(exe) if exe.is_file() else "dystream", "fit", "--config", f"recipes/{step.base}.yaml",
            "--config", step.overlay, *train_args]  # fmt: skip


def resolved_config(step: AblationStep, train_args: list[str]) -> dict:
    """The row's resolved recipe, as `dystream fit --print_config` gives it."""
    import yaml

    cmd = _fit_command(step, train_args) + ["--print_config"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return yaml.safe_load(out)


def _layout_defaults() -> dict[str, Any]:
    import dataclasses

    from dystream.models.dit import DiTConfig
    from dystream.stages.student import LAYOUT_FIELDS

    return {f.name: f.default for f in dataclasses.fields(DiTConfig) if f.name in LAYOUT_FIELDS}


def _strip(tree: Any) -> Any:
    if isinstance(tree, dict):
        out = {k: _strip(v) for k, v in tree.items() if k not in PATH_KEYS}
        if "student_overrides" in out:  # an override equal to the DiT default changes nothing
            defaults = _layout_defaults()
            given = out["student_overrides"] or {}
            out["student_overrides"] = {k: v for k, v in given.items() if defaults.get(k, object()) != v}
        return out
    if isinstance(tree, list):
        return [_strip(v) for v in tree]
    return tree


def config_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys where two resolved recipes differ, output locations excepted (PATH_KEYS)."""
    a, b = _strip(a), _strip(b)
    diffs: list[str] = []

    def walk(x: Any, y: Any, where: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                walk(x.get(k), y.get(k), f"{where}.{k}" if where else k)
        elif x != y:
            diffs.append(where)

    walk(a, b, prefix)
    return diffs


def chain_stand_in(step: AblationStep, train_args: list[str]) -> tuple[str | None, str]:
    """(the chain export that may replace this step's run, why or why not)."""
    run_dir = CHAIN_EQUIVALENT.get(step.export)
    if run_dir is None:
        return None, "no chain equivalent"
    import yaml

    export = Path(run_dir) / Path(step.export).name
    saved = Path(run_dir) / "config.yaml"
    if not export.is_file() or not saved.is_file():
        return None, f"{export} or {saved} missing"
    diffs = config_differences(yaml.safe_load(saved.read_text()), resolved_config(step, train_args))
    if diffs:
        return None, f"{saved} differs in {', '.join(diffs[:4])}"
    return str(export), f"equal to {saved}"


def plan(rows: list, train_args: list[str], summary: dict, log=print) -> tuple[list[AblationStep], dict[str, str]]:
    """(the runs to train, in order, each once; the export each row's next stage / evaluation uses)."""
    todo: list[AblationStep] = []
    use: dict[str, str] = {}  # export path -> the file standing in for it
    total = 0.0
    log(f"{'row':<10} {'stage':<11} {'state':<8} {'min':>5}  export / reason")
    for row in rows:
        for step in row.steps:
            if step.export in use or step in todo:
                continue
            minutes = summary.get(step.base, DEFAULT_MINUTES.get(step.base, 5.0))
            if Path(step.export).is_file():
                use[step.export] = step.export
                log(f"{row.name:<10} {step.base:<11} {'done':<8} {0:>5.1f}  {step.export}")
                continue
            stand_in, why = chain_stand_in(step, train_args)
            if stand_in is not None:
                use[step.export] = stand_in
                log(f"{row.name:<10} {step.base:<11} {'reuse':<8} {0:>5.1f}  {stand_in} ({why})")
                continue
            todo.append(step)
            use[step.export] = step.export
            total += minutes
            log(f"{row.name:<10} {step.base:<11} {'train':<8} {minutes:>5.1f}  {step.export} ({why})")
    log(f"training: {len(todo)} run(s), about {total:.0f} min on this machine (plus the evaluation)")
    return todo, use


def _stage_minutes(runs: str = "runs") -> dict[str, float]:
    """Measured minutes per stage from the chain summary (runs/summary.json), where present."""
    try:
        from dystream.chain import load_summary

        stages = load_summary(runs).get("stages", {})
    except Exception:  # noqa: BLE001  (no summary yet: the defaults)
        return {}
    return {k: v["seconds"] / 60 for k, v in stages.items() if isinstance(v, dict) and v.get("seconds")}


# ------------------------------------------------------------------------------------------------------------ cli
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("plan", "run", "eval"), help="plan, run (train missing rows + eval), eval")
    parser.add_argument("--rows", nargs="*", default=None, help=f"rows (default all): {[r.name for r in ROWS]}")
    parser.add_argument(
        "--train-args",
        default="",
        help="extra Lightning CLI arguments for every training run, e.g. a uniformly reduced budget "
        '"--trainer.max_epochs=1" (quoted, one string)',
    )
    defaults = AblationEvalConfig()
    parser.add_argument("--seconds", type=float, default=defaults.seconds, help="long-stream length (s)")
    parser.add_argument("--clips", type=int, default=defaults.clips, help="validation identities")
    parser.add_argument("--bucket-s", type=float, default=defaults.bucket_s, help="bucket length (s)")
    parser.add_argument("--short-s", type=float, default=defaults.short_s, help="the short (first seconds) numbers")
    parser.add_argument("--teacher-steps", type=int, default=defaults.teacher_steps, help="teacher Euler steps")
    parser.add_argument(
        "--out", default="docs/results/ablation.md", help="the markdown (a .json is written next to it)"
    )
    parser.add_argument("--plot", default="docs/images/ablation_drift.png", help="the drift plot ('' for none)")
    parser.add_argument(
        "--sheet", default="docs/images/ablation_frames.png",
        help="frames of the first identity's stream of every row at 0, 20, ..., 100 s and the end ('' for none)",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    rows = get_rows(args.rows)
    train_args = shlex.split(args.train_args)
    # stage rows need their earlier stages: a stage2 row trains the rapr row's stage 1 first (ROWS lists them)
    todo, use = plan(rows, train_args, _stage_minutes())
    students = sum(r.kind == "student" for r in rows)
    eval_min = students * args.clips * args.seconds / 60 * EVAL_S_PER_STREAM_S
    print(
        f"evaluation: {students} student row(s) x {args.clips} identities x {args.seconds:g} s of streaming, about "
        f"{eval_min:.0f} min (streaming at real-time factor {STREAM_RTF} and scoring; plus the teachers' 4-s clips)"
    )
    if args.action == "plan":
        return 0
    if args.action == "run":
        for step in todo:
            cmd = _fit_command(step, train_args)
            # a later stage starts from the export its predecessor stands in for (e.g. runs/stage1_sid)
            for src, dst in use.items():
                if src != dst and src in _inputs_of(step):
                    cmd += [f"--model.init_args.{_inputs_of(step)[src]}={dst}"]
            print("ablation: dystream " + " ".join(cmd[1:]), flush=True)
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True)
            print(f"ablation: {step.overlay} trained in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
            if not Path(step.export).is_file():
                raise SystemExit(f"ablation: {step.overlay} finished but {step.export} was not written")
    cfg = AblationEvalConfig(
        clips=args.clips, seconds=args.seconds, bucket_s=args.bucket_s, short_s=args.short_s,
        teacher_steps=args.teacher_steps,
    )  # fmt: skip
    weights = {r.name: use.get(r.weights, r.weights) for r in rows}
    t0 = time.perf_counter()
    results, meta = evaluate_rows(rows, cfg, weights)
    meta["eval_minutes"] = round((time.perf_counter() - t0) / 60, 1)
    meta["train_args"] = args.train_args
    command = "dystream ablation " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    for path in write_outputs(results, meta, args.out, args.plot or None, command, args.sheet or None):
        print(f"ablation: wrote {path}")
    return 0


def _inputs_of(step: AblationStep) -> dict[str, str]:
    """The exports a step reads (path -> the init arg naming it)."""
    if step.base == "stage1_sid":
        return {step.export.replace("stage1_sid", "stage1_ode"): "student"}
    if step.base == "stage2_gan":
        return {"runs/ablation/rapr/stage1_sid/student.safetensors": "student"}
    return {}
