"""Stage `finetune`: train a segmentation model on labelled EM slices with Ray Train, report held-out IoU.

Inputs are checked in the driver before any worker starts; the run lives in `run_dir` (Ray Train storage,
metrics.csv, metrics.png, and the final self-describing checkpoint in `run_dir/checkpoint`). Rerunning the
same config with the same run_dir resumes from the latest checkpoint.
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
from vemscale.train.augment import AugmentConfig
from vemscale.train.metrics_log import metrics_logger, read_metrics
from vemscale.train.multitask import MultitaskConfig
from vemscale.train.select import SelectionConfig, TargetVolume, coerce_target

log = logging.getLogger(__name__)


class LabelledVolume(Strict):
    """An image volume, its labels (class ids, or 0/1 for one class) and the z range of labelled slices."""

    image: str
    labels: str
    slices: str | None = None  # "z0:z1"; all slices when omitted
    # self-training: `labels` is a teacher's class probabilities (a `vemscale infer` output's probabilities, e.g.
    # a model or `vemscale ensemble` run on an unlabeled target volume); a pixel is labelled with its most
    # probable class where that probability is >= pseudo, and skipped by the loss elsewhere
    pseudo: float | None = Field(None, gt=0, le=1)
    # with pseudo: each foreground class goes to the teacher's most probable pixels up to this share of the slices'
    # pixels (`source`: the class's share in the manually labelled data.train entries; or one fraction per
    # foreground class), background where p >= pseudo, the rest ignored (vemscale.train.data.pseudo_labels)
    pseudo_area: Literal["source"] | list[float] | None = None
    weight: float = Field(1.0, gt=0)  # crops are drawn in proportion to the voxels (ignored ones too) x weight

    @model_validator(mode="after")
    def _area_needs_pseudo(self) -> "LabelledVolume":
        if self.pseudo_area is not None and self.pseudo is None:
            raise ValueError("pseudo_area applies to pseudo-labels: set pseudo=<confidence> too")
        if isinstance(self.pseudo_area, list) and not all(0 <= a <= 1 for a in self.pseudo_area):
            raise ValueError("pseudo_area fractions must lie in [0, 1]")
        return self

    def load(self, num_classes: int, area: list[float] | None = None):
        """The chosen slices and their labels (`vemscale.train.data.load_labelled`); `area` resolves `source`."""
        from vemscale.train.data import load_labelled

        if isinstance(self.pseudo_area, list):
            area = self.pseudo_area
        return load_labelled(self.image, self.labels, self.slices, num_classes, self.pseudo, self.weight, area)


class DataConfig(Strict):
    train: list[LabelledVolume] = Field(default_factory=list)
    val: list[LabelledVolume] = Field(default_factory=list)
    classes: list[str] = Field(default_factory=lambda: ["background", "foreground"])
    planes: Literal["xy", "all", "auto"] = "xy"  # all = xy+xz+yz crops (isotropic data)
    voxel_size_xyz: tuple[float, float, float] | None = None  # nm; read from the image when omitted
    mean: list[float] | None = None  # input normalisation after scaling to [0,1]; measured on train when omitted
    # training crops matched to this reference histogram (a volume URL or a histogram .json), e.g. the target
    # volume's, so the model also learns on target-like grey values (vemscale.io.histogram); None = raw values.
    # EM_domain_adaptation (Att_YNet_functions.histogram_matching): each source patch is matched to the target
    # domain's histogram with probability 0.5
    match_histogram: str | None = None
    match_histogram_p: float = Field(0.5, ge=0, le=1)
    std: list[float] | None = None

    @field_validator("val")
    @classmethod
    def _val_has_true_labels(cls, v: list[LabelledVolume]) -> list[LabelledVolume]:
        if any(s.pseudo is not None for s in v):
            raise ValueError("data.val scores the model, so it needs manual labels: pseudo-labels belong in data.train")
        return v

    @field_validator("classes")
    @classmethod
    def _two_classes(cls, v: list[str]) -> list[str]:
        if len(v) < 2:
            raise ValueError("need at least two classes, e.g. [background, mitochondria]")
        return v


class ModelConfig(Strict):
    name: str = "tiny"  # a name from vemscale.models.list_models()
    kwargs: dict[str, Any] = Field(default_factory=dict)


class TrainConfig(Strict):
    iterations: int = Field(1500, gt=0)
    batch_size: int = Field(8, gt=0)  # global, split across workers
    crop: int = 256
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = 1e-4
    momentum: float = 0.9
    poly_power: float = 0.9
    warmup: int = 0
    # poly (RETINA) | step (lr x gamma at each milestone, fractions of the run: CEM500K MoCoV2's epochs 120 and
    # 160 of 200) | onecycle (PyTorch OneCycleLR defaults: CEM500K's fine-tuning); vemscale.train.schedule
    schedule: Literal["poly", "step", "onecycle"] = "poly"
    poly_horizon: float = Field(1.0, ge=1)  # poly decays over this many times the run (RETINA pre-training: 25)
    milestones: tuple[float, ...] = (0.6, 0.8)
    gamma: float = Field(0.1, gt=0)
    loss: Literal["ce", "dice", "ce_dice", "retina"] = "ce_dice"  # retina: 0.5 CE + 0.5 Dice
    # an exponential moving average of the weights (timm ModelEmaV3 with its warmup: decay at step s is
    # min(ema, 1 - s^-2/3)); validation, selection and checkpoints use the average. 0: off
    ema: float = Field(0.0, ge=0, lt=1)
    log_every: int = Field(25, gt=0)
    val_every: int = Field(250, gt=0)
    checkpoint_every: int = Field(250, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    seed: int = 0
    workers: int = Field(1, gt=0)
    cpus_per_worker: int | None = None  # default: the local CPUs split across workers
    use_gpu: bool | Literal["auto"] = "auto"

    @field_validator("crop")
    @classmethod
    def _crop16(cls, v: int) -> int:
        if v <= 0 or v % 16:
            raise ValueError("crop must be a positive multiple of 16")
        return v

    @model_validator(mode="after")
    def _batch_splits(self) -> "TrainConfig":
        if self.batch_size % self.workers:
            raise ValueError(f"batch_size {self.batch_size} must be divisible by workers {self.workers}")
        return self


class TileConfig(Strict):
    """How validation (and, by default, inference with this checkpoint) tiles slices."""

    tile: int = 256
    margin: int = 32
    batch_size: int = 4
    # test-time augmentation (vemscale.infer.tta): 1 = none; 8 = mean over the 4 rotations x flip (8x the passes)
    tta: Literal[1, 8] = 1


class FinetuneConfig(StageConfig):
    run_dir: Path = Path("runs/finetune")
    # a paper's parameters (vemscale.train.recipes): they replace the config file's, command-line keys win
    recipe: Literal["none", "retina", "cem500k"] = "none"

    @classmethod
    def recipe_values(cls, name: str) -> dict[str, Any]:
        from vemscale.train.recipes import recipe_values

        return recipe_values(name, "finetune")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    tiles: TileConfig = Field(default_factory=TileConfig)
    init: str | None = None  # a pre-training or segmentation checkpoint to start from
    # parameter groups (vemscale.models.groups): a set (all, encoder, retina, vit, none) or groups "cnn,embed"
    transfer: str = "all"  # RETINA (BaderLab/RETINA train.py): retina = all but decoder and head
    freeze: str = "none"  # RETINA: vit_blocks = the ViT blocks and their final norm
    # checkpoint selection without target labels (vemscale.train.select): last | morphology | area_ratio
    select: Literal["last", "morphology", "area_ratio"] = "last"
    target: TargetVolume | None = None  # the unlabeled target volume the selection predicts on
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    # a Y-Net fine-tune: reconstruction of unlabeled target crops through the same encoder (vemscale.train.multitask)
    multitask: MultitaskConfig | None = None

    @field_validator("multitask", mode="before")
    @classmethod
    def _multitask(cls, v: Any) -> Any:
        return {"target": v} if isinstance(v, str) else v

    @field_validator("target", mode="before")
    @classmethod
    def _target(cls, v: Any) -> Any:
        return coerce_target(v)

    @model_validator(mode="after")
    def _select_needs_target(self) -> "FinetuneConfig":
        if self.select != "last" and self.target is None:
            raise ValueError(f"select={self.select} needs the unlabeled target volume: add target=<volume>")
        return self

    @field_validator("transfer")
    @classmethod
    def _transfer(cls, v: str) -> str:
        from vemscale.models.groups import resolve

        resolve(v, "transfer")
        return v

    @field_validator("freeze")
    @classmethod
    def _freeze(cls, v: str) -> str:
        from vemscale.models.groups import resolve

        resolve(v, "freeze")
        return v


METRIC_COLUMNS = ["iteration", "resumed_from", "loss", "lr", "images_per_s", "val_iou", "best_val_iou"]


def _report_line(run_dir: Path):
    """After each report: a log line; after an evaluation, metrics.png redrawn."""

    def on_report(m: dict[str, Any]) -> None:
        msg = f"[vemscale] it {m['iteration']} loss {m['loss']:.4f} lr {m['lr']:.2e} {m['images_per_s']:.1f} img/s"
        if "val_iou" in m:
            msg += f" val_iou {m['val_iou']:.4f}"
            plot_metrics(run_dir / "metrics.csv", run_dir / "metrics.png")
        print(msg, flush=True)

    return on_report


def plot_metrics(csv_path: Path, png_path: Path) -> None:
    """Loss and validation IoU against iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vemscale.io.atomic import save_figure

    rows = read_metrics(csv_path)
    it = [float(r["iteration"]) for r in rows]
    loss = [float(r["loss"]) for r in rows]
    val = [(float(r["iteration"]), float(r["val_iou"])) for r in rows if r.get("val_iou") not in (None, "")]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    ax[0].plot(it, loss)
    ax[0].set(xlabel="iteration", ylabel="training loss", title="loss")
    if val:
        ax[1].plot(*zip(*val), marker="o")
    ax[1].set(xlabel="iteration", ylabel="IoU (foreground mean)", title="held-out IoU", ylim=(0, 1))
    fig.tight_layout()
    save_figure(fig, png_path, dpi=100)
    plt.close(fig)


def prepare(cfg: FinetuneConfig) -> dict[str, Any]:
    """Check every input and derive what workers need (normalisation, voxel size) before training starts."""
    from vemscale.models import create_model
    from vemscale.train.data import channel_stats, class_shares, dtype_scale

    if not cfg.data.train:
        raise UserError("the training set is empty: list labelled volumes under data.train (image, labels, slices)")
    create_model(cfg.model.name, num_classes=len(cfg.data.classes), **cfg.model.kwargs)  # name check, early
    k = len(cfg.data.classes)
    manual = {i: s.load(k) for i, s in enumerate(cfg.data.train) if s.pseudo is None}
    shares = class_shares(list(manual.values()), k) if manual else None
    if shares is None and any(s.pseudo_area == "source" for s in cfg.data.train):
        raise UserError("pseudo_area=source measures the class shares of the manually labelled data.train entries, "
                        "and there are none; give the fractions (pseudo_area=[0.05]) or add the labelled source")
    areas = [shares if s.pseudo_area == "source" else s.pseudo_area for s in cfg.data.train]
    stacks = [manual[i] if i in manual else s.load(k, areas[i]) for i, s in enumerate(cfg.data.train)]
    val = [s.load(k) for s in cfg.data.val]
    reference = None
    if cfg.data.match_histogram:
        from vemscale.io.histogram import reference_histogram

        reference = reference_histogram(cfg.data.match_histogram)
        for st in stacks:
            if st.image.shape[0] != 1 or str(st.image.dtype) != reference.dtype:
                raise UserError(f"data.match_histogram: the reference is one-channel {reference.dtype}, but {st.name} "
                                f"is {st.image.shape[0]}-channel {st.image.dtype}; match images of the same kind")
    chans = {st.image.shape[0] for st in stacks + val}
    if len(chans) != 1:
        raise UserError(f"all volumes must have the same number of channels, found {sorted(chans)}")
    dtypes = {st.image.dtype for st in stacks}
    if len(dtypes) != 1:
        raise UserError(f"training images mix dtypes {sorted(map(str, dtypes))}; convert them to one")
    if cfg.init:  # the checkpoint must fit the model (name, sizes, the transferred keys) before workers start
        from vemscale.train.transfer import check_init

        check_init(cfg.init, cfg.model.name, next(iter(chans)), k, cfg.model.kwargs, cfg.transfer, cfg.freeze)
    scale = dtype_scale(stacks[0].image.dtype)
    mean, std = (cfg.data.mean, cfg.data.std) if cfg.data.mean and cfg.data.std else channel_stats(stacks, scale)
    voxel = cfg.data.voxel_size_xyz or stacks[0].voxel_size_xyz
    in_chans = next(iter(chans))
    if cfg.multitask is not None:  # the target and the model's encoder-decoder split, before any worker starts
        from vemscale.models import create_model as _create
        from vemscale.models.ynet import YNet
        from vemscale.train import select as sel

        mt_image, _ = sel.load_target({"image": cfg.multitask.target, "slices": cfg.multitask.slices,
                                        "max_slices": 1}, in_chans)
        if mt_image.dtype != stacks[0].image.dtype:
            raise UserError(f"multitask.target {cfg.multitask.target!r} is {mt_image.dtype} but the training images "
                            f"are {stacks[0].image.dtype}; convert it so the same normalisation applies")
        try:
            YNet(_create(cfg.model.name, in_chans=in_chans, num_classes=k, **cfg.model.kwargs))
        except ValueError as err:
            raise UserError(f"multitask: {err}") from None
    histogram = None
    if in_chans == 1 and stacks[0].image.dtype.kind == "u" and stacks[0].image.dtype.itemsize <= 2:
        from vemscale.io.histogram import histogram_of

        histogram = sum((histogram_of(st.image) for st in stacks[1:]), histogram_of(stacks[0].image)).to_dict()
    selection = None
    if cfg.target is not None:  # the target and the prior are checked here, before any worker starts
        from vemscale.train import select as sel

        target, _ = sel.load_target(cfg.target.model_dump(), in_chans)
        if target.dtype != stacks[0].image.dtype:
            raise UserError(f"target {cfg.target.image!r} is {target.dtype} but the training images are "
                            f"{stacks[0].image.dtype}; convert it so the same normalisation applies")
        cls = sel.class_index(cfg.data.classes, cfg.selection.class_name)
        method = "morphology" if cfg.select == "last" else cfg.select  # last: recorded, never copied
        prior = cfg.selection.prior
        if prior is None:
            manual = [st for st in stacks if not st.pseudo]  # the prior describes the source's own labels
            if not manual:
                raise UserError(f"select={cfg.select}: every training volume has pseudo-labels, so there is no source "
                                "prior to measure; set selection.prior or add the labelled source to data.train")
            prior = sel.source_prior(manual, cls, method, cfg.selection.min_size, cfg.selection.objects)
        selection = {"method": method, "choose": cfg.select != "last", "prior": float(prior), "class": cls,
                     "threshold": cfg.selection.threshold, "min_size": cfg.selection.min_size,
                     "objects": cfg.selection.objects, "lut": None}
        if cfg.target.match_histogram:  # the target seen as infer match_histogram=checkpoint will see it
            from vemscale.io.histogram import Histogram, match_lut, volume_histogram

            if histogram is None:
                raise UserError("target.match_histogram needs one-channel uint8/uint16 training images")
            selection["lut"] = match_lut(volume_histogram(cfg.target.image), Histogram.from_dict(histogram)).tolist()
    return {
        "normalization": {"scale": scale, "mean": list(mean), "std": list(std)},
        "voxel_size_xyz": list(voxel) if voxel else None,
        "in_chans": in_chans,
        "selection": selection,
        "input_histogram": histogram,
        "match_reference": None if reference is None else reference.to_dict(),
        "pseudo_areas": areas,  # pseudo_area per data.train entry, `source` resolved
    }



def build_trainer(cfg: FinetuneConfig, callbacks: Sequence[Any] = (),
                  worker_resources: dict[str, float] | None = None):
    """The Ray Train TorchTrainer `finetune` fits: inputs checked first (`prepare`), storage in run_dir/ray,
    resuming from the newest checkpoint there, rank 0's reports logged to run_dir/metrics.csv.

    `callbacks` run after the metrics logger (a sweep adds Ray Tune's report callback). `worker_resources`
    (e.g. {"CPU": 0.9}, or with "GPU") replaces train.cpus_per_worker / use_gpu, so that trials of a Ray Tune
    sweep can take fractional CPUs and fit a node beside their 0.1-CPU trainables.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from vemscale.io.writable import check_writable
    from vemscale.raycluster import cluster_has_gpus, ensure_ray
    from vemscale.train.loop import train_loop_per_worker

    derived = prepare(cfg)
    run_dir = cfg.run_dir.resolve()
    check_writable(run_dir, "run_dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    ensure_ray()
    if worker_resources:
        use_gpu = worker_resources.get("GPU", 0) > 0
        resources = {k: v for k, v in worker_resources.items() if v}
        cpus = max(1, round(worker_resources.get("CPU", 1)))  # torch threads
    else:
        use_gpu = cluster_has_gpus() if cfg.train.use_gpu == "auto" else bool(cfg.train.use_gpu)
        cpus = cfg.train.cpus_per_worker or max(1, int(ray.cluster_resources().get("CPU", 1)) // cfg.train.workers)
        resources = {"CPU": cpus}
    worker_cfg = cfg.model_dump(mode="json")
    for split in ("train", "val"):  # workers do not share the driver's working directory
        for src in worker_cfg["data"][split]:
            src["image"], src["labels"] = absolute_url(src["image"]), absolute_url(src["labels"])
    for src, area in zip(worker_cfg["data"]["train"], derived.pop("pseudo_areas")):
        src["pseudo_area"] = area
    if worker_cfg.get("init"):
        worker_cfg["init"] = absolute_url(worker_cfg["init"])
    if worker_cfg.get("multitask"):
        worker_cfg["multitask"]["target"] = absolute_url(worker_cfg["multitask"]["target"])
    if worker_cfg.get("target"):
        for key in ("image", "labels"):
            if worker_cfg["target"].get(key):
                worker_cfg["target"][key] = absolute_url(worker_cfg["target"][key])
    keepers = []
    if derived["selection"]:
        from vemscale.train.select import selection_keeper

        sel = derived["selection"]
        keepers.append(selection_keeper(run_dir, sel["method"], sel["prior"], copy=sel["choose"]))
    resume = newest_resumable(run_dir / "ray")
    worker_cfg.update(derived, config=cfg.model_dump(mode="json"), threads=cpus, resume_dir=str(resume) if resume else None)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=worker_cfg,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name="train",
            storage_path=str(run_dir / "ray"),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            callbacks=[metrics_logger(run_dir, METRIC_COLUMNS, _report_line(run_dir)), *keepers, *callbacks],
        ),
    )


def export_result(cfg: FinetuneConfig, result) -> dict[str, Any]:
    """After `fit`: copy the final checkpoint to run_dir/checkpoint, redraw the plot, return paths + metrics."""
    if result.error:
        raise RuntimeError(f"fine-tuning failed: {result.error}")
    run_dir = cfg.run_dir.resolve()
    final = run_dir / "checkpoint"
    export_final(result.checkpoint, final)
    plot_metrics(run_dir / "metrics.csv", run_dir / "metrics.png")
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    out = {
        "checkpoint": str(final),
        "metrics_csv": str(run_dir / "metrics.csv"),
        "plot": str(run_dir / "metrics.png"),
        "metrics": metrics,
    }
    if cfg.target is not None:
        from vemscale.train.select import RECORD_FILE, SELECTED_DIR, read_record

        record = read_record(run_dir)
        out["selection"] = {k: v for k, v in record.items() if k != "intervals"}
        out["selection_record"] = str(run_dir / RECORD_FILE)
        if cfg.select != "last":
            out["selected_checkpoint"] = str(run_dir / SELECTED_DIR)
    return out


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Run (or resume) a fine-tuning run; returns the checkpoint path and the final metrics."""
    return export_result(cfg, build_trainer(cfg).fit())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config (see configs/finetune_*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.iterations=200 run_dir=runs/x")


def run_cli(args: argparse.Namespace) -> dict:
    config, overrides = args.config, list(args.overrides)
    if config and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config] + overrides
    cfg = load_config(FinetuneConfig, config, overrides)
    result = finetune(cfg)
    m = result["metrics"]
    if m.get("resumed_from"):
        print(f"resumed from the checkpoint at iteration {m['resumed_from']}")
    print(f"checkpoint: {result['checkpoint']}")
    if "val_iou" in m:
        print(f"held-out IoU (foreground mean): {m['val_iou']:.4f} at iteration {m.get('iteration')}")
    sel = result.get("selection")
    if sel and "chosen_iteration" in sel:
        line = f"{cfg.select} selection: iteration {sel['chosen_iteration']} (|statistic - prior| {sel['chosen_distance']:.4f})"
        if "oracle_target_iou" in sel:
            line += (f"; target IoU chosen {sel['chosen_target_iou']:.4f}, last {sel['last_target_iou']:.4f}, "
                     f"oracle {sel['oracle_target_iou']:.4f} (iteration {sel['oracle_iteration']})")
        print(line)
        if result.get("selected_checkpoint"):
            print(f"selected checkpoint: {result['selected_checkpoint']}")
    return result
