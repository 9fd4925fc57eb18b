"""The bad-input catalogue: each kind of mistake a user makes, through the command line as a user types it.

Every case must exit 2 (never a traceback), print a message that names the problem and the fix, and leave an
existing output and its ledger byte for byte as they were. README's troubleshooting table lists them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from conftest import cli
from vemscale.checkpoint import CheckpointMeta, save_checkpoint
from vemscale.cli import main
from vemscale.io import create_ome_zarr
from vemscale.models import create_model

SHAPE = (4, 64, 64)


def _tif(path: Path, a: np.ndarray) -> str:
    tifffile.imwrite(path, a, photometric="minisblack")
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_local):
    """Inputs good and bad, checkpoints good and bad, and one finished infer output to keep intact."""
    r = tmp_path_factory.mktemp("bad_input")
    rng = np.random.default_rng(0)
    vol = rng.integers(0, 255, SHAPE, dtype=np.uint8)
    create_ome_zarr(r / "vol.zarr", SHAPE, np.uint8, (2, 32, 32), (4.0, 4.0, 40.0)).write(vol).result()
    create_ome_zarr(r / "big.zarr", (4, 96, 64), np.uint8, (2, 32, 32), (4.0, 4.0, 40.0)).write(
        rng.integers(0, 255, (4, 96, 64), dtype=np.uint8)).result()
    create_ome_zarr(r / "u16.zarr", SHAPE, np.uint16, (2, 32, 32), (4.0, 4.0, 40.0)).write(vol.astype(np.uint16) * 257).result()
    create_ome_zarr(r / "f32.zarr", SHAPE, np.float32, (2, 32, 32), (4.0, 4.0, 40.0)).write((vol / 255.0).astype(np.float32)).result()
    create_ome_zarr(r / "rgb.zarr", (3, *SHAPE), np.uint8, (1, 2, 32, 32), (4.0, 4.0, 40.0)).write(
        np.stack([vol] * 3)).result()
    import zarr

    zarr.open_array(str(r / "empty.zarr"), mode="w", shape=(0, 64, 64), chunks=(1, 32, 32), dtype="u1", zarr_format=2)
    _tif(r / "vol.tif", vol)
    _tif(r / "mask.tif", vol > 128)
    _tif(r / "lab.tif", (vol > 128).astype(np.uint8))
    _tif(r / "lab5.tif", (vol % 5).astype(np.uint8))
    _tif(r / "lab_small.tif", (vol[:, :32] > 128).astype(np.uint8))
    _tif(r / "mask_odd.tif", np.ones((4, 50, 64), np.uint8))  # 64 / 50 rows: no whole ratio, no voxel size
    (r / "notavol.tif").write_text("hello, I am not a TIFF")
    (r / "nomulti.zarr").mkdir()
    (r / "nomulti.zarr" / ".zgroup").write_text('{"zarr_format": 2}')
    (r / "bad.yaml").write_text("block_shape: [2, 32\n")
    (r / "afile").write_text("x")
    torch.manual_seed(0)
    model = create_model("tiny", in_chans=1, num_classes=2)
    save_checkpoint(r / "ckpt", model, CheckpointMeta(model=model.spec, tile=64, margin=8))
    recon = create_model("tiny", in_chans=1, num_classes=1)
    save_checkpoint(r / "pretrained", recon, CheckpointMeta(model=recon.spec, kind="pretrain", tile=64, margin=8))
    r18 = create_model("unet_resnet18", in_chans=1, num_classes=2)
    save_checkpoint(r / "ckpt_r18", r18, CheckpointMeta(model=r18.spec, tile=64, margin=8))
    shutil.copytree(r / "ckpt", r / "truncated")
    weights = next(p for p in (r / "truncated").iterdir() if p.suffix in (".pt", ".pth", ".safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    # a finished output, which no failed command may touch
    assert main(["infer", f"input={r / 'vol.zarr'}", f"output={r / 'done'}", f"checkpoint={r / 'ckpt'}",
                 "block_shape=2,32,32", "output_chunks=2,32,32", "workers=1", "progress=false",
                 f"run_dir={r / 'run'}"]) == 0
    mounts: list[Path] = []
    try:
        _unwritable_places(r, mounts)
        yield r
    finally:
        for m in mounts:
            subprocess.run(["umount", "-l", str(m)], capture_output=True)
        if (r / "readonly").exists():
            (r / "readonly").chmod(0o755)


def _tmpfs(path: Path, options: str) -> bool:
    """A tmpfs mounted at `path` (root only); False where this machine does not allow mounts."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode == 0


def _unwritable_places(r: Path, mounts: list[Path]) -> None:
    """r/readonly: a directory no one may write to (a read-only tmpfs as root, mode 555 otherwise); r/full: a
    1 MiB tmpfs filled to the last byte, holding a finished output (root only: mounts need it). Appends each
    mount to `mounts` as soon as it exists, so the fixture unmounts it whatever fails next."""
    (r / "readonly").mkdir()
    if _tmpfs(r / "readonly", "ro,size=1m"):
        mounts.append(r / "readonly")
    elif os.geteuid() != 0:  # root writes through mode 555: then the case is skipped
        (r / "readonly").chmod(0o555)
    (r / "full").mkdir()
    if _tmpfs(r / "full", "size=1m"):
        mounts.append(r / "full")
        shutil.copytree(r / "done", r / "full" / "done")
        fd = os.open(r / "full" / "filler", os.O_WRONLY | os.O_CREAT)
        with contextlib.suppress(OSError):  # fill the disk to the last block
            while os.write(fd, b"\0" * 4096):
                pass
        os.close(fd)


def _readonly(r: Path) -> Path:
    if not os.path.ismount(r / "readonly") and os.geteuid() == 0:
        pytest.skip("as root, only a read-only mount keeps a directory unwritable, and mounting failed here")
    return r / "readonly"


def _on_full_disk(r: Path) -> Path:
    if not os.path.ismount(r / "full"):
        pytest.skip("a full disk is simulated with a tmpfs, which needs root")
    return r / "full"


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def infer(r: Path, **kw: str) -> list[str]:
    args = {"input": r / "vol.zarr", "output": r / "done", "checkpoint": r / "ckpt", "block_shape": "2,32,32",
            "output_chunks": "2,32,32", "progress": "false", "run_dir": r / "run", **kw}
    return ["infer", *[f"{k}={v}" for k, v in args.items()]]


def finetune(r: Path, train: str, **kw: str) -> list[str]:
    args = {"data.train": train, "train.iterations": 1, "train.crop": 64, "run_dir": r / "ft", **kw}
    return ["finetune", *[f"{k}={v}" for k, v in args.items()]]


# (id, argv builder, regex the message must match: the problem ... and the fix)
CASES = [
    ("missing input", lambda r: infer(r, input=r / "missing.zarr"), r"missing.zarr' does not exist.*accepted:"),
    ("not a volume", lambda r: infer(r, input=r / "notavol.tif"), r"cannot read TIFF .*notavol.tif"),
    ("bool input", lambda r: infer(r, input=r / "mask.tif"), r"boolean \(a mask\?\), not an EM image.*grey-value"),
    ("uint16 for a uint8 model", lambda r: infer(r, input=r / "u16.zarr"),
     r"uint16 \(full scale 65535\) but .* trained on uint8 .*Convert the volume to uint8 .*or fine-tune"),
    ("float for a uint8 model", lambda r: infer(r, input=r / "f32.zarr"), r"float32 \(full scale 1\) .*Convert"),
    ("wrong channel count", lambda r: infer(r, input=r / "rgb.zarr"), r"expects 1 input channel\(s\) but .* has 3"),
    ("zero-size axis", lambda r: infer(r, input=r / "empty.zarr"), r"positive sizes, got \(0, 64, 64\): an axis is empty; check"),
    ("OME-Zarr without multiscales", lambda r: infer(r, input=r / "nomulti.zarr"),
     r"without OME-Zarr multiscales metadata; point the URL at an array inside it"),
    ("scale that does not exist", lambda r: infer(r, scale=3), r"scale 3 out of range; it has 1 scales"),
    ("missing checkpoint", lambda r: infer(r, checkpoint=r / "nockpt"), r"nockpt.*does not exist"),
    ("truncated checkpoint", lambda r: infer(r, checkpoint=r / "truncated"), r"truncated.*cannot load weights"),
    ("pre-training checkpoint to infer", lambda r: infer(r, checkpoint=r / "pretrained"),
     r"pre-training checkpoint .*fine-tune it first"),
    ("negative block shape", lambda r: infer(r, block_shape="-2,32,32"), r"block_shape must be three positive"),
    ("block not a multiple of chunks", lambda r: infer(r, block_shape="2,40,32"),
     r"not a whole multiple of the output chunk shape .*nearest valid block_shape: 2,32,32"),
    ("ROI outside the volume", lambda r: infer(r, roi="0:2,0:32,100:200"), r"x range 100:200 is empty or outside"),
    ("output of another shape", lambda r: infer(r, input=r / "big.zarr"), r"exists with shape .*overwrite"),
    ("output path is a file", lambda r: infer(r, output=r / "afile"), r"is a file; the output is a directory"),
    ("unknown config key", lambda r: infer(r, blok_shape="2,32,32"), r"unknown config key 'blok_shape'; valid keys:"),
    ("wrong type for a key", lambda r: infer(r, batch_size="many"), r"batch_size: Input should be a valid integer"),
    ("YAML that does not parse", lambda r: ["infer", str(r / "bad.yaml"), *infer(r)[1:]], r"bad.yaml' is not valid YAML"),
    ("conflicting keys", lambda r: infer(r, sharded="false", shard_shape="2,32,32"),
     r"shard_shape .* given with sharded=false; drop one of the two keys"),
    ("mask that cannot be mapped", lambda r: infer(r, mask=r / "mask_odd.tif"),
     r"cannot map a mask of 50 voxels onto 64 along y .*give the mask.s and the volume.s voxel sizes"),
    ("labels with values >= classes", lambda r: finetune(r, f"[{{image: {r / 'vol.tif'}, labels: {r / 'lab5.tif'}}}]"),
     r"hold values \[0, 1, 2, 3, 4\] but the config declares 2 classes .*fix data.classes or the labels"),
    ("labels of another shape", lambda r: finetune(r, f"[{{image: {r / 'vol.tif'}, labels: {r / 'lab_small.tif'}}}]"),
     r"have shape .* but image .* has .*must cover the same voxels"),
    ("empty training set", lambda r: finetune(r, "[]"), r"training set is empty: list labelled volumes under data.train"),
    ("checkpoint of another architecture",
     lambda r: finetune(r, f"[{{image: {r / 'vol.tif'}, labels: {r / 'lab.tif'}}}]", init=r / "ckpt_r18"),
     r"holds a unet_resnet18 but the model is transunet_tiny; set model.name=unet_resnet18"),
    ("instances of a class the source lacks",
     lambda r: ["instances", f"source={r / 'done'}", f"output={r / 'done'}", "classes=nucleus"], r"nucleus"),
    ("watershed keys without split=watershed",
     lambda r: ["instances", f"source={r / 'done'}", f"output={r / 'objects'}", "watershed.h_nm=5"],
     r"split=none: add split=watershed"),
    ("no write permission", lambda r: infer(r, output=_readonly(r) / "out"),
     r"output '.*readonly/out': (no permission to write|.*is on a read-only file system).*choose an output"),
    ("run_dir is a file", lambda r: infer(r, run_dir=r / "afile"), r"run_dir '.*afile' exists and is not a directory"),
    ("full disk", lambda r: infer(r, output=_on_full_disk(r) / "out"),
     r"no space left on the device of .*full.*free space there or choose an output on another disk"),
    ("fine-tune run_dir on a full disk", lambda r: finetune(r, f"[{{image: {r / 'vol.tif'}, labels: {r / 'lab.tif'}}}]",
                                                            run_dir=_on_full_disk(r) / "ft"),
     r"run_dir .*full/ft.*no space left.*free space there"),
    ("curate: patch larger than the volume",
     lambda r: ["curate", f"sources={r / 'vol.zarr'}", f"output={r / 'done'}", "patch=128"], r"smaller than a patch"),
]


@pytest.mark.parametrize("name, argv, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_names_the_fix_and_touches_nothing(world, name, argv, message):
    before = _digest(world / "done")
    full_before = _digest(world / "full")
    r = cli(*argv(world))
    rc, text = r.returncode, " ".join(r.stderr.split())
    assert rc == 2, f"{name}: exit {rc}; stderr: {text[-1500:]}"
    assert "Traceback" not in text
    assert re.search(message, text), f"{name}: {text[-800:]}"
    assert _digest(world / "done") == before, f"{name} changed the existing output"
    assert _digest(world / "full") == full_before, f"{name} changed the output on the full disk"


def test_a_missing_zarr_chunk_reads_as_the_fill_value(world, tmp_path):
    """Not an error, by the zarr spec: a chunk that was never written is the fill value (sparse volumes are
    legal). Inference of a volume with a deleted chunk sees zeros there, and says nothing else."""
    src = tmp_path / "holey.zarr"
    shutil.copytree(world / "vol.zarr", src)
    chunk = next(p for p in (src / "0").rglob("*") if p.is_file() and not p.name.startswith(".") and p.name != "zarr.json")
    chunk.unlink()
    from vemscale.io.volume import open_volume

    data = open_volume(str(src)).read()
    assert (data == 0).any() and data.shape == SHAPE


def test_a_disk_that_fills_mid_run_fails_clearly_and_the_rerun_finishes_the_same_bytes(world, tmp_path):
    """A disk can fill after the checks passed: the run stops with exit 2 and what to do, the blocks written so
    far stay done, and once there is space the same command writes only the rest, to a clean run's bytes."""
    disk = tmp_path / "filling"
    disk.mkdir()
    _on_full_disk(world)  # skips where mounts are not allowed
    if not _tmpfs(disk, "size=20m"):
        pytest.skip("needs a tmpfs")
    try:
        src = tmp_path / "em.zarr"
        vol = np.random.default_rng(1).integers(0, 255, (24, 1024, 1024), dtype=np.uint8)  # 24 MiB raw: over 20 MiB
        create_ome_zarr(src, vol.shape, np.uint8, (8, 256, 256), (4.0, 4.0, 40.0)).write(vol).result()
        args = ["task_voxels=2097152", "--encoding", "raw", "--chunk", "8,256,256", "--no-sharded"]

        def export(dest: Path, run: Path) -> tuple[int, str, str]:
            r = cli("export", src, f"precomputed://file://{dest}", *args, f"--run-dir={run}", "--json")
            return r.returncode, " ".join(r.stderr.split()), r.stdout

        rc, text, _ = export(disk / "em", tmp_path / "run")
        assert rc == 2 and "Traceback" not in text, text[-1500:]
        assert re.search(r"no space left on the device of the path in this line: free space .* rerun the same "
                         r"command, the blocks already written are kept and skipped .*filling/em/", text), text[-800:]
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        rc, text, out = export(disk / "em", tmp_path / "run")
        assert rc == 0, text[-1500:]
        blocks = json.loads(out.strip().splitlines()[-1])["blocks"]["scale0"]
        assert 0 < blocks["skipped"] < blocks["blocks"], blocks  # only the rest was written
        assert export(tmp_path / "clean", tmp_path / "clean_run")[0] == 0
        layer = {k: v for k, v in _digest(disk / "em").items() if not k.startswith(".vemscale-ledger")}
        assert layer == {k: v for k, v in _digest(tmp_path / "clean").items() if not k.startswith(".vemscale-ledger")}
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_an_s3_input_without_credentials_says_to_set_them(world, tmp_path):
    """A private bucket read with no AWS credentials in the environment: exit 2, the 403 and how to give them."""
    import boto3
    from moto.server import ThreadedMotoServer

    from conftest import free_ports

    port = free_ports(1)[0]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="AKIAVEMSCALETEST",
                              aws_secret_access_key="test-secret")
        client.create_bucket(Bucket="private")
        for f in sorted((world / "vol.zarr").rglob("*")):
            if f.is_file():
                client.upload_file(str(f), "private", f"vol.zarr/{f.relative_to(world / 'vol.zarr').as_posix()}")
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}
        env.update(AWS_ENDPOINT_URL=endpoint, AWS_REGION="us-east-1", HOME=str(tmp_path))  # no ~/.aws either
        before = _digest(world / "done")
        r = subprocess.run([sys.executable, "-m", "vemscale.cli", *infer(world, input="s3://private/vol.zarr")],
                           env=env, capture_output=True, text=True, timeout=120)
        text = " ".join(r.stderr.split())
        assert r.returncode == 2 and "Traceback" not in text, text[-1500:]
        assert re.search(r"s3://private/vol.zarr.*HTTP 403.*no AWS credentials were found \(AWS_ACCESS_KEY_ID", text), \
            text[-800:]
        assert _digest(world / "done") == before
    finally:
        server.stop()
