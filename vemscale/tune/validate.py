"""Check a whole sweep before any trial starts: every arm x search-space value makes a valid fine-tune config,
its inputs exist and fit (data, model, init checkpoint), and the metric is one the trials report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vemscale.config import ConfigError, build_config
from vemscale.errors import UserError
from vemscale.tune.config import SweepConfig, compose
from vemscale.tune.space import check_points

PRETRAIN_HINT = ("produce it first, e.g. `vemscale pretrain configs/pretrain_retina.yaml run_dir=<dir>` "
                 "(its checkpoint is <dir>/checkpoint; see the sweep config's header)")


def reported_metrics(classes: list[str]) -> list[str]:
    """What a fine-tuning trial reports at each evaluation (val_every and the last iteration)."""
    return ["val_iou", "best_val_iou", *(f"val_iou_{i}" for i in range(len(classes))), "loss"]


def check_sweep(state: dict[str, Any], prepare_inputs: bool = True) -> dict[str, Any]:
    """Validate every arm x search-space point; with `prepare_inputs`, also open each distinct data/model/init.

    Raises ConfigError/UserError naming the arm and value; returns what the scheduler defaults need.
    """
    from vemscale.train.finetune import FinetuneConfig, prepare

    sweep = SweepConfig.model_validate(state["sweep"])
    if sweep.reserved_keys():
        raise ConfigError("; ".join(sweep.reserved_keys()))
    configs = []
    for arm, params, what in check_points(sweep):
        data = compose(state, arm, sweep.seeds[0], params, run_dir=Path(sweep.run_dir) / "trials" / "check")
        try:
            cfg = build_config(FinetuneConfig, data)
        except ConfigError as err:
            raise ConfigError(f"sweep {what}: {err}") from None
        metrics = reported_metrics(cfg.data.classes)
        if sweep.metric not in metrics:
            raise ConfigError(f"metric {sweep.metric!r} is not reported by fine-tuning; use one of {', '.join(metrics)}")
        if sweep.metric != "loss" and not cfg.data.val:
            raise ConfigError(f"sweep {what}: metric {sweep.metric!r} needs a validation set (data.val is empty)")
        if cfg.init and "://" not in cfg.init and not Path(cfg.init).exists():
            raise UserError(f"sweep {what}: init checkpoint {cfg.init} does not exist; {PRETRAIN_HINT}")
        configs.append((what, cfg))
    prepared = 0
    if prepare_inputs:
        seen = set()
        for what, cfg in configs:
            key = json.dumps([cfg.data.model_dump(mode="json"), cfg.model.model_dump(mode="json"), cfg.init,
                              cfg.transfer, cfg.freeze], sort_keys=True)
            if key in seen:
                continue
            seen.add(key)
            try:
                prepare(cfg)
            except UserError as err:
                raise UserError(f"sweep {what}: {err}") from None
            prepared += 1
    return {
        "checked": len(configs),
        "prepared": prepared,
        "max_iterations": max(c.train.iterations for _, c in configs),
        "min_val_every": min(min(c.train.val_every, c.train.iterations) for _, c in configs),
        "n_trials": sweep.n_trials(),
    }
