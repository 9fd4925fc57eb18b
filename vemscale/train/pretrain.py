"""Stage `pretrain`: self-supervised pre-training on unlabeled EM with Ray Train (RETINA or MoCoV2).

    vemscale pretrain configs/pretrain_retina.yaml data=/data/cem500k/ workers=4   # a folder of 2D patches
    vemscale pretrain configs/pretrain_retina.yaml data=/data/vol.zarr             # patches from a volume
    vemscale finetune configs/finetune_vnc_mito.yaml init=runs/pretrain/checkpoint transfer=transformer freeze=transformer

`data=` takes one path, a comma list, or (in YAML) a list of sources with weights; `workers=` is the number
of Ray Train workers (the global batch is split across them). Sources are checked in the driver before
any worker starts. In run_dir: `checkpoint/` (final, kind "pretrain"), `metrics.csv`, `metrics.png`,
`previews/` (input, degraded input, reconstruction), `ray/` (Ray Train storage: rerun to resume).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Literal, Sequence

from pydantic import Field, field_validator, model_validator

from vemscale.checkpoint import export_final, newest_resumable
from vemscale.config import Strict, StageConfig, absolute_url, load_config
from vemscale.errors import UserError
from vemscale.train.metrics_log import metrics_logger, read_metrics
from vemscale.train.moco import MocoConfig
from vemscale.train.augment import RetinaAugmentConfig
from vemscale.train.unlabeled import SourceConfig, sources_from

log = logging.getLogger(__name__)

CEM500K_MEAN, CEM500K_STD = 0.57287, 0.12741


class PretrainModelConfig(Strict):
    name: str = "tiny"  # a name from vemscale.models.list_models(); the architecture fine-tuning will use
    kwargs: dict[str, Any] = Field(default_factory=dict)


class NormalizationConfig(Strict):
    """Input normalisation after scaling raw values to [0, 1] (default: CEM500K's statistics)."""

    mean: list[float] = Field(default_factory=lambda: [CEM500K_MEAN])
    std: list[float] = Field(default_factory=lambda: [CEM500K_STD])


class PretrainTrainConfig(Strict):
    iterations: int = Field(10000, gt=0)
    batch_size: int = Field(32, gt=0)  # global, split across workers
    crop: int = Field(224, gt=0)  # patch side; a multiple of the model's input multiple (16, or 32 for UNet-ResNet)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    poly_power: float = Field(0.9, ge=0)
    warmup: int = Field(0, ge=0)
    # poly (RETINA) | step (lr x gamma at each milestone, fractions of the run: CEM500K MoCoV2's epochs 120 and
    # 160 of 200) | onecycle (PyTorch OneCycleLR defaults: CEM500K's fine-tuning); vemscale.train.schedule
    schedule: Literal["poly", "step", "onecycle"] = "poly"
    poly_horizon: float = Field(1.0, ge=1)  # poly decays over this many times the run (RETINA pre-training: 25)
    milestones: tuple[float, ...] = (0.6, 0.8)
    gamma: float = Field(0.1, gt=0)
    log_every: int = Field(25, gt=0)
    checkpoint_every: int = Field(500, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    preview_every: int = Field(250, ge=0)  # 0 = no previews
    preview_images: int = Field(4, gt=0)
    prefetch: int = Field(2, gt=0)  # batches read ahead in a background thread
    seed: int = 0


class PretrainConfig(StageConfig):
    run_dir: Path = Path("runs/pretrain")
    objective: Literal["retina", "moco"] = "retina"
    # a paper's parameters (vemscale.train.recipes): they replace the config file's, command-line keys win
    recipe: Literal["none", "retina", "cem500k"] = "none"

    @classmethod
    def recipe_values(cls, name: str) -> dict[str, Any]:
        from vemscale.train.recipes import recipe_values

        return recipe_values(name, "pretrain")
    data: list[SourceConfig] = Field(default_factory=list)  # also `data=path` or `data=a,b`
    in_chans: int = Field(1, gt=0)
    normalization: NormalizationConfig = Field(default_factory=NormalizationConfig)
    model: PretrainModelConfig = Field(default_factory=PretrainModelConfig)
    train: PretrainTrainConfig = Field(default_factory=PretrainTrainConfig)
    augment: RetinaAugmentConfig = Field(default_factory=RetinaAugmentConfig)
    moco: MocoConfig = Field(default_factory=MocoConfig)
    workers: int = Field(1, gt=0)  # Ray Train workers (DDP)
    cpus_per_worker: int | None = None  # default: the cluster's CPUs split across workers
    use_gpu: bool | Literal["auto"] = "auto"

    @field_validator("data", mode="before")
    @classmethod
    def _sources(cls, v: Any) -> Any:
        return sources_from(v)

    @model_validator(mode="after")
    def _consistent(self) -> "PretrainConfig":
        if self.train.batch_size % self.workers:
            raise ValueError(f"train.batch_size {self.train.batch_size} must be divisible by workers {self.workers}")
        n = self.in_chans
        if len(self.normalization.mean) != n or len(self.normalization.std) != n:
            raise ValueError(f"normalization.mean and .std need {n} value(s) (in_chans)")
        if self.objective == "moco" and self.moco.queue % self.train.batch_size:
            raise ValueError(f"moco.queue {self.moco.queue} must be a multiple of train.batch_size {self.train.batch_size}")
        return self


METRIC_COLUMNS = ["iteration", "resumed_from", "loss", "acc", "lr", "images_per_s", "loop_images_per_s", "samples_seen", "epoch"]


def plot_loss(csv_path: Path, png_path: Path) -> None:
    """Training loss (and MoCo's top-1 accuracy) against iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vemscale.io.atomic import save_figure

    rows = read_metrics(csv_path)
    if not rows:
        return
    it = [float(r["iteration"]) for r in rows]
    acc = [(i, float(r["acc"])) for i, r in zip(it, rows) if r.get("acc") not in (None, "")]
    fig, axes = plt.subplots(1, 2 if acc else 1, figsize=(9 if acc else 5, 3.5), squeeze=False)
    axes[0, 0].plot(it, [float(r["loss"]) for r in rows])
    axes[0, 0].set(xlabel="iteration", ylabel="loss", title="pre-training loss", yscale="log")
    if acc:
        axes[0, 1].plot(*zip(*acc))
        axes[0, 1].set(xlabel="iteration", ylabel="top-1", title="positive-key accuracy", ylim=(0, 1))
    fig.tight_layout()
    save_figure(fig, png_path, dpi=100)
    plt.close(fig)


def _report_line(run_dir: Path):
    """After each report: metrics.png redrawn and a log line."""

    def on_report(m: dict[str, Any]) -> None:
        plot_loss(run_dir / "metrics.csv", run_dir / "metrics.png")
        extra = f" acc {m['acc']:.3f}" if "acc" in m else ""
        print(f"[vemscale] it {m['iteration']} loss {m['loss']:.4f}{extra} lr {m['lr']:.2e} "
              f"{m['images_per_s']:.1f} img/s", flush=True)

    return on_report


def prepare(cfg: PretrainConfig) -> dict[str, Any]:
    """Check sources and model before any worker starts; derive the input scale stored in the checkpoint."""
    from vemscale.models import create_model
    from vemscale.train.data import dtype_scale
    from vemscale.train.unlabeled import check_source

    if not cfg.data:
        raise UserError("no unlabeled data: give data=PATH (a folder of 2D images or a volume) or a list under data:")
    model = create_model(cfg.model.name, in_chans=cfg.in_chans, num_classes=cfg.in_chans, **cfg.model.kwargs)
    if cfg.train.crop % model.input_multiple:
        raise UserError(f"train.crop {cfg.train.crop} must be a multiple of {model.input_multiple} for {cfg.model.name}")
    if cfg.objective == "moco" and not getattr(model, "encode_channels", 0):
        raise UserError(f"model {cfg.model.name} has no encoder output to contrast (encode_channels)")
    checked = [check_source(s, cfg.in_chans, cfg.train.crop) for s in cfg.data]
    for c in checked:
        log.info("unlabeled source: %s", c["what"])
    return {"input_scale": dtype_scale(checked[0]["dtype"]), "sources": [c["what"] for c in checked]}


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """Run (or resume) a pre-training run; returns the checkpoint path and the last metrics."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from vemscale.io.writable import check_writable
    from vemscale.raycluster import cluster_has_gpus, ensure_ray
    from vemscale.train.pretrain_loop import pretrain_loop_per_worker

    derived = prepare(cfg)
    run_dir = cfg.run_dir.resolve()
    check_writable(run_dir, "run_dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    ensure_ray()
    use_gpu = cluster_has_gpus() if cfg.use_gpu == "auto" else bool(cfg.use_gpu)
    cpus = cfg.cpus_per_worker or max(1, int(ray.cluster_resources().get("CPU", 1)) // cfg.workers)
    worker_cfg = cfg.model_dump(mode="json")
    for src in worker_cfg["data"]:  # workers do not share the driver's working directory
        src["path"] = absolute_url(src["path"])
    resume = newest_resumable(run_dir / "ray")
    worker_cfg.update(input_scale=derived["input_scale"], config=cfg.model_dump(mode="json"), threads=cpus,
                      run_dir=str(run_dir), resume_dir=str(resume) if resume else None)
    trainer = TorchTrainer(
        pretrain_loop_per_worker,
        train_loop_config=worker_cfg,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus}),
        run_config=ray.train.RunConfig(
            name="pretrain",
            storage_path=str(run_dir / "ray"),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            callbacks=[metrics_logger(run_dir, METRIC_COLUMNS, _report_line(run_dir))],
        ),
    )
    result = trainer.fit()
    if result.error:
        raise RuntimeError(f"pre-training failed: {result.error}")
    final = run_dir / "checkpoint"
    export_final(result.checkpoint, final)
    plot_loss(run_dir / "metrics.csv", run_dir / "metrics.png")
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    return {
        "checkpoint": str(final),
        "metrics_csv": str(run_dir / "metrics.csv"),
        "plot": str(run_dir / "metrics.png"),
        "previews": str(run_dir / "previews"),
        "metrics": metrics,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config (see configs/pretrain_*.yaml)")
    parser.add_argument("overrides", nargs="*",
                        help="key=value overrides, e.g. data=/data/cem500k/ workers=4 train.iterations=200 run_dir=runs/x")


def load_pretrain_config(config: str | None, overrides: Sequence[str]) -> PretrainConfig:
    overrides = list(overrides)
    if config and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config] + overrides
    return load_config(PretrainConfig, config, overrides)


def run_cli(args: argparse.Namespace) -> dict:
    result = pretrain(load_pretrain_config(args.config, args.overrides))
    m = result["metrics"]
    if m.get("resumed_from"):
        print(f"resumed from the checkpoint at iteration {m['resumed_from']}")
    print(f"checkpoint: {result['checkpoint']}")
    if "loss" in m:
        print(f"final loss: {m['loss']:.4f} at iteration {m.get('iteration')}")
    return result
