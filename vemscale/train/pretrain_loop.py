"""The pre-training steps (RETINA reconstruction, MoCoV2) and the Ray Train worker loop around them.

`RetinaStep` and `MocoStep` are plain PyTorch (the benchmark times them outside Ray too);
`pretrain_loop_per_worker` is what each Ray Train worker runs: its share of the patch stream, a DDP model,
SGD with poly LR, loss reports, preview PNGs and checkpoints from rank 0, resume from the newest checkpoint.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vemscale.checkpoint import WEIGHTS_FILE, CheckpointMeta, load_train_state, save_checkpoint
from vemscale.train.loop import make_optimizer, resume_checkpoint
from vemscale.train.schedule import lr_at, set_schedule
from vemscale.train.moco import MoCo, MocoConfig
from vemscale.train.augment import Normalize, RetinaAugmentConfig, retina_pair, two_views


class RetinaStep:
    """Augment a batch of [0,1] patches into (degraded input, clean target), regress, MSE, update."""

    def __init__(self, model, optimizer, augment: RetinaAugmentConfig, norm: Normalize, device, seed: int) -> None:
        self.model, self.optimizer, self.augment, self.norm, self.device = model, optimizer, augment, norm, device
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.views: dict[str, torch.Tensor] = {}

    def __call__(self, batch: np.ndarray, lr: float, keep: int = 0) -> dict[str, float]:
        x = torch.from_numpy(batch).to(self.device, non_blocking=True)
        inp, target = retina_pair(x, self.augment, self.gen, self.norm)
        set_schedule(self.optimizer, lr, None)
        self.model.train()
        pred = self.model(inp)
        loss = F.mse_loss(pred.float(), target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if keep:
            self.views = {"target": target[:keep].detach(), "input": inp[:keep].detach(), "output": pred[:keep].detach()}
        return {"loss": float(loss.detach())}


class MocoStep:
    """Two augmented views per patch, InfoNCE against the queue, update (the key encoder follows by EMA)."""

    def __init__(self, moco, optimizer, augment: RetinaAugmentConfig, norm: Normalize, device, seed: int) -> None:
        self.model, self.optimizer, self.augment, self.norm, self.device = moco, optimizer, augment, norm, device
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.views: dict[str, torch.Tensor] = {}

    def __call__(self, batch: np.ndarray, lr: float, keep: int = 0) -> dict[str, float]:
        x = torch.from_numpy(batch).to(self.device, non_blocking=True)
        q, k = two_views(x, self.augment, self.gen, self.norm)
        set_schedule(self.optimizer, lr, None)
        self.model.train()
        loss, acc = self.model(q, k)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if keep:
            self.views = {"view 1": q[:keep].detach(), "view 2": k[:keep].detach()}
        return {"loss": float(loss.detach()), "acc": float(acc)}


def _mean_over_ranks(values: dict[str, float], world: int, device) -> dict[str, float]:
    """Average logged values over the data-parallel ranks (every rank logs at the same iterations)."""
    if world == 1 or not values:
        return values
    import torch.distributed as dist

    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / world for k, v in zip(values, t.tolist())}


def write_preview(path: Path, views: dict[str, torch.Tensor], norm: Normalize) -> None:
    """A PNG grid: one row per sample, one column per view (first channel, back on the [0,1] scale)."""
    from PIL import Image

    cols = [norm.inverse(v.float()).clamp(0, 1)[:, 0].cpu().numpy() for v in views.values()]
    n, h, w = cols[0].shape
    gap = 4
    grid = np.ones((n * (h + gap) - gap, len(cols) * (w + gap) - gap), np.float32)
    for j, col in enumerate(cols):
        for i in range(n):
            grid[i * (h + gap) : i * (h + gap) + h, j * (w + gap) : j * (w + gap) + w] = col[i]
    path.parent.mkdir(parents=True, exist_ok=True)
    import io

    from vemscale.io.atomic import write_bytes

    buf = io.BytesIO()
    Image.fromarray((grid * 255).round().astype(np.uint8)).save(buf, format="PNG")
    write_bytes(path, buf.getvalue())


def build_model(cfg: dict[str, Any]) -> torch.nn.Module:
    """The segmentation architecture being pre-trained; RETINA uses its head to regress in_chans channels."""
    from vemscale.models import create_model

    c = int(cfg["in_chans"])
    return create_model(cfg["model"]["name"], in_chans=c, num_classes=c, **cfg["model"]["kwargs"])


def build_meta(cfg: dict, spec: dict, it: int, metrics: dict) -> CheckpointMeta:
    norm = cfg["normalization"]
    return CheckpointMeta(
        kind="pretrain",
        model=spec,
        classes=[],
        normalization={"scale": float(cfg["input_scale"]), "mean": list(norm["mean"]), "std": list(norm["std"])},
        tile=cfg["train"]["crop"],
        margin=0,
        iteration=it,
        metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        train_config=cfg["config"],
        objective=cfg["objective"],
    )


def pretrain_loop_per_worker(cfg: dict[str, Any]) -> None:
    """Ray Train worker: pre-train for cfg['train']['iterations'] steps, reporting metrics and checkpoints."""
    import ray.train
    import ray.train.torch

    from vemscale.train.unlabeled import PatchStream, Prefetcher, SourceConfig

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tcfg = cfg["train"]
    torch.set_num_threads(max(1, int(cfg["threads"])))
    device = ray.train.torch.get_device()

    torch.manual_seed(tcfg["seed"])  # identical initial weights (and MoCo queue) on every rank
    model = build_model(cfg)
    spec = dict(model.spec)
    moco = MoCo(model, MocoConfig(**cfg["moco"])) if cfg["objective"] == "moco" else None
    net = moco if moco is not None else model
    ddp = ray.train.torch.prepare_model(net, parallel_strategy_kwargs={"find_unused_parameters": False})
    inner = ddp.module if hasattr(ddp, "module") else ddp
    params = [p for p in ddp.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, tcfg)

    start, counters = 0, None
    checkpoint = resume_checkpoint(cfg.get("resume_dir"))
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = load_train_state(d) or {}
            if moco is not None and "moco" in state:
                inner.load_state_dict(state["moco"])
            else:
                target = inner.model if moco is not None else inner
                target.load_state_dict(torch.load(f"{d}/{WEIGHTS_FILE}", map_location=device, weights_only=True))
            if "optimizer" in state:
                optimizer.load_state_dict(state["optimizer"])
                start = int(state["iteration"])
            counters = state.get("data_counters")

    sources = [SourceConfig(**s) for s in cfg["data"]]
    stream = PatchStream(sources, cfg["in_chans"], tcfg["crop"], tcfg["seed"], rank, world, counters)
    norm = Normalize(cfg["normalization"]["mean"], cfg["normalization"]["std"], device)
    augment = RetinaAugmentConfig(**cfg["augment"])
    run_seed = (tcfg["seed"] * 1_000_003 + rank * 10_007 + start) % 2**31
    step = (MocoStep if moco is not None else RetinaStep)(ddp, optimizer, augment, norm, device, seed=run_seed)
    previews = Path(cfg["run_dir"]) / "previews"
    total, gb = tcfg["iterations"], tcfg["batch_size"]
    prefetch = Prefetcher(stream, start, total, gb, tcfg["prefetch"])
    sums: dict[str, float] = {}
    n_logged, step_time, step_images = 0, 0.0, 0
    loop_t0, loop_images = time.perf_counter(), 0
    try:
        for it in range(start, total):
            t0 = time.perf_counter()
            got_it, batch, counters, epochs = prefetch.get()
            assert got_it == it, (got_it, it)
            done = it + 1
            due_preview = rank == 0 and tcfg["preview_every"] and (done % tcfg["preview_every"] == 0 or done == total)
            lr, momentum = lr_at(tcfg, it, total)
            set_schedule(optimizer, lr, momentum)
            out = step(batch, lr, keep=tcfg["preview_images"] if due_preview else 0)
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + v
            n_logged += 1
            step_time += time.perf_counter() - t0
            step_images += gb
            loop_images += gb
            if due_preview:
                write_preview(previews / f"step_{done:07d}.png", step.views, norm)
            due_ckpt = done % tcfg["checkpoint_every"] == 0 or done == total
            if not (done % tcfg["log_every"] == 0 or due_ckpt):
                continue
            metrics: dict[str, Any] = {
                "iteration": done,
                "resumed_from": start,
                **_mean_over_ranks({k: v / n_logged for k, v in sums.items()}, world, device),
                "lr": lr,
                "images_per_s": step_images / step_time if step_time else 0.0,
                "loop_images_per_s": loop_images / (time.perf_counter() - loop_t0),
                "samples_seen": int(sum(counters)),
            }
            if epochs is not None:
                metrics["epoch"] = epochs
            sums, n_logged, step_time, step_images = {}, 0, 0.0, 0
            if rank == 0 and due_ckpt:
                with tempfile.TemporaryDirectory() as tmp:
                    state = {"optimizer": optimizer.state_dict(), "iteration": done, "data_counters": counters}
                    if moco is not None:
                        state["moco"] = inner.state_dict()
                    target = inner.model if moco is not None else inner
                    save_checkpoint(f"{tmp}/ckpt", target, build_meta(cfg, spec, done, metrics), state)
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(f"{tmp}/ckpt"))
            else:
                ray.train.report(metrics)
    finally:
        prefetch.close()
