"""`vemscale view`: the viewer state built from real layers, and a headless-Chromium screenshot that must show
the EM (grey texture) and the mitochondria segmentation (coloured pixels)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile

from conftest import ROOT, data_path
from vemscale.config import build_config
from vemscale.errors import UserError
from vemscale.export.run import ExportConfig, run_export
from vemscale.export.state import build_state, describe_layer, expand_layer_args, state_url
from vemscale.io import create_ome_zarr

VOXEL = (4.6, 4.6, 50.0)
CROP = (slice(4, 12), slice(256, 640), slice(256, 640))


@pytest.fixture(scope="module")
def layers(tmp_path_factory: pytest.TempPathFactory, ray_local) -> dict[str, Any]:
    """A real EM crop (image) and its mitochondria (segmentation with meshes and properties), exported by us."""
    root = tmp_path_factory.mktemp("view")
    em = tifffile.imread(data_path("vnc_drosophila_sstem", "train", "image.tif"))[CROP]
    mito = tifffile.imread(data_path("vnc_drosophila_sstem", "train", "labels_mitochondria.tif"))[CROP]
    for name, arr in (("em_src", em), ("mito_src", mito)):
        create_ome_zarr(str(root / f"{name}.zarr"), arr.shape, arr.dtype, (8, 128, 128), VOXEL).write(arr).result()
    common = {"chunk": (8, 64, 64), "pyramid": True, "max_scales": 2, "run_dir": str(root / "runs")}
    run_export(build_config(ExportConfig, {**common, "source": str(root / "em_src.zarr"), "dest": str(root / "em")}))
    seg = run_export(build_config(ExportConfig, {**common, "source": str(root / "mito_src.zarr"), "dest": str(root / "mito"),
                                           "layer_type": "segmentation", "mesh": True, "sharded": True,
                                           "task_voxels": 8 * 64 * 64,  # mesh blocks of 8x64x64: objects span several
                                           "classes": ["background", "mitochondria"]}))
    probs = np.stack([255 - mito * 255, mito * 255]).astype(np.uint8)
    create_ome_zarr(str(root / "probs.zarr"), probs.shape, probs.dtype, (1, 8, 128, 128), VOXEL,
                    channel_names=["background", "mitochondria"]).write(probs).result()
    return {"root": root, "em": root / "em", "mito": root / "mito", "probs": root / "probs.zarr", "meshes": seg["meshes"]}


def test_state_from_layers(layers: dict[str, Any]) -> None:
    described = [describe_layer(str(layers["em"])), describe_layer(f"seg={layers['mito']}"),
                 describe_layer(str(layers["probs"])), describe_layer(f"{layers['root'] / 'em_src.zarr'}:image")]
    assert [(d.name, d.kind, d.fmt) for d in described] == [
        ("em", "image", "precomputed"), ("seg", "segmentation", "precomputed"),
        ("probs.zarr", "probabilities", "zarr2"), ("em_src.zarr", "image", "zarr2")]
    assert described[1].segments == [1] and described[2].classes == ["background", "mitochondria"]
    state = build_state(described, "http://127.0.0.1:9/data")
    assert state["position"] == [192.0, 192.0, 4.0]  # x,y,z centre of the 8 x 384 x 384 crop
    assert state["dimensions"] == {"x": [4.6e-9, "m"], "y": [4.6e-9, "m"], "z": [5.0000000000000004e-08, "m"]}
    by_name = {lay["name"]: lay for lay in state["layers"]}
    assert by_name["em"]["source"] == "precomputed://http://127.0.0.1:9/data/em"
    assert by_name["seg"]["type"] == "segmentation" and by_name["seg"]["segments"] == ["1"]
    # zarr probabilities: one layer per foreground class, picked by the local channel position
    assert by_name["probs.zarr:mitochondria"]["localPosition"] == [1]
    assert "getDataValue()" in by_name["probs.zarr:mitochondria"]["shader"]
    url = state_url(state, "http://host/v/tok/")
    assert url.startswith("http://host/v/tok/#!")
    assert json.loads(urllib.parse.unquote(url.split("#!", 1)[1])) == state
    # a `vemscale infer` output folder (OME-Zarr group naming its layers) stands for its layers
    pred = layers["root"] / "pred"
    for name, arr in (("probabilities", np.zeros((2, 8, 64, 64), np.uint8)), ("labels", np.zeros((8, 64, 64), np.uint8))):
        create_ome_zarr(str(pred / name), arr.shape, arr.dtype, (1, 8, 64, 64)[-arr.ndim:], VOXEL).write(arr).result()
    (pred / ".zgroup").write_text(json.dumps({"zarr_format": 2}))
    (pred / ".zattrs").write_text(json.dumps({"vemscale": {"layers": {"probabilities": "probabilities", "labels": "labels"}}}))
    args = expand_layer_args([str(pred), str(layers["em"])])
    assert args == [f"probabilities={pred / 'probabilities'}", f"labels={pred / 'labels'}", str(layers["em"])]
    assert [describe_layer(a).kind for a in args] == ["probabilities", "segmentation", "image"]
    with pytest.raises(UserError, match="export it first"):
        describe_layer(str(data_path("vnc_drosophila_sstem", "train", "image.tif")))


def _chromium_or_skip() -> None:
    """Install Debian chromium + chromium-driver when missing; skip (saying why) only where apt cannot run."""
    from vemscale.export.browser import find_chromium

    try:
        find_chromium()
        return
    except UserError:
        pass
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("chromium/chromium-driver missing and apt-get cannot run here (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", "chromium", "chromium-driver"]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=True)
        subprocess.run(cmd, env=env, capture_output=True, check=True)
    find_chromium()


def test_view_screenshot_shows_em_and_segments(layers: dict[str, Any], tmp_path: Path) -> None:
    _chromium_or_skip()
    from PIL import Image

    shot = tmp_path / "shot.png"
    proc = subprocess.run([sys.executable, "-m", "vemscale.cli", "view", str(layers["em"]), str(layers["mito"]),
                           "--screenshot", str(shot), "--size", "1024x768", "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["url"].startswith("http://127.0.0.1:") and "/v/" in result["url"]
    assert not [e for e in result["browser_errors"] if "/data/" in e], result["browser_errors"]
    rgb = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    spread = rgb.max(axis=2) - rgb.min(axis=2)
    grey = rgb[..., 0][spread < 6]
    assert grey.size > 0.2 * spread.size and grey.std() > 30, "no EM texture in the screenshot"
    # segment colour blended over EM: coloured, but not one of the UI's pure line colours
    pure = ((rgb < 40) | (rgb > 215)).all(axis=2)
    coloured = (spread > 40) & ~pure
    assert coloured.sum() > 2000, f"only {coloured.sum()} coloured pixels: segments not drawn"


def test_view_3d_draws_the_sharded_meshes(layers: dict[str, Any], tmp_path: Path) -> None:
    """The 3D panel alone: the mitochondria's sharded multi-resolution meshes, decoded and drawn by Neuroglancer
    (without them the panel holds the yellow bounding box and its blended edges only: 56 such pixels, measured
    with the mesh key taken out of the layer's info)."""
    assert layers["meshes"]["fragments"] > layers["meshes"]["labels"]  # objects of several fragments among them
    _chromium_or_skip()
    from PIL import Image

    shot = tmp_path / "shot3d.png"
    proc = subprocess.run([sys.executable, "-m", "vemscale.cli", "view", str(layers["mito"]), "--layout", "3d",
                           "--screenshot", str(shot), "--size", "800x600", "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["browser_errors"] == [], result["browser_errors"]
    rgb = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)[60:]  # below the layer bar
    yellowish = (np.abs(rgb[..., 0] - rgb[..., 1]) < 40) & (rgb[..., 2] < 80)  # the box's lines on black
    shaded = ((rgb.max(axis=2) - rgb.min(axis=2)) > 40) & ~((rgb < 40) | (rgb > 215)).all(axis=2) & ~yellowish
    assert shaded.sum() > 1000, f"only {shaded.sum()} shaded pixels: no mesh drawn"
