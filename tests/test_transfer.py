"""Transfer and freeze: which weights a checkpoint gives a model, which stay fixed, and the errors."""

from __future__ import annotations

import functools

import pytest
import torch

from vemscale.checkpoint import CheckpointMeta, save_checkpoint
from vemscale.errors import UserError
from vemscale.models import create_model
from vemscale.train.transfer import apply_init


@functools.cache
def _ckpt_model(name: str = "tiny", classes: int = 1, **kw) -> torch.nn.Module:
    torch.manual_seed(1)
    return create_model(name, in_chans=1, num_classes=classes, **kw)


def _checkpoint(tmp_path, name: str = "tiny", classes: int = 1, drop: tuple[str, ...] = (), **kw):
    model = _ckpt_model(name, classes, **kw)
    path = tmp_path / f"ckpt_{name}_{classes}_{len(drop)}_{len(kw)}"
    save_checkpoint(path, model, CheckpointMeta(kind="pretrain", model=model.spec))
    if drop:
        state = {k: v for k, v in model.state_dict().items() if not k.startswith(drop)}
        torch.save(state, path / "model.pt")
    return path, model


def _fresh(name: str = "tiny", classes: int = 2, **kw) -> torch.nn.Module:
    torch.manual_seed(2)
    return create_model(name, num_classes=classes, **{"in_chans": 1, **kw})


def _same(a: torch.nn.Module, b: torch.nn.Module, prefix: tuple[str, ...]) -> dict[str, bool]:
    """Per tensor under prefix: equal in a and b? (Only randomly initialised ones: weights of >= 2 dims.)"""
    sb = b.state_dict()
    return {k: torch.equal(v, sb[k]) for k, v in a.state_dict().items()
            if k.startswith(prefix) and v.shape == sb[k].shape and v.ndim >= 2}


def test_transfer_transformer_and_freeze(tmp_path):
    path, src = _checkpoint(tmp_path)
    model = _fresh()
    report = apply_init(model, path, "transformer", "transformer")
    assert all(_same(model, src, ("patch_embed.", "transformer.")).values())
    assert not any(_same(model, src, ("cnn.", "decoder.")).values())  # convolutions keep their own init
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n in set(model.parameter_groups()["transformer"])}
    assert report["frozen"] == len(frozen) and report["transferred"] > 0


def test_transfer_encoder_and_all(tmp_path):
    path, src = _checkpoint(tmp_path)
    model = _fresh()
    apply_init(model, path, "encoder")
    assert all(_same(model, src, ("cnn.", "patch_embed.", "transformer.")).values())
    assert not any(_same(model, src, ("decoder.",)).values())
    assert all(p.requires_grad for p in model.parameters())
    model = _fresh()
    report = apply_init(model, path, "all", "encoder")
    assert all(_same(model, src, ("cnn.", "patch_embed.", "transformer.", "decoder.")).values())
    assert report["skipped"] == ["head.weight", "head.bias"]  # 1 reconstruction channel vs 2 classes
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == set(model.parameter_groups()["encoder"])


def test_transfer_none_leaves_the_model_alone(tmp_path):
    path, _ = _checkpoint(tmp_path)
    model = _fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_init(model, path, "none", "none")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_frozen_batchnorm_encoder_stays_bit_identical(tmp_path):
    path, _ = _checkpoint(tmp_path, "unet_resnet18")
    model = _fresh("unet_resnet18")
    apply_init(model, path, "encoder", "encoder")
    enc_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("cnn.")}
    dec_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("decoder.")}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9, weight_decay=1e-4)
    model.train()
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 1, 32, 32)), torch.randint(0, 2, (2, 32, 32)))
    loss.backward()
    opt.step()
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in enc_before.items())  # weights and BN running statistics
    assert not all(torch.equal(v, after[k]) for k, v in dec_before.items())


@pytest.mark.parametrize(
    "ckpt, model_kw, transfer, freeze, message",
    [
        (dict(name="tiny"), dict(name="unet_resnet18"), "encoder", "none", "holds a transunet_tiny but the model is unet_resnet18"),
        (dict(name="tiny", embed_dim=96, num_heads=3), dict(name="tiny"), "transformer", "none", "shapes differ.*embed_dim=96"),
        (dict(name="tiny", embed_dim=96, num_heads=3), dict(name="tiny", embed_dim=192), "encoder", "none", "embed_dim: checkpoint 96, model 192"),
        (dict(name="tiny", drop=("transformer.blocks.3",)), dict(name="tiny"), "transformer", "none", "missing transformer.blocks.3"),
        (dict(name="tiny"), dict(name="tiny", depth=3), "all", "none", "not in the model transformer.blocks.3.*depth=3"),
        (dict(name="tiny"), dict(name="tiny", in_chans=3), "all", "none", "in_chans: checkpoint 1, model 3"),
        (dict(name="unet_resnet18"), dict(name="unet_resnet18"), "transformer", "none", "has no transformer part"),
        (dict(name="tiny"), dict(name="tiny"), "transformer", "encoder", "freeze=encoder would fix weights"),
    ],
)
def test_transfer_errors(tmp_path, ckpt, model_kw, transfer, freeze, message):
    ckpt = dict(ckpt)
    path, _ = _checkpoint(tmp_path, ckpt.pop("name"), 1, ckpt.pop("drop", ()), **ckpt)
    model_kw = dict(model_kw)
    model = _fresh(model_kw.pop("name"), **model_kw)
    with pytest.raises(UserError, match=message):
        apply_init(model, path, transfer, freeze)


def test_missing_keys_without_spec_difference(tmp_path):
    """A checkpoint whose weights lack blocks its spec claims (e.g. an edited file) names the keys."""
    path, src = _checkpoint(tmp_path)
    state = {k: v for k, v in src.state_dict().items() if not k.startswith("cnn.stages.2")}
    torch.save(state, path / "model.pt")
    with pytest.raises(UserError, match=r"missing cnn\.stages\.2"):
        apply_init(_fresh(), path, "encoder")
    apply_init(_fresh(), path, "transformer")  # the transformer part is complete: fine


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(UserError, match="not a vemscale checkpoint"):
        (tmp_path / "empty").mkdir()
        apply_init(_fresh(), tmp_path / "empty", "all")


def test_finetune_refuses_a_mismatched_init_before_training(tmp_path):
    """`vemscale finetune init=...` checks the checkpoint against the model in the driver: exit 2, no run."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    path, _ = _checkpoint(tmp_path)
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([sys.executable, "-m", "vemscale.cli", "finetune", "configs/finetune_vnc_mito.yaml", f"init={path}",
                        "model.name=unet_resnet18", "transfer=encoder", f"run_dir={tmp_path / 'run'}"],
                       capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "holds a transunet_tiny but the model is unet_resnet18" in r.stderr
    assert not (tmp_path / "run").exists()
