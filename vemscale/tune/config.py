"""The sweep config, and how one trial's fine-tune config is composed from it.

A trial's config is `base` (a fine-tune YAML) <- `overrides` <- its arm's overrides <- its sampled search-space
values <- `train.seed` (one of `seeds`), `train.workers` (`resources.workers`) and its own `run_dir`. Keys are
dotted (`train.lr`), in YAML either flat (`train.lr: 0.001`) or nested (`train: {lr: 0.001}`).

    run_dir: runs/sweep_seeds
    base: configs/finetune_vnc_mito.yaml
    overrides: {train.iterations: 600, train.crop: 128}
    arms:
      random: {}
      retina: {init: runs/pretrain_retina/checkpoint, transfer: retina, freeze: vit_blocks}
    search_space:
      train.lr: {loguniform: [1.0e-4, 3.0e-3]}
      train.batch_size: {choice: [4, 8]}
      freeze: {grid: [none, vit_blocks]}
    seeds: [0, 1, 2]
    scheduler: {type: asha, grace_period: 100, reduction_factor: 2}
    resources: {cpus: 1, gpus: 0, workers: 1}
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from vemscale.config import Strict, StageConfig

DOMAIN_KINDS = ("grid", "choice", "uniform", "loguniform")
TRAINABLE_CPUS = 0.1  # the function trainable itself; its Ray Train workers take the rest of a trial's CPUs

# keys the sweep sets for every trial; setting them elsewhere would be silently overwritten
RESERVED = {
    "run_dir": "each trial's run_dir is set by the sweep (under the sweep's run_dir/trials)",
    "train.seed": "list the seeds under `seeds:`",
    "train.workers": "set `resources.workers`",
}


def flatten(data: dict[str, Any], prefix: str = "", leaf=lambda v: False) -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}; an empty dict, or one `leaf(v)` accepts, stays a value."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and not leaf(value):
            out.update(flatten(value, f"{path}.", leaf))
        else:
            out[path] = value
    return out


def nest(dotted: dict[str, Any]) -> dict[str, Any]:
    """{"train.lr": 1} -> {"train": {"lr": 1}}."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        node = out
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: nested dicts merge, anything else (lists included) replaces."""
    out = dict(base)
    for key, value in update.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _is_domain(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and set(value) <= set(DOMAIN_KINDS)


class Domain(Strict):
    """One search-space entry: exactly one of `grid` (every value, crossed with the rest), `choice` (one value
    drawn per sample), `uniform` or `loguniform` ([low, high], drawn per sample). A plain list is a grid."""

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None

    @model_validator(mode="before")
    @classmethod
    def _list_is_grid(cls, v: Any) -> Any:
        return {"grid": v} if isinstance(v, list) else v

    @model_validator(mode="after")
    def _exactly_one(self) -> "Domain":
        kinds = [k for k in DOMAIN_KINDS if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"give exactly one of {', '.join(DOMAIN_KINDS)} (got {kinds or 'none'})")
        if self.kind in ("grid", "choice") and not self.values:
            raise ValueError(f"{self.kind} needs at least one value")
        if self.kind in ("uniform", "loguniform"):
            low, high = self.values
            if not low < high:
                raise ValueError(f"{self.kind} needs low < high, got [{low}, {high}]")
            if self.kind == "loguniform" and low <= 0:
                raise ValueError(f"loguniform needs low > 0, got {low}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in DOMAIN_KINDS if getattr(self, k) is not None)

    @property
    def values(self) -> list[Any]:
        """The values a trial may get (grid, choice), or the bounds (uniform, loguniform)."""
        return list(getattr(self, self.kind))

    def size(self) -> int:
        """How many trials this key multiplies the sweep by (grids only)."""
        return len(self.values) if self.kind == "grid" else 1


class SchedulerConfig(Strict):
    """`none`: every trial runs to the end. `asha`: ASHA stops weak trials at rungs of `time_attr`."""

    type: Literal["none", "asha"] = "none"
    time_attr: str = "iteration"  # the fine-tuning iteration (every report carries it)
    max_t: int | None = Field(None, gt=0)  # default: the longest trial's train.iterations
    grace_period: int | None = Field(None, gt=0)  # default: the shortest train.val_every
    reduction_factor: float = Field(3.0, gt=1)
    brackets: int = Field(1, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _name_only(cls, v: Any) -> Any:
        return {"type": v} if isinstance(v, str) else v


class TrialResources(Strict):
    """What one trial holds: `cpus` (its 0.1-CPU trainable included), `gpus`, and its Ray Train `workers`."""

    cpus: float = Field(1.0, gt=TRAINABLE_CPUS)
    gpus: float = Field(0.0, ge=0)
    workers: int = Field(1, gt=0)

    def worker_resources(self) -> dict[str, float]:
        """Each Ray Train worker's share (Ray takes fractions to 4 decimals)."""
        share = {"CPU": (self.cpus - TRAINABLE_CPUS) / self.workers, "GPU": self.gpus / self.workers}
        return {k: math.floor(v * 1e4) / 1e4 for k, v in share.items()}


class SweepConfig(StageConfig):
    run_dir: Path = Path("runs/sweep")
    stage: Literal["finetune"] = "finetune"  # the stage every trial runs
    base: Path | None = None  # a fine-tune YAML; its paths are relative to where vemscale runs
    overrides: dict[str, Any] = Field(default_factory=dict)  # dotted keys, for every trial
    arms: dict[str, dict[str, Any]] = Field(default_factory=lambda: {"default": {}})  # name -> dotted overrides
    only: list[str] | None = None  # run these arms of `arms` only, e.g. only=[a.source_only,a.ssl] on the command line
    # dotted key -> domain ({grid|choice|uniform|loguniform: ...}, or a list = grid); `domains()` gives them typed
    search_space: dict[str, Any] = Field(default_factory=dict)
    num_samples: int = Field(1, gt=0)  # draws of the choice/uniform/loguniform keys per arm x seed x grid point
    sample_seed: int = 0  # seeds the draws, so a sweep config always gives the same trials
    seeds: list[int] = Field(default_factory=lambda: [0])
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    metric: str = "val_iou"  # reported at every evaluation (val_every); best/final of it go into the tables
    mode: Literal["max", "min"] = "max"
    resources: TrialResources = Field(default_factory=TrialResources)
    max_concurrent: int = Field(0, ge=0)  # 0: as many trials as the cluster's CPUs (and GPUs) hold

    @field_validator("overrides", mode="before")
    @classmethod
    def _flat_overrides(cls, v: Any) -> Any:
        return flatten(v) if isinstance(v, dict) else v

    @field_validator("arms", mode="before")
    @classmethod
    def _flat_arms(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {name: flatten(o) if isinstance(o, dict) else ({} if o is None else o) for name, o in v.items()}
        if isinstance(v, list):  # arms: [a, b] -> named arms without overrides
            return {str(name): {} for name in v}
        return v

    @field_validator("search_space", mode="before")
    @classmethod
    def _flat_space(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        out = {}
        for key, value in flatten(v, leaf=_is_domain).items():
            try:
                out[key] = Domain.model_validate(value).model_dump(exclude_none=True)
            except ValidationError as err:
                msgs = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in err.errors())
                raise ValueError(f"search_space {key!r}: {msgs} (a domain is one of {', '.join(DOMAIN_KINDS)}, "
                                 f"or a list for a grid)") from None
        return out

    @field_validator("arms")
    @classmethod
    def _arm_names(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        if not v:
            raise ValueError("need at least one arm (an arm with no overrides is `name: {}`)")
        for name in v:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", name):
                raise ValueError(f"arm name {name!r}: use letters, digits and _ . + - (it names directories)")
        return v

    @model_validator(mode="before")
    @classmethod
    def _only_arms(cls, data: Any) -> Any:
        """`only` keeps the named arms (in the config's order), so a part of a matrix reruns with its own settings;
        applied here, so a saved sweep.yaml holds just the arms that ran."""
        if not isinstance(data, dict) or data.get("only") is None:
            return data
        data = dict(data)
        arms, only = data.get("arms", {"default": {}}), data["only"]
        only = [only] if isinstance(only, str) else only
        if isinstance(arms, (dict, list)) and isinstance(only, list) and only and all(a in arms for a in only):
            data["arms"] = ({a: o for a, o in arms.items() if a in only} if isinstance(arms, dict)
                            else [a for a in arms if a in only])
            data["only"] = None
        return data  # otherwise `only` stays, and its own validator says what is wrong

    @field_validator("only")
    @classmethod
    def _only_names(cls, v: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if v is not None:
            names = list(info.data.get("arms") or {})
            raise ValueError(f"{[a for a in v if a not in names] or 'an empty list'} names no arm of this sweep; "
                             f"its arms are {', '.join(names)}")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("need at least one seed")
        if len(set(v)) != len(v):
            raise ValueError(f"seeds repeat: {v}")
        return v

    def domains(self) -> dict[str, Domain]:
        return {key: Domain.model_validate(d) for key, d in self.search_space.items()}

    def reserved_keys(self) -> list[str]:
        """'where sets key: why' for every key the sweep itself sets per trial (seed, workers, run_dir)."""
        where = [("overrides", self.overrides)] + [(f"arms.{a}", o) for a, o in self.arms.items()]
        where.append(("search_space", self.search_space))
        return [f"{name} sets {key!r}: {RESERVED[key]}" for name, keys in where for key in keys if key in RESERVED]

    def n_trials(self) -> int:
        grid = math.prod(d.size() for d in self.domains().values())
        return len(self.arms) * len(self.seeds) * grid * self.num_samples


def trial_name(arm: str, seed: int, trial_id: str) -> str:
    """A trial's directory name, under run_dir/tune (Ray Tune's) and run_dir/trials (its fine-tuning run)."""
    return f"{arm}_seed{seed}_{trial_id}"


def _local(path: str, cwd: str) -> str:
    if "://" in path or os.path.isabs(path):
        return path
    return os.path.normpath(os.path.join(cwd, path))


def resolve_paths(data: dict[str, Any], cwd: str) -> dict[str, Any]:
    """Make a fine-tune config dict's relative paths absolute against `cwd` (trials run elsewhere)."""
    data = merge(data, {})
    for split in ("train", "val"):
        sources = (data.get("data") or {}).get(split)
        if isinstance(sources, list):
            data["data"] = dict(data["data"])
            data["data"][split] = [
                {**s, **{k: _local(s[k], cwd) for k in ("image", "labels") if isinstance(s.get(k), str)}}
                if isinstance(s, dict) else s
                for s in sources
            ]
    if isinstance(data.get("init"), str):
        data["init"] = _local(data["init"], cwd)
    match = (data.get("data") or {}).get("match_histogram")
    if isinstance(match, str):
        data["data"] = {**data["data"], "match_histogram": _local(match, cwd)}
    mt = data.get("multitask")
    if isinstance(mt, str):
        data["multitask"] = _local(mt, cwd)
    elif isinstance(mt, dict) and isinstance(mt.get("target"), str):
        data["multitask"] = {**mt, "target": _local(mt["target"], cwd)}
    target = data.get("target")
    if isinstance(target, str):
        data["target"] = _local(target, cwd)
    elif isinstance(target, dict):
        data["target"] = {**target, **{k: _local(target[k], cwd) for k in ("image", "labels") if isinstance(target.get(k), str)}}
    return data


def compose(state: dict[str, Any], arm: str, seed: int, params: dict[str, Any], run_dir: str | Path) -> dict[str, Any]:
    """One trial's fine-tune config (a dict to validate): base <- overrides <- arm <- params <- seed, workers, run_dir.

    `state` is what the sweep saved in run_dir/sweep_state.json: the base config dict, the sweep config and the
    directory relative paths are relative to.
    """
    from vemscale.config import layer
    from vemscale.train.finetune import FinetuneConfig

    sweep = state["sweep"]
    update = merge(nest(sweep["overrides"]), nest(sweep["arms"][arm]))
    update = merge(update, nest(params))
    update = merge(update, {"train": {"seed": int(seed), "workers": int(sweep["resources"]["workers"])},
                            "run_dir": str(run_dir)})
    # a recipe (in the base or named by the arm) replaces the base's values; the sweep's own keys win
    return resolve_paths(layer(FinetuneConfig, state["base"], update), state["cwd"])
