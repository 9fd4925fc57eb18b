"""Blockwise inference end to end on a real ssTEM crop: decomposition independence, resume after kills, scale,
and every bad input failing before any block runs. Real Ray, real tensorstore, a real (tiny) model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import numpy as np
import pytest
import tensorstore as ts
import tifffile
import torch

from conftest import ROOT, data_path, kill_cli_when
from vemscale.blocks.grid import BlockGrid
from vemscale.blocks.ledger import Ledger, ledger_url
from vemscale.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from vemscale.errors import UserError
from vemscale.infer.outputs import argmax_labels, quantize_probabilities
from vemscale.infer.pipeline import InferConfig, prepare_infer, run_infer
from vemscale.infer.predictor import grid_and_normalizer
from vemscale.infer.run import load_infer_config
from vemscale.infer.tiling import numpy_reader, predict_block_orthoplane, predict_block_xy, predict_volume_xy
from vemscale.infer.tta import with_tta
from vemscale.io.volume import create_ome_zarr, open_volume
from vemscale.models import create_model

SHAPE = (6, 200, 232)
VOXEL = (4.6, 4.6, 45.0)
BATCH = 4


def make_checkpoint(path: Path, sample: np.ndarray, in_chans: int = 1) -> Path:
    """Tiny TransUNet, seed 0, head rescaled so both classes occur (a random head predicts ~0.5 everywhere)."""
    torch.manual_seed(0)
    model = create_model("tiny", in_chans=in_chans, num_classes=2).eval()
    meta = CheckpointMeta(model=model.spec, tile=64, margin=8, voxel_size_xyz=list(VOXEL))
    with torch.no_grad():
        model.head.weight.mul_(300.0)
        model.head.bias.zero_()
        _, norm = grid_and_normalizer(meta)
        x = torch.from_numpy(norm(sample[None, :1, :64, :64]))[0][:, None].repeat(1, in_chans, 1, 1)
        logits = model(x)
        model.head.bias[1] -= float((logits[:, 1] - logits[:, 0]).median())
    return save_checkpoint(path, model, meta)


def reference(ckpt: Path, vol: np.ndarray, fn=None, box=None, tta: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Quantised probabilities and labels of the whole-volume sliding window (1 thread, as the workers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, meta = load_checkpoint(ckpt)
        model = with_tta(model, tta)
        grid, norm = grid_and_normalizer(meta)
        if box is None:
            probs = predict_volume_xy(model, vol, grid, norm, batch_size=BATCH)
        else:
            probs = fn(model, numpy_reader(vol), box, vol.shape, grid, norm, batch_size=BATCH)
    finally:
        torch.set_num_threads(threads)
    return quantize_probabilities(probs), argmax_labels(probs)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    vol = tifffile.imread(data_path("vnc_drosophila_sstem", "test_unlabeled", "image.tif"), key=range(SHAPE[0]))
    vol = np.ascontiguousarray(vol[:, : SHAPE[1], : SHAPE[2]])
    store = create_ome_zarr(root / "vol.ome.zarr", SHAPE, np.uint8, (1, 64, 64), VOXEL)
    store.write(vol).result()
    ckpt = make_checkpoint(root / "ckpt", vol)
    probs, labels = reference(ckpt, vol)
    assert 0.05 < labels.mean() < 0.95, "the test model should predict both classes"
    return SimpleNamespace(root=root, vol=vol, input=str(root / "vol.ome.zarr"), ckpt=str(ckpt), probs=probs, labels=labels)


def config(data, name: str, **kw) -> InferConfig:
    base = dict(input=data.input, output=str(data.root / name), checkpoint=data.ckpt, block_shape=(2, 48, 48),
                output_chunks=(2, 48, 48), workers=1, threads_per_worker=1, batch_size=BATCH, progress=False,
                run_dir=str(data.root / f"run-{name}"))
    return InferConfig(**{**base, **kw})


def outputs(out: str | Path) -> tuple[np.ndarray, np.ndarray]:
    return open_volume(f"{out}/probabilities").read(), open_volume(f"{out}/labels").read()


def assert_equals_reference(data, out) -> None:
    probs, labels = outputs(out)
    assert probs.shape == (2, *SHAPE) and probs.dtype == np.uint8 and labels.dtype == np.uint8
    assert np.array_equal(probs, data.probs)
    assert np.array_equal(labels, data.labels)


# --- decomposition independence ------------------------------------------------------------------------------


@pytest.mark.parametrize("block,workers,read_tasks", [  # every block shape, worker and read-task count
    ((2, 48, 48), 1, 1), ((2, 48, 48), 2, 2), ((4, 96, 144), 1, 2), ((4, 96, 144), 2, 1), ((6, 200, 232), 1, 1),
    # one block gets one actor and one read task whatever the counts: the same run as the one above (CI budget)
    pytest.param((6, 200, 232), 2, 2, marks=pytest.mark.slow),
])
def test_outputs_do_not_depend_on_blocks_workers_or_read_tasks(data, ray_local, block, workers, read_tasks):
    name = f"decomp-{'x'.join(map(str, block))}-{workers}-{read_tasks}"
    cfg = config(data, name, block_shape=block, workers=workers, read_tasks=read_tasks, write_tasks=read_tasks,
                 blocks_per_batch=3)
    result = run_infer(cfg)
    s = result["summary"]
    assert s["computed"] == s["blocks"] == BlockGrid.create(SHAPE, (2, 48, 48), block).num_blocks
    assert s["voxels"] == np.prod(SHAPE) and s["halo_misses"] == 0 and 1 <= s["actors"] <= min(workers, s["blocks"])
    assert_equals_reference(data, cfg.output)
    assert open_volume(result["outputs"]["labels"]).voxel_size_xyz == VOXEL


def test_orthoplane_with_a_short_halo_equals_one_block(data, ray_local):
    """Orthoplane over an ROI; the halo is deliberately too small (extra reads), which must not change bytes."""
    cfg = config(data, "ortho", mode="orthoplane", roi="0:6,48:144,48:144", halo=(1, 8, 8), write="probabilities")
    s = run_infer(cfg)["summary"]
    assert s["computed"] == 3 * 2 * 2 and s["halo_misses"] > 0
    box = (slice(0, 6), slice(48, 144), slice(48, 144))
    probs, _ = reference(data.ckpt, data.vol, predict_block_orthoplane, box)
    out = open_volume(f"{cfg.output}/probabilities").read()
    assert np.array_equal(out[(slice(None), *box)], probs)
    assert not out[:, :, :48].any() and not (Path(cfg.output) / "labels").exists()


def test_tta_of_the_checkpoint_or_the_command_line_equals_the_whole_volume_reference(data, ray_local):
    """A checkpoint validated with tiles.tta=8 is predicted with the 8-view mean; tta=1 on the command line turns
    it off again. An ROI keeps the 8x cost small."""
    model, meta = load_checkpoint(data.ckpt)
    ckpt = save_checkpoint(data.root / "ckpt-tta", model, meta.model_copy(update={"tta": 8}))
    box = (slice(0, 2), slice(48, 144), slice(0, 96))
    probs, labels = reference(ckpt, data.vol, predict_block_xy, box, tta=8)
    assert not np.array_equal(labels, data.labels[box])  # the views change some labels
    cfg = config(data, "tta", checkpoint=str(ckpt), roi="0:2,48:144,0:96", block_shape=(2, 96, 96))
    s = run_infer(cfg)["summary"]
    assert s["computed"] == s["blocks"] == 1
    for out, ref in zip(outputs(cfg.output), (probs, labels)):
        assert np.array_equal(out[(Ellipsis, *box)], ref)
    # the command line wins over the checkpoint (without TTA every other test here checks the bytes)
    assert prepare_infer(config(data, "tta-off", checkpoint=str(ckpt), tta=1))["job"]["tta"] == 1


# --- resume ----------------------------------------------------------------------------------------------------


def test_precomputed_output_rerun_skips_done_blocks_and_new_geometry_starts_over(data, ray_local, caplog):
    """A Neuroglancer precomputed output equals the reference; a rerun computes nothing, another block shape
    starts over (its ledger fingerprint changed) and still writes the same bytes."""
    cfg = config(data, "rerun", block_shape=(6, 96, 96))
    cfg.output = "precomputed://" + str(data.root / "rerun")
    result = run_infer(cfg)
    first = result["summary"]
    assert result["outputs"]["labels"].startswith("precomputed://")
    written = [open_volume(result["outputs"][layer]).read() for layer in ("probabilities", "labels")]
    assert np.array_equal(written[0], data.probs) and np.array_equal(written[1], data.labels)
    again = run_infer(cfg)["summary"]
    assert (again["computed"], again["skipped"]) == (0, first["blocks"])
    cfg.block_shape = (6, 48, 96)
    with caplog.at_level("INFO", logger="vemscale.blocks.ledger"):
        moved = run_infer(cfg)["summary"]
    assert (moved["computed"], moved["skipped"]) == (moved["blocks"], 0)
    assert "starting over" in caplog.text and "plan" in caplog.text
    written = [open_volume(result["outputs"][layer]).read() for layer in ("probabilities", "labels")]
    assert np.array_equal(written[0], data.probs) and np.array_equal(written[1], data.labels)


def _ledger_count(out: str, blocks: int) -> int:
    meta = Path(out) / ".vemscale-ledger" / "ledger.json"
    if not meta.exists():
        return 0
    import json

    try:
        info = json.loads(meta.read_text())
    except ValueError:  # being replaced right now
        return 0
    return Ledger(ledger_url(out), info["fingerprint"], info["generation"]).count_done(blocks)


def _shard_bytes(out: str | Path) -> dict[str, bytes]:
    """Every file of the output's layers (shards and array metadata), by path inside the layer."""
    return {str(p.relative_to(out)): p.read_bytes() for layer in ("labels", "probabilities")
            for p in (Path(out) / layer).rglob("*") if p.is_file()}


SHARDED = dict(block_shape=(2, 96, 96), output_chunks=(2, 48, 48), sharded=True, shard_shape=(2, 96, 96))


@pytest.fixture(scope="module")
def sharded_run(data, ray_local):
    """One uninterrupted zarr-v3-sharded run (4 chunks per shard, one shard per block)."""
    cfg = config(data, "sh-zarr", **SHARDED)
    return cfg, run_infer(cfg)["summary"]


@pytest.mark.parametrize("fmt", ["zarr", pytest.param("precomputed", marks=pytest.mark.slow)])  # CI budget: -m slow
def test_sigkill_of_the_whole_run_then_rerun_computes_only_the_rest(data, ray_local, sharded_run, fmt):
    """A sharded output (zarr v3 or precomputed) killed mid-run resumes to the same bytes, file by file, as an
    uninterrupted run."""
    cfg = config(data, f"killed-{fmt}", **SHARDED)
    if fmt == "zarr":
        whole_out = sharded_run[0].output
    else:  # the uninterrupted precomputed reference, then the same layout killed
        whole = config(data, "sh-pc-whole", **SHARDED)
        whole_out, whole.output = whole.output, "precomputed://" + whole.output
        assert run_infer(whole)["summary"]["sharded"]
    root = cfg.output
    if fmt == "precomputed":
        cfg.output = "precomputed://" + root
    blocks = BlockGrid.create(SHAPE, (2, 96, 96), cfg.block_shape).num_blocks
    args = [f"input={cfg.input}", f"output={cfg.output}", f"checkpoint={cfg.checkpoint}", "block_shape=2,96,96",
            "output_chunks=2,48,48", "sharded=true", "shard_shape=2,96,96", "workers=1", "threads_per_worker=1",
            f"batch_size={BATCH}", "progress=false", f"run_dir={cfg.run_dir}",
            "blocks_per_batch=1"]  # small batches, so the kill lands mid-run
    kill_cli_when(["infer", *args], lambda: _ledger_count(root, blocks) >= 4, timeout=150)
    done = _ledger_count(root, blocks)
    assert 4 <= done < blocks
    result = run_infer(cfg)
    s = result["summary"]
    assert (s["computed"], s["skipped"]) == (blocks - done, done) and s["sharded"]
    assert np.array_equal(open_volume(result["outputs"]["labels"]).read(), data.labels)
    assert np.array_equal(open_volume(result["outputs"]["probabilities"]).read(), data.probs)
    resumed, whole = _shard_bytes(root), _shard_bytes(whole_out)
    assert len(resumed) > 2 * blocks and resumed.keys() == whole.keys()
    assert [k for k in resumed if resumed[k] != whole[k]] == []


def test_killed_actor_is_restarted_and_the_run_completes(data, ray_local):
    from ray.util.state import list_actors

    cfg = config(data, "actor-killed", blocks_per_batch=1)  # small batches, so the kill lands mid-run
    killed: list[int] = []

    finished = threading.Event()

    def kill_one_actor() -> None:
        """SIGKILL the Predictor actor 0.3 s after it comes alive (mid-run: the actor predicts all 75 blocks
        in about a second, ahead of the writes that fill the ledger, so the ledger cannot time the kill)."""
        address = ray_local.get_runtime_context().gcs_address  # other Ray instances may run on this machine
        deadline, seen = time.monotonic() + 120, {}
        while not finished.is_set() and time.monotonic() < deadline:
            for actor in list_actors(address=address, filters=[("state", "=", "ALIVE")]):
                if "Predictor" in actor.class_name and actor.pid:
                    first = seen.setdefault(actor.pid, time.monotonic())
                    if time.monotonic() - first >= 0.3 and not finished.is_set():
                        os.kill(actor.pid, signal.SIGKILL)
                        killed.append(actor.pid)
                        return
            time.sleep(0.02)

    errors: list[BaseException] = []

    def watch() -> None:
        try:
            kill_one_actor()
        except BaseException as err:  # surfaced below: a failing state API must not look like "no actor"
            errors.append(err)

    killer = threading.Thread(target=watch)
    killer.start()
    try:
        s = run_infer(cfg)["summary"]
    finally:
        finished.set()
        killer.join()
    assert not errors, errors
    assert killed, "no Predictor actor was found to kill"
    assert s["computed"] == s["blocks"] == 75 and s["actors"] >= 2  # the restarted actor has a new pid
    assert_equals_reference(data, cfg.output)


# --- scale -----------------------------------------------------------------------------------------------------


def test_roi_of_a_petavoxel_volume(data, ray_local, tmp_path):
    shape = (100_000, 100_000, 100_000)
    url = f"file://{tmp_path}/huge.zarr/"
    store = ts.open({"driver": "zarr", "kvstore": url, "metadata": {"shape": list(shape), "chunks": [2, 64, 64],
                     "dtype": "|u1", "fill_value": 0}}, create=True).result()  # metadata only, no chunk written
    store[0:6, 1000:1200, 2000:2232].write(data.vol).result()
    t = time.perf_counter()
    plan = BlockGrid.create(shape, (2, 48, 48), (2, 48, 48), "0:2,1000:1100,2000:2100")
    assert time.perf_counter() - t < 1.0 and plan.num_blocks == 3 * 3
    cfg = config(data, "huge-out", input=str(tmp_path / "huge.zarr"), output=str(tmp_path / "huge-out"),
                 roi="0:2,1000:1100,2000:2100", write="labels")
    s = run_infer(cfg)["summary"]
    assert s["computed"] == 9 and s["voxels"] == 2 * 144 * 144
    box = tuple(slice(a, b) for a, b in plan.roi)
    vol = open_volume(cfg.input)
    assert vol.shape == shape
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, meta = load_checkpoint(data.ckpt)
        grid, norm = grid_and_normalizer(meta)
        probs = predict_block_xy(model, lambda z, y, x: vol.read((z, y, x))[None], box, shape, grid, norm,
                                 batch_size=BATCH)
    finally:
        torch.set_num_threads(threads)
    labels = open_volume(str(tmp_path / "huge-out" / "labels"))
    assert labels.shape == shape
    assert np.array_equal(labels.read(box), argmax_labels(probs))
    assert s["sharded"] and s["shard_shape"] == (2, 48, 48)  # 1e15 voxels: sharded (zarr v3), one shard per block
    chunks = [p for p in (tmp_path / "huge-out" / "labels" / "0").rglob("*")
              if p.is_file() and not p.name.startswith(".") and p.name != "zarr.json"]
    assert len(chunks) == 9  # only the ROI's shards exist


# --- bad input: a UserError before any block runs ----------------------------------------------------------------


def _no_blocks_ran(out: Path) -> bool:
    return not (out / ".vemscale-ledger").exists()


def test_missing_input(data, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        run_infer(config(data, "x", input=str(tmp_path / "nope.zarr"), output=str(tmp_path / "o")))
    assert _no_blocks_ran(tmp_path / "o")


def test_unreadable_checkpoint(data, tmp_path):
    bad = tmp_path / "bad-ckpt"
    bad.mkdir()
    (bad / "vemscale.json").write_text((Path(data.ckpt) / "vemscale.json").read_text())
    (bad / "model.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="cannot load weights"):
        run_infer(config(data, "x", checkpoint=str(bad), output=str(tmp_path / "o")))
    with pytest.raises(UserError, match="not a vemscale checkpoint|does not exist"):
        run_infer(config(data, "x", checkpoint=str(tmp_path), output=str(tmp_path / "o")))
    assert _no_blocks_ran(tmp_path / "o")


def test_checkpoint_channels_must_match_volume(data, tmp_path):
    ckpt = make_checkpoint(tmp_path / "rgb", data.vol, in_chans=2)
    with pytest.raises(UserError, match="expects 2 input channel"):
        run_infer(config(data, "x", checkpoint=str(ckpt), output=str(tmp_path / "o")))
    assert _no_blocks_ran(tmp_path / "o")


def test_existing_output_of_another_shape(data, tmp_path):
    out = tmp_path / "o"
    create_ome_zarr(out / "labels", (6, 100, 100), np.uint8, (2, 48, 48), VOXEL)
    with pytest.raises(UserError, match="overwrite"):
        run_infer(config(data, "x", output=str(out)))
    assert _no_blocks_ran(out)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a vemscale output"):
        run_infer(config(data, "x", output=str(tmp_path / "foreign"), overwrite=True))
    assert (tmp_path / "foreign" / "notes.txt").exists()


def test_bad_block_shape(data, tmp_path):
    with pytest.raises(UserError, match="nearest valid block_shape: 2,48,96"):
        run_infer(config(data, "x", block_shape=(2, 50, 100), output=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()


def test_overrides_and_job_entry_point(data, tmp_path):
    cfg = load_infer_config(["input=a", "output=b", "checkpoint=c",
                             "roi=10:20,0:64,:", "block_shape=16,256,256", "halo=0,32,32", "workers=2",
                             "mode=orthoplane", "write=labels", "overwrite=true"])
    assert cfg.roi == "10:20,0:64,:" and cfg.block_shape == (16, 256, 256) and cfg.halo == (0, 32, 32)
    assert (cfg.workers, cfg.mode, cfg.write, cfg.overwrite) == (2, "orthoplane", "labels", True)
    from_file = load_infer_config([str(ROOT / "configs" / "infer.yaml"), "input=a", "output=b", "checkpoint=c"])
    assert from_file.halo == "auto" and from_file.block_shape == (16, 768, 768)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "jobs/infer.py", f"input={tmp_path}/missing.zarr", f"output={tmp_path}/o",
                           f"checkpoint={data.ckpt}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_ten_thousand_blocks_resume_after_a_kill_recomputing_only_what_was_in_flight(tmp_path, ray_local):
    """1e4 one-tile blocks of a cheap model (pixel_linear) through the ledger: SIGKILL the whole run midway, rerun:
    exactly the blocks the ledger did not hold are computed, and the bytes equal the whole-volume reference."""
    from vemscale.checkpoint import CheckpointMeta, save_checkpoint

    shape, side = (16, 800, 800), 32
    vol = np.random.default_rng(3).integers(0, 255, shape, dtype=np.uint8)
    src = tmp_path / "gen.zarr"
    create_ome_zarr(src, shape, np.uint8, (1, 160, 160), VOXEL).write(vol).result()
    torch.manual_seed(0)
    model = create_model("pixel_linear", in_chans=1, num_classes=2).eval()
    with torch.no_grad():
        model.head.weight[:] = torch.tensor([[[[1.0]]], [[[-1.0]]]])
        model.head.bias[:] = torch.tensor([0.0, 0.3])
    ckpt = save_checkpoint(tmp_path / "pixel", model, CheckpointMeta(model=model.spec, tile=side, margin=0))
    out = tmp_path / "out"
    blocks = BlockGrid.create(shape, (1, side, side), (1, side, side)).num_blocks
    assert blocks == 10_000
    args = [f"input={src}", f"output={out}", f"checkpoint={ckpt}", f"block_shape=1,{side},{side}",
            f"output_chunks=1,{side},{side}", "workers=1", "write=labels", "progress=false", "blocks_per_batch=250",
            f"run_dir={tmp_path}/run"]
    kill_cli_when(["infer", *args], lambda: _ledger_count(str(out), blocks) >= 2000, timeout=180)
    done = _ledger_count(str(out), blocks)
    assert 2000 <= done < blocks
    cfg = load_infer_config(args)
    s = run_infer(cfg)["summary"]
    assert (s["computed"], s["skipped"]) == (blocks - done, done)
    assert s["tiles"] == blocks - done  # one tile per block: nothing padded but the last batch
    _, labels = reference(ckpt, vol)
    assert np.array_equal(open_volume(f"{out}/labels").read(), labels)


# --- sharded outputs and tissue masks ----------------------------------------------------------------------------


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")]


def test_sharded_zarr3_and_precomputed_equal_the_reference(data, ray_local, sharded_run):
    """Forced sharding: same bytes as the whole-volume reference, read back by zarr-python and cloud-volume."""
    import zarr
    from cloudvolume import CloudVolume

    cfg, s = sharded_run
    assert s["sharded"] and s["shard_shape"] == (2, 96, 96)
    assert_equals_reference(data, cfg.output)
    z = zarr.open_array(f"{cfg.output}/labels/0", mode="r")
    assert z.metadata.zarr_format == 3 and tuple(z.shards) == (2, 96, 96) and np.array_equal(z[...], data.labels)
    grid = BlockGrid.create(SHAPE, (2, 96, 96), (2, 96, 96))
    assert len([p for p in _files(Path(cfg.output) / "labels" / "0") if p.name != "zarr.json"]) == grid.num_blocks

    pc = config(data, "sh-pc", block_shape=(6, 96, 96), sharded=True)
    pc.output = "precomputed://" + str(data.root / "sh-pc")
    result = run_infer(pc)
    assert result["summary"]["sharded"]
    info = CloudVolume("file://" + str(data.root / "sh-pc" / "labels")).info
    assert info["scales"][0]["sharding"]["@type"] == "neuroglancer_uint64_sharded_v1"
    cv = CloudVolume("file://" + str(data.root / "sh-pc" / "labels"), mip=0, fill_missing=False, progress=False)
    assert np.array_equal(np.asarray(cv[:, :, :])[..., 0].transpose(2, 1, 0), data.labels)
    assert np.array_equal(open_volume(result["outputs"]["probabilities"]).read(), data.probs)
    unsharded = 3 * 5 * 5  # chunk files of the labels layer alone, unsharded: 3 z x 5 y x 5 x chunks of 2x48x48
    assert len(_files(data.root / "sh-pc")) < unsharded  # both layers, sharded, with their info files


def _mask_volume(root: Path) -> tuple[str, np.ndarray]:
    """A 4x coarser mask in y,x (voxel 18.4 nm): tissue in an L-shaped region; expanded to the target grid too."""
    m = np.zeros((6, 50, 58), np.uint8)
    m[:, :20, :] = 1
    m[:4, :, :10] = 7
    url = str(root / "mask.ome.zarr")
    if not Path(url).exists():
        create_ome_zarr(url, m.shape, np.uint8, (2, 25, 29), (18.4, 18.4, 45.0)).write(m).result()
    return url, m.repeat(4, axis=1).repeat(4, axis=2) != 0


@pytest.mark.parametrize("block", [(2, 48, 48), (6, 96, 144)])
def test_mask_skips_blocks_without_tissue_and_keeps_the_rest_exact(data, ray_local, block):
    url, tissue = _mask_volume(data.root)
    cfg = config(data, f"mask-{block[1]}", block_shape=block, mask=url)
    s = run_infer(cfg)["summary"]
    grid = BlockGrid.create(SHAPE, (2, 48, 48), block)
    empty = sum(not tissue[grid.box(i)].any() for i in range(grid.num_blocks))
    assert 0 < empty < grid.num_blocks and s["masked"] == empty and s["computed"] == grid.num_blocks
    assert s["masked_voxels"] == sum(np.prod([b.stop - b.start for b in grid.box(i)])
                                     for i in range(grid.num_blocks) if not tissue[grid.box(i)].any())
    # tiles run: only those whose 48x48 core (64 tile, margin 8; blocks are whole cores) holds tissue
    core = 48
    with_tissue = sum(tissue[z, a : a + core, b : b + core].any() for z in range(SHAPE[0])
                      for a in range(0, SHAPE[1], core) for b in range(0, SHAPE[2], core))
    assert with_tissue < SHAPE[0] * 5 * 5 and round(s["tiles"]) == with_tissue
    probs, labels = outputs(cfg.output)
    assert np.array_equal(labels, np.where(tissue, data.labels, 0))
    assert np.array_equal(probs, np.where(tissue, data.probs, 0))
    # masked blocks store no chunk: exactly the output chunks (2,48,48; one class each) holding a non-zero voxel
    for name, expect in (("labels", [labels]), ("probabilities", list(probs))):
        stored = [p for p in _files(Path(cfg.output) / name) if p.name not in ("zarr.json", "info")]
        want = sum(_nonzero_boxes(e, (2, 48, 48)) for e in expect)
        assert len(stored) == want < len(expect) * _nonzero_boxes(np.ones(SHAPE), (2, 48, 48)), name


def _precomputed_mask(root: Path) -> str:
    """The same mask as a two-scale Neuroglancer segmentation layer: scale 0 (9.2 nm) all tissue, scale 1 the L."""
    from vemscale.export.precomputed import add_scale, create_precomputed

    url = str(root / "mask-pc")
    if not Path(url).exists():
        _, m = _mask_volume(root)
        s0 = create_precomputed(url, (6, 100, 116), np.uint8, (9.2, 9.2, 45.0), "segmentation", chunk=(2, 32, 32))
        s0.write(np.ones(s0.shape, s0.dtype.numpy_dtype)).result()
        _, s1 = add_scale(url, (6, 50, 58), (18.4, 18.4, 45.0), (2, 32, 32))
        m = np.zeros((6, 50, 58), np.uint8)
        m[:, :20, :] = 1
        m[:4, :, :10] = 7
        s1.write(m.astype(s1.dtype.numpy_dtype)).result()
    return url


def _nonzero_boxes(a: np.ndarray, box: Sequence[int]) -> int:
    """How many boxes of `box` (z,y,x, aligned at 0, clipped at the edge) hold a non-zero voxel of `a` (z,y,x)."""
    return sum(bool(a[z : z + box[0], y : y + box[1], x : x + box[2]].any()) for z in range(0, a.shape[0], box[0])
               for y in range(0, a.shape[1], box[1]) for x in range(0, a.shape[2], box[2]))


@pytest.mark.parametrize("fmt", [pytest.param("zarr", marks=pytest.mark.slow), "precomputed"])  # CI budget: -m slow
def test_sharded_output_of_a_neuroglancer_mask_stores_no_shard_for_masked_blocks(data, ray_local, fmt):
    """mask= a precomputed layer at mask_scale=1, output sharded: masked blocks are background and store no shard;
    every shard that holds a non-zero voxel of the expected output is stored, and no other."""
    url = _precomputed_mask(data.root)
    _, tissue = _mask_volume(data.root)
    cfg = config(data, f"mask-sh-{fmt}", block_shape=(6, 96, 96), sharded=True, mask=url, mask_scale=1)
    root = cfg.output
    if fmt == "precomputed":
        cfg.output = "precomputed://" + root
    result = run_infer(cfg)
    s = result["summary"]
    grid = BlockGrid.create(SHAPE, (2, 48, 48), (6, 96, 96))
    empty = [i for i in range(grid.num_blocks) if not tissue[grid.box(i)].any()]
    assert len(empty) == 4 and s["masked"] == 4 and s["sharded"]
    labels = np.where(tissue, data.labels, 0)
    probs = np.where(tissue, data.probs, 0)
    assert np.array_equal(open_volume(result["outputs"]["labels"]).read(), labels)
    assert np.array_equal(open_volume(result["outputs"]["probabilities"]).read(), probs)
    shard = tuple(s["shard_shape"])
    for name, expect in (("labels", labels), ("probabilities", probs.max(axis=0))):
        stored = [p for p in _files(Path(root) / name) if p.name not in ("zarr.json", "info")]
        assert len(stored) == _nonzero_boxes(expect, shard) < _nonzero_boxes(np.ones(SHAPE), shard), name


def test_auto_mask_skips_empty_resin(data, ray_local, tmp_path):
    """mask=auto on a volume whose right half is flat resin: those blocks are not computed, the rest are exact."""
    vol = data.vol.copy()
    vol[:, :, 128:] = 200
    src = str(tmp_path / "half.ome.zarr")
    create_ome_zarr(src, SHAPE, np.uint8, (1, 64, 64), VOXEL).write(vol).result()
    _, plain = reference(data.ckpt, vol)  # the whole-volume sliding window, without a mask
    auto = config(data, "auto", input=src, output=str(tmp_path / "auto"), run_dir=str(tmp_path / "r2"),
                  write="labels", mask="auto", mask_cell=(2, 16, 16), mask_dilate=0)
    result = run_infer(auto)
    s = result["summary"]
    grid = BlockGrid.create(SHAPE, (2, 48, 48), (2, 48, 48))
    flat = sum(grid.box(i)[2].start >= 128 for i in range(grid.num_blocks))  # blocks wholly in the resin
    assert s["masked"] == flat and flat > 0
    mask = open_volume(result["tissue_mask"]["url"]).read()
    assert mask[:, :, : 128 // 16].all() and not mask[:, :, 128 // 16:].any()
    a = open_volume(f"{auto.output}/labels").read()
    assert np.array_equal(a[:, :, :128], plain[:, :, :128]) and not a[:, :, 144:].any()


def test_bad_mask_and_shard_inputs_fail_before_any_output(data, tmp_path):
    out = tmp_path / "o"
    bad = tmp_path / "bad-mask.zarr"
    create_ome_zarr(bad, (6, 40, 58), np.uint8, (2, 20, 29), (18.4, 18.4, 45.0))
    for kw, msg in [(dict(mask=str(tmp_path / "none.zarr")), "does not exist"),
                    (dict(mask=str(bad)), "same extent"),
                    (dict(mask_scale=1), "mask_scale is given without mask"),
                    (dict(sharded=False, shard_shape=(2, 48, 48)), "shard"),
                    (dict(sharded=True, block_shape=(2, 96, 96), shard_shape=(2, 144, 144)), "shard"),
                    (dict(sharded=True, block_shape=(2, 96, 96), shard_shape=(2, 50, 48)), "shard")]:
        with pytest.raises(UserError, match=msg):
            run_infer(config(data, "x", output=str(out), **kw))
        assert not out.exists()
