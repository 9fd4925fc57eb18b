"""open_volume / create_ome_zarr on real files of every supported format, written to tmp_path."""

from __future__ import annotations

import json
import pickle

import h5py
import mrcfile
import numpy as np
import pytest
import tensorstore as ts
import tifffile
from PIL import Image

from vemscale.errors import UserError
from vemscale.io.volume import array_volume, create_ome_zarr, open_volume, parse_voxel_size

BOX = (slice(1, 4), slice(2, 9), slice(3, 11))


@pytest.fixture(scope="module")
def vol() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, size=(5, 12, 14), dtype=np.uint8)


def check(v, a: np.ndarray) -> None:
    """Shape, dtype, whole read, a box read, to_dask and pickling all agree with numpy."""
    assert v.shape == a.shape and v.ndim == a.ndim and v.dtype == a.dtype
    np.testing.assert_array_equal(v.read(), a)
    np.testing.assert_array_equal(v.read(BOX), a[BOX])
    buf = np.full(a[BOX].shape, 7, a.dtype)  # a block task's reused buffer (vemscale.blocks.scratch)
    assert v.read(BOX, out=buf) is buf
    np.testing.assert_array_equal(buf, a[BOX])
    np.testing.assert_array_equal(v[-1], a[-1])
    np.testing.assert_array_equal(v.to_dask(chunks=(1,) * (a.ndim - 3) + (2, 5, 6)).compute(), a)
    np.testing.assert_array_equal(v.to_dask().compute(), a)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(v)).read(BOX), a[BOX])


def write_ts(spec: dict, data: np.ndarray) -> None:
    store = ts.open(spec, create=True, delete_existing=True, shape=data.shape,
                    dtype=ts.dtype(data.dtype.name)).result()
    store.write(data).result()


# ------------------------------------------------------------------------------------- non-tensorstore


def test_tiff_stack_reads_pages_lazily(tmp_path, vol):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, vol, compression="zlib")
    v = open_volume(str(path))
    check(v, vol)
    assert v.chunks == (1, 12, 14) and v.voxel_size_xyz is None and v.tensorstore is None
    assert v.read((slice(2, 2),)).shape == (0, 12, 14)


def test_tiff_2d_imagej_voxel_size_and_channels(tmp_path, vol):
    tifffile.imwrite(tmp_path / "one.tif", vol[0])
    check(open_volume(tmp_path / "one.tif"), vol[:1])
    zc = np.stack([vol, 255 - vol], axis=1)  # z,c,y,x
    tifffile.imwrite(tmp_path / "ij.tif", zc, imagej=True, resolution=(1 / 0.004, 1 / 0.004),
                     metadata={"axes": "ZCYX", "spacing": 0.05, "unit": "um"})
    rgb = np.stack([vol, vol // 2, vol // 3], axis=-1)  # z,y,x,s (contiguous RGB pages)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    check(open_volume(tmp_path / "rgb.tif"), np.moveaxis(rgb, -1, 0))
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(rgb, -1, 1), photometric="rgb", planarconfig="separate")
    check(open_volume(tmp_path / "planar.tif"), np.moveaxis(rgb, -1, 0))
    v = open_volume(f"file://{tmp_path}/ij.tif")
    check(v, np.moveaxis(zc, 1, 0))
    assert v.voxel_size_xyz == pytest.approx((4.0, 4.0, 50.0))


def test_hdf5_dataset_forms_and_resolution(tmp_path, vol):
    path = tmp_path / "v.h5"
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("group/raw", data=vol, chunks=(1, 6, 7))
        ds.attrs["resolution"] = [50.0, 4.6, 4.6]  # z,y,x nm (CREMI)
        f.create_dataset("other", data=vol[0])
    for url in (f"{path}:/group/raw", f"{path}#group/raw"):
        v = open_volume(url)
        check(v, vol)
        assert v.voxel_size_xyz == pytest.approx((4.6, 4.6, 50.0)) and v.chunks == (1, 6, 7)
    check(open_volume(f"{path}:/other"), vol[:1])
    with pytest.raises(UserError, match="holds 2 datasets"):
        open_volume(str(path))
    with pytest.raises(UserError, match="no dataset '/nope'"):
        open_volume(f"{path}:/nope")


def test_mrc_voxel_size_from_angstrom(tmp_path, vol):
    path = tmp_path / "v.mrc"
    with mrcfile.new(path) as m:
        m.set_data(vol.astype(np.int16))
        m.voxel_size = (46.0, 46.0, 500.0)
    v = open_volume(str(path))
    check(v, vol.astype(np.int16))
    assert v.voxel_size_xyz == pytest.approx((4.6, 4.6, 50.0))


def test_slice_folder_natural_order(tmp_path, vol):
    folder = tmp_path / "slices"
    folder.mkdir()
    for z in range(vol.shape[0]):
        Image.fromarray(vol[z]).save(folder / f"s{z * 5}.png")  # s0 s5 s10 s15 s20: natural, not lexical, order
    check(open_volume(str(folder)), vol)
    check(open_volume(str(folder / "s10.png")), vol[2:3])


def test_array_volume_and_voxel_override(vol):
    v = array_volume(vol, (1, 2, 3))
    check(v, vol)
    assert open_volume(v, voxel_size_xyz="4,4,40").voxel_size_xyz == (4.0, 4.0, 40.0)
    with pytest.raises(UserError, match="three positive numbers"):
        parse_voxel_size("4,4")


# ------------------------------------------------------------------------------------- tensorstore


def test_zarr_v2_v3_arrays(tmp_path, vol):
    write_ts({"driver": "zarr", "kvstore": f"file://{tmp_path}/a.zarr"}, vol)
    v = open_volume(str(tmp_path / "a.zarr"))
    check(v, vol)
    assert v.tensorstore is not None and v.kind == "zarr"
    write_ts({"driver": "zarr3", "kvstore": f"file://{tmp_path}/b.zarr"}, vol)
    check(open_volume(f"zarr3://{tmp_path}/b.zarr"), vol)
    write_ts({"driver": "zarr", "kvstore": f"file://{tmp_path}/c.zarr"}, vol[0])  # 2-D -> one slice
    check(open_volume(f"file://{tmp_path}/c.zarr"), vol[:1])
    with pytest.raises(UserError, match="single zarr v2 array"):
        open_volume(str(tmp_path / "a.zarr"), scale=1)
    with pytest.raises(ValueError, match="C-contiguous"):
        v.read(BOX, out=np.zeros((3, 7, 9), np.uint8))


def test_scratch_buffers_are_reused_per_slot_and_grow():
    from vemscale.blocks.scratch import scratch

    a = scratch("test.a", (4, 8, 8), np.uint32)
    assert a.shape == (4, 8, 8) and a.dtype == np.uint32 and a.flags.c_contiguous
    small = scratch("test.a", (2, 8, 8), np.uint8)
    assert np.shares_memory(a, small)  # same slot, smaller: the same memory
    assert not np.shares_memory(a, scratch("test.b", (4, 8, 8), np.uint32))  # another slot: its own
    big = scratch("test.a", (8, 8, 8), np.uint64)
    assert big.shape == (8, 8, 8) and not np.shares_memory(a, big)  # grown


def test_ome_zarr_multiscale_hand_written(tmp_path, vol):
    root = tmp_path / "img.ome.zarr"
    root.mkdir()
    (root / ".zgroup").write_text(json.dumps({"zarr_format": 2}))
    ms = {"version": "0.4", "name": "x",
          "axes": [{"name": "t", "type": "time"}, {"name": "z", "type": "space", "unit": "micrometer"},
                   {"name": "y", "type": "space", "unit": "micrometer"}, {"name": "x", "type": "space", "unit": "micrometer"}],
          "datasets": [{"path": "s0", "coordinateTransformations": [{"type": "scale", "scale": [1, 0.05, 0.004, 0.004]}]},
                       {"path": "s1", "coordinateTransformations": [{"type": "scale", "scale": [1, 0.05, 0.008, 0.008]}]}]}
    (root / ".zattrs").write_text(json.dumps({"multiscales": [ms]}))
    write_ts({"driver": "zarr", "kvstore": f"file://{root}/s0"}, vol[None])
    small = vol[:, ::2, ::2]
    write_ts({"driver": "zarr", "kvstore": f"file://{root}/s1"}, small[None])
    v = open_volume(str(root))
    check(v, vol)
    assert v.voxel_size_xyz == pytest.approx((4.0, 4.0, 50.0)) and v.kind == "ome-zarr"
    for scale in (1, "s1"):
        v1 = open_volume(str(root), scale=scale)
        check(v1, small)
        assert v1.voxel_size_xyz == pytest.approx((8.0, 8.0, 50.0))
    v0 = open_volume(str(root / "s0"))  # an array inside the group takes its voxel size from the group
    assert v0.shape == vol.shape and v0.voxel_size_xyz == pytest.approx((4.0, 4.0, 50.0))
    with pytest.raises(UserError, match="scale 2 out of range"):
        open_volume(str(root), scale=2)
    with pytest.raises(UserError, match="no scale with path 's9'"):
        open_volume(str(root), scale="s9")


def test_n5_fastest_axis_first(tmp_path, vol):
    # N5 lists dimensions x,y,z (fastest first): write the x,y,z view, read back z,y,x
    spec = {"driver": "n5", "kvstore": f"file://{tmp_path}/v.n5",
            "metadata": {"compression": {"type": "gzip"}, "blockSize": [7, 6, 2]}}
    write_ts(spec, np.ascontiguousarray(vol.T))
    attrs_path = tmp_path / "v.n5" / "attributes.json"
    attrs = json.loads(attrs_path.read_text())
    attrs["resolution"] = [4.6, 4.6, 50.0]
    attrs_path.write_text(json.dumps(attrs))
    v = open_volume(str(tmp_path / "v.n5"))
    check(v, vol)
    assert v.voxel_size_xyz == pytest.approx((4.6, 4.6, 50.0)) and v.chunks == (2, 6, 7)
    # explicit axes win over the default order
    write_ts({"driver": "n5", "kvstore": f"file://{tmp_path}/w.n5", "metadata": {"compression": {"type": "raw"}}}, vol)
    attrs_path = tmp_path / "w.n5" / "attributes.json"
    attrs_path.write_text(json.dumps({**json.loads(attrs_path.read_text()), "axes": ["z", "y", "x"]}))
    check(open_volume(f"n5://{tmp_path}/w.n5"), vol)


def test_precomputed_transposed_and_scales(tmp_path, vol):
    base = {"driver": "neuroglancer_precomputed", "kvstore": f"file://{tmp_path}/pc/",
            "multiscale_metadata": {"type": "image", "data_type": "uint8", "num_channels": 1}}
    s0 = ts.open({**base, "scale_metadata": {"resolution": [4, 4, 40], "size": [14, 12, 5], "voxel_offset": [100, 0, 7],
                                             "chunk_size": [8, 8, 2], "encoding": "raw"}}, create=True).result()
    s0[ts.d[:].translate_to[0]].write(vol.T[..., None]).result()
    small = vol[:, ::2, ::2]
    s1 = ts.open({**base, "scale_metadata": {"resolution": [8, 8, 40], "size": [7, 6, 5], "chunk_size": [4, 4, 2],
                                             "encoding": "raw"}}, create=True).result()
    s1.write(np.ascontiguousarray(small.T[..., None])).result()
    v = open_volume(f"precomputed://file://{tmp_path}/pc")
    check(v, vol)
    assert v.voxel_size_xyz == (4.0, 4.0, 40.0) and v.chunks == (2, 8, 8)
    v1 = open_volume(str(tmp_path / "pc"), scale="8_8_40")
    check(v1, small)
    assert v1.voxel_size_xyz == (8.0, 8.0, 40.0)
    # several channels -> c,z,y,x
    rgb = np.stack([vol, vol // 2, vol // 3])
    s = ts.open({"driver": "neuroglancer_precomputed", "kvstore": f"file://{tmp_path}/rgb/",
                 "multiscale_metadata": {"type": "image", "data_type": "uint8", "num_channels": 3},
                 "scale_metadata": {"resolution": [4, 4, 40], "size": [14, 12, 5], "encoding": "raw"}}, create=True).result()
    s.write(np.ascontiguousarray(rgb.T)).result()
    check(open_volume(str(tmp_path / "rgb")), rgb)


# ------------------------------------------------------------------------------------- errors


def test_missing_and_unknown_inputs_name_url_and_formats(tmp_path):
    with pytest.raises(UserError, match=r"'.*nowhere\.zarr' does not exist.*accepted: zarr v2/v3"):
        open_volume(str(tmp_path / "nowhere.zarr"))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(UserError, match="unknown file type '.txt'"):
        open_volume(str(tmp_path / "notes.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no zarr/n5/precomputed metadata"):
        open_volume(str(tmp_path / "empty"))
    (tmp_path / "group.zarr").mkdir()
    (tmp_path / "group.zarr" / ".zgroup").write_text('{"zarr_format": 2}')
    with pytest.raises(UserError, match="without OME-Zarr multiscales"):
        open_volume(str(tmp_path / "group.zarr"))
    (tmp_path / "bad.tif").write_bytes(b"not a tiff")
    with pytest.raises(UserError, match="cannot read TIFF"):
        open_volume(str(tmp_path / "bad.tif"))
    with pytest.raises(UserError, match="unsupported URL scheme 'ftp'"):
        open_volume("ftp://host/x.zarr")


# ------------------------------------------------------------------------------------- create_ome_zarr


def test_create_ome_zarr_metadata_resume_and_overwrite(tmp_path, vol):
    url = str(tmp_path / "out.ome.zarr")
    store = create_ome_zarr(url, vol.shape, vol.dtype, (2, 64, 8), (4.6, 4.6, 50))
    store.write(vol).result()
    attrs = json.loads((tmp_path / "out.ome.zarr" / ".zattrs").read_text())
    ms = attrs["multiscales"][0]
    assert ms["version"] == "0.4"
    assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    assert all(a["unit"] == "nanometer" for a in ms["axes"])
    assert ms["datasets"] == [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [50.0, 4.6, 4.6]}]}]
    zarray = json.loads((tmp_path / "out.ome.zarr" / "0" / ".zarray").read_text())
    assert zarray["chunks"] == [2, 12, 8] and zarray["dimension_separator"] == "/"
    assert zarray["compressor"]["cname"] == "zstd"
    v = open_volume(url)
    check(v, vol)
    assert v.voxel_size_xyz == pytest.approx((4.6, 4.6, 50.0))
    again = create_ome_zarr(url, vol.shape, vol.dtype, (2, 64, 8), (4.6, 4.6, 50))  # resume: same data
    np.testing.assert_array_equal(again.read().result(), vol)
    with pytest.raises(UserError, match=r"exists with shape \(5, 12, 14\) uint8, not shape \(5, 12, 15\) uint16"):
        create_ome_zarr(url, (5, 12, 15), np.uint16, (2, 8, 8), (4.6, 4.6, 50))
    fresh = create_ome_zarr(url, (5, 12, 15), np.uint16, (2, 8, 8), (4.6, 4.6, 50), overwrite=True)
    assert fresh.shape == (5, 12, 15) and not fresh.read().result().any()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("precious")
    with pytest.raises(UserError, match="non-empty directory that is not a zarr"):
        create_ome_zarr(str(tmp_path / "mine"), vol.shape, vol.dtype, (2, 8, 8), None, overwrite=True)


def test_create_ome_zarr_v3_with_channels(tmp_path, vol):
    url = str(tmp_path / "c.ome.zarr")
    data = np.stack([vol, vol // 2]).astype(np.uint16)
    store = create_ome_zarr(url, data.shape, data.dtype, (1, 2, 8, 8), (4, 4, 40), channel_names=["raw", "half"],
                            zarr_format=3)
    store.write(data).result()
    group = json.loads((tmp_path / "c.ome.zarr" / "zarr.json").read_text())
    ome = group["attributes"]["ome"]
    assert ome["version"] == "0.5"
    assert [a["name"] for a in ome["multiscales"][0]["axes"]] == ["c", "z", "y", "x"]
    assert [c["label"] for c in ome["omero"]["channels"]] == ["raw", "half"]
    v = open_volume(url)
    check(v, data)
    assert v.voxel_size_xyz == (4.0, 4.0, 40.0)


def test_parse_url_forms(tmp_path):
    from vemscale.io.urls import kvstore_url, parse_url

    p = parse_url("precomputed://gs://bucket/em/raw")
    assert (p.driver, p.remote, p.location, kvstore_url(p)) == ("neuroglancer_precomputed", True, "gs://bucket/em/raw",
                                                                "gs://bucket/em/raw/")
    p = parse_url("zarr://s3://bucket/v.zarr/")
    assert (p.driver, p.remote, kvstore_url(p)) == ("zarr", True, "s3://bucket/v.zarr/")
    p = parse_url("s3://bucket/v.zarr")
    assert (p.driver, p.remote) == (None, True)
    p = parse_url(f"file://{tmp_path}/a.h5#/raw")
    assert (p.location, p.dataset, p.remote) == (f"{tmp_path}/a.h5", "/raw", False)
    p = parse_url(f"{tmp_path}/a.hdf5:/g/raw")
    assert (p.location, p.dataset) == (f"{tmp_path}/a.hdf5", "/g/raw")
    assert kvstore_url(parse_url(f"precomputed://file://{tmp_path}/pc")) == f"file://{tmp_path}/pc/"
