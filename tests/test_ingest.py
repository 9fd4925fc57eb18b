"""`vemscale ingest`: TIFF / slice folder / HDF5 / MRC into OME-Zarr, bit for bit, with NGFF metadata."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import mrcfile
import numpy as np
import pytest
import tifffile
from PIL import Image

from vemscale import cli
from vemscale.errors import UserError
from vemscale.io.ingest import ingest
from vemscale.io.ome_zarr import create_ome_zarr
from vemscale.io.volume import open_volume

ISBI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "isbi2012_membranes" / "train" / "image.tif"


def read_zarr(url: str) -> np.ndarray:
    return open_volume(url).read()


def test_ingest_real_tiff_round_trips_with_ngff_metadata(tmp_path):
    if not ISBI.exists():
        pytest.skip(f"shared data not found at {ISBI}")
    dst = tmp_path / "isbi.ome.zarr"
    out = ingest(str(ISBI), str(dst), voxel_size_xyz="4,4,50")
    expected = tifffile.imread(ISBI)
    assert out["shape"] == [30, 512, 512] and out["dtype"] == "uint8" and out["voxel_size_xyz"] == [4.0, 4.0, 50.0]
    assert out["chunks"] == [16, 256, 256]
    v = open_volume(str(dst))
    assert v.voxel_size_xyz == (4.0, 4.0, 50.0) and v.chunks == (16, 256, 256)
    np.testing.assert_array_equal(v.read(), expected)
    ms = json.loads((dst / ".zattrs").read_text())["multiscales"][0]
    assert ms["version"] == "0.4"
    assert ms["axes"] == [{"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"]
    assert ms["datasets"][0]["coordinateTransformations"] == [{"type": "scale", "scale": [50.0, 4.0, 4.0]}]
    assert json.loads((dst / ".zgroup").read_text()) == {"zarr_format": 2}


def test_sharded_ingest_writes_zarr3_shards_one_slab_deep_that_zarr_python_reads(tmp_path):
    """--sharded: 8x128x128 chunks, 2^19-voxel target -> shards of 1x1x4 chunks (x first), 4 slabs x 4 rows of files."""
    import zarr

    if not ISBI.exists():
        pytest.skip(f"shared data not found at {ISBI}")
    dst = tmp_path / "isbi.ome.zarr"
    out = ingest(str(ISBI), str(dst), voxel_size_xyz="4,4,50", chunks="8,128,128", sharded=True, shard_voxels=2**19)
    assert out["shard"] == [8, 128, 512]
    z = zarr.open_array(str(dst / "0"), mode="r")
    assert z.metadata.zarr_format == 3 and tuple(z.shards) == (8, 128, 512) and tuple(z.chunks) == (8, 128, 128)
    np.testing.assert_array_equal(z[...], tifffile.imread(ISBI))
    assert len([f for f in (dst / "0").rglob("*") if f.is_file() and f.name != "zarr.json"]) == 4 * 4  # vs 4*4*4
    # a shard of whole chunks wider than the plane (3 x 192 > 512): reported as stored, and a rerun reopens it
    wide = tmp_path / "wide.ome.zarr"
    for _ in range(2):
        out = ingest(str(ISBI), str(wide), voxel_size_xyz="4,4,50", chunks="8,192,192", sharded=True, shard_voxels=2**30)
    assert out["shard"] == [8, 512, 512]
    np.testing.assert_array_equal(open_volume(str(wide)).read(), tifffile.imread(ISBI))
    # c,z,y,x sources: one channel per shard
    src = tmp_path / "two.ome.zarr"
    two = np.stack([tifffile.imread(ISBI)[:4], 255 - tifffile.imread(ISBI)[:4]])
    create_ome_zarr(str(src), two.shape, np.uint8, (1, 4, 256, 256), (4, 4, 50)).write(two).result()
    out = ingest(str(src), str(tmp_path / "two-sh.ome.zarr"), chunks="4,128,128", sharded=True)
    z = zarr.open_array(str(tmp_path / "two-sh.ome.zarr" / "0"), mode="r")
    assert tuple(z.shards) == (1, 4, 512, 512) and np.array_equal(z[...], two)


def test_ingest_slice_folder_in_natural_order(tmp_path):
    rng = np.random.default_rng(1)
    stack = rng.integers(0, 255, size=(11, 20, 30), dtype=np.uint8)
    folder = tmp_path / "slices"
    folder.mkdir()
    for z in range(stack.shape[0]):
        Image.fromarray(stack[z]).save(folder / f"slice_{z}.png")  # slice_10 sorts after slice_9
    out = ingest(str(folder), str(tmp_path / "s.ome.zarr"), voxel_size_xyz=(4.6, 4.6, 50), chunks=(4, 8, 8))
    assert out["chunks"] == [4, 8, 8] and out["source_format"] == "slice"
    np.testing.assert_array_equal(read_zarr(out["output"]), stack)


def test_ingest_hdf5_and_mrc_take_voxel_size_from_metadata(tmp_path):
    rng = np.random.default_rng(2)
    data = rng.integers(0, 60000, size=(6, 17, 19), dtype=np.uint16)
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f.create_dataset("volumes/raw", data=data).attrs["resolution"] = [40.0, 4.0, 4.0]
    out = ingest(f"{tmp_path}/v.h5:/volumes/raw", str(tmp_path / "h.ome.zarr"), zarr_format=3)
    assert out["voxel_size_xyz"] == [4.0, 4.0, 40.0]
    np.testing.assert_array_equal(read_zarr(out["output"]), data)
    assert (tmp_path / "h.ome.zarr" / "zarr.json").exists()

    with mrcfile.new(tmp_path / "t.mrc") as m:
        m.set_data(data.astype(np.float32))
        m.voxel_size = 23.0  # Å
    out = ingest(str(tmp_path / "t.mrc"), str(tmp_path / "m.ome.zarr"))
    assert out["voxel_size_xyz"] == pytest.approx([2.3, 2.3, 2.3]) and out["dtype"] == "float32"
    np.testing.assert_array_equal(read_zarr(out["output"]), data.astype(np.float32))


def test_ingest_2d_image_becomes_one_slice(tmp_path):
    img = np.arange(12 * 13, dtype=np.uint8).reshape(12, 13)
    Image.fromarray(img).save(tmp_path / "one.png")
    out = ingest(str(tmp_path / "one.png"), str(tmp_path / "one.ome.zarr"), voxel_size_xyz="5,5,5")
    assert out["shape"] == [1, 12, 13] and out["chunks"] == [1, 12, 13]
    np.testing.assert_array_equal(read_zarr(out["output"])[0], img)


def test_ingest_needs_voxel_size_and_refuses_to_clobber(tmp_path):
    data = np.zeros((3, 8, 9), np.uint8)
    tifffile.imwrite(tmp_path / "a.tif", data, photometric="minisblack")  # 3 pages, not one planar RGB page
    tifffile.imwrite(tmp_path / "b.tif", np.ones((4, 8, 9), np.uint8), photometric="minisblack")
    dst = str(tmp_path / "out.ome.zarr")
    with pytest.raises(UserError, match="--voxel-size"):
        ingest(str(tmp_path / "a.tif"), dst)
    ingest(str(tmp_path / "a.tif"), dst, voxel_size_xyz="4,4,40")
    ingest(str(tmp_path / "a.tif"), dst, voxel_size_xyz="4,4,40")  # same shape: reopened, rewritten
    with pytest.raises(UserError, match=r"exists with shape \(3, 8, 9\) uint8, not shape \(4, 8, 9\) uint8.*--overwrite"):
        ingest(str(tmp_path / "b.tif"), dst, voxel_size_xyz="4,4,40")
    np.testing.assert_array_equal(read_zarr(dst), data)  # untouched
    ingest(str(tmp_path / "b.tif"), dst, voxel_size_xyz="4,4,40", overwrite=True)
    np.testing.assert_array_equal(read_zarr(dst), np.ones((4, 8, 9), np.uint8))
    with pytest.raises(UserError, match="chunks"):
        ingest(str(tmp_path / "a.tif"), str(tmp_path / "x.zarr"), voxel_size_xyz="4,4,40", chunks="16,256")


def test_ingest_cli_json(tmp_path, capsys):
    data = np.arange(2 * 5 * 6, dtype=np.uint8).reshape(2, 5, 6)
    tifffile.imwrite(tmp_path / "a.tif", data, compression="zlib")
    dst = str(tmp_path / "cli.ome.zarr")
    assert cli.main(["ingest", str(tmp_path / "a.tif"), dst, "--voxel-size", "4.6,4.6,50", "--chunks", "1,4,4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["output"] == dst and result["shape"] == [2, 5, 6] and result["voxel_size_xyz"] == [4.6, 4.6, 50.0]
    np.testing.assert_array_equal(read_zarr(dst), data)
    assert cli.main(["ingest", str(tmp_path / "missing.tif"), dst, "--voxel-size", "4,4,4"]) == 2
    assert "does not exist" in capsys.readouterr().err
