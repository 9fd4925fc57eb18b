"""Precomputed export end to end on real ssTEM crops: image + segmentation layers with 3-scale pyramids (sharded
and not) read back at every scale through tensorstore and compared with a numpy reference; segment properties;
blockwise meshes that close across block seams; and an independent client (cloud-volume) reading what we wrote."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import tensorstore as ts
import tifffile

from conftest import data_path
from vemscale.config import build_config
from vemscale.errors import UserError
from vemscale.export.precomputed import create_precomputed, open_scale, read_info, write_chunk_aligned_block, \
    write_chunk_shape
from vemscale.export.pyramid import plan_factors
from vemscale.export.run import ExportConfig, run_export
from vemscale.io import create_ome_zarr

VOXEL = (4.6, 4.6, 50.0)
CROP = (slice(0, 10), slice(100, 400), slice(200, 460))  # z,y,x: odd sizes, so edge chunks are partial


# ---------- numpy reference (independent of tensorstore) ----------

def _block_sums(a: np.ndarray, f: tuple[int, int, int]) -> np.ndarray:
    """Sum over f-blocks (edge blocks partial), by padding with zeros and reshaping."""
    pad = [(0, -s % k) for s, k in zip(a.shape, f)]
    p = np.pad(a, pad)
    shape = [n for s, k in zip(p.shape, f) for n in (s // k, k)]
    return p.reshape(shape).sum(axis=(1, 3, 5))


def reference_downsample(a: np.ndarray, f: tuple[int, int, int], method: str) -> np.ndarray:
    """Mean (round half to even) or mode (most frequent, smallest on ties) over f-blocks; edge blocks use what exists."""
    n = _block_sums(np.ones(a.shape, np.int64), f)
    if method == "mean":
        return np.rint(_block_sums(a.astype(np.float64), f) / n).astype(a.dtype)
    values = np.unique(a)  # ascending, so argmax (first maximum) picks the smallest value on ties
    counts = np.stack([_block_sums((a == v).astype(np.int64), f) for v in values], axis=-1)
    return values[np.argmax(counts, axis=-1)].astype(a.dtype)


@pytest.fixture(scope="module")
def crops(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Real crops written as OME-Zarr sources: EM (uint8), class labels (0..4), mitochondria instances."""
    from scipy import ndimage

    root = tmp_path_factory.mktemp("export_src")
    em = tifffile.imread(data_path("vnc_drosophila_sstem", "train", "image.tif"))[CROP]
    classes = tifffile.imread(data_path("vnc_drosophila_sstem", "train", "labels.tif"))[CROP]
    mito = tifffile.imread(data_path("vnc_drosophila_sstem", "train", "labels_mitochondria.tif"))[CROP]
    objects, _ = ndimage.label(mito > 0)
    out: dict[str, object] = {"root": root, "em": em, "classes": classes, "objects": objects.astype(np.uint32)}
    for name, arr in (("em", em), ("classes", classes), ("objects", objects.astype(np.uint32))):
        store = create_ome_zarr(str(root / f"{name}.zarr"), arr.shape, arr.dtype, (8, 128, 128), VOXEL)
        store.write(arr).result()
        out[f"{name}_url"] = str(root / f"{name}.zarr")
    return out


def _export(**kw: object) -> dict:
    base = {"chunk": (4, 64, 64), "task_voxels": 2**15, "shard_voxels": 2**16, "run_dir": str(kw["dest"]) + "_run"}
    return run_export(build_config(ExportConfig, {**base, **kw}))


def test_plan_factors_anisotropic_then_isotropic() -> None:
    assert plan_factors((4, 4, 40), (200, 8192, 8192), (16, 64, 64), max_scales=6) == [
        (1, 2, 2), (1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2)]
    assert plan_factors((8, 8, 8), (512, 512, 512), (64, 64, 64)) == [(2, 2, 2)] * 3
    assert plan_factors((4.6, 4.6, 50), (10, 300, 260), (4, 64, 64), max_scales=3) == [(1, 2, 2), (1, 2, 2)]


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.uint64])
def test_in_memory_downsampling_equals_the_reference_and_tensorstore(dtype) -> None:
    """The fused levels' downsampling (numpy fast path, tensorstore for the rest) on windows with ties, uniform
    windows and extreme values: the numpy reference's values and tensorstore's bytes, mean and mode."""
    from vemscale.export.pyramid import downsample_array

    rng = np.random.default_rng(0)
    info = np.iinfo(dtype)
    for f in ((1, 2, 2), (2, 2, 2), (1, 2, 1), (1, 4, 4)):
        for shape in ((4, 16, 24), (2, 4, 16, 24), (5, 15, 24)):  # divisible; channels; partial edge windows
            wide = rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
            labels = rng.integers(0, 3, shape).astype(dtype)  # ties (2 + 2) and 2 + 1 + 1 windows
            labels[..., :4, :8] = 7  # uniform windows
            for data, method in ((wide, "mean"), (labels, "mean"), (labels, "mode"), (wide, "mode")):
                got = downsample_array(data, f, method)
                lead = (1,) * (data.ndim - 3)
                expected = ts.downsample(ts.array(data), [*lead, *f], method=method).read().result()
                assert got.dtype == data.dtype and got.shape == expected.shape
                np.testing.assert_array_equal(got, expected, err_msg=f"{method} {f} {shape}")
                if data.ndim == 3 and (method == "mode" or data.dtype.itemsize < 8):
                    np.testing.assert_array_equal(got, reference_downsample(data, f, method))


@pytest.mark.parametrize("sharded,task_voxels", [(False, 2**15), (True, 2**15), (False, 2**20), (True, 2**20)],
                         ids=["unsharded", "sharded", "fused-levels", "sharded-fused-levels"])
def test_image_and_segmentation_pyramids_match_numpy(ray_local, crops, tmp_path: Path, sharded: bool,
                                                     task_voxels: int) -> None:
    """Every scale equals the numpy reference, whether levels are computed level by level from the stored scale
    below (small blocks) or written by the scale-0 blocks from memory (blocks of 10x256x256: levels 1 and 2)."""
    em, classes = crops["em"], crops["classes"]
    names = ["background", "membrane", "glia", "mitochondria", "synapse"]
    img = _export(source=crops["em_url"], dest=str(tmp_path / "em"), pyramid=True, max_scales=3, sharded=sharded,
                  task_voxels=task_voxels)
    seg = _export(source=crops["classes_url"], dest=str(tmp_path / "seg"), layer_type="segmentation", pyramid=True,
                  max_scales=3, sharded=sharded, classes=names, task_voxels=task_voxels)
    assert img["type"] == "image" and seg["type"] == "segmentation" and seg["dtype"] == "uint32"
    fused = [[s["scale"] for s in r["scales"] if s.get("fused_into")] for r in (img, seg)]
    if task_voxels == 2**15:
        assert fused == [[], []]
    else:  # sharded: levels fuse while a block's box is whole shards of theirs
        assert fused[0] == fused[1] and (fused[0] == [1, 2] if not sharded else fused[0][:1] == [1])
    for layer, ref0, method, encoding in ((tmp_path / "em", em, "mean", "raw"),
                                          (tmp_path / "seg", classes.astype(np.uint32), "mode", "compressed_segmentation")):
        info = read_info(str(layer))
        assert [s["resolution"] for s in info["scales"]] == [[4.6, 4.6, 50.0], [9.2, 9.2, 50.0], [18.4, 18.4, 50.0]]
        assert all(("sharding" in s) == sharded and s["encoding"] == encoding for s in info["scales"])
        ref = ref0
        for s in range(3):
            if s:
                ref = reference_downsample(ref, (1, 2, 2), method)
            got = open_scale(str(layer), s).read().result()
            assert got.shape == ref.shape and got.dtype == ref.dtype
            np.testing.assert_array_equal(got, ref, err_msg=f"{layer.name} scale {s}")
        store = open_scale(str(layer), 0)
        if sharded:  # several shards, and the writers' boxes were whole shards
            assert len(list((layer / info["scales"][0]["key"]).glob("*.shard"))) > 1
            assert np.prod(write_chunk_shape(store)) > np.prod(store.chunk_layout.read_chunk.shape)
    props = json.loads((tmp_path / "seg" / "segment_properties" / "info").read_text())
    ids, counts = np.unique(classes[classes > 0], return_counts=True)
    assert props["inline"]["ids"] == [str(i) for i in ids]
    assert props["inline"]["properties"][0]["values"] == [names[i] for i in ids]
    np.testing.assert_allclose(props["inline"]["properties"][1]["values"], counts * np.prod(VOXEL) * 1e-9, rtol=1e-5)
    assert read_info(str(tmp_path / "seg"))["segment_properties"] == "segment_properties"


def _cloudvolume_mesh(layer: Path, label: int) -> tuple[np.ndarray, np.ndarray]:
    """One label's mesh as cloud-volume decodes it (an independent reader of sharded multi-resolution meshes)."""
    from cloudvolume import CloudVolume

    mesh = CloudVolume(f"file://{layer}", progress=False).mesh.get(label)
    mesh = mesh[label] if isinstance(mesh, dict) else mesh
    return np.asarray(mesh.vertices, np.float64), np.asarray(mesh.faces).reshape(-1, 3)


def test_meshes_close_across_blocks_and_cloudvolume_reads_everything(ray_local, crops, tmp_path: Path) -> None:
    from cloudvolume import CloudVolume

    from vemscale.export.meshes import mesh_ids

    objects, em = crops["objects"], crops["em"]
    seg = _export(source=crops["objects_url"], dest=str(tmp_path / "obj"), layer_type="segmentation", pyramid=True,
                  max_scales=2, mesh=True, mesh_scale=0, mesh_reduction=0, sharded=True)
    _export(source=crops["em_url"], dest=str(tmp_path / "em"), pyramid=True, max_scales=2, encoding="jpeg")
    ids, counts = np.unique(objects[objects > 0], return_counts=True)
    assert seg["meshes"]["labels"] == len(ids) and seg["meshes"]["fragments"] > len(ids)  # some span several blocks
    mesh_dir = tmp_path / "obj" / "mesh"
    info = json.loads((mesh_dir / "info").read_text())
    assert info["@type"] == "neuroglancer_multilod_draco" and info["sharding"]["@type"] == "neuroglancer_uint64_sharded_v1"
    assert read_info(str(tmp_path / "obj"))["mesh"] == "mesh"
    # a few files, not one or two per object and block: the shard(s) and the info, the per-block scratch gone
    assert sorted(p.name for p in mesh_dir.iterdir()) == ["0.shard", "info"]
    # tensorstore's sharded key-value store finds one manifest per label, and nothing else
    shard_kv = ts.KvStore.open({"driver": "neuroglancer_uint64_sharded", "metadata": info["sharding"],
                                "base": f"file://{mesh_dir}/"}).result()
    assert all(shard_kv.read(struct.pack(">Q", int(i))).result().state == "value" for i in ids)
    assert shard_kv.read(struct.pack(">Q", int(ids.max()) + 1)).result().state == "missing"
    assert mesh_ids(str(tmp_path / "obj")) == [int(i) for i in ids]

    big = int(ids[np.argmax(counts)])
    verts, faces = _cloudvolume_mesh(tmp_path / "obj", big)
    # one surface: after welding equal vertices every edge has exactly two triangles (no seams at block faces)
    _, weld = np.unique(np.round(verts, 1), axis=0, return_inverse=True)
    tri = weld.ravel()[faces]
    tri = tri[(tri[:, 0] != tri[:, 1]) & (tri[:, 1] != tri[:, 2]) & (tri[:, 0] != tri[:, 2])]
    edges = np.sort(np.concatenate([tri[:, [0, 1]], tri[:, [1, 2]], tri[:, [2, 0]]]), axis=1)
    _, uses = np.unique(edges, axis=0, return_counts=True)
    assert (uses == 2).all(), f"{(uses != 2).sum()} open edges"
    # the surface bounds the object's voxels: voxel i spans [i, i+1) * voxel size; 16-bit positions over its box
    zz, yy, xx = np.nonzero(objects == big)
    lo = np.array([xx.min(), yy.min(), zz.min()]) * VOXEL
    hi = (np.array([xx.max(), yy.max(), zz.max()]) + 1) * VOXEL
    assert (np.abs(verts.min(0) - lo) <= 0.51 * np.array(VOXEL)).all(), (verts.min(0), lo)
    assert (np.abs(verts.max(0) - hi) <= 0.51 * np.array(VOXEL)).all(), (verts.max(0), hi)
    # every vertex sits on the voxel lattice's marching-cubes positions (multiples of half a voxel), to 16 bits
    step = (hi - lo + np.array(VOXEL)) / 65535
    half = np.asarray(VOXEL) / 2
    assert (np.abs(verts / half - np.rint(verts / half)) * half <= step + 1e-3).all()

    # an independent client: cloud-volume reads the sharded segmentation (both scales), the jpeg image and a mesh
    # (fill_missing: tensorstore stores no all-background chunk; missing means 0 in precomputed)
    cv = CloudVolume(f"file://{tmp_path / 'obj'}", mip=0, progress=False, fill_missing=True)
    np.testing.assert_array_equal(np.asarray(cv[:, :, :])[..., 0].T, objects)
    cv1 = CloudVolume(f"file://{tmp_path / 'obj'}", mip=1, progress=False, fill_missing=True)
    np.testing.assert_array_equal(np.asarray(cv1[:, :, :])[..., 0].T, open_scale(str(tmp_path / "obj"), 1).read().result())
    cvi = CloudVolume(f"file://{tmp_path / 'em'}", mip=0, progress=False)
    got = np.asarray(cvi[:, :, :])[..., 0].T.astype(np.float64)
    assert got.shape == em.shape and np.abs(got - em).mean() < 6  # jpeg, quality 90


def _surface_samples(mesh, per_nm2: float = 0.05) -> np.ndarray:
    """Points spread over a mesh's triangles (corners, edge midpoints, centroids and random points): the surface."""
    rng = np.random.default_rng(0)
    tri = mesh.vertices.astype(np.float64)[mesh.faces]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    counts = 1 + (area * per_nm2).astype(int)
    which = np.repeat(np.arange(len(tri)), counts)
    w = rng.dirichlet((1, 1, 1), len(which))
    fixed = np.concatenate([tri.reshape(-1, 3), tri.mean(1), (tri + np.roll(tri, 1, axis=1)).reshape(-1, 3) / 2])
    return np.concatenate([fixed, np.einsum("nk,nkd->nd", w, tri[which])])


def weld(mesh, digits: int = 2):
    """Join vertices that coincide (to 10^-digits nm) and drop faces that collapse."""
    import zmesh

    uniq, inverse = np.unique(np.round(mesh.vertices.astype(np.float64), digits), axis=0, return_inverse=True)
    faces = inverse.reshape(-1)[mesh.faces]
    good = (faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])
    return zmesh.Mesh(uniq.astype(np.float32), faces[good].astype(np.uint32), None)


def _simplified_vs_dense(objects: np.ndarray, reduction: int, max_error: float | None) -> tuple[dict, int, int, float]:
    """Mesh `objects` in 2x2x2 blocks (as the export's tasks) and weld per label; compare with one dense zmesh of
    the whole array: (welded meshes, their faces and the dense faces, both without the low-face caps, which stay
    unsimplified and equal in both, the largest distance of a dense vertex from the simplified surface)."""
    import zmesh
    from scipy.spatial import cKDTree

    from vemscale.post.mesh import block_pieces

    shape = objects.shape
    dense = zmesh.Mesher(tuple(VOXEL))  # the reference: one unsimplified mesh of the whole array, closed at its edges
    dense.mesh(np.asfortranarray(np.pad(objects, 1).T), close=False)
    parts: dict[int, list] = {}
    caps = 0  # triangles of the caps at the volume's low faces, kept unsimplified
    cuts = [(0, n // 2, n) for n in shape]
    for idx in np.ndindex(2, 2, 2):
        box = [(c[i], c[i + 1]) for c, i in zip(cuts, idx)]
        read = tuple(slice(lo, min(hi + 1, n)) for (lo, hi), n in zip(box, shape))
        for label, node, mesh in block_pieces(objects[read].T, VOXEL, [s.start for s in read][::-1],
                                              pad_low=[s.start == 0 for s in read][::-1],
                                              pad_high=[s.stop == n for s, n in zip(read, shape)][::-1],
                                              reduction_factor=reduction, max_error_nm=max_error):
            # each piece fits its octree node: the block's own cells within [0.5, size + 0.5] voxels of the block's
            # first voxel, a padded low edge's caps within [0, 0.5] (what the 16-bit quantisation relies on)
            local = mesh.vertices / np.asarray(VOXEL) - [lo for lo, _ in box][::-1]
            size = np.asarray([hi - lo for lo, hi in box][::-1])
            lo_ok = np.where(np.asarray(node) < 0, -1e-3, 0.5 - 1e-3)
            hi_ok = np.where(np.asarray(node) < 0, 0.5 + 1e-3, size + 0.5 + 1e-3)
            assert (local >= lo_ok).all() and (local <= hi_ok).all(), (label, node, local.min(0), local.max(0))
            parts.setdefault(label, []).append(mesh)
            caps += len(mesh.faces) if any(node) else 0
    welded = {label: weld(zmesh.Mesh.concatenate(*meshes)) for label, meshes in parts.items()}
    simplified = dense_faces = 0
    worst = 0.0
    for label, mesh in welded.items():
        ref = dense.get(label, normals=False, reduction_factor=0, voxel_centered=True)
        ref_vertices = ref.vertices - np.asarray(VOXEL, np.float32)  # the padding voxel
        on, _ = cKDTree(ref_vertices).query(mesh.vertices)
        assert on.max() < 1e-3, f"object {label}: a simplified vertex is not a vertex of the dense surface"
        off, _ = cKDTree(_surface_samples(mesh)).query(ref_vertices)
        worst = max(worst, float(off.max()))
        simplified += len(mesh.faces)
        dense_faces += len(ref.faces)
    return welded, simplified - caps, dense_faces - caps, worst


def test_simplified_block_meshes_weld_closed_and_stay_near_the_dense_surface(crops) -> None:
    """Real mitochondria (and a one-voxel object) meshed in 2x2x2 blocks with the export's default simplification
    (reduction 10, error one xy voxel): each object's welded fragments are closed, keep a fraction of the dense
    surface's triangles, and the dense surface stays within twice the error of the simplified one (zmesh's own
    simplifier, the one used before: 7.0 nm here, this one 8.1 nm; a 50x reduction without a bound: 204 nm)."""
    import trimesh

    objects = crops["objects"].copy()
    dot = int(objects.max()) + 1
    objects[5, 150, 3] = dot  # a one-voxel object: simplified to nothing, it keeps its unsimplified mesh
    assert (objects[4:7, 149:152, 2:5] == dot).sum() == 1
    welded, simplified, dense_faces, worst = _simplified_vs_dense(objects, 10, VOXEL[0])
    assert sorted(welded) == sorted(int(i) for i in np.unique(objects) if i)
    for label, mesh in welded.items():
        closed = trimesh.Trimesh(mesh.vertices, mesh.faces, process=False)
        assert closed.is_watertight, f"object {label}: its fragments do not close"
    assert simplified < dense_faces / 3, (simplified, dense_faces)  # simplified (unsimplified: about equal)
    assert worst <= 2 * VOXEL[0], f"the dense surface is {worst:.1f} nm from the simplified one"


def test_create_precomputed_for_writers(tmp_path: Path) -> None:
    """The API infer uses: create a sharded multi-channel layer, write shard-aligned boxes, refuse the rest."""
    url = f"precomputed://file://{tmp_path / 'prob'}"
    store = create_precomputed(url, (10, 300, 260), np.uint8, VOXEL, "image", num_channels=2, chunk=(4, 64, 64),
                               sharded=True, shard_voxels=2**16, attrs={"vemscale": {"kind": "probabilities"}})
    assert store.shape == (2, 10, 300, 260)
    wc = write_chunk_shape(store)[-3:]
    assert wc != (4, 64, 64) and all(w % c == 0 for w, c in zip(wc, (4, 64, 64)))
    data = np.random.default_rng(0).integers(0, 255, (2, 10, 300, 260), dtype=np.uint8)
    box = tuple(slice(0, min(w, s)) for w, s in zip(wc, (10, 300, 260)))
    write_chunk_aligned_block(store, box, data[(slice(None), *box)])
    with pytest.raises(ValueError, match="not aligned"):
        write_chunk_aligned_block(store, (slice(0, 4), slice(64, 128), slice(0, 64)), data[:, :4, 64:128, :64])
    np.testing.assert_array_equal(store[(slice(None), *box)].read().result(), data[(slice(None), *box)])
    again = create_precomputed(url, (10, 300, 260), np.uint8, VOXEL, "image", num_channels=2, chunk=(4, 64, 64),
                               sharded=True, shard_voxels=2**16)  # same layer: reopened to resume
    np.testing.assert_array_equal(again[(slice(None), *box)].read().result(), data[(slice(None), *box)])
    assert read_info(url)["vemscale"] == {"kind": "probabilities"}
    with pytest.raises(UserError, match="exists"):
        create_precomputed(url, (10, 300, 261), np.uint8, VOXEL, "image", num_channels=2)
    with pytest.raises(UserError, match="jpeg"):
        create_precomputed(str(tmp_path / "j"), (4, 64, 64), np.uint8, VOXEL, "image", num_channels=2, encoding="jpeg")
    seg = create_precomputed(str(tmp_path / "seg"), (4, 64, 64), np.int64, VOXEL, "segmentation")
    assert seg.dtype == ts.uint64 and seg.shape == (4, 64, 64)


def test_export_cli_arguments() -> None:
    from vemscale.cli import build_parser
    from vemscale.export.run import load_export_config

    args = build_parser().parse_args(["export", "in.zarr", "precomputed://file:///tmp/x,y", "mesh_reduction=20",
                                      "--pyramid", "--mesh", "--sharded", "--classes", "bg,mito",
                                      "--voxel-size", "4,4,40", "--layer-type", "segmentation"])
    cfg = load_export_config(args)
    assert (cfg.source, cfg.dest) == ("in.zarr", "precomputed://file:///tmp/x,y")
    assert cfg.pyramid and cfg.mesh and cfg.sharded is True and cfg.classes == ["bg", "mito"]
    assert cfg.voxel_size == (4.0, 4.0, 40.0) and cfg.mesh_reduction == 20 and cfg.layer_type == "segmentation"
    with pytest.raises(UserError, match="unknown config key"):
        load_export_config(build_parser().parse_args(["export", "a", "b", "meshh=1"]))


def _layer_files(root: Path) -> dict[str, bytes]:
    """Every file of a layer but its ledgers (what a viewer reads), by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".vemscale-ledger" not in p.parts}


def _step_done(layer: Path, step: str) -> int:
    from vemscale.blocks.ledger import Ledger, ledger_url

    meta = layer / ".vemscale-ledger" / step / "ledger.json"
    try:
        info = json.loads(meta.read_text())
    except (OSError, ValueError):
        return 0
    return Ledger(ledger_url(str(layer), step), info["fingerprint"], info["generation"]).count_done(10**6)


def test_killed_export_resumes_to_the_bytes_of_a_clean_export(ray_local, crops, tmp_path: Path) -> None:
    """SIGKILL a whole `vemscale export` (driver, its Ray, its workers) in the middle of scale 0, rerun: only the
    blocks not in the ledger are recomputed, and every file equals a clean export's. Blocks of 10x32x32 write
    pyramid level 1 with scale 0 (fused), so the kill also lands inside that level."""
    from conftest import kill_cli_when

    args = {"layer_type": "segmentation", "pyramid": True, "max_scales": 3, "mesh": True, "mesh_scale": 0,
            "mesh_reduction": 0, "sharded": False, "task_voxels": 16 * 32 * 32, "blocks_per_batch": 1,
            "max_in_flight": 1}
    clean = _export(source=crops["objects_url"], dest=str(tmp_path / "clean"), chunk=(2, 16, 16), **args)
    blocks = clean["blocks"]["scale0"]["blocks"]
    assert blocks >= 30
    assert [s.get("fused_into") for s in clean["scales"]] == ["scale0", None]
    dest = tmp_path / "killed"
    cmd = ["export", crops["objects_url"], str(dest),
           f"run_dir={tmp_path}/killed_run", "chunk=2,16,16", "shard_voxels=65536",
           *[f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in args.items()]]
    kill_cli_when(cmd, lambda: _step_done(dest, "scale0") >= 3, timeout=120, poll=0.01)
    done = _step_done(dest, "scale0")
    assert 3 <= done < blocks, "the kill should land inside scale 0"
    resumed = _export(source=crops["objects_url"], dest=str(dest), chunk=(2, 16, 16), **args)
    b = resumed["blocks"]
    assert (b["scale0"]["computed"], b["scale0"]["skipped"]) == (blocks - done, done)
    assert b["scale1"] == b["scale0"]  # fused: the same blocks
    assert b["scale2"]["skipped"] == 0 and b["meshes"]["skipped"] == 0  # never started before the kill
    assert _layer_files(dest) == _layer_files(tmp_path / "clean")
    again = _export(source=crops["objects_url"], dest=str(dest), chunk=(2, 16, 16), **args)  # nothing to redo
    assert all(step["computed"] == 0 for step in again["blocks"].values())
    assert again["meshes"]["shards_written"] == 0
    # a mesh shard lost after the run (its blocks' piece files are gone by then): the meshes are made again
    (dest / "mesh" / "0.shard").unlink()
    healed = _export(source=crops["objects_url"], dest=str(dest), chunk=(2, 16, 16), **args)
    assert healed["meshes"]["computed"] == healed["meshes"]["blocks"] and healed["meshes"]["shards_written"] == 1
    assert healed["blocks"]["scale0"]["computed"] == 0
    assert _layer_files(dest) == _layer_files(tmp_path / "clean")


def test_export_killed_while_writing_mesh_shards_resumes_to_the_bytes_of_a_clean_export(ray_local, crops,
                                                                                      tmp_path: Path) -> None:
    """About one object per mesh shard (a dozen shard tasks, one at a time), the CLI SIGKILLed once the first shards are
    written: the rerun meshes no block again, writes only the missing shards (from the block files kept until every
    shard is written), and every file equals a clean export's made with 2 tasks at a time."""
    from scipy import ndimage

    from conftest import kill_cli_when

    # the mitochondria cut per slice into 18 objects with sparse ids (multiples of 4096: the hash still spreads them)
    objects, n = np.zeros_like(crops["objects"]), 0
    for z, plane in enumerate(crops["objects"]):
        cut, k = ndimage.label(plane > 0)
        objects[z] = np.where(cut > 0, (cut + n) * 4096, 0)
        n += k
    src = str(tmp_path / "slices.zarr")
    create_ome_zarr(src, objects.shape, objects.dtype, (8, 128, 128), VOXEL).write(objects).result()
    args = {"layer_type": "segmentation", "mesh": True, "mesh_scale": 0, "mesh_objects_per_shard": 1,
            "sharded": False, "task_voxels": 4 * 64 * 64}
    clean = _export(source=src, dest=str(tmp_path / "clean"), max_in_flight=2, **args)
    shards = clean["meshes"]["shards"]
    assert clean["meshes"]["labels"] == n >= 15 and clean["meshes"]["fragments"] > n  # objects span blocks
    assert shards >= 8, shards
    dest = tmp_path / "killed"
    mesh_dir = dest / "mesh"
    written = lambda: len(list(mesh_dir.glob("*.shard"))) if mesh_dir.is_dir() else 0  # noqa: E731
    cmd = ["export", src, str(dest), f"run_dir={tmp_path}/killed_run", "chunk=4,64,64",
           "shard_voxels=65536", "max_in_flight=1",
           *[f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in args.items()]]
    kill_cli_when(cmd, lambda: written() >= 2, timeout=180, poll=0.005)
    done = written()
    print(f"{shards} shards, {done} written before the kill")
    assert 2 <= done < shards, "the kill should land among the shard tasks"
    assert list(mesh_dir.glob("~fragments-*")), "block files are kept until every shard is written"
    resumed = _export(source=src, dest=str(dest), max_in_flight=1, **args)
    m = resumed["meshes"]
    assert m["computed"] == 0 and m["shards_written"] == shards - done, (m, done)
    assert not list(mesh_dir.glob("~fragments-*"))
    assert _layer_files(dest) == _layer_files(tmp_path / "clean")


def test_auto_mesh_scale_is_the_coarsest_xy_only_scale_finer_than_half_z() -> None:
    from vemscale.export.meshes import auto_mesh_scale

    def info(*res: tuple[float, float, float]) -> dict:
        return {"scales": [{"resolution": list(r)} for r in res]}

    ssTEM = [(4.6, 4.6, 50), (9.2, 9.2, 50), (18.4, 18.4, 50), (36.8, 36.8, 50), (73.6, 73.6, 100)]
    assert auto_mesh_scale(info(*ssTEM)) == 2  # 18.4 <= 25 < 36.8
    assert auto_mesh_scale(info(*ssTEM[:2])) == 1 and auto_mesh_scale(info(ssTEM[0])) == 0
    assert auto_mesh_scale(info((4, 4, 40), (8, 8, 40), (16, 16, 40), (32, 32, 40))) == 2
    assert auto_mesh_scale(info((8, 8, 8), (16, 16, 16))) == 0  # isotropic: scale 0
    assert auto_mesh_scale(info((10, 10, 15), (20, 20, 15))) == 0  # scale 1 already coarser than z/2


def test_reopening_a_layer_with_another_storage_layout_is_refused(tmp_path):
    """Resume may reopen a layer only as it was stored: sharding, chunks or encoding changed would mix layouts."""
    url = "file://" + str(tmp_path / "layer")
    create_precomputed(url, (4, 64, 64), np.uint8, None, chunk=(2, 32, 32))
    create_precomputed(url, (4, 64, 64), np.uint8, None, chunk=(2, 32, 32))  # the same layout reopens
    for kw in (dict(chunk=(2, 32, 32), sharded=True), dict(chunk=(4, 32, 32)), dict(chunk=(2, 32, 32), encoding="jpeg")):
        with pytest.raises(UserError, match="exists stored as"):
            create_precomputed(url, (4, 64, 64), np.uint8, None, **kw)
    assert read_info(url)["scales"][0]["chunk_sizes"] == [[32, 32, 2]]  # nothing was changed by the refusals


def test_shard_shape_key_sets_scale_zero_shards_and_a_wrong_one_fails_before_writing(ray_local, crops, tmp_path):
    """shard_shape=4,128,128 over 4x64x64 chunks: 2x2x1 chunks per shard (Morton bits k=2), 3x3x3 shard files,
    read back equal by tensorstore and cloud-volume; a box that is no Morton shard, or shard_shape with
    sharded=false, fails before the layer exists."""
    from cloudvolume import CloudVolume

    em = crops["em"]
    out = _export(source=crops["em_url"], dest=str(tmp_path / "em"), shard_shape=(4, 128, 128))
    assert out["sharded"] and out["shard_shape"] == [4, 128, 128] and out["write_chunk_zyx"] == [4, 128, 128]
    scale = read_info(str(tmp_path / "em"))["scales"][0]
    assert scale["sharding"]["preshift_bits"] + scale["sharding"]["minishard_bits"] == 2
    assert len(list((tmp_path / "em" / scale["key"]).glob("*.shard"))) == 3 * 3 * 3
    np.testing.assert_array_equal(open_scale(str(tmp_path / "em"), 0).read().result(), em)
    cv = CloudVolume("file://" + str(tmp_path / "em"), mip=0, fill_missing=False, progress=False)
    np.testing.assert_array_equal(np.asarray(cv[:, :, :])[..., 0].transpose(2, 1, 0), em)
    for kw, msg in ((dict(shard_shape=(4, 100, 128)), "not a precomputed shard"),
                    (dict(shard_shape=(4, 128, 128), sharded=False), "sharded=false")):
        with pytest.raises(UserError, match=msg):
            _export(source=crops["em_url"], dest=str(tmp_path / "bad"), **kw)
        assert not (tmp_path / "bad").exists()


def test_shard_files_read_back_through_tensorstore_for_many_shards_and_minishards(tmp_path: Path) -> None:
    """Shards assembled by `encode_shard` (values with a prefix before them, as mesh fragments sit before their
    manifest) read by tensorstore's own `neuroglancer_uint64_sharded` store, key by key, and listed back: the mesh
    layout (murmurhash, 8 shards x 32 minishards) and an identity-hashed one with a single minishard per shard."""
    from vemscale.export.shardfile import encode_shard, mesh_sharding, shard_entries, shard_name, shard_of

    rng = np.random.default_rng(0)
    keys = np.unique(np.concatenate([rng.integers(1, 2**40, 3000).astype(np.uint64), np.arange(1, 200, dtype=np.uint64),
                                     np.array([2**63 + 5, 2**64 - 1], np.uint64)]))
    mesh = mesh_sharding(len(keys), keys_per_shard=512, keys_per_minishard=16)
    assert (mesh["hash"], mesh["shard_bits"], mesh["minishard_bits"]) == ("murmurhash3_x86_128", 3, 5)  # 3,201 keys
    identity = {**mesh, "hash": "identity", "preshift_bits": 2, "minishard_bits": 0, "shard_bits": 2,
                "minishard_index_encoding": "raw"}
    for name, spec in (("mesh", mesh), ("identity", identity)):
        values = {int(k): rng.bytes(int(rng.integers(0, 40))) + int(k).to_bytes(8, "little") for k in keys}
        root = tmp_path / name
        kv = ts.KvStore.open(f"file://{root}/").result()
        shards = shard_of(keys, spec)
        assert len(np.unique(shards)) == 2 ** spec["shard_bits"]
        for sh in np.unique(shards):
            entries = [(int(k), rng.bytes(int(rng.integers(0, 30))), values[int(k)]) for k in keys[shards == sh]]
            kv.write(shard_name(int(sh), spec), encode_shard(entries, spec)).result()
            data = (root / shard_name(int(sh), spec)).read_bytes()
            listed = shard_entries(lambda a, b: data[a:b], spec)
            assert sorted(listed) == sorted(int(k) for k in keys[shards == sh])
            assert all(data[a:b] == values[k] for k, (a, b) in listed.items())
        reader = ts.KvStore.open({"driver": "neuroglancer_uint64_sharded", "metadata": spec,
                                  "base": f"file://{root}/"}).result()
        for k in keys:
            assert reader.read(struct.pack(">Q", int(k))).result().value == values[int(k)], (name, int(k))
        assert reader.read(struct.pack(">Q", 2**63 + 6)).result().state == "missing"
