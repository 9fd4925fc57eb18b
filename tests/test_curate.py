"""`vemscale curate`: planted duplicates go, blank patches go, the manifest matches the stored pixels (read back
against the source with tifffile), the corpus feeds pretrain, and bad input fails before anything is written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from conftest import data_path
from vemscale.curate.run import CurateConfig, run_curate
from vemscale.errors import UserError

P = 64  # patch size of the density test
PD = 128  # patch size of the duplicate tests: a 2-pixel shift is 1.6% of it


def texture(seed: int, shape: tuple[int, int], sigma: float = 5.0) -> np.ndarray:
    """EM-like smooth texture: distinct seeds give unrelated dHashes (>= 17 bits apart for the seeds used)."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    a = ndimage.gaussian_filter(rng.random(shape), sigma)
    a = (a - a.min()) / (a.max() - a.min())
    return np.clip(40 + 170 * a + rng.normal(0, 6, shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """12 slices of 256x256 (4 patches of 128 each): 0-7 unique, 8 = slice 1 exactly, 9 = slice 2 shifted by 2 px
    with noise (dHash 3-9 bits from the original), 10 empty resin (std 15 of pure noise: a plain std filter keeps
    it, the pooled std does not), 11 saturated (only 0 and 255)."""
    root = tmp_path_factory.mktemp("curate")
    vol = np.stack([texture(s, (256, 256)) for s in range(8)] + [np.zeros((256, 256), np.uint8)] * 4)
    vol[8] = vol[1]
    shifted = np.roll(vol[2], (2, 2), axis=(0, 1)).astype(np.int16) + np.random.default_rng(9).normal(0, 3, (256, 256))
    vol[9] = np.clip(shifted, 0, 255).astype(np.uint8)
    vol[10] = np.clip(200 + np.random.default_rng(10).normal(0, 15, (256, 256)), 0, 255)  # empty resin, noisy
    vol[11] = np.where(texture(50, (256, 256)) > 125, 255, 0)  # over-exposed: every pixel 0 or 255
    tifffile.imwrite(root / "vol.tif", vol)
    return root, vol


def _cfg(sources, out: Path, **kw) -> CurateConfig:
    kw.setdefault("patch", PD)
    return CurateConfig(sources=sources, output=str(out), run_dir=str(out) + "_run", progress=False, **kw)


def _png(root: Path, rel: str) -> np.ndarray:
    return np.asarray(Image.open(root / rel))


def test_planted_duplicates_and_blank_patches_go_and_the_manifest_matches(planted, ray_local, tmp_path):
    root, vol = planted
    out = tmp_path / "corpus"
    result = run_curate(_cfg([str(root / "vol.tif")], out, patches_per_task=16))  # 3 tasks of 4 slices
    assert result["tasks"] == 3
    m = pd.read_parquet(out / "manifest")
    assert len(m) == 12 * 4 == result["drawn"]  # every grid patch: 2 x 2 per 256 x 256 slice
    by_slice = m.groupby("slice")
    assert (by_slice.get_group(10)["reason"] == "flat").all()
    assert (by_slice.get_group(11)["reason"] == "saturated").all()
    for a, b in ((1, 8), (2, 9)):  # one of each planted pair is kept, the other names it
        for (y, x), rows in pd.concat([by_slice.get_group(a), by_slice.get_group(b)]).groupby(["y", "x"]):
            assert sorted(rows["reason"]) == ["", "duplicate"], rows
            dup = rows[rows["reason"] == "duplicate"].iloc[0]
            assert dup["duplicate_of"] == rows[rows["kept"]].iloc[0]["path"] and not dup["path"]
    unique = m[m["slice"].isin([0, 3, 4, 5, 6, 7])]
    assert unique["kept"].all() and (unique["reason"] == "").all()
    assert set(m.loc[m["reason"] == "duplicate", "duplicate_of"]) <= set(m.loc[m["kept"], "path"])
    assert m["kept"].sum() == result["kept"] == 32
    # the manifest matches the stored patches, pixel for pixel against the source volume
    files = sorted(str(p.relative_to(out)) for p in (out / "patches").rglob("*.png"))
    assert files == sorted(m.loc[m["kept"], "path"])
    for _, r in m[m["kept"]].iterrows():
        np.testing.assert_array_equal(_png(out, r["path"]), vol[r["slice"], r["y"] : r["y"] + PD, r["x"] : r["x"] + PD])
    assert (m["plane"] == "xy").all() and (m["h"] == PD).all()
    # statistics are what numpy says they are
    r = m[m["kept"]].iloc[0]
    patch = vol[r["slice"], r["y"] : r["y"] + PD, r["x"] : r["x"] + PD]
    assert r["std"] == pytest.approx(patch.std(), rel=1e-9)
    assert r["pooled_std"] == pytest.approx(patch.reshape(PD // 4, 4, PD // 4, 4).mean(axis=(1, 3)).std(), rel=1e-5)
    assert m[m["slice"] == 10]["std"].min() > 14  # the resin's raw std is its noise
    # report and corpus metadata
    s = json.loads((out / "report" / "summary.json").read_text())
    assert s["total"] == {"kept": 32, "duplicate": 8, "flat": 4, "saturated": 4}
    for name in ("kept", "dropped_flat", "dropped_saturated", "dropped_duplicate"):
        assert (out / "report" / f"{name}.png").stat().st_size > 500, name
    assert json.loads((out / "corpus.json").read_text())["kind"] == "vemscale-corpus"
    again = run_curate(_cfg([str(root / "vol.tif")], out, patches_per_task=16))  # a finished corpus recomputes nothing
    assert again["kept"] == 32 and again["passes"]["sample"] == {"computed": 0, "skipped": 3}
    assert sorted(str(p.relative_to(out)) for p in (out / "patches").rglob("*.png")) == files


def test_duplicates_across_sources_and_a_folder_source(planted, ray_local, tmp_path):
    """The same image in a volume and in a folder of PNGs: across-source dedupe keeps one; within-only keeps both."""
    root, vol = planted
    folder = tmp_path / "pngs"
    (folder / "a").mkdir(parents=True)
    Image.fromarray(vol[0]).save(folder / "a" / "same.png")
    Image.fromarray(texture(99, (200, 280))).save(folder / "a" / "other.png")  # 2 x 2 patches (round(200/128) = 2)
    Image.fromarray(texture(98, (80, 80))).save(folder / "small.png")  # smaller than a patch
    tifffile.imwrite(folder / "a" / "stack.tif", vol[:3], photometric="minisblack")
    src = [str(root / "vol.tif"), {"path": str(folder), "name": "pngs"}]
    both = run_curate(_cfg(src, tmp_path / "across"))
    m = pd.read_parquet(tmp_path / "across" / "manifest")
    pngs = m[m["source"] == "pngs"]
    assert (pngs.loc[pngs["file"] == "small.png", "reason"] == "small").all()
    assert len(pngs[pngs["file"] == "a/other.png"]) == 4 and pngs.loc[pngs["file"] == "a/other.png", "kept"].all()
    # a 3-page TIFF stack among the images is counted as unreadable (a stack is a volume source), not cut wrongly
    assert (pngs.loc[pngs["file"] == "a/stack.tif", "reason"] == "unreadable").all()
    assert set(m.loc[m["reason"] == "duplicate", "duplicate_of"]) <= set(m.loc[m["kept"], "path"])  # kept ones
    pair = m[((m["source"] == "pngs") & (m["file"] == "a/same.png")) | ((m["source"] != "pngs") & (m["slice"] == 0))]
    assert len(pair) == 8 and pair["kept"].sum() == 4 and (pair["reason"] == "duplicate").sum() == 4
    assert both["duplicates"]["across"] == 4
    within = run_curate(_cfg(src, tmp_path / "within", dedupe="within"))
    m2 = pd.read_parquet(tmp_path / "within" / "manifest")
    assert m2.loc[(m2["source"] == "pngs") & (m2["file"] == "a/same.png"), "kept"].all()
    assert within["kept"] == both["kept"] + 4


def test_density_and_pixel_size_and_planes(ray_local, tmp_path):
    """density draws ~density x area patches, the same ones on a rerun; pixel_size_nm resamples; a
    near-isotropic volume is cut in xy, xz and yz."""
    from vemscale.io import create_ome_zarr

    vol = np.stack([texture(100 + z, (256, 256)) for z in range(64)])
    url = str(tmp_path / "iso.ome.zarr")
    create_ome_zarr(url, vol.shape, np.uint8, (16, 128, 128), (8.0, 8.0, 8.0)).write(vol).result()
    area = P * 8 * P * 8 / 1e6  # um^2 of a patch at 8 nm
    res = run_curate(_cfg([url], tmp_path / "d", density=0.5 / area, dedupe="none", patch=P))
    m = pd.read_parquet(tmp_path / "d" / "manifest")
    grid = 64 * 16 + 2 * 256 * 4  # xy: 64 slices x 4 x 4 patches; xz, yz: 256 slices x 1 x 4
    assert set(m["plane"]) == {"xy", "xz", "yz"}
    assert abs(len(m) - grid / 2) < 4 * np.sqrt(grid / 4), (len(m), grid)  # binomial(grid, 0.5) within 4 sigma
    again = run_curate(_cfg([url], tmp_path / "d2", density=0.5 / area, dedupe="none", patch=P))
    m2 = pd.read_parquet(tmp_path / "d2" / "manifest")
    assert m[["plane", "slice", "y", "x"]].equals(m2[["plane", "slice", "y", "x"]]) and again["drawn"] == res["drawn"]
    # so sparse a draw that most tasks (one slice each) draw nothing: their manifest parts are typed and readable
    sparse = run_curate(_cfg([{"path": url, "planes": ["xy"]}], tmp_path / "sparse", density=0.05 / area,
                             dedupe="none", patch=P, patches_per_task=16))
    ms = pd.read_parquet(tmp_path / "sparse" / "manifest")
    assert len(ms) == sparse["drawn"] < 64 and ms["slice"].nunique() < 64
    xz = m[m["plane"] == "xz"]
    assert set(xz["y"]) == {0} and set(xz["x"]) <= {0, 64, 128, 192} and xz["slice"].max() < 256
    # 16 nm pixels: each patch covers 2x the source pixels per side, resampled to P x P
    run_curate(_cfg([{"path": url, "planes": ["xy"]}], tmp_path / "r", pixel_size_nm=16.0, dedupe="none", patch=P))
    r = pd.read_parquet(tmp_path / "r" / "manifest")
    assert (r["h"] == 2 * P).all() and len(r) == 64 * 4
    row = r[r["kept"]].iloc[0]
    img = _png(tmp_path / "r", row["path"])
    src = vol[row["slice"], row["y"] : row["y"] + 2 * P, row["x"] : row["x"] + 2 * P].astype(np.float64)
    assert img.shape == (P, P) and np.abs(img - src.reshape(P, 2, P, 2).mean(axis=(1, 3))).mean() < 3


@pytest.mark.slow  # CI budget: runs with -m slow; ~15 s
def test_classifier_keeps_what_it_scores_informative(planted, ray_local, tmp_path):
    import torch

    from vemscale.curate.classifier import build_classifier

    root, _ = planted
    for bias, kept in ((20.0, 32), (-20.0, 0)):
        torch.manual_seed(0)
        model = build_classifier()
        with torch.no_grad():
            model.fc.weight.zero_()
            model.fc.bias.fill_(bias)
        path = tmp_path / f"clf{bias}.pth"
        torch.save(model.state_dict(), path)
        res = run_curate(_cfg([str(root / "vol.tif")], tmp_path / f"c{bias}", classifier=str(path)))
        assert res["kept"] == kept
        if not kept:  # nothing passes, so nothing is a duplicate either: the 32 + 8 candidates all go
            assert res["total"]["classifier"] == 40 and "duplicate" not in res["total"]
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="missing keys"):
        run_curate(_cfg([str(root / "vol.tif")], tmp_path / "badclf", classifier=str(tmp_path / "bad.pth")))
    assert not (tmp_path / "badclf").exists()


@pytest.mark.slow  # CI budget: runs with -m slow; ~25 s
def test_corpus_feeds_pretrain(ray_local, tmp_path):
    """The unlabeled VNC split, curated, then `pretrain data=<corpus>` trains on its patches."""
    from vemscale.config import build_config
    from vemscale.train.pretrain import PretrainConfig, pretrain

    src = {"path": str(data_path("vnc_drosophila_sstem", "test_unlabeled", "image.tif")), "slices": "0:2",
           "voxel_size": [4.6, 4.6, 50]}
    res = run_curate(_cfg([src], tmp_path / "corpus", patch=224))
    assert res["kept"] > 20  # real tissue: 2 slices x 5 x 5 patches, nearly all informative
    cfg = build_config(PretrainConfig, {"run_dir": str(tmp_path / "pre"), "data": [str(tmp_path / "corpus")],
                                        "model": {"name": "tiny"}, "workers": 1, "use_gpu": False,
                                        "train": {"iterations": 2, "batch_size": 2, "crop": 64, "log_every": 2,
                                                  "checkpoint_every": 2, "preview_every": 0}})
    out = pretrain(cfg)
    assert out["metrics"]["samples_seen"] == 4
    from vemscale.train.unlabeled import SourceConfig, check_source

    what = check_source(SourceConfig(path=str(tmp_path / "corpus")), 1, 64)["what"]
    assert what.startswith(f"folder {tmp_path / 'corpus' / 'patches'}")  # the kept patches, not the report's PNGs


def test_bad_input_fails_before_writing(planted, tmp_path):
    root, _ = planted
    out = tmp_path / "out"
    cases = [
        ([str(tmp_path / "missing.zarr")], {}, "does not exist"),
        ([str(root / "vol.tif")], {"patch": 512}, "smaller than a patch"),
        ([str(root / "vol.tif")], {"density": 1.0}, "no voxel size"),
        ([{"path": str(root / "vol.tif"), "planes": ["xz"]}], {}, "smaller than a patch"),
        ([], {}, "sources is empty"),
        ([str(root / "vol.tif")], {"classifier": str(tmp_path / "none.pth")}, "does not exist"),
    ]
    for sources, kw, match in cases:
        with pytest.raises(UserError, match=match):
            run_curate(_cfg(sources, out, **kw))
        assert not out.exists(), match
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.docx").write_text("x")
    with pytest.raises(UserError, match="not a vemscale corpus"):
        run_curate(_cfg([str(root / "vol.tif")], tmp_path / "busy"))
    assert os.listdir(tmp_path / "busy") == ["thesis.docx"]
