"""`vemscale ensemble`: several checkpoints as one whose prediction is their mean probability, checked against a
numpy mean of the members' own softmax, through `vemscale infer`, and its bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from conftest import data_path
from vemscale.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from vemscale.cli import main
from vemscale.errors import UserError
from vemscale.infer.outputs import quantize_probabilities
from vemscale.infer.pipeline import InferConfig, run_infer
from vemscale.infer.predictor import grid_and_normalizer
from vemscale.infer.tiling import predict_volume_xy
from vemscale.infer.tta import DihedralTTA
from vemscale.io.volume import create_ome_zarr, open_volume
from vemscale.models import create_model

SHAPE = (2, 96, 96)


def member(path: Path, seed: int, **meta_kw) -> Path:
    """A tiny TransUNet of its own seed; the head scaled so that members disagree by far more than rounding."""
    torch.manual_seed(seed)
    model = create_model("tiny", in_chans=1, num_classes=2).eval()
    with torch.no_grad():
        model.head.weight.mul_(100.0)
        model.head.bias.zero_()
    meta = CheckpointMeta(model=model.spec, **{"tile": 64, "margin": 8, "classes": ["background", "mito"],
                                                "voxel_size_xyz": [4.6, 4.6, 45.0], **meta_kw})
    return save_checkpoint(path, model, meta)


def softmax(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - a.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def member_probs(ckpt: Path, x: np.ndarray) -> np.ndarray:
    """The reference: the member's weights loaded into a plain model by hand, its softmax taken in numpy."""
    model = create_model("tiny", in_chans=1, num_classes=2).eval()
    model.load_state_dict(torch.load(ckpt / "model.pt", weights_only=True))
    with torch.no_grad():
        return softmax(model(torch.from_numpy(x)).numpy().astype(np.float64))


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble")
    paths = [member(root / f"seed{s}", s) for s in range(3)]
    dest = root / "ens"
    assert main(["ensemble", str(dest), *map(str, paths)]) == 0
    return root, paths, dest


def test_the_ensemble_predicts_the_mean_probability_of_its_members(members):
    _, paths, dest = members
    x = np.random.default_rng(0).normal(size=(2, 1, 64, 64)).astype(np.float32)
    model, meta = load_checkpoint(dest)
    assert meta.model["name"] == "ensemble" and len(meta.model["members"]) == 3
    assert (meta.tile, meta.margin, meta.classes) == (64, 8, ["background", "mito"])
    assert [m["checkpoint"] for m in meta.metrics["members"]] == [str(p.resolve()) for p in paths]
    with torch.no_grad():
        ours = torch.softmax(model(torch.from_numpy(x)), 1).numpy()
    each = [member_probs(p, x) for p in paths]
    ref = np.mean(each, axis=0)
    assert np.abs(ours - ref).max() < 1e-5
    assert min(np.abs(e - ref).max() for e in each) > 0.05  # a missing or doubled member would be seen
    # with 8-view TTA around it: the mean over views and members alike
    with torch.no_grad():
        tta = torch.softmax(DihedralTTA(model)(torch.from_numpy(x)), 1).numpy()
        views = np.mean([torch.softmax(DihedralTTA(load_checkpoint(p)[0])(torch.from_numpy(x)), 1).numpy()
                         for p in paths], axis=0)
    assert np.abs(tta - views).max() < 1e-5


def test_infer_with_an_ensemble_writes_the_members_mean(members, ray_local):
    root, paths, dest = members
    vol = tifffile.imread(data_path("vnc_drosophila_sstem", "test_unlabeled", "image.tif"), key=range(SHAPE[0]))
    vol = np.ascontiguousarray(vol[:, : SHAPE[1], : SHAPE[2]])
    create_ome_zarr(root / "vol.ome.zarr", SHAPE, np.uint8, (1, 48, 48), (4.6, 4.6, 45.0)).write(vol).result()
    out = root / "pred"
    cfg = InferConfig(input=str(root / "vol.ome.zarr"), output=str(out), checkpoint=str(dest), block_shape=(2, 48, 48),
                      output_chunks=(2, 48, 48), workers=1, threads_per_worker=1, batch_size=4, progress=False,
                      run_dir=str(root / "run"))
    assert run_infer(cfg)["summary"]["computed"] == 4
    probs = []
    for p in paths:  # each member alone, whole volume, then their mean
        model, meta = load_checkpoint(p)
        grid, norm = grid_and_normalizer(meta)
        probs.append(predict_volume_xy(model, vol, grid, norm, batch_size=4).astype(np.float64))
    mean = np.mean(probs, axis=0)
    written = open_volume(f"{out}/probabilities").read()
    labels = open_volume(f"{out}/labels").read()
    assert np.abs(written.astype(int) - quantize_probabilities(mean.astype(np.float32)).astype(int)).max() <= 1
    sure = np.abs(mean[1] - mean[0]) > 1e-3  # away from ties, the labels are the mean's argmax
    assert np.array_equal(labels[sure], mean.argmax(0)[sure])
    assert 0.05 < labels.mean() < 0.95
    assert any((p.argmax(0) != mean.argmax(0)).mean() > 0.01 for p in probs)  # not any one member's labels


def test_members_used_differently_at_inference_fail_before_anything_is_written(members, tmp_path):
    _, paths, _ = members
    other_tile = member(tmp_path / "tile128", 5, tile=128)
    dest = tmp_path / "ens"
    with pytest.raises(UserError, match="tile: 64 in .* 128 here"):
        main_raise(["ensemble", str(dest), str(paths[0]), str(other_tile)])
    other_classes = member(tmp_path / "classes", 6)
    meta = load_checkpoint(other_classes)[1]
    (other_classes / "vemscale.json").write_text(meta.model_copy(update={"classes": ["bg", "er"]}).model_dump_json())
    with pytest.raises(UserError, match="classes"):
        main_raise(["ensemble", str(dest), str(paths[0]), str(other_classes)])
    with pytest.raises(UserError, match="at least 2"):
        main_raise(["ensemble", str(dest), str(paths[0])])
    with pytest.raises(UserError, match="not a vemscale checkpoint|does not exist"):
        main_raise(["ensemble", str(dest), str(paths[0]), str(tmp_path / "nope")])
    assert not dest.exists()
    assert main(["ensemble", str(dest), str(paths[0]), str(other_tile)]) == 2  # the CLI: a message, exit 2


def main_raise(argv: list[str]) -> None:
    """The stage function itself, so the test sees the UserError the CLI turns into a message."""
    from vemscale.models.ensemble import build_ensemble

    build_ensemble(argv[2:], argv[1])


def test_an_ensemble_cannot_be_a_member_or_a_fine_tuning_init(members, tmp_path):
    from vemscale.train.transfer import apply_init

    _, paths, dest = members
    with pytest.raises(UserError, match="itself an ensemble"):
        main_raise(["ensemble", str(tmp_path / "e2"), str(dest), str(paths[0])])
    with pytest.raises(UserError, match="an ensemble .* for inference only; fine-tune from one of its members"):
        apply_init(create_model("tiny"), dest, "all")
    pre = member(tmp_path / "pre", 7)
    meta = load_checkpoint(pre)[1]
    (pre / "vemscale.json").write_text(meta.model_copy(update={"kind": "pretrain"}).model_dump_json())
    with pytest.raises(UserError, match="pretrain checkpoint"):
        main_raise(["ensemble", str(tmp_path / "e3"), str(pre), str(paths[0])])
