"""Pre-training on Ray Train (2 workers, real EM crops): loss falls, checkpoints, resume, and fine-tuning
from the checkpoint with the transformer frozen keeps it bit-identical through DDP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tifffile
import torch
from PIL import Image

from conftest import cli, data_path
from vemscale.config import build_config
from vemscale.train.finetune import FinetuneConfig, finetune
from vemscale.train.metrics_log import read_metrics
from vemscale.train.pretrain import PretrainConfig, pretrain

CROP, BATCH, ITERATIONS = 64, 8, 12
# Ray Train V2 workers block on a report until the controller polls (every 2 s), so log rarely in tests


@pytest.fixture(scope="module")
def unlabeled(tmp_path_factory) -> list[str]:
    """A real unlabeled volume crop (VNC) and a folder of 2D PNG patches cut from another dataset (ISBI)."""
    root = tmp_path_factory.mktemp("unlabeled")
    vol = tifffile.imread(data_path("vnc_drosophila_sstem", "test_unlabeled", "image.tif"), key=range(4))
    tifffile.imwrite(root / "vol.tif", vol[:, :192, :192], photometric="minisblack", compression="zlib")
    isbi = tifffile.imread(data_path("isbi2012_membranes", "test_unlabeled", "image.tif"), key=range(2))
    for z in range(2):
        (root / "patches" / f"z{z}").mkdir(parents=True)
        for i in range(4):
            for j in range(4):
                Image.fromarray(isbi[z, i * 80 : i * 80 + 80, j * 80 : j * 80 + 80]).save(root / "patches" / f"z{z}" / f"{i}_{j}.png")
    return [str(root / "vol.tif"), str(root / "patches")]


def _pretrain_config(run_dir: Path, data: list[str], iterations: int, workers: int = 2) -> PretrainConfig:
    return build_config(PretrainConfig, {
        "run_dir": str(run_dir),
        "data": data,
        "model": {"name": "tiny"},
        "train": {"iterations": iterations, "batch_size": BATCH, "crop": CROP, "lr": 0.05, "log_every": 4,
                  "checkpoint_every": 8, "preview_every": 6, "preview_images": 2},
        "workers": workers,
        "use_gpu": False,
    })


@pytest.fixture(scope="module")
def pretrained(ray_local, unlabeled, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("pretrain") / "run"
    result = pretrain(_pretrain_config(run_dir, unlabeled, ITERATIONS))
    return run_dir, result


def test_pretrain_learns_and_writes_a_checkpoint(pretrained):
    run_dir, result = pretrained
    losses = [float(r["loss"]) for r in read_metrics(run_dir / "metrics.csv")]
    assert len(losses) == ITERATIONS // 4
    assert losses[-1] < 0.8 * losses[0], losses  # each the mean over 4 steps and both ranks
    meta = json.loads((Path(result["checkpoint"]) / "vemscale.json").read_text())
    assert meta["kind"] == "pretrain" and meta["iteration"] == ITERATIONS and meta["objective"] == "retina"
    assert meta["model"] == {"name": "transunet_tiny", "in_chans": 1, "num_classes": 1}
    assert meta["normalization"] == {"scale": 255.0, "mean": [0.57287], "std": [0.12741]}
    previews = sorted(p.name for p in (run_dir / "previews").glob("*.png"))
    assert previews == ["step_0000006.png", "step_0000012.png"]
    w, h = Image.open(run_dir / "previews" / previews[0]).size
    assert (w, h) == (3 * CROP + 8, 2 * CROP + 4)  # target | degraded input | reconstruction, 2 samples
    assert (run_dir / "metrics.png").is_file()
    assert result["metrics"]["samples_seen"] == ITERATIONS * BATCH


@pytest.mark.slow  # CI budget: runs with -m slow; fine-tune kill/resume runs in the default suite
def test_rerun_with_more_iterations_resumes(pretrained, unlabeled):
    """A rerun in the same run_dir continues model, optimizer and data stream (here on 1 worker: the
    stream's position is global, so the worker count may change)."""
    run_dir, _ = pretrained
    result = pretrain(_pretrain_config(run_dir, unlabeled, ITERATIONS + 4, workers=1))
    assert result["metrics"]["resumed_from"] == ITERATIONS
    assert result["metrics"]["samples_seen"] == (ITERATIONS + 4) * BATCH  # the data stream continued
    rows = [int(r["iteration"]) for r in read_metrics(run_dir / "metrics.csv")]
    assert rows == list(range(4, ITERATIONS + 5, 4))
    assert json.loads((run_dir / "checkpoint" / "vemscale.json").read_text())["iteration"] == ITERATIONS + 4


def test_finetune_with_retinas_sets_keeps_the_vit_blocks_bit_identical(pretrained, tmp_path):
    """transfer=retina freeze=vit_blocks (RETINA's sets) through DDP: the ViT blocks and their norm end exactly as
    pre-trained, every other transferred tensor (CNN, embeddings) moved, and the decoder moved from its init."""
    from vemscale.models import create_model

    run_dir, _ = pretrained
    init = run_dir / "checkpoint"
    vnc = {"image": str(data_path("vnc_drosophila_sstem", "train", "image.tif")),
           "labels": str(data_path("vnc_drosophila_sstem", "train", "labels_mitochondria.tif")), "slices": "0:2"}
    cfg = build_config(FinetuneConfig, {
        "run_dir": str(tmp_path / "ft"),
        "data": {"train": [vnc], "val": [], "classes": ["background", "mitochondria"]},
        "model": {"name": "tiny"},
        "train": {"iterations": 8, "batch_size": 2, "crop": CROP, "workers": 2, "log_every": 8, "checkpoint_every": 8,
                  "use_gpu": False},
        "init": str(init), "transfer": "retina", "freeze": "vit_blocks",
    })
    result = finetune(cfg)
    tuned = torch.load(Path(result["checkpoint"]) / "model.pt", weights_only=True)
    pre = torch.load(init / "model.pt", weights_only=True)
    torch.manual_seed(0)  # the fine-tuning loop's own initialisation (train.seed 0)
    start = create_model("tiny", in_chans=1, num_classes=2).state_dict()
    frozen = [k for k in tuned if k.startswith(("transformer.blocks.", "transformer.norm."))]
    assert frozen and all(torch.equal(tuned[k], pre[k]) for k in frozen)
    transferred = [k for k in tuned if k.startswith(("cnn.", "patch_embed.", "transformer.")) and k not in frozen]
    assert "transformer.pos_embed" in transferred and "patch_embed.weight" in transferred
    assert [k for k in transferred if torch.equal(tuned[k], pre[k])] == []  # trainable, so all moved
    rest = [k for k in tuned if k.startswith(("decoder.", "head.")) and "num_batches" not in k]
    assert [k for k in rest if torch.equal(tuned[k], start[k])] == []


def test_cli_bad_input_fails_before_training(tmp_path):
    r = cli("pretrain", f"data={tmp_path / 'nope'}", f"run_dir={tmp_path / 'run'}")
    assert r.returncode == 2 and "does not exist" in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_transfer_comparison_runs_and_resumes(tmp_path, capsys):
    """`python -m vemscale.bench.pretrain_transfer` end to end at toy length on the real datasets: every arm x seed
    gets a held-out IoU, the table compares each arm with random init, and a rerun reuses the finished runs."""
    from vemscale.bench.pretrain_transfer import main

    argv = ["--out", str(tmp_path), "--pretrain-iterations", "4", "--pretrain-crop", "64", "--pretrain-batch", "4",
            "--finetune-iterations", "4", "--crop", "64", "--batch", "2", "--seeds", "0,1", "--arms", "random,frozen",
            "--workers", "1"]
    result = main(argv)
    assert sorted((r["arm"], r["seed"]) for r in result["runs"]) == [("frozen", 0), ("frozen", 1), ("random", 0), ("random", 1)]
    assert all(0.0 <= r["val_iou"] <= 1.0 and r["iteration"] == 4 for r in result["runs"])
    assert result["summary"]["frozen"]["vs_random"]["n_a"] == 2 and "vs_random" not in result["summary"]["random"]
    assert "| frozen |" in capsys.readouterr().out
    assert json.loads((tmp_path / "results.json").read_text())["runs"] == result["runs"]
    again = main(argv)  # finished runs are read back, not trained again
    assert again["runs"] == result["runs"]
