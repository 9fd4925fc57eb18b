"""Unlabeled patch streams (folders and real volumes, mixed, split across ranks) and the MoCoV2 objective."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from conftest import data_path
from vemscale.config import ConfigError, load_config
from vemscale.errors import UserError
from vemscale.models import create_model
from vemscale.train.moco import MoCo, MocoConfig
from vemscale.train.pretrain import PretrainConfig
from vemscale.train.unlabeled import PatchStream, SourceConfig, check_source


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """24 PNGs of 32x32 in two sub-folders (CEM500K-like layout); file k holds the constant value 10 + k."""
    root = tmp_path_factory.mktemp("patches")
    for k in range(24):
        sub = root / f"set{k % 2}"
        sub.mkdir(exist_ok=True)
        Image.fromarray(np.full((32, 32), 10 + k, np.uint8)).save(sub / f"p{k:03d}.png")
    return root


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    """A small real crop of an unlabeled EM stack (VNC test split), 3 x 96 x 128."""
    img = tifffile.imread(data_path("vnc_drosophila_sstem", "test_unlabeled", "image.tif"), key=range(3))
    path = tmp_path_factory.mktemp("vol") / "vol.tif"
    tifffile.imwrite(path, img[:, :96, :128], photometric="minisblack", compression="zlib")
    return path, img[:, :96, :128]


def _ids(batch: np.ndarray) -> list[int]:
    return [int(round(float(b.mean()) * 255)) - 10 for b in batch]


def test_folder_epochs_are_permutations_split_across_ranks(folder):
    src = [SourceConfig(path=str(folder))]
    ranks = [PatchStream(src, 1, 32, seed=3, rank=r, world=2) for r in range(2)]
    seen: list[list[int]] = [[], []]
    for it in range(6):  # 6 global batches of 4 = one pass over 24 files
        for r, stream in enumerate(ranks):
            seen[r] += _ids(stream.batch(it, 4))
    assert sorted(seen[0] + seen[1]) == list(range(24))  # every file once, no overlap between ranks
    assert ranks[0].epochs() == 1.0
    nxt = [_ids(ranks[r].batch(6, 4)) for r in range(2)]
    assert nxt != [seen[0][:2], seen[1][:2]]  # the next epoch has its own order


def test_stream_resumes_from_counters(folder, volume):
    src = [SourceConfig(path=str(folder), weight=2), SourceConfig(path=str(volume[0]))]
    full = PatchStream(src, 1, 32, seed=0, rank=1, world=2)
    for it in range(3):
        full.batch(it, 8)
    resumed = PatchStream(src, 1, 32, seed=0, rank=1, world=2, counters=full.counters)
    assert np.array_equal(full.batch(3, 8), resumed.batch(3, 8))
    assert sum(full.counters) == 32 and min(full.counters) > 0  # both sources drawn


def test_volume_patches_come_from_the_volume(volume):
    path, img = volume
    stream = PatchStream([SourceConfig(path=str(path))], 1, 32, seed=0, rank=0, world=1)
    batch = stream.batch(0, 4)
    assert batch.shape == (4, 1, 32, 32) and batch.dtype == np.float32
    for patch in batch:  # each patch is an exact xy window of one slice, scaled to [0, 1]
        raw = np.round(patch[0] * 255).astype(np.uint8)
        found = any((np.lib.stride_tricks.sliding_window_view(img[z], (32, 32)) == raw).all(axis=(-1, -2)).any()
                    for z in range(img.shape[0]))
        assert found


def test_source_errors(tmp_path, volume):
    with pytest.raises(UserError, match="does not exist"):
        check_source(SourceConfig(path=str(tmp_path / "nope")), 1, 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no PNG"):
        check_source(SourceConfig(path=str(tmp_path / "empty")), 1, 32)
    with pytest.raises(UserError, match="xz planes are 3x128, smaller than the crop 32"):
        check_source(SourceConfig(path=str(volume[0]), planes="all"), 1, 32)
    with pytest.raises(UserError, match="1 channel"):
        check_source(SourceConfig(path=str(volume[0])), 3, 32)


def test_config_shortcuts():
    cfg = load_config(PretrainConfig, None, ["data=/data/cem500k/", "workers=4", "train.batch_size=8"])
    assert [s.path for s in cfg.data] == ["/data/cem500k/"] and cfg.workers == 4
    cfg = load_config(PretrainConfig, "configs/pretrain_retina.yaml", ["data=a.zarr,b/"])
    assert [s.path for s in cfg.data] == ["a.zarr", "b/"]
    with pytest.raises(ConfigError, match="divisible by workers"):
        load_config(PretrainConfig, None, ["workers=3", "train.batch_size=8"])
    with pytest.raises(ConfigError, match="moco.queue"):
        load_config(PretrainConfig, "configs/pretrain_moco.yaml", ["moco.queue=1000"])
    with pytest.raises(ConfigError, match="unknown config key 'train.lrr'"):
        load_config(PretrainConfig, None, ["train.lrr=1"])


@pytest.mark.parametrize("name", ["tiny", "unet_resnet18"])
def test_moco_step(name):
    torch.manual_seed(0)
    model = create_model(name, in_chans=1, num_classes=1)
    moco = MoCo(model, MocoConfig(dim=16, hidden=32, queue=8, momentum=0.9))
    assert not any(p.requires_grad for p in model.decoder.parameters())  # not part of the objective
    opt = torch.optim.SGD([p for p in moco.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    q0 = moco.queue.clone()
    x = torch.randn(4, 1, 32, 32)
    loss, acc = moco(x + 0.1 * torch.randn_like(x), x)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and 0 <= float(acc) <= 1
    assert int(moco.queue_ptr) == 4 and torch.equal(moco.queue[:, 4:], q0[:, 4:]) and not torch.equal(moco.queue[:, :4], q0[:, :4])
    # the key encoder is the query's encoder and projection, without a copy of the decoder or head
    keys = {n for n, _ in moco.encoder_k.named_parameters()}
    assert keys == {n for n, _ in moco.encoder_q.named_parameters() if not n.startswith(("model.decoder.", "model.head."))}
    before = {n: p.clone() for n, p in moco.encoder_k.named_parameters()}
    query = {n: p.detach().clone() for n, p in moco.encoder_q.named_parameters()}
    loss, _ = moco(x, x)  # the key encoder has moved towards the updated query encoder
    k = dict(moco.encoder_k.named_parameters())
    for n in keys:  # k <- 0.9 k + 0.1 q, name by name
        torch.testing.assert_close(k[n], 0.9 * before[n] + 0.1 * query[n])
    moved = [not torch.equal(p, k[n]) for n, p in moco.encoder_q.named_parameters() if p.requires_grad]
    assert any(moved)
