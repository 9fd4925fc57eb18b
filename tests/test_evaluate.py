"""Metrics against hand-computed values and brute force; blockwise evaluation against one block; CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage
from scipy.spatial.distance import cdist

from vemscale import cli
from vemscale.errors import UserError
from vemscale.eval import metrics
from vemscale.eval.evaluate import evaluate, format_table
from vemscale.io.volume import array_volume, create_ome_zarr

VNC_MITO = (Path(__file__).resolve().parents[1].parent / "shared" / "data" / "vnc_drosophila_sstem" / "train"
            / "labels_mitochondria.tif")


def write_zarr(path: Path, data: np.ndarray, voxel=(4.6, 4.6, 50.0), chunks=(2, 16, 16)) -> str:
    store = create_ome_zarr(str(path), data.shape, data.dtype, chunks, voxel)
    store.write(data).result()
    return str(path)


# ------------------------------------------------------------------------------------- counts and scores


def test_confusion_and_scores_by_hand():
    truth = np.array([[0, 0, 1, 1, 2, 2, 2, 0]])
    pred = np.array([[0, 1, 1, 0, 2, 2, 0, 0]])
    cm = metrics.confusion_matrix(pred, truth, 3)
    np.testing.assert_array_equal(cm, [[2, 1, 0], [1, 1, 0], [1, 0, 2]])
    c = metrics.counts_from_confusion(cm)
    np.testing.assert_array_equal(c["tp"], [2, 1, 2])
    np.testing.assert_array_equal(c["fp"], [2, 1, 0])
    np.testing.assert_array_equal(c["fn"], [1, 1, 1])
    np.testing.assert_array_equal(c["tn"], [3, 5, 5])
    s = metrics.class_scores(1, 1, 1)  # class 1: tp 1, fp 1, fn 1
    assert s == pytest.approx({"iou": 1 / 3, "f1": 0.5, "precision": 0.5, "recall": 0.5})
    s = metrics.class_scores(2, 0, 1)  # class 2
    assert s == pytest.approx({"iou": 2 / 3, "f1": 0.8, "precision": 1.0, "recall": 2 / 3})


def test_empty_class_conventions():
    assert metrics.class_scores(0, 0, 0) == {"iou": 1.0, "f1": 1.0, "precision": 1.0, "recall": 1.0}
    assert metrics.class_scores(0, 0, 5) == {"iou": 0.0, "f1": 0.0, "precision": 0.0, "recall": 0.0}
    assert metrics.class_scores(0, 3, 0) == {"iou": 0.0, "f1": 0.0, "precision": 0.0, "recall": 0.0}
    empty = np.zeros((3, 5, 5), bool)
    full = np.zeros((3, 5, 5), bool)
    full[1, 1:4, 1:4] = True
    assert metrics.mean_false_distance(empty, empty, (1, 1, 1)) == 0.0
    assert math.isnan(metrics.mean_false_distance(full, empty, (1, 1, 1)))


# ------------------------------------------------------------------------------------- surface distances


def brute_force_mfd(pred: np.ndarray, truth: np.ndarray, voxel_size_xyz) -> float:
    """MFD from all pairs of surface points (same surface definition, no distance transform)."""
    sampling = np.array(metrics.sampling_zyx(voxel_size_xyz))
    ps = np.argwhere(metrics.surface(pred)) * sampling
    ts_ = np.argwhere(metrics.surface(truth)) * sampling
    d = cdist(ps, ts_)
    return 0.5 * (d.min(axis=1).mean() + d.min(axis=0).mean())


def cube(shape, lo, hi) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


def test_surface_is_face_connected_boundary_not_the_volume_edge():
    m = cube((5, 6, 6), (1, 1, 1), (4, 5, 5))
    s = metrics.surface(m)
    assert s.sum() == m.sum() - 1 * 2 * 2  # a 3x4x4 cube minus its 1x2x2 interior
    edge = cube((3, 4, 4), (0, 0, 0), (3, 4, 2))  # touches the volume edge on five sides
    assert metrics.surface(edge).sum() == 3 * 4  # only the face x=1 is a surface


def test_mfd_of_offset_cubes_matches_brute_force_and_known_value():
    shape = (12, 20, 20)
    truth = cube(shape, (3, 4, 4), (9, 12, 12))
    pred = cube(shape, (4, 6, 7), (10, 14, 15))
    for voxel in ((1.0, 1.0, 1.0), (4.6, 4.6, 50.0), (3.0, 5.0, 7.0)):
        got = metrics.mean_false_distance(pred, truth, voxel)
        assert got == pytest.approx(brute_force_mfd(pred, truth, voxel), rel=1e-12)
    # two half-spaces 3 voxels apart in x: every surface point is exactly 3 * 4.6 nm from the other surface
    a = cube((4, 10, 20), (0, 0, 0), (4, 10, 10))
    b = cube((4, 10, 20), (0, 0, 0), (4, 10, 13))
    assert metrics.mean_false_distance(b, a, (4.6, 4.6, 50)) == pytest.approx(13.8)
    assert metrics.mean_false_distance(b, a, (4.6, 4.6, 50), per_slice=True) == pytest.approx(13.8)
    # the cap bounds every distance
    assert metrics.mean_false_distance(b, a, (4.6, 4.6, 50), max_distance_nm=5.0) == pytest.approx(5.0)


def test_per_slice_ignores_z_neighbours():
    shape = (6, 16, 16)
    truth = cube(shape, (1, 4, 4), (5, 12, 12))
    pred = truth.copy()
    pred[3] = False  # one slice missing: in 3-D its neighbours become surface; per slice it has no surface
    d3 = metrics.mean_false_distance(pred, truth, (4, 4, 40))
    d2 = metrics.mean_false_distance(pred, truth, (4, 4, 40), per_slice=True, max_distance_nm=100.0)
    assert d3 > 0 and d2 > 0
    assert d3 == pytest.approx(brute_force_mfd(pred, truth, (4, 4, 40)))


# ------------------------------------------------------------------------------------- blockwise evaluate


def blobs(shape, seed, classes=3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=(1, 3, 3))
    edges = np.quantile(noise, np.linspace(0, 1, classes + 1)[1:-1] + 0.15)
    return np.digitize(noise, edges).astype(np.uint8)


def test_blockwise_equals_single_block_and_whole_volume(tmp_path):
    shape = (10, 40, 44)
    truth = blobs(shape, 0)
    pred = blobs(shape, 0)
    pred[:, 5:9, :] = blobs(shape, 1)[:, 5:9, :]  # some disagreement
    pred[7:, 30:, 30:] = 0
    voxel = (4.0, 4.0, 20.0)
    t_url, p_url = write_zarr(tmp_path / "t.zarr", truth, voxel), write_zarr(tmp_path / "p.zarr", pred, voxel)
    halo = 400.0  # covers every distance in this volume (it is 176 x 160 x 200 nm)
    one = evaluate(p_url, t_url, block_shape=(16, 64, 64), mfd_halo_nm=halo)
    many = evaluate(p_url, t_url, block_shape=(3, 11, 16), mfd_halo_nm=halo)
    exact = evaluate(p_url, t_url, mfd_halo_nm=None)
    assert one["blocks"] == 1 and many["blocks"] == 4 * 4 * 3 and exact["blocks"] == 1
    assert one["num_classes"] == 3 and list(one["per_class"]) == ["background", "class1", "class2"]
    for name in one["per_class"]:
        a, b, c = one["per_class"][name], many["per_class"][name], exact["per_class"][name]
        for key in ("tp", "fp", "fn", "voxels_truth", "voxels_pred"):
            assert a[key] == b[key] == c[key]
        if name != "background":
            assert a["mfd_nm"] == pytest.approx(b["mfd_nm"], rel=1e-12)
            assert a["mfd_nm"] == pytest.approx(c["mfd_nm"], rel=1e-12)
            k = list(one["per_class"]).index(name)
            assert c["mfd_nm"] == pytest.approx(brute_force_mfd(pred == k, truth == k, voxel), rel=1e-12)
    # counts against numpy on the whole arrays
    for k, name in enumerate(one["per_class"]):
        tp = int(((pred == k) & (truth == k)).sum())
        fp = int(((pred == k) & (truth != k)).sum())
        fn = int(((pred != k) & (truth == k)).sum())
        assert (one["per_class"][name]["tp"], one["per_class"][name]["fp"], one["per_class"][name]["fn"]) == (tp, fp, fn)
        assert one["per_class"][name]["iou"] == pytest.approx(tp / (tp + fp + fn))
    assert one["mean_iou"] == pytest.approx(np.mean([one["per_class"][n]["iou"] for n in ("class1", "class2")]))


def test_small_halo_caps_distances_the_same_way_in_every_decomposition(tmp_path):
    shape = (8, 48, 48)
    truth = blobs(shape, 3, classes=2)
    pred = np.zeros_like(truth)
    pred[:, :20] = truth[:, :20]  # half the objects missed: far truth surfaces hit the cap
    voxel = (4.0, 4.0, 20.0)
    pv, tv = array_volume(pred, voxel), array_volume(truth, voxel)
    cap = 30.0
    one = evaluate(pv, tv, block_shape=shape, mfd_halo_nm=cap)
    many = evaluate(pv, tv, block_shape=(3, 10, 13), mfd_halo_nm=cap)
    whole = metrics.mean_false_distance(pred == 1, truth == 1, voxel, max_distance_nm=cap)
    assert one["mfd_nm"] == pytest.approx(whole, rel=1e-12)
    assert many["mfd_nm"] == pytest.approx(whole, rel=1e-12)
    per_slice = evaluate(pv, tv, block_shape=(3, 10, 13), mfd_halo_nm=cap, mfd_per_slice=True)
    assert per_slice["mfd_nm"] == pytest.approx(
        metrics.mean_false_distance(pred == 1, truth == 1, voxel, per_slice=True, max_distance_nm=cap), rel=1e-12)


def test_z_range_threshold_and_argmax(tmp_path):
    truth = np.zeros((6, 16, 16), np.uint8)
    truth[:, 4:12, 4:12] = 1
    prob = np.where(truth == 1, 0.8, 0.1).astype(np.float32)
    prob[0] = 0.9  # slice 0 is all wrong, and outside the evaluated range
    r = evaluate(array_volume(prob), array_volume(truth), threshold=0.5, z_range="1:6", voxel_size_xyz="4,4,40")
    assert r["z_range"] == [1, 6] and r["shape"] == [5, 16, 16]
    assert r["per_class"]["foreground"]["iou"] == 1.0 and r["mfd_nm"] == 0.0
    r8 = evaluate(array_volume((prob * 255).astype(np.uint8)), array_volume(truth), threshold=0.5, z_range=slice(1, 6),
                  voxel_size_xyz="4,4,40", mfd=False)
    assert r8["mean_iou"] == 1.0 and r8["mfd_nm"] is None
    scores = np.stack([1 - prob, prob])  # c,z,y,x class scores -> argmax
    r = evaluate(array_volume(scores), array_volume(truth), z_range=(1, 6), class_names=["bg", "square"], mfd=False)
    assert r["per_class"]["square"]["iou"] == 1.0


def test_errors_name_shapes_and_labels(tmp_path):
    a = array_volume(np.zeros((4, 8, 8), np.uint8), (4, 4, 40), url="a")
    b = array_volume(np.zeros((4, 8, 9), np.uint8), (4, 4, 40), url="b")
    with pytest.raises(UserError, match=r"\(4, 8, 9\).*\(4, 8, 8\)"):
        evaluate(b, a)
    bad = np.zeros((4, 8, 8), np.uint8)
    bad[1, 2, 3] = 5
    with pytest.raises(UserError, match="truth 'bad' has 1 voxels with values outside 0..1"):
        evaluate(a, array_volume(bad, url="bad"), class_names="background,mito", block_shape=(2, 4, 4))
    with pytest.raises(UserError, match="prediction 'bad' has 1 voxels"):
        evaluate(array_volume(bad, url="bad"), a, num_classes=2)
    with pytest.raises(UserError, match="--voxel-size"):
        evaluate(array_volume(np.zeros((4, 8, 8), np.uint8)), array_volume(np.zeros((4, 8, 8), np.uint8)))
    with pytest.raises(UserError, match="selects no slices"):
        evaluate(a, a, z_range="5:9")
    with pytest.raises(UserError, match="instance ids"):
        evaluate(array_volume(np.arange(4 * 8 * 8, dtype=np.uint16).reshape(4, 8, 8) * 3, (4, 4, 40)), a)


# ------------------------------------------------------------------------------------- real data and CLI


@pytest.fixture(scope="module")
def vnc_mito(tmp_path_factory):
    if not VNC_MITO.exists():
        pytest.skip(f"shared data not found at {VNC_MITO}")
    truth = tifffile.imread(VNC_MITO)[16:20]
    eroded = np.stack([ndimage.binary_erosion(s, iterations=2) for s in truth]).astype(np.uint8)
    full = np.zeros((20,) + truth.shape[1:], np.uint8)
    full[16:20] = eroded
    path = tmp_path_factory.mktemp("vnc") / "eroded.ome.zarr"
    return truth, eroded, write_zarr(path, full, chunks=(4, 512, 512))


def test_real_mitochondria_truth_vs_itself_and_eroded(vnc_mito):
    truth, eroded, eroded_url = vnc_mito
    same = evaluate(str(VNC_MITO), str(VNC_MITO), z_range=slice(16, 20), voxel_size_xyz=(4.6, 4.6, 50),
                    class_names=["background", "mito"], block_shape=(4, 1024, 1024))  # 3-D surfaces
    mito = same["per_class"]["mito"]
    assert mito["iou"] == 1.0 and mito["f1"] == 1.0 and mito["mfd_nm"] == 0.0
    assert mito["voxels_truth"] == int(truth.sum()) > 0
    worse = evaluate(eroded_url, str(VNC_MITO), z_range="16:20", voxel_size_xyz=(4.6, 4.6, 50),
                     class_names=["background", "mito"], block_shape=(4, 512, 512), mfd_per_slice=True)
    m = worse["per_class"]["mito"]
    assert 0.5 < m["iou"] < 1.0 and m["precision"] == 1.0 and m["recall"] < 1.0
    assert m["iou"] == pytest.approx(eroded.sum() / truth.sum())
    assert 4.6 < m["mfd_nm"] < 3 * 4.6  # eroded twice in-plane: surfaces 1-2 pixels apart
    assert "mito" in format_table(worse)


def test_evaluate_cli_prints_table_and_json(tmp_path, capsys):
    truth = np.zeros((4, 16, 16), np.uint8)
    truth[:, 4:12, 4:12] = 1
    pred = np.zeros_like(truth)
    pred[:, 5:12, 4:12] = 1
    t_url, p_url = write_zarr(tmp_path / "t.zarr", truth), write_zarr(tmp_path / "p.zarr", pred)
    code = cli.main(["evaluate", "--pred", p_url, "--truth", t_url, "--slices", "1:3", "--classes", "background,mito",
                     "--block-shape", "1,8,8", "--json"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["per_class"]["mito"]["iou"] == pytest.approx(7 / 8)
    assert result["z_range"] == [1, 3] and result["voxel_size_xyz"] == [4.6, 4.6, 50.0]
    assert any(line.startswith("mito") for line in lines[:-1])
    assert cli.main(["evaluate", "--pred", p_url, "--truth", str(tmp_path / "nope.zarr")]) == 2
    assert "nope.zarr' does not exist" in capsys.readouterr().err


def test_evaluate_on_ray_matches_in_process(tmp_path, ray_local, monkeypatch):
    from vemscale.eval import evaluate as ev

    truth = blobs((6, 32, 32), 5, classes=2)
    pred = blobs((6, 32, 32), 6, classes=2)
    t_url, p_url = write_zarr(tmp_path / "t.zarr", truth), write_zarr(tmp_path / "p.zarr", pred)
    on_ray = evaluate(p_url, t_url, block_shape=(3, 16, 16))
    monkeypatch.setattr(ev, "_executor", lambda n: "local")
    local = evaluate(p_url, t_url, block_shape=(3, 16, 16))
    assert on_ray["blocks"] == 8
    assert on_ray["per_class"]["foreground"]["tp"] == local["per_class"]["foreground"]["tp"]
    assert on_ray["mfd_nm"] == local["mfd_nm"]  # same block order of the sums: the same float


def test_interrupted_evaluation_resumes_from_its_ledger(tmp_path, monkeypatch):
    """A block that fails (a corrupt chunk) stops the run with the done count; once fixed, a rerun with the same
    run_dir computes only the blocks that were missing and gives the clean result."""
    from vemscale.eval import evaluate as ev

    monkeypatch.setattr(ev, "_executor", lambda n: "local")  # blocks in order: exactly 3 done when block 3 fails
    truth = blobs((8, 32, 32), 7, classes=2)
    pred = blobs((8, 32, 32), 8, classes=2)
    t_url, p_url = write_zarr(tmp_path / "t.zarr", truth), write_zarr(tmp_path / "p.zarr", pred)
    clean = evaluate(p_url, t_url, block_shape=(2, 32, 32), num_classes=2, mfd=False)  # no halo: block 3 alone reads z 6-7
    chunk = tmp_path / "p.zarr" / "0" / "3" / "0" / "0"  # z chunk 3 lies in block 3 (of 4) of (2, 32, 32)
    good = chunk.read_bytes()
    chunk.write_bytes(b"corrupt")
    with pytest.raises(RuntimeError, match=r"evaluate failed with 3/4 blocks done"):
        evaluate(p_url, t_url, block_shape=(2, 32, 32), run_dir=tmp_path / "run", num_classes=2, mfd=False)
    chunk.write_bytes(good)
    resumed = evaluate(p_url, t_url, block_shape=(2, 32, 32), run_dir=tmp_path / "run", num_classes=2, mfd=False)
    assert resumed["per_class"] == clean["per_class"]
    assert (resumed["computed"], resumed["skipped"]) == (1, 3)
