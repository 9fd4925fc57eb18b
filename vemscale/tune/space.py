"""The sweep as a Ray Tune parameter space: arm x seed x grid keys (every combination), the other keys sampled.

A trial's Tune config is `{"arm": name, "seed": s, "params": {dotted key: value}}`; `config.compose` turns it
into the trial's fine-tune config.
"""

from __future__ import annotations

from typing import Any

from vemscale.tune.config import Domain, SweepConfig


def tune_domain(domain: Domain) -> Any:
    from ray import tune

    if domain.kind == "grid":
        return tune.grid_search(domain.values)
    if domain.kind == "choice":
        return tune.choice(domain.values)
    low, high = domain.values
    return tune.uniform(low, high) if domain.kind == "uniform" else tune.loguniform(low, high)


def param_space(sweep: SweepConfig) -> dict[str, Any]:
    from ray import tune

    return {
        "arm": tune.grid_search(list(sweep.arms)),
        "seed": tune.grid_search(list(sweep.seeds)),
        "params": {key: tune_domain(d) for key, d in sweep.domains().items()},
    }


def check_points(sweep: SweepConfig) -> list[tuple[str, dict[str, Any], str]]:
    """(arm, params, what) to validate: per arm, every key at its first value, then each value (or bound) of
    each key in turn. Covers every key and value without crossing them all."""
    first = {k: d.values[0] for k, d in sweep.domains().items()}
    points = []
    for arm in sweep.arms:
        points.append((arm, dict(first), f"arm {arm!r}"))
        for key, d in sweep.domains().items():
            for value in d.values[1:] if d.kind in ("grid", "choice") else d.values:
                points.append((arm, {**first, key: value}, f"arm {arm!r} with search_space {key}={value!r}"))
    return points
