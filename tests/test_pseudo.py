"""Self-training on a volume without manual labels: pseudo-labels from a teacher's probabilities, the loss that
skips the pixels it was unsure of, the per-volume sampling weight, and bad input before training."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
import tensorstore as ts
import tifffile
import torch
import torch.nn.functional as F

from conftest import data_path

VNC = ("vnc_drosophila_sstem", "train")


def _write_probs(path: Path, probs: np.ndarray) -> str:
    """A plain zarr v2 array (c, z, y, x) written by tensorstore, as a teacher's probability layer."""
    store = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)}},
                    create=True, dtype=probs.dtype.name, shape=probs.shape).result()
    store.write(probs).result()
    return str(path)


def _reference_pseudo(p_float: np.ndarray, confidence: float) -> np.ndarray:
    """Pixel by pixel: the most probable class if its probability reaches `confidence`, else 255."""
    out = np.empty(p_float.shape[1:], np.uint8)
    for idx in np.ndindex(*out.shape):
        v = p_float[(slice(None),) + idx]
        out[idx] = int(np.argmax(v)) if v.max() >= confidence else 255
    return out


def test_pseudo_labels_take_the_confident_class_and_ignore_the_rest(tmp_path):
    from vemscale.train.data import IGNORE, load_labelled, pseudo_labels

    rng = np.random.default_rng(0)
    p1 = rng.random((2, 12, 16), dtype=np.float32)
    p_float = np.stack([1 - p1, p1])
    for conf in (0.5, 0.75, 0.9):
        ref = _reference_pseudo(p_float, conf)
        assert np.array_equal(pseudo_labels(p_float, conf), ref)
        # infer's uint8 layer (round(p * 255)): the same labels as its float values p_uint8 / 255
        q = np.rint(p_float * 255).astype(np.uint8)
        assert np.array_equal(pseudo_labels(q, conf), _reference_pseudo(q / 255.0, conf))
    assert (ref == IGNORE).mean() > 0.5 and {0, 1} <= set(np.unique(ref))  # the 0.9 case ignores most, not all
    # from a probability volume on disk, only the chosen slices, beside the real image
    img = tifffile.imread(data_path(*VNC, "image.tif"), key=range(3))[:, 200:328, 300:428]  # a real 128^2 window
    tifffile.imwrite(tmp_path / "img.tif", img, photometric="minisblack")
    p = rng.random((3,) + img.shape[1:], dtype=np.float32)
    q = np.rint(np.stack([1 - p, p]) * 255).astype(np.uint8)
    url = _write_probs(tmp_path / "probs.zarr", q)
    st = load_labelled(str(tmp_path / "img.tif"), url, "1:3", 2, pseudo=0.8, weight=2.5)
    assert st.pseudo and st.weight == 2.5 and np.array_equal(st.image[0], img[1:3])
    assert np.array_equal(st.labels, _reference_pseudo(q[:, 1:3] / 255.0, 0.8))
    # float probabilities on disk too; logits by mistake are refused
    f = np.stack([1 - p, p]).astype(np.float32)
    st = load_labelled(str(tmp_path / "img.tif"), _write_probs(tmp_path / "f.zarr", f), "0:2", 2, pseudo=0.6)
    assert np.array_equal(st.labels, _reference_pseudo(f[:, 0:2], 0.6))
    from vemscale.errors import UserError

    with pytest.raises(UserError, match=r"must lie in \[0, 1\]"):
        load_labelled(str(tmp_path / "img.tif"), _write_probs(tmp_path / "l.zarr", f * 8 - 4), "0:2", 2, pseudo=0.6)


def test_pseudo_labels_with_an_area_prior_give_the_class_its_share():
    from vemscale.train.data import IGNORE, LabelledStack, class_shares, pseudo_labels

    rng = np.random.default_rng(3)
    p1 = rng.random((2, 40, 50))  # distinct values: no ties at the cut
    p = np.stack([1 - p1, p1])
    for share in (0.0, 0.05, 0.3):
        got = pseudo_labels(p, 0.75, [share])
        n = round(share * p1.size)
        ref = np.where(p[0] >= 0.75, 0, IGNORE).ravel()  # reference: the n largest p_1 by a full sort
        if n:
            ref[np.argsort(p1.ravel())[-n:]] = 1
        assert np.array_equal(got.ravel(), ref), share
        assert (got == 1).sum() == n
    # three classes: each its share, a pixel both claim goes to the more probable class
    q = rng.dirichlet([1, 1, 1], size=(30, 30)).transpose(2, 0, 1)[:, None]
    got = pseudo_labels(q, 0.9, [0.2, 0.1])
    top1 = q[1] >= np.sort(q[1].ravel())[-180]
    top2 = q[2] >= np.sort(q[2].ravel())[-90]
    ref = np.where(q[0] >= 0.9, 0, IGNORE)
    ref = np.where(top1, 1, ref)
    ref = np.where(top2 & (~top1 | (q[2] > q[1])), 2, ref)
    assert np.array_equal(got, ref.astype(np.uint8))
    # the shares of manual labels, which `pseudo_area: source` uses
    lab = np.zeros((2, 10, 10), np.uint8)
    lab[0, :5] = 1
    lab[1, :2, :5] = 2
    st = LabelledStack(np.zeros((1, 2, 10, 10), np.uint8), lab, "s", None)
    assert class_shares([st], 3) == pytest.approx([50 / 200, 10 / 200])


def test_loss_skips_ignored_pixels_as_if_they_were_not_there():
    from vemscale.train.data import IGNORE
    from vemscale.train.losses import segmentation_loss

    torch.manual_seed(0)
    logits = torch.randn(3, 2, 16, 16, requires_grad=True)
    target = torch.randint(0, 2, (3, 16, 16))
    ignored = torch.rand(3, 16, 16) < 0.4
    target_ig = torch.where(ignored, torch.full_like(target, IGNORE), target)
    keep = ~ignored
    # the reference: only the kept pixels, as one (1, K, N, 1) batch
    kept_logits = logits.permute(1, 0, 2, 3)[:, keep].unsqueeze(0).unsqueeze(-1)
    kept_target = target[keep].view(1, -1, 1)
    for kind in ("ce", "dice", "ce_dice", "retina"):
        got = segmentation_loss(logits, target_ig, kind)
        ref = segmentation_loss(kept_logits, kept_target, kind)
        assert got.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6), kind
        (grad,) = torch.autograd.grad(got, logits)
        assert grad.permute(1, 0, 2, 3)[:, ignored].abs().max() == 0  # ignored pixels teach nothing
        assert grad.permute(1, 0, 2, 3)[:, keep].abs().max() > 0
    # without IGNORE pixels the loss is what it always was: cross-entropy + soft Dice of the foreground, written
    # out here from their definitions
    ce = F.cross_entropy(logits, target)
    p1, t1 = torch.softmax(logits, 1)[:, 1], (target == 1).float()
    dice = 1 - (2 * (p1 * t1).sum() + 1) / (p1.sum() + t1.sum() + 1)
    assert segmentation_loss(logits, target, "ce").item() == pytest.approx(ce.item(), rel=1e-6)
    assert segmentation_loss(logits, target, "ce_dice").item() == pytest.approx((ce + dice).item(), rel=1e-6)
    # a batch with nothing left to learn from: zero, not NaN, and still differentiable
    none = segmentation_loss(logits, torch.full_like(target, IGNORE), "ce_dice")
    assert torch.isfinite(none) and none.requires_grad


def test_crops_are_drawn_in_proportion_to_voxels_times_weight():
    from vemscale.train.data import CropSampler, LabelledStack

    def stack(value: int, z: int, weight: float) -> LabelledStack:
        return LabelledStack(np.full((1, z, 64, 64), value, np.uint8), np.zeros((z, 64, 64), np.uint8), str(value),
                             None, weight)

    n = 2000
    # 4 slices at weight 1 against 1 slice at weight 4: one half each
    imgs = CropSampler([stack(10, 4, 1.0), stack(200, 1, 4.0)], 32, [0], seed=1).sample(n)[0]
    share = (imgs[:, 0, 0, 0] == 200).mean()
    assert 0.45 <= share <= 0.55  # binomial(2000, 0.5): outside has probability < 1e-5; unweighted it is 0.2
    imgs = CropSampler([stack(10, 4, 1.0), stack(200, 1, 1.0)], 32, [0], seed=1).sample(n)[0]
    assert 0.17 <= (imgs[:, 0, 0, 0] == 200).mean() <= 0.23  # without weights: by voxels, 1 in 5


def test_foreground_crops_ignore_the_ignored_pixels():
    from vemscale.train.data import IGNORE, CropSampler, LabelledStack

    lab = np.full((1, 256, 256), IGNORE, np.uint8)
    lab[0, :32, :32] = 0
    lab[0, 200:210, 200:210] = 1  # the only foreground: every foreground crop must hold it
    st = LabelledStack(np.zeros((1, 1, 256, 256), np.uint8), lab, "s", None, 1.0, True)
    labs = CropSampler([st], 64, [0], seed=2, p_foreground=1.0).sample(100)[1]
    assert ((labs == 1).reshape(100, -1).any(1)).all()


def _finetune_rc(tmp_path: Path, *extra: str) -> tuple[int, str]:
    from vemscale.cli import main  # in-process: the checks run before any Ray or worker starts

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["finetune", f"run_dir={tmp_path / 'run'}", "data.classes=[background,mito]", *extra])
    return rc, " ".join(err.getvalue().split())


def test_pseudo_label_bad_input_fails_before_training(tmp_path):
    tifffile.imwrite(tmp_path / "img.tif", np.zeros((2, 64, 64), np.uint8))
    lab = np.zeros((2, 64, 64), np.uint8)
    lab[:, 10:30, 10:30] = 1
    tifffile.imwrite(tmp_path / "lab.tif", lab)
    three = _write_probs(tmp_path / "p3.zarr", np.zeros((3, 2, 64, 64), np.uint8))
    two = _write_probs(tmp_path / "p2.zarr", np.full((2, 2, 64, 64), 128, np.uint8))
    src = f"{{image: {tmp_path / 'img.tif'}, labels: {tmp_path / 'lab.tif'}}}"
    cases = [
        ([f"data.train=[{{image: {tmp_path / 'img.tif'}, labels: {three}, pseudo: 0.7}}]"],
         "must be class probabilities (c,z,y,x) with one channel per class (2)"),
        ([f"data.train=[{{image: {tmp_path / 'img.tif'}, labels: {tmp_path / 'lab.tif'}, pseudo: 0.7}}]"],
         "must be class probabilities (c,z,y,x)"),
        ([f"data.train=[{src}]", f"data.val=[{{image: {tmp_path / 'img.tif'}, labels: {two}, pseudo: 0.7}}]"],
         "pseudo-labels belong in data.train"),
        ([f"data.train=[{{image: {tmp_path / 'img.tif'}, labels: {two}, pseudo: 1.5}}]"], "pseudo"),
        ([f"data.train=[{{image: {tmp_path / 'img.tif'}, labels: {two}, pseudo: 0.5}}]", "select=morphology",
          f"target={tmp_path / 'img.tif'}"], "every training volume has pseudo-labels"),
        ([f"data.train=[{src}]".replace("}]", ", weight: 0}]")], "weight"),
        ([f"data.train=[{{image: {tmp_path / 'img.tif'}, labels: {two}, pseudo: 0.7, pseudo_area: source}}]"],
         "pseudo_area=source measures the class shares of the manually labelled"),
        ([f"data.train=[{src}]".replace("}]", ", pseudo_area: [0.1]}]")], "set pseudo=<confidence> too"),
    ]
    for extra, message in cases:
        rc, err = _finetune_rc(tmp_path, *extra)
        assert rc == 2 and message in err, (extra, err[-1500:])
        assert not (tmp_path / "run").exists()


@pytest.mark.slow  # ~1 min of Ray start-up; the pieces are unit-tested above
def test_self_training_from_an_infer_output_learns_the_teacher(tmp_path, ray_local):
    """A teacher's `vemscale infer` probabilities on unlabeled slices, as the only training labels: the student
    trains through Ray Train and its held-out IoU on the true labels beats a model trained on nothing."""
    from vemscale.cli import main

    img = str(data_path(*VNC, "image.tif"))
    lab = str(data_path(*VNC, "labels_mitochondria.tif"))
    # the teacher: the true labels of slices 0-3 as probabilities (a perfect teacher, unsure at the borders)
    truth = tifffile.imread(lab, key=range(4)).astype(np.float32)
    from scipy.ndimage import gaussian_filter

    p = np.stack([gaussian_filter(t, 2) for t in truth])
    probs = _write_probs(tmp_path / "teacher.zarr", np.rint(np.stack([1 - p, p]) * 255).astype(np.uint8))
    tifffile.imwrite(tmp_path / "img4.tif", tifffile.imread(img, key=range(4)), photometric="minisblack")
    run = tmp_path / "student"
    assert main(["finetune", "configs/finetune_vnc_mito.yaml", f"run_dir={run}", "model.name=tiny",
                 f"data.train=[{{image: {tmp_path / 'img4.tif'}, labels: {probs}, pseudo: 0.8}}]",
                 f"data.val=[{{image: {img}, labels: {lab}, slices: '16:18'}}]",
                 "train.iterations=100", "train.batch_size=4", "train.val_every=100",
                 "train.checkpoint_every=100", "train.ema=0", "tiles.tta=1"]) == 0
    import csv

    rows = [r for r in csv.DictReader(open(run / "metrics.csv")) if r.get("val_iou")]
    # all-background scores 0, all-mitochondria ~0.05; the same run on the true labels of slices 0-15 scores ~0.55
    assert float(rows[-1]["val_iou"]) > 0.3
