"""The function trainable of a sweep: one trial = one fine-tuning run on Ray Train, reporting to Ray Tune.

Ray Tune cannot take a Ray Train V2 `TorchTrainer` itself; each trial builds and fits one (the same trainer
`vemscale finetune` runs, storage in run_dir/trials/<trial>) with a callback that forwards every evaluation
to Tune. The trainable holds 0.1 CPU; the trial's workers hold the rest of `resources.cpus`. A trial that
runs again (resumed sweep, errored trial) continues from its newest Ray Train checkpoint; one that had
already finished (the sweep was killed before Tune recorded it) only reports its last evaluation again.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from vemscale.tune.config import TRAINABLE_CPUS, trial_name

ATTEMPTS_FILE = "attempts.jsonl"  # a line per start, end (with its outcome) and skip of the trial


def trial_dirname(trial) -> str:
    """Tune's trial directory name (run_dir/tune/<name>), also the name of its fine-tuning run_dir."""
    return trial_name(trial.config["arm"], trial.config["seed"], trial.trial_id)


def evaluation_reporter(metric: str):
    """A Ray Train callback forwarding rank 0's reports that carry `metric` (the evaluations) to Ray Tune.

    Tune requires the metric in every result, and ASHA compares trials on it, so reports between
    evaluations (loss only) stay in the trial's metrics.csv and are not sent.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    class EvaluationReport(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint) -> None:
            if metrics and metric in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    return EvaluationReport()


def _record(run_dir: Path, **event) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    from vemscale.io.atomic import append_line

    append_line(run_dir / ATTEMPTS_FILE, json.dumps({"time": time.time(), **event}))


def read_attempts(run_dir: Path) -> list[dict[str, Any]]:
    from vemscale.io.atomic import read_json_lines

    return read_json_lines(Path(run_dir) / ATTEMPTS_FILE)  # without a line cut by a kill


def _finished(run_dir: Path, iterations: int, metric: str) -> bool:
    """If this trial's run already completed (final checkpoint exported), report its last evaluation to Tune."""
    import ray.tune

    from vemscale.checkpoint import read_meta
    from vemscale.train.metrics_log import read_metrics

    runs = [e for e in read_attempts(run_dir) if e.get("event") in ("start", "end")]
    if not runs or runs[-1].get("outcome") != "done" or not (run_dir / "checkpoint").is_dir():
        return False
    try:
        if read_meta(run_dir / "checkpoint").iteration < iterations:
            return False
    except Exception:
        return False
    rows = [r for r in read_metrics(run_dir / "metrics.csv") if r.get(metric) not in (None, "")]
    if not rows:
        return False
    last = {}
    for k, v in rows[-1].items():
        try:
            last[k] = float(v)
        except (TypeError, ValueError):
            continue
    _record(run_dir, event="skip", reason="already finished")
    ray.tune.report(last)
    return True


def run_trial(config: dict[str, Any], state: dict[str, Any]) -> None:
    """Tune function trainable: compose the trial's fine-tune config, build its TorchTrainer, fit it."""
    import ray.tune

    from vemscale.config import build_config
    from vemscale.train.finetune import FinetuneConfig, build_trainer, export_result
    from vemscale.tune.config import TrialResources, compose

    trial_id = ray.tune.get_context().get_trial_id()
    run_dir = Path(state["run_dir"]) / "trials" / trial_name(config["arm"], config["seed"], trial_id)
    cfg = build_config(FinetuneConfig, compose(state, config["arm"], config["seed"], config.get("params") or {}, run_dir))
    if _finished(run_dir, cfg.train.iterations, state["sweep"]["metric"]):
        return  # it finished before the sweep was interrupted, only Tune had not recorded it yet
    _record(run_dir, event="start", trial_id=trial_id)
    try:
        trainer = build_trainer(
            cfg,
            callbacks=[evaluation_reporter(state["sweep"]["metric"])],
            worker_resources=TrialResources.model_validate(state["sweep"]["resources"]).worker_resources(),
        )
        export_result(cfg, trainer.fit())
    except BaseException as err:
        _record(run_dir, event="end", outcome="error", error=f"{type(err).__name__}: {err}"[:500])
        raise
    _record(run_dir, event="end", outcome="done")


def trainable(state: dict[str, Any]):
    """`run_trial` bound to the sweep's state, holding TRAINABLE_CPUS (its workers request their own)."""
    from ray import tune

    return tune.with_resources(tune.with_parameters(run_trial, state=state), {"cpu": TRAINABLE_CPUS})
