"""Stage `sweep`: fine-tuning over arms x a search space x seeds on Ray Tune, then statistics, plots, a report.

    vemscale sweep configs/sweep_seeds.yaml                  # run it (see the config's header for the pre-training step)
    vemscale sweep configs/sweep_seeds.yaml seeds=[0,1] run_dir=runs/try overrides.train.iterations=100
    vemscale sweep configs/sweep_hparams.yaml --check        # validate every arm x value, count trials, run nothing
    vemscale sweep --resume runs/sweep_seeds                 # continue an interrupted sweep, rerun errored trials
    vemscale sweep --report runs/sweep_seeds                 # rewrite the tables, figures and report only

Every arm x search-space value is validated against the fine-tune config, and each distinct data/model/init is
opened, before any trial starts. In run_dir: `trials.csv` (one row per trial, with its status), `summary.csv`
(per arm), `pvalues.csv` (Mann-Whitney U between arms), `box_*.png`, `curves_*.png`, `report.md`,
`report.json`; `trials/<trial>/` holds each trial's fine-tuning run, `tune/` Ray Tune's experiment state.
The exit code is 1 when any trial failed (the report lists them; `--resume` reruns them).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import yaml

from vemscale.config import ConfigError, dump_config, load_config
from vemscale.errors import UserError
from vemscale.io.atomic import append_line, read_json_lines
from vemscale.tune.config import SweepConfig

log = logging.getLogger(__name__)

STATE_FILE = "sweep_state.json"  # what trials are composed from; `--resume` reads it
RUNS_FILE = "sweep_runs.jsonl"  # one line per invocation (start/resume) with its wall time
TUNE_DIR = "tune"


def load_sweep_config(config: str | None, overrides: Sequence[str]) -> SweepConfig:
    overrides = list(overrides)
    if config and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config] + overrides
    return load_config(SweepConfig, config, overrides)


def plan(cfg: SweepConfig) -> dict[str, Any]:
    """The sweep's state: its config, the base fine-tune config (as written) and the directory paths are relative to."""
    base: dict[str, Any] = {}
    if cfg.base is not None:
        if not cfg.base.is_file():
            raise ConfigError(f"base config {str(cfg.base)!r} does not exist (paths are relative to {os.getcwd()})")
        try:
            base = yaml.safe_load(cfg.base.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"base config {str(cfg.base)!r} is not valid YAML: {err}") from None
        if not isinstance(base, dict):
            raise ConfigError(f"base config {str(cfg.base)!r} must hold a mapping of keys to values")
    return {
        "cwd": os.getcwd(),
        "run_dir": str(cfg.run_dir.resolve()),
        "base_path": str(cfg.base) if cfg.base else None,
        "base": base,
        "sweep": cfg.model_dump(mode="json"),
    }


def _scheduler(cfg: SweepConfig, checked: dict[str, Any]):
    if cfg.scheduler.type == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    s = cfg.scheduler
    return ASHAScheduler(time_attr=s.time_attr, max_t=s.max_t or checked["max_iterations"],
                         grace_period=s.grace_period or checked["min_val_every"],
                         reduction_factor=s.reduction_factor, brackets=s.brackets)


def _concurrency(cfg: SweepConfig) -> int:
    """Trials at once: max_concurrent, else as many as the cluster's CPUs (and GPUs) hold; fails when not even one fits."""
    import ray

    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 0), res.get("GPU", 0)
    r = cfg.resources
    if r.cpus > cpus + 1e-9 or r.gpus > gpus + 1e-9:
        raise UserError(f"a trial needs {r.cpus} CPU(s) and {r.gpus} GPU(s) (resources.cpus/gpus) but the Ray cluster "
                        f"has {cpus:g} CPU(s) and {gpus:g} GPU(s)")
    fit = math.floor(cpus / r.cpus + 1e-9)
    if r.gpus:
        fit = min(fit, math.floor(gpus / r.gpus + 1e-9))
    return min(cfg.max_concurrent or fit, cfg.n_trials())


def _tuner(state: dict[str, Any], cfg: SweepConfig, checked: dict[str, Any]):
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    from vemscale.tune.space import param_space
    from vemscale.tune.trainable import trainable, trial_dirname

    return tune.Tuner(
        trainable(state),
        param_space=param_space(cfg),
        tune_config=tune.TuneConfig(
            metric=cfg.metric,
            mode=cfg.mode,
            scheduler=_scheduler(cfg, checked),
            # the variant generator limits concurrency itself (Tune ignores max_concurrent_trials beside it)
            search_alg=BasicVariantGenerator(max_concurrent=_concurrency(cfg), random_state=cfg.sample_seed),
            num_samples=cfg.num_samples,
            trial_name_creator=trial_dirname,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=TUNE_DIR,
            storage_path=state["run_dir"],
            failure_config=tune.FailureConfig(max_failures=0),  # a failed trial stays ERROR; --resume reruns it
            verbose=1,
        ),
    )


def _finish(grid, state: dict[str, Any], t0: float | None, how: str) -> dict[str, Any]:
    """Record this invocation's wall time (t0 None: a report only), write the results, print the summary."""
    from vemscale.tune.report import write_report
    from vemscale.tune.results import collect

    run_dir = Path(state["run_dir"])
    if t0 is not None:
        append_line(run_dir / RUNS_FILE, json.dumps({"how": how, "started": t0, "wall_s": round(time.time() - t0, 1)}))
    runs = read_json_lines(run_dir / RUNS_FILE)
    total = sum(r.get("wall_s", 0) for r in runs) if runs else None
    report = write_report(run_dir, collect(grid, state), state, wall_s=total)
    _print_summary(report)
    return report


def sweep(cfg: SweepConfig) -> dict[str, Any]:
    """Validate, run every trial on Ray Tune, write the results; returns report.json's content."""
    from vemscale.raycluster import ensure_ray
    from vemscale.tune.validate import check_sweep

    t0 = time.time()
    state = plan(cfg)
    run_dir = Path(state["run_dir"])
    if (run_dir / TUNE_DIR).exists():
        raise UserError(f"{run_dir} already holds a sweep: continue it with `vemscale sweep --resume {run_dir}` "
                        "or give another run_dir=")
    checked = check_sweep(state)
    log.info("sweep: %d trials; %d config(s) validated, %d input set(s) opened", checked["n_trials"],
             checked["checked"], checked["prepared"])
    ensure_ray()
    run_dir.mkdir(parents=True, exist_ok=True)
    tuner = _tuner(state, cfg, checked)  # checks the cluster's resources before anything is written
    from vemscale.io.atomic import write_text

    write_text(run_dir / STATE_FILE, json.dumps(state, indent=2))
    dump_config(cfg, run_dir / "sweep.yaml")
    return _finish(tuner.fit(), state, t0, "start")


def _restore(run_dir: str | Path, check_inputs: bool):
    """The sweep's saved state and its restored Tuner (unfinished trials resume, errored ones run again)."""
    from ray import tune

    from vemscale.raycluster import ensure_ray
    from vemscale.tune.trainable import trainable
    from vemscale.tune.validate import check_sweep

    run_dir = Path(run_dir).resolve()
    state_file = run_dir / STATE_FILE
    if not state_file.is_file():
        raise UserError(f"{run_dir} holds no sweep to resume ({STATE_FILE} is missing)")
    state = json.loads(state_file.read_text())
    state["run_dir"] = str(run_dir)  # the sweep may have moved
    if check_inputs:
        check_sweep(state)  # inputs may have changed (a missing init checkpoint is the usual cause of errors)
    ensure_ray()
    if not tune.Tuner.can_restore(str(run_dir / TUNE_DIR)):
        raise UserError(f"{run_dir / TUNE_DIR} holds no Ray Tune experiment state to restore")
    # resume_errored keeps an errored trial's id, hence its run_dir and Ray Train checkpoints: it continues from
    # its newest checkpoint (restart_errored would give it a new id and start it from scratch)
    tuner = tune.Tuner.restore(str(run_dir / TUNE_DIR), trainable=trainable(state), resume_unfinished=True,
                               resume_errored=True)
    return state, tuner


def resume(run_dir: str | Path) -> dict[str, Any]:
    """Continue a sweep: unfinished trials resume, errored ones run again (each from its newest checkpoint)."""
    t0 = time.time()
    state, tuner = _restore(run_dir, check_inputs=True)
    return _finish(tuner.fit(), state, t0, "resume")


def report_only(run_dir: str | Path) -> dict[str, Any]:
    """Rewrite a sweep's tables, figures and report from its saved state; runs no trial."""
    state, tuner = _restore(run_dir, check_inputs=False)
    return _finish(tuner.get_results(), state, None, "report")


def _print_summary(report: dict[str, Any]) -> None:
    m = report["metric"]
    print(f"\nsweep: {report['n_trials']} trials, " + ", ".join(f"{n} {s}" for s, n in report["status"].items() if n)
          + (f", wall {report['wall_s'] / 60:.1f} min" if report.get("wall_s") else ""))
    print(f"{'arm':<16} {'n':>3}  {'final ' + m + ' mean ± std':<28} {'best ' + m + ' mean ± std':<28}")
    for arm, s in report["arms"].items():
        cells = []
        for k in (f"final_{m}", f"best_{m}"):
            mean, std = s[k]["mean"], s[k]["std"]
            cells.append("-" if mean is None else f"{mean:.4f} ± {std:.4f}" if std is not None else f"{mean:.4f}")
        print(f"{arm:<16} {s[f'final_{m}']['n']:>3}  {cells[0]:<28} {cells[1]:<28}")
    for t in report["mann_whitney"][f"final_{m}"]:
        p = "-" if t["p"] is None else f"{t['p']:.4f}"
        print(f"Mann-Whitney U (two-sided), final {m}, {t['arm_a']} vs {t['arm_b']}: U={t['u']} p={p}")
    if report["failed"]:
        print(f"{report['failed']} trial(s) failed or unfinished (see trials.csv); "
              f"rerun them with: vemscale sweep --resume {report['run_dir']}")
    print(f"report: {report['report']}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="sweep YAML (see configs/sweep_*.yaml)")
    parser.add_argument("overrides", nargs="*",
                        help="key=value overrides of the sweep config, e.g. seeds=[0,1] run_dir=runs/x "
                             "overrides.train.iterations=100")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the sweep in RUN_DIR (reruns errored trials)")
    parser.add_argument("--report", metavar="RUN_DIR",
                        help="rewrite the tables, figures and report of the sweep in RUN_DIR; run no trial")
    parser.add_argument("--check", action="store_true",
                        help="validate every arm x search-space value and open the inputs; run no trial")


def run_cli(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    connected_before = ray.is_initialized()  # e.g. main() called from a notebook or a test on its own Ray
    try:
        return _run_cli(args)
    finally:
        # Ray relays the trials' log lines asynchronously; disconnect so none lands after --json's last line
        # (only from a Ray this command connected to: a caller's own session stays up)
        if ray.is_initialized() and not connected_before:
            ray.shutdown()


def _run_cli(args: argparse.Namespace) -> dict[str, Any]:
    if args.resume or args.report:
        if args.config or args.overrides or (args.resume and args.report):
            raise UserError("--resume/--report RUN_DIR take no config or overrides: the sweep's own are in RUN_DIR")
        return resume(args.resume) if args.resume else report_only(args.report)
    if not args.config and not args.overrides:
        raise UserError("give a sweep config (e.g. configs/sweep_seeds.yaml) or --resume RUN_DIR")
    cfg = load_sweep_config(args.config, args.overrides)
    if args.check:
        from vemscale.tune.validate import check_sweep

        checked = check_sweep(plan(cfg))
        print(f"sweep ok: {checked['n_trials']} trials; {checked['checked']} config(s) validated, "
              f"{checked['prepared']} input set(s) opened")
        return checked
    return sweep(cfg)
