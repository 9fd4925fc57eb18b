"""`vemscale instances`: ids across blocks equal a whole-volume cc3d (any blocks, any workers), the object table
equals scikit-image regionprops / marching cubes / a whole-object convex hull, and bad input fails before writing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from conftest import data_path
from vemscale.errors import UserError
from vemscale.io import create_ome_zarr, open_volume
from vemscale.objects.run import InstancesConfig, run_instances

SHAPE = (40, 150, 170)
VOXEL = (5.0, 5.0, 40.0)  # x,y,z nm


def reference_instances(classes: np.ndarray, connectivity: int, min_voxels: int) -> np.ndarray:
    """Whole-volume cc3d, small objects removed (cc3d.dust), renumbered in scan order (fastremap)."""
    import cc3d
    import fastremap

    lab = cc3d.connected_components(classes, connectivity=connectivity)
    if min_voxels:
        lab = cc3d.dust(lab, threshold=min_voxels, connectivity=connectivity, in_place=False)
    out, _ = fastremap.renumber(lab, preserve_zero=True, in_place=False)
    return out.astype(np.uint64)


def reference_classes(probs: np.ndarray, threshold: float) -> np.ndarray:
    """Class 1..C where p >= threshold (p stored as round(p*255)); the largest passing probability wins."""
    cut = int(np.ceil(threshold * 255))
    passing = probs >= cut
    best = np.argmax(np.where(passing, probs.astype(np.int32), -1), axis=0) + 1
    return np.where(passing.any(axis=0), best, 0).astype(np.uint8)


@pytest.fixture(scope="module")
def probs(tmp_path_factory):
    """Two classes of blobs of all sizes (smoothed noise), as a c,z,y,x uint8 OME-Zarr with class names."""
    from scipy import ndimage

    rng = np.random.default_rng(7)
    root = tmp_path_factory.mktemp("instances_src")
    noise = ndimage.gaussian_filter(rng.random(SHAPE), (1.0, 3.0, 3.0))
    noise = (noise - noise.min()) / (noise.max() - noise.min())
    p = np.stack([np.clip((noise - 0.45) * 6, 0, 1), np.clip((0.5 - noise) * 5, 0, 1)])
    p = np.rint(p * 255).astype(np.uint8)
    url = str(root / "probs.zarr")
    create_ome_zarr(url, p.shape, np.uint8, (1, 8, 64, 64), VOXEL, channel_names=["mito", "vesicle"])[...].write(p).result()
    return {"url": url, "p": p, "root": root}


def _cfg(source: str, output: Path, **kw) -> InstancesConfig:
    kw.setdefault("chunk", (8, 32, 32))
    return InstancesConfig(source=source, output=str(output), run_dir=str(output) + "_run", progress=False, **kw)


@pytest.mark.parametrize("block, workers", [((16, 64, 64), 1), ((16, 64, 64), 2), ((8, 96, 32), 1),
                                            ((8, 96, 32), 2), ((40, 160, 192), 1), ((40, 160, 192), 2)])
def test_ids_equal_whole_volume_cc3d_for_any_blocks_and_workers(probs, ray_local, tmp_path, block, workers):
    min_nm3 = 20 * 5 * 5 * 40.0  # objects under 20 voxels go
    cfg = _cfg(probs["url"], tmp_path / "out", classes=["mito", "vesicle"], block_shape=block, max_in_flight=workers,
               min_size_nm3=min_nm3, connectivity=6 if workers == 2 else 26)
    result = run_instances(cfg)
    ref = reference_instances(reference_classes(probs["p"], 0.5), cfg.connectivity, 20)
    seg = open_volume(str(tmp_path / "out" / "segmentation")).read()
    assert seg.dtype == np.uint64
    assert int(ref.max()) > 100  # enough objects, and many cross blocks, for the comparison to mean something
    assert result["crossing_components"] > 20 or block == (40, 160, 192)
    np.testing.assert_array_equal(seg, ref)
    assert result["objects"] == int(ref.max())
    table = pd.read_parquet(tmp_path / "out" / "objects")
    assert table["id"].tolist() == list(range(1, int(ref.max()) + 1))  # one row per object, sorted by id
    counts = np.bincount(ref.ravel().astype(np.int64))[1:]
    np.testing.assert_array_equal(table["voxels"].to_numpy(), counts)
    assert (table["voxels"] >= 20).all()
    assert sum(result["per_class"].values()) == result["objects"]
    assert (tmp_path / "out" / "plots" / "objects.png").stat().st_size > 5000


def reference_watershed(classes: np.ndarray, voxel_zyx: tuple[float, ...], h_nm: float, min_voxels: int,
                        max_object_voxels: int) -> np.ndarray:
    """Whole-volume seeded watershed, written from scipy/scikit-image alone: per class, the distance transform of
    the class mask, markers = 26-connected h-maxima, watershed of -distance inside the mask; an object without
    two markers, or whose bounding box (+1 voxel) is over `max_object_voxels`, stays its cc3d object; pieces
    numbered in scan order, small ones removed."""
    import cc3d
    import fastremap
    from scipy import ndimage
    from skimage.morphology import h_maxima
    from skimage.segmentation import watershed

    cc = cc3d.connected_components(classes, connectivity=26).astype(np.int64)
    pieces = np.zeros(classes.shape, np.int64)
    offset = 0
    for c in np.unique(classes[classes > 0]):
        mask = classes == c
        dist = ndimage.distance_transform_edt(mask, sampling=voxel_zyx)
        markers = cc3d.connected_components((h_maxima(dist, h_nm) > 0).astype(np.uint8), connectivity=26)
        ws = watershed(-dist, markers, mask=mask, connectivity=3).astype(np.int64)
        pieces[mask] = ws[mask] + offset
        offset += int(ws.max()) + 1
    for o, sl in enumerate(ndimage.find_objects(cc), start=1):
        grown = [slice(max(0, s.start - 1), min(n, s.stop + 1)) for s, n in zip(sl, cc.shape)]
        obj = cc == o
        n_markers = len(np.unique(pieces[obj]))
        if n_markers < 2 or np.prod([s.stop - s.start for s in grown]) > max_object_voxels:
            pieces[obj] = offset + o  # one piece: the whole object
    lab = cc3d.connected_components(pieces, connectivity=26)  # pieces are connected: this only renumbers
    if min_voxels:
        lab = cc3d.dust(lab, threshold=min_voxels, connectivity=26, in_place=False)
    out, _ = fastremap.renumber(lab, preserve_zero=True, in_place=False)
    return out.astype(np.uint64)


@pytest.fixture(scope="module")
def touching(tmp_path_factory):
    """Two classes of balls that touch in pairs and chains (one cc3d object each, several cells), some across
    classes, as a z,y,x label OME-Zarr with 10 x 10 x 20 nm voxels."""
    rng = np.random.default_rng(3)
    shape, voxel = (24, 96, 120), (10.0, 10.0, 20.0)
    zz, yy, xx = np.mgrid[: shape[0], : shape[1], : shape[2]]
    labels = np.zeros(shape, np.uint8)
    for k in range(16):
        cls = 1 + (k % 3 == 2)
        r = rng.uniform(70, 110)  # nm
        c = np.array([rng.uniform(0, shape[0] * 20), rng.uniform(0, shape[1] * 10), rng.uniform(0, shape[2] * 10)])
        step = rng.normal(size=3) * np.array([0.3, 1, 1])
        step *= 1.6 * r / np.linalg.norm(step)
        for _ in range(1 + k % 3):  # single balls, pairs and chains of three, overlapping by a neck
            inside = ((zz * 20 - c[0]) ** 2 + (yy * 10 - c[1]) ** 2 + (xx * 10 - c[2]) ** 2) <= r * r
            labels[inside] = cls
            c = c + step
    root = tmp_path_factory.mktemp("touching")
    url = str(root / "labels.zarr")
    create_ome_zarr(url, shape, np.uint8, (8, 32, 32), voxel)[...].write(labels).result()
    return {"url": url, "labels": labels, "voxel": voxel}


@pytest.mark.parametrize("block, workers, max_voxels", [((8, 32, 32), 2, 1 << 26), ((12, 48, 40), 1, 1 << 26),
                                                        ((24, 96, 120), 1, 20000)])
def test_watershed_split_equals_a_whole_volume_watershed_for_any_blocks(touching, ray_local, tmp_path, block,
                                                                         workers, max_voxels):
    import cc3d

    h_nm, min_voxels = 20.0, 10
    cfg = _cfg(touching["url"], tmp_path / "out", classes=["1", "2"], block_shape=block, max_in_flight=workers,
               chunk=(4, 16, 8), split="watershed", watershed={"h_nm": h_nm, "max_object_voxels": max_voxels},
               min_size_nm3=min_voxels * 10 * 10 * 20.0)
    result = run_instances(cfg)
    ref = reference_watershed(touching["labels"], touching["voxel"][::-1], h_nm, min_voxels, max_voxels)
    seg = open_volume(str(tmp_path / "out" / "segmentation")).read()
    whole = cc3d.connected_components(touching["labels"], connectivity=26).max()
    # the split is real: more pieces than objects, and the unsplit case (small max_object_voxels) has some
    assert int(ref.max()) >= whole + 3
    np.testing.assert_array_equal(seg, ref)
    assert result["objects"] == int(ref.max())
    assert result["split"]["objects_before"] == whole
    print("objects", whole, "pieces", int(ref.max()), result["split"])
    assert result["split"]["objects_split"] >= 2
    assert result["split"]["objects_too_large"] == (2 if max_voxels == 20000 else 0)  # bounding boxes of 87,100 and 31,920
    table = pd.read_parquet(tmp_path / "out" / "objects")
    np.testing.assert_array_equal(table["voxels"].to_numpy(), np.bincount(ref.ravel().astype(np.int64))[1:])
    if max_voxels == 20000:  # another size threshold: only the pieces' ids and table are made again
        again = run_instances(cfg.model_copy(update={"min_size_nm3": 300 * 10 * 10 * 20.0}))
        assert again["blocks"]["split"]["computed"] == 0 and again["blocks"]["cc_relabel"]["computed"] == 0
        assert again["blocks"]["relabel"]["computed"] == again["blocks"]["relabel"]["blocks"]
        ref = reference_watershed(touching["labels"], touching["voxel"][::-1], h_nm, 300, max_voxels)
        np.testing.assert_array_equal(open_volume(str(tmp_path / "out" / "segmentation")).read(), ref)


def test_distance_seeds_split_a_dumbbell_at_its_neck_and_keep_an_unseeded_object_whole():
    from vemscale.post.split import WatershedParams, split_object

    zz, yy, xx = np.mgrid[:20, :40, :80]
    voxel = (20.0, 10.0, 10.0)  # z,y,x nm
    ball = lambda cx: ((zz - 9.5) * 2) ** 2 + (yy - 19.5) ** 2 + (xx - cx) ** 2 <= 15 ** 2  # radius 150 nm
    neck = (np.abs(zz - 9.5) * 2 <= 3) & (np.abs(yy - 19.5) <= 3) & (xx > 20) & (xx < 60)
    dumbbell = ball(20) | ball(60) | neck
    pieces = split_object(dumbbell, voxel, WatershedParams(seeds="distance", seed_distance_nm=100.0))
    assert pieces.max() == 2 and np.array_equal(pieces > 0, dumbbell)
    assert pieces[10, 20, 20] == 1 and pieces[10, 20, 60] == 2  # numbered by first voxel: the left ball first
    left = (pieces == 1).sum() / dumbbell.sum()
    assert 0.45 < left < 0.55 and not ((pieces == 1) & (xx > 45)).any()  # cut near the middle of the neck
    whole = split_object(dumbbell, voxel, WatershedParams(seeds="distance", seed_distance_nm=200.0))
    assert whole.max() == 1 and np.array_equal(whole > 0, dumbbell)  # no voxel 200 nm inside: one piece, kept


def test_an_object_across_eight_blocks_is_one_object(ray_local, tmp_path):
    from skimage.measure import marching_cubes, mesh_surface_area

    zz, yy, xx = np.mgrid[:32, :64, :64]
    # a ball of radius 160 nm at 10 x 10 x 20 nm voxels, centred on the corner that 8 blocks share
    voxel = (10.0, 10.0, 20.0)
    ball = ((zz - 15.5) / 8) ** 2 + ((yy - 31.5) / 16) ** 2 + ((xx - 31.5) / 16) ** 2 <= 1
    tifffile.imwrite(tmp_path / "ball.tif", ball.astype(np.uint8))
    result = run_instances(_cfg(str(tmp_path / "ball.tif"), tmp_path / "out", classes=["1"], voxel_size=voxel,
                                block_shape=(16, 32, 32)))
    assert result["objects"] == 1
    row = pd.read_parquet(tmp_path / "out" / "objects").iloc[0]
    assert row["voxels"] == int(ball.sum()) and row["blocks"] == 8 and not row["touches_edge"]
    verts, faces, _, _ = marching_cubes(np.pad(ball, 1).astype(np.float32), 0.5, spacing=voxel[::-1])
    assert row["surface_nm2"] == pytest.approx(mesh_surface_area(verts, faces), rel=1e-3)
    print("ball sphericity", row["sphericity"], "solidity", row["solidity"])
    assert 0.85 < row["sphericity"] <= 1.0 and 0.85 < row["solidity"] <= 1.0  # a 2:1 ellipsoid scores ~0.73

    # exported with meshes in blocks of the same 8: one closed mesh, and the table's values as segment properties
    import trimesh
    from cloudvolume import CloudVolume

    from vemscale.export.run import ExportConfig, run_export

    layer = tmp_path / "layer"
    exported = run_export(ExportConfig(source=str(tmp_path / "out" / "segmentation"), dest=str(layer), mesh=True,
                                       chunk=(16, 32, 32), task_voxels=16 * 32 * 32, mesh_reduction=10,
                                       run_dir=str(tmp_path / "export_run")))
    assert exported["meshes"]["fragments"] == 8  # meshed in 8 blocks: one fragment each
    mesh = CloudVolume(f"file://{layer}", progress=False).mesh.get(1)  # read by an independent client
    mesh = mesh[1] if isinstance(mesh, dict) else mesh
    closed = trimesh.Trimesh(mesh.vertices, mesh.faces, process=True)  # Draco splits vertices: merge them again
    assert closed.is_watertight and closed.is_volume
    assert closed.volume == pytest.approx(row["volume_nm3"], rel=0.1)  # the mesh encloses the object
    props = json.loads((layer / "segment_properties" / "info").read_text())["inline"]
    assert props["ids"] == ["1"]
    values = {p["id"]: p["values"][0] for p in props["properties"]}
    assert values["label"] == "1 1" and values["voxels"] == row["voxels"]
    assert values["volume_um3"] == pytest.approx(row["volume_nm3"] * 1e-9, rel=1e-5)
    assert values["surface_um2"] == pytest.approx(row["surface_nm2"] * 1e-6, rel=1e-5)


def test_table_equals_regionprops_on_real_mitochondria(ray_local, tmp_path):
    """Ground-truth mitochondria of the VNC stack: rows vs regionprops, marching cubes and whole-object hulls."""
    import cc3d
    from scipy.spatial import ConvexHull
    from skimage.measure import marching_cubes, mesh_surface_area, regionprops

    mito = tifffile.imread(data_path("vnc_drosophila_sstem", "train", "labels_mitochondria.tif"))[:12, :512, :512]
    tifffile.imwrite(tmp_path / "mito.tif", mito)
    voxel = (4.6, 4.6, 45.0)
    run_instances(_cfg(str(tmp_path / "mito.tif"), tmp_path / "out", classes=["1"], voxel_size=voxel,
                       block_shape=(8, 192, 128), chunk=(4, 64, 64)))
    ref = cc3d.connected_components(mito, connectivity=26)
    table = pd.read_parquet(tmp_path / "out" / "objects").set_index("id")
    props = regionprops(ref)
    assert len(table) == len(props) > 10
    spacing = np.asarray(voxel[::-1])
    for p in props:
        row = table.loc[p.label]
        assert row["voxels"] == p.area
        assert (row["bbox_z0"], row["bbox_y0"], row["bbox_x0"], row["bbox_z1"], row["bbox_y1"], row["bbox_x1"]) == p.bbox
        np.testing.assert_allclose([row["centroid_z"], row["centroid_y"], row["centroid_x"]], p.centroid, rtol=1e-9)
        assert row["volume_nm3"] == pytest.approx(p.area * np.prod(voxel))
        mask = np.pad(ref == p.label, 1).astype(np.float32)
        verts, faces, _, _ = marching_cubes(mask, 0.5, spacing=tuple(spacing))
        assert row["surface_nm2"] == pytest.approx(mesh_surface_area(verts, faces), rel=2e-2)
        z, y, x = np.nonzero(ref == p.label)
        corners = np.concatenate([np.stack([z + a, y + b, x + c], 1) for a in (0, 1) for b in (0, 1) for c in (0, 1)])
        assert row["convex_volume_nm3"] == pytest.approx(ConvexHull(corners * spacing).volume, rel=1e-9)
        touches = min(p.bbox[:3]) == 0 or any(hi == n for hi, n in zip(p.bbox[3:], mito.shape))
        assert bool(row["touches_edge"]) == touches


def _done(output: Path, step: str) -> int:
    """Blocks the step's ledger marks done (its current generation), read from the files."""
    meta = json.loads((output / ".vemscale-ledger" / step / "ledger.json").read_text())
    gen = output / ".vemscale-ledger" / step / str(meta["generation"])
    total = 0
    for key in gen.rglob("*-*"):
        lo, _, hi = key.name.partition("-")
        if lo.isdigit() and hi.isdigit():  # not a store's transient lock or temp file
            total += int(hi) - int(lo)
    return total


def test_sharded_segmentation_equals_cc3d_and_zarr_reads_it(probs, ray_local, tmp_path):
    """sharded=true: zarr v3 shards (one writer each: shards divide the block) hold the same ids as cc3d."""
    import zarr

    out = tmp_path / "out"
    result = run_instances(_cfg(probs["url"], out, classes=["mito", "vesicle"], block_shape=(16, 64, 64),
                                sharded=True, shard_shape=(16, 64, 32)))
    assert result["sharded"] and result["shard_shape"] == [16, 64, 32]
    ref = reference_instances(reference_classes(probs["p"], 0.5), 26, 0)
    z = zarr.open_array(str(out / "segmentation" / "0"), mode="r")
    assert z.metadata.zarr_format == 3 and tuple(z.shards) == (16, 64, 32) and tuple(z.chunks) == (8, 32, 32)
    np.testing.assert_array_equal(z[...], ref)
    np.testing.assert_array_equal(open_volume(str(out / "segmentation")).read(), ref)
    shards = [p for p in (out / "segmentation" / "0").rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert len(shards) == 3 * 3 * 6  # z 40/16, y 150/64, x 170/32 shards, vs 5 * 5 * 6 chunks unsharded
    group = json.loads((out / "zarr.json").read_text())
    assert group["node_type"] == "group" and group["attributes"]["vemscale"]["kind"] == "instances"
    assert not (out / ".zattrs").exists()
    with pytest.raises(UserError, match="does not divide block_shape"):
        run_instances(_cfg(probs["url"], tmp_path / "bad", classes=["mito"], block_shape=(16, 64, 64),
                           sharded=True, shard_shape=(16, 96, 32)))
    assert not (tmp_path / "bad").exists()


def test_precomputed_sharded_segmentation_equals_cc3d_and_cloudvolume_reads_it(probs, ray_local, tmp_path):
    """segmentation_format=precomputed, sharded: a Neuroglancer layer (Morton shards of 2x2x2 chunks, one writer
    each) with cc3d's ids, read by cloud-volume; resuming it as zarr is refused before anything changes."""
    from cloudvolume import CloudVolume

    out = tmp_path / "out"
    cfg = _cfg(probs["url"], out, classes=["mito", "vesicle"], block_shape=(16, 64, 64), sharded=True,
               segmentation_format="precomputed")
    result = run_instances(cfg)
    assert result["sharded"] and result["shard_shape"] == [16, 64, 64]
    ref = reference_instances(reference_classes(probs["p"], 0.5), 26, 0)
    info = json.loads((out / "segmentation" / "info").read_text())
    scale = info["scales"][0]
    assert info["type"] == "segmentation" and info["data_type"] == "uint64"
    assert scale["encoding"] == "compressed_segmentation" and scale["sharding"]["@type"] == "neuroglancer_uint64_sharded_v1"
    cv = CloudVolume("file://" + str(out / "segmentation"), mip=0, fill_missing=False, progress=False)
    np.testing.assert_array_equal(np.asarray(cv[:, :, :])[..., 0].transpose(2, 1, 0), ref)
    np.testing.assert_array_equal(open_volume(str(out / "segmentation")).read(), ref)
    assert len(list((out / "segmentation" / scale["key"]).glob("*.shard"))) == 3 * 3 * 3  # vs 5 * 5 * 6 chunks
    assert pd.read_parquet(out / "objects")["id"].tolist() == list(range(1, int(ref.max()) + 1))
    from vemscale.export.properties import instance_table

    for url in (str(out / "segmentation"), "precomputed://" + str(out / "segmentation")):  # export finds the table
        assert instance_table(url).rstrip("/").endswith(str(out / "objects")), url
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(UserError, match="exists as precomputed"):
        run_instances(cfg.model_copy(update={"segmentation_format": "zarr"}))
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_another_min_size_reruns_only_the_last_passes(probs, ray_local, tmp_path):
    out = tmp_path / "out"
    cfg = _cfg(probs["url"], out, classes=["mito", "vesicle"], block_shape=(8, 64, 64))
    first = run_instances(cfg)
    assert all(b["skipped"] == 0 for b in first["blocks"].values())
    same = run_instances(cfg)  # a finished run recomputes nothing
    assert all(b["computed"] == 0 for b in same["blocks"].values())
    again = run_instances(cfg.model_copy(update={"min_size_nm3": 50 * 5 * 5 * 40.0}))
    b = again["blocks"]
    assert b["label"]["computed"] == b["faces"]["computed"] == 0 and b["relabel"]["computed"] == b["relabel"]["blocks"]
    ref = reference_instances(reference_classes(probs["p"], 0.5), 26, 50)
    np.testing.assert_array_equal(open_volume(str(out / "segmentation")).read(), ref)
    table = pd.read_parquet(out / "objects")
    assert table["id"].tolist() == list(range(1, int(ref.max()) + 1))  # no row of the earlier table is left


@pytest.mark.slow  # ~22 s, most of it a second Ray start-up; the engine's kill tests run in the default suite
def test_killed_run_resumes_recomputing_only_the_missing_blocks(probs, tmp_path):
    from conftest import kill_cli_when

    out = tmp_path / "out"
    args = {"classes": "mito,vesicle", "block_shape": "8,64,64", "chunk": "8,32,32", "blocks_per_batch": 1,
            "max_in_flight": 1, "progress": "false"}
    cmd = ["instances", f"source={probs['url']}", f"output={out}", f"run_dir={tmp_path / 'run'}",
           *[f"{k}={v}" for k, v in args.items()]]
    kill_cli_when(cmd, lambda: (out / ".vemscale-ledger" / "relabel" / "ledger.json").exists()
                  and _done(out, "relabel") >= 3, timeout=180, poll=0.01)
    done = _done(out, "relabel")
    blocks = 5 * 3 * 3
    assert 3 <= done < blocks, "the kill should land inside the relabel pass"
    cfg = _cfg(probs["url"], out, classes=["mito", "vesicle"], block_shape=(8, 64, 64), blocks_per_batch=1)
    resumed = run_instances(cfg)
    b = resumed["blocks"]
    assert b["label"]["computed"] == 0 and b["faces"]["computed"] == 0
    assert (b["relabel"]["computed"], b["relabel"]["skipped"]) == (blocks - done, done)
    ref = reference_instances(reference_classes(probs["p"], 0.5), 26, 0)
    np.testing.assert_array_equal(open_volume(str(out / "segmentation")).read(), ref)
    assert len(pd.read_parquet(out / "objects")) == int(ref.max())


# --- bad input: each fails before anything is written ----------------------------------------------------------

def test_bad_input_fails_before_writing(probs, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"no probabilities for class\(es\) \['nucleus'\].*\['mito', 'vesicle'\]"):
        run_instances(_cfg(probs["url"], out, classes=["nucleus"]))
    with pytest.raises(UserError, match="min_size_nm3 -1.0 must be >= 0"):
        run_instances(_cfg(probs["url"], out, classes=["mito"], min_size_nm3=-1))
    with pytest.raises(UserError, match="threshold"):
        run_instances(_cfg(probs["url"], out, classes=["mito"], threshold=1.5))
    with pytest.raises(UserError, match="whole multiple"):
        run_instances(_cfg(probs["url"], out, classes=["mito"], block_shape=(8, 50, 64)))
    with pytest.raises(UserError, match="does not exist|No such|not found"):
        run_instances(_cfg(str(tmp_path / "missing.zarr"), out))
    assert not out.exists()
    other = tmp_path / "other"
    create_ome_zarr(str(other / "segmentation"), (4, 8, 8), np.uint64, (4, 8, 8), VOXEL)
    before = sorted(str(p.relative_to(other)) for p in other.rglob("*"))
    with pytest.raises(UserError, match="exists with shape"):
        run_instances(_cfg(probs["url"], other, classes=["mito"]))
    assert sorted(str(p.relative_to(other)) for p in other.rglob("*")) == before


# --- real data, the whole user path: fine-tune, infer, instances, score against ground-truth objects -------------

@pytest.mark.slow  # ~4 min on 2 cores (fine-tuning); BENCHMARKS.md records its F1
def test_vnc_mitochondria_objects_from_a_finetuned_checkpoint(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    def cli(*args: str, timeout: int = 900) -> dict:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        r = subprocess.run([sys.executable, "-m", "vemscale.cli", *args, "--json"], capture_output=True, text=True,
                           cwd=ROOT, env=env, timeout=timeout)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    vnc = data_path("vnc_drosophila_sstem", "train")
    ft = cli("finetune", "configs/finetune_vnc_mito.yaml", "train.iterations=300", "train.batch_size=4",
             "train.val_every=300", "train.checkpoint_every=300", f"run_dir={tmp_path / 'ft'}")
    cli("infer", "configs/infer.yaml", f"input={vnc / 'image.tif'}", f"output={tmp_path / 'pred'}",
        f"checkpoint={ft['checkpoint']}", "roi=16:20,0:1024,0:1024", "block_shape=4,512,512", "output_chunks=4,128,128",
        "write=both", "progress=false", f"run_dir={tmp_path / 'infer'}")
    size = "min_size_nm3=2e6"  # ~2,000 voxels at 4.6 x 4.6 x 50 nm: the smallest mitochondria of the labels are larger
    pred = cli("instances", "configs/instances.yaml", f"source={tmp_path / 'pred'}", f"output={tmp_path / 'objects'}",
               "classes=mitochondria", size, "voxel_size=4.6,4.6,50", "block_shape=4,256,256", "chunk=4,128,128", "progress=false",
               f"run_dir={tmp_path / 'inst'}")
    split = cli("instances", "configs/instances.yaml", f"source={tmp_path / 'pred'}", f"output={tmp_path / 'split'}",
                "classes=mitochondria", size, "voxel_size=4.6,4.6,50", "block_shape=4,256,256", "chunk=4,128,128",
                "split=watershed", "watershed.h_nm=20", "progress=false", f"run_dir={tmp_path / 'inst_split'}")
    truth = cli("instances", f"source={vnc / 'labels_mitochondria.tif'}", f"output={tmp_path / 'truth'}", "classes=1",
                "voxel_size=4.6,4.6,50", "block_shape=4,256,256", "chunk=4,128,128", "progress=false",
                f"run_dir={tmp_path / 'inst_truth'}")
    # trivial baseline: dark blobs (mitochondria are dark in ssTEM): the smoothed image's darkest 5.4 % (the
    # mitochondria's share of voxels), the same size filter
    from scipy import ndimage

    em = ndimage.gaussian_filter(tifffile.imread(vnc / "image.tif").astype(np.float32), (0, 4, 4))
    dark = (em < np.quantile(em[16:20], 0.054)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "dark.tif", dark)
    cli("instances", f"source={tmp_path / 'dark.tif'}", f"output={tmp_path / 'dark'}", "classes=1", size,
        "voxel_size=4.6,4.6,50", "block_shape=4,256,256", "chunk=4,128,128", "progress=false",
        f"run_dir={tmp_path / 'inst_dark'}")
    scores = cli("evaluate", "--pred", str(tmp_path / "objects" / "segmentation"), "--truth",
                 str(tmp_path / "truth" / "segmentation"), "--instances", "--slices", "16:20")
    split_scores = cli("evaluate", "--pred", str(tmp_path / "split" / "segmentation"), "--truth",
                       str(tmp_path / "truth" / "segmentation"), "--instances", "--slices", "16:20")
    print(f"with split=watershed (h 20 nm): F1@0.5 {split_scores['f1@0.5']:.3f}, {split['objects']} objects "
          f"({split['split']['objects_split']} of {split['split']['objects_before']} split), "
          f"merged predicted {split_scores['merged_pred_objects']}, split truth {split_scores['split_truth_objects']} "
          f"(without: {scores['merged_pred_objects']}, {scores['split_truth_objects']})")
    base = cli("evaluate", "--pred", str(tmp_path / "dark" / "segmentation"), "--truth",
               str(tmp_path / "truth" / "segmentation"), "--instances", "--slices", "16:20")
    print(f"VNC mitochondria objects, slices 16-19: F1@0.5 {scores['f1@0.5']:.3f} (dark-voxel baseline "
          f"{base['f1@0.5']:.3f}), F1@0.75 {scores['f1@0.75']:.3f}, AP {scores['ap_50_95']:.3f}, PQ {scores['pq']:.3f}, "
          f"{scores['objects_pred']} predicted / {scores['objects_truth']} true objects; {pred['objects']} objects")
    assert truth["objects"] > 20 and scores["objects_truth"] > 20
    assert scores["f1@0.5"] >= 0.5 and scores["f1@0.5"] > base["f1@0.5"] + 0.2
    assert split_scores["f1@0.5"] > base["f1@0.5"] + 0.2  # the split keeps the objects (no shredding into crumbs)
