"""The fine-tuning step and the Ray Train worker loop around it.

`SegmentationStep` is plain PyTorch (also used by the throughput benchmark's baseline loop);
`train_loop_per_worker` is what each Ray Train worker runs: data, DDP model, poly LR, periodic validation on
rank 0, checkpoints reported to Ray Train, resume from the latest checkpoint.
"""

from __future__ import annotations

import logging
import tempfile
import time
from typing import Any

import numpy as np
import torch

from vemscale.checkpoint import CheckpointMeta, load_train_state, read_meta, save_checkpoint, WEIGHTS_FILE
from vemscale.eval.metrics import class_scores, confusion_matrix, counts_from_confusion
from vemscale.infer.tiling import Normalizer, TileGrid, numpy_reader, predict_block_xy
from vemscale.infer.tta import with_tta
from vemscale.train.augment import AugmentConfig, geometric_pair, intensity
from vemscale.train.data import CropSampler, LabelledStack, load_labelled, plane_axes
from vemscale.train.losses import segmentation_loss
from vemscale.train.schedule import lr_at, set_schedule

log = logging.getLogger(__name__)


def make_optimizer(params, cfg: dict) -> torch.optim.Optimizer:
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    return torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])


class SegmentationStep:
    """One optimisation step on a batch of raw crops: normalise, augment, forward, loss, backward, update."""

    def __init__(self, model, optimizer, normalizer: Normalizer, augment: AugmentConfig, loss: str, device, seed: int):
        self.model, self.optimizer, self.augment, self.loss, self.device = model, optimizer, augment, loss, device
        c = len(normalizer.mean)
        self.scale = float(normalizer.scale)
        self.mean = torch.tensor(normalizer.mean, dtype=torch.float32, device=device).view(1, c, 1, 1)
        self.std = torch.tensor(normalizer.std, dtype=torch.float32, device=device).view(1, c, 1, 1)
        self.gen = torch.Generator().manual_seed(seed)

    def _input(self, imgs: np.ndarray, labs: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw crops (and labels; None: zeros) -> the augmented, normalised network input and its labels."""
        x = torch.from_numpy(imgs).to(self.device, non_blocking=True).float() / self.scale  # [0, 1]
        labs = labs if labs is not None else np.zeros((len(imgs),) + imgs.shape[-2:], np.int64)
        y = torch.from_numpy(labs).to(self.device, non_blocking=True)
        x, y = geometric_pair(x, y, self.augment, self.gen)
        if self.augment.brightness_contrast == "albumentations":  # on the [0, 1] image, as the reference
            return (intensity(x, self.augment, self.gen) - self.mean) / self.std, y
        return intensity((x - self.mean) / self.std, self.augment, self.gen), y

    def __call__(self, imgs: np.ndarray, labs: np.ndarray, lr: float) -> float:
        x, y = self._input(imgs, labs)
        set_schedule(self.optimizer, lr, None)
        self.model.train()
        loss = segmentation_loss(self.model(x), y, self.loss)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


def validate(model, stacks: list[LabelledStack], grid: TileGrid, normalizer: Normalizer, k: int, device, batch: int,
             tta: int = 1) -> dict:
    """IoU per class over whole held-out slices, predicted exactly as inference does (tiled, `tta` views, argmax)."""
    net = model.module if hasattr(model, "module") else model
    was_training = net.training
    net.eval()
    cm = np.zeros((k, k), np.int64)
    for st in stacks:
        shape = st.labels.shape
        box = (slice(0, shape[0]), slice(0, shape[1]), slice(0, shape[2]))
        probs = predict_block_xy(with_tta(net, tta), numpy_reader(st.image), box, shape, grid, normalizer,
                                 batch_size=batch, device=device)
        cm += confusion_matrix(probs.argmax(0).astype(np.uint8), st.labels, k)
    net.train(was_training)
    c = counts_from_confusion(cm)
    iou = np.array([class_scores(c["tp"][i], c["fp"][i], c["fn"][i])["iou"] for i in range(k)])
    out = {f"val_iou_{i}": float(v) for i, v in enumerate(iou)}
    out["val_iou"] = float(iou[1:].mean()) if k > 1 else float(iou[0])
    return out


def score_target(model, image: np.ndarray, labels: np.ndarray | None, sel: dict, grid: TileGrid,
                 normalizer: Normalizer, device, batch: int, tta: int = 1) -> dict:
    """The selection statistics of one validation interval: the target sample predicted as inference does."""
    from vemscale.train.select import target_metrics

    probs = predict_target(model, image, grid, normalizer, device, batch, tta)
    cls = sel["class"]
    return target_metrics(probs[cls], None if labels is None else labels == cls, sel["method"], sel["prior"],
                          sel["threshold"], sel["min_size"], sel.get("objects", "stack"))


def predict_target(model, image: np.ndarray, grid: TileGrid, normalizer: Normalizer, device, batch: int,
                   tta: int = 1) -> np.ndarray:
    """Class probabilities (C, Z, Y, X) of the target sample (C, Z, Y, X), predicted as inference does."""
    net = model.module if hasattr(model, "module") else model
    was_training = net.training
    net.eval()
    shape = image.shape[1:]
    box = (slice(0, shape[0]), slice(0, shape[1]), slice(0, shape[2]))
    probs = predict_block_xy(with_tta(net, tta), numpy_reader(image), box, shape, grid, normalizer, batch_size=batch,
                             device=device)
    net.train(was_training)
    return probs


def build_meta(cfg: dict, model_spec: dict, it: int, metrics: dict) -> CheckpointMeta:
    return CheckpointMeta(
        kind="segmentation",
        model=model_spec,
        classes=cfg["data"]["classes"],
        normalization=cfg["normalization"],
        tile=cfg["tiles"]["tile"],
        margin=cfg["tiles"]["margin"],
        tta=cfg["tiles"].get("tta", 1),
        voxel_size_xyz=cfg.get("voxel_size_xyz"),
        planes=cfg["data"]["planes"],
        iteration=it,
        metrics=metrics,
        train_config=cfg["config"],
        input_histogram=cfg.get("input_histogram"),
    )


def resume_checkpoint(resume_dir: str | None):
    """Ray's latest recorded checkpoint, or the newer complete one the driver found on disk (`resume_dir`)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if resume_dir:
        if checkpoint:
            with checkpoint.as_directory() as d:
                recorded = read_meta(d).iteration
        if not checkpoint or recorded < read_meta(resume_dir).iteration:
            checkpoint = ray.train.Checkpoint.from_directory(resume_dir)
    return checkpoint


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    """Ray Train worker: fine-tune for cfg['train']['iterations'] steps, reporting metrics and checkpoints."""
    import ray.train
    import ray.train.torch

    from vemscale.models import create_model

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tcfg, dcfg = cfg["train"], cfg["data"]
    torch.set_num_threads(max(1, int(cfg["threads"])))
    k = len(dcfg["classes"])
    device = ray.train.torch.get_device()

    stacks = [load_labelled(s["image"], s["labels"], s.get("slices"), k, s.get("pseudo"), s.get("weight", 1.0),
                            s.get("pseudo_area")) for s in dcfg["train"]]
    val_stacks = [load_labelled(s["image"], s["labels"], s.get("slices"), k) for s in dcfg["val"]] if rank == 0 else []
    sel = cfg.get("selection")
    target = None
    if sel and rank == 0:
        from vemscale.train.select import load_target

        image, labels = load_target(cfg["target"])
        if sel.get("lut"):
            image = np.asarray(sel["lut"], image.dtype)[image]
        target = (image, labels)

    torch.manual_seed(tcfg["seed"])  # identical initial weights on every rank
    model = create_model(cfg["model"]["name"], in_chans=stacks[0].image.shape[0], num_classes=k, **cfg["model"]["kwargs"])
    spec = dict(model.spec)
    if cfg.get("init"):
        from vemscale.train.transfer import apply_init

        apply_init(model, cfg["init"], cfg.get("transfer", "all"), cfg.get("freeze", "none"))
    mt = cfg.get("multitask")
    if mt:  # a Y-Net: the segmentation model plus a reconstruction decoder on its encoder
        from vemscale.models.ynet import YNet

        model = YNet(model)
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, tcfg)
    seg_net = model.module if hasattr(model, "module") else model  # what validation scores and checkpoints hold
    seg_net = seg_net.net if mt else seg_net
    ema = None
    if tcfg.get("ema") and rank == 0:  # the averaged copy is what rank 0 scores and checkpoints
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(seg_net, decay=tcfg["ema"], use_warmup=True)
    scored = ema.module if ema is not None else seg_net

    start = 0
    checkpoint = resume_checkpoint(cfg.get("resume_dir"))
    if checkpoint:
        with checkpoint.as_directory() as d:
            done_meta = read_meta(d)
            saved = torch.load(f"{d}/{WEIGHTS_FILE}", map_location=device, weights_only=True)
            state = load_train_state(d)
            # with an average the checkpoint's weights are the average and the train state holds the raw ones
            raw = state.get("weights") if state else None
            seg_net.load_state_dict(raw if raw is not None else saved)
            if ema is not None:
                ema.module.load_state_dict(saved)
            if state:
                optimizer.load_state_dict(state["optimizer"])
                start = int(state["iteration"])
                if mt:
                    (model.module if hasattr(model, "module") else model).reconstruction.load_state_dict(
                        state["reconstruction"])

    normalizer = Normalizer(**cfg["normalization"])
    grid = TileGrid(cfg["tiles"]["tile"], cfg["tiles"]["margin"])
    tta = cfg["tiles"].get("tta", 1)  # views averaged at validation, as inference with this checkpoint does
    axes = plane_axes(dcfg["planes"], cfg.get("voxel_size_xyz"))
    # seeds depend on (seed, rank, start) so a run, and a resumed run, are repeatable
    run_seed = (tcfg["seed"] * 1_000_003 + rank * 10_007 + start) % 2**31
    match = cfg.get("match_reference")
    sampler = CropSampler(stacks, tcfg["crop"], axes, seed=run_seed, match=match,
                          match_p=dcfg.get("match_histogram_p", 0.5) if match else 0.0,
                          p_foreground=cfg["augment"].get("p_foreground_crop", 0.0))
    local_batch = tcfg["batch_size"] // world
    total = tcfg["iterations"]
    if mt:
        from vemscale.train.data import LabelledStack
        from vemscale.train.multitask import MultitaskStep, phase_at
        from vemscale.train.select import load_target

        timage, _ = load_target({"image": mt["target"], "slices": mt.get("slices"), "max_slices": mt["max_slices"]})
        tstack = LabelledStack(timage, np.zeros(timage.shape[1:], np.uint8), mt["target"], None)
        target_sampler = CropSampler([tstack], tcfg["crop"], [0], seed=run_seed + 2)
        step = MultitaskStep(model, optimizer, normalizer, AugmentConfig(**cfg["augment"]), tcfg["loss"], device,
                             seed=run_seed + 1)
    else:
        step = SegmentationStep(model, optimizer, normalizer, AugmentConfig(**cfg["augment"]), tcfg["loss"], device,
                                seed=run_seed + 1)
    losses: list[float] = []
    parts: dict[str, list[float]] = {"loss_seg": [], "loss_rec": []}
    step_time, step_images = 0.0, 0
    best = float("-inf")
    loop_t0, loop_images = time.perf_counter(), 0
    if start >= tcfg["iterations"]:
        # killed after its last checkpoint was recorded: nothing is left to train, but the run (and a Tune trial
        # around it) still needs its final result, so the last checkpoint is reported again with its metrics
        if rank == 0:
            ray.train.report({**done_meta.metrics, "iteration": start, "resumed_from": start}, checkpoint=checkpoint)
        else:
            ray.train.report({"iteration": start, "resumed_from": start})
        return
    for it in range(start, total):
        t0 = time.perf_counter()
        imgs, labs = sampler.sample(local_batch)
        lr, momentum = lr_at(tcfg, it, total)
        set_schedule(optimizer, lr, momentum)
        if mt:
            phase = phase_at(mt, it, total)
            out = step(imgs, labs, target_sampler.sample(local_batch)[0], lr, phase)
            losses.append(out["loss"])
            for key in parts:
                parts[key].append(out[key])
        else:
            losses.append(step(imgs, labs, lr))
        if ema is not None:
            ema.update(seg_net, step=it + 1)  # step 1 copies the weights; the warmup counts from there
        step_time += time.perf_counter() - t0
        step_images += local_batch * world
        loop_images += local_batch * world
        done = it + 1
        due_val = done % tcfg["val_every"] == 0 or done == total
        # a selection can only keep a checkpoint that was reported: one at every validation interval
        due_ckpt = done % tcfg["checkpoint_every"] == 0 or done == total or (bool(sel) and due_val)
        if not (done % tcfg["log_every"] == 0 or due_val or due_ckpt):
            continue
        metrics: dict[str, Any] = {
            "iteration": done,
            "resumed_from": start,
            "loss": float(np.mean(losses)),
            "lr": lr,
            "images_per_s": step_images / step_time if step_time else 0.0,
            # wall-clock throughput since this (possibly resumed) run started, reports and validation included
            "loop_images_per_s": loop_images / (time.perf_counter() - loop_t0),
        }
        if mt:
            metrics.update(phase=phase.name, **{k: float(np.mean(v)) for k, v in parts.items() if v})
            parts = {k: [] for k in parts}
        losses, step_time, step_images = [], 0.0, 0
        if rank == 0 and due_val and val_stacks:
            metrics.update(validate(scored, val_stacks, grid, normalizer, k, device, cfg["tiles"]["batch_size"], tta))
            if ema is not None:  # the raw weights' score beside the average's, same step
                metrics["val_iou_raw"] = validate(seg_net, val_stacks, grid, normalizer, k, device,
                                                  cfg["tiles"]["batch_size"], tta)["val_iou"]
            best = max(best, metrics["val_iou"])
            metrics["best_val_iou"] = best
        # with the Y-Net schedule the reference selects in its last step only (Att_YNet.py custom_callback [F, F, T])
        selecting = not mt or mt["schedule"] != "ynet" or phase.name == "segmentation"
        if rank == 0 and due_val and target is not None and selecting:
            metrics.update(score_target(scored, *target, sel, grid, normalizer, device, cfg["tiles"]["batch_size"],
                                        tta))
        if rank == 0 and due_ckpt:
            with tempfile.TemporaryDirectory() as tmp:
                state = {"optimizer": optimizer.state_dict(), "iteration": done}
                if ema is not None:
                    state["weights"] = seg_net.state_dict()
                if mt:
                    state["reconstruction"] = (model.module if hasattr(model, "module") else model).reconstruction.state_dict()
                save_checkpoint(f"{tmp}/ckpt", scored, build_meta(cfg, spec, done, metrics), state)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(f"{tmp}/ckpt"))
        else:
            ray.train.report(metrics)
