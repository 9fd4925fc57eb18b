"""The model registry and the TransUNet / UNet-ResNet families: shapes, specs, parameter groups."""

from __future__ import annotations

import functools
import json

import pytest
import torch

from vemscale.errors import UserError
from vemscale.models import GROUP_NAMES, create_model, list_models

SMALL = ["transunet_tiny", "unet_resnet18"]
ENGINE_ONLY = {"pixel_linear"}  # the 1x1-conv model for measuring the block engine: no encoder, any tile size
COMPOSITE = {"ensemble"}  # built from other models' specs (tests/test_ensemble.py)
SEGMENTATION = [n for n in list_models() if n not in ENGINE_ONLY | COMPOSITE]
LARGE = ["transunet_base", "unet_resnet50"]


@functools.cache
def built(name: str) -> torch.nn.Module:
    """One seeded instance per registered name, shared by the tests (base models take a while)."""
    torch.manual_seed(0)
    return create_model(name).eval()


def test_registry_lists_every_family():
    assert set(SMALL + LARGE) <= set(list_models())
    assert list_models() == sorted(list_models())


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("hw", [(64, 96), (128, 128)])
def test_small_models_map_input_to_logits(name, hw):
    model = built(name)
    with torch.no_grad():
        y = model(torch.randn(2, 1, *hw))
    assert y.shape == (2, 2, *hw)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", LARGE)
def test_large_models_map_input_to_logits(name):
    with torch.no_grad():
        y = built(name)(torch.randn(2, 1, 64, 64))
    assert y.shape == (2, 2, 64, 64)


@pytest.mark.parametrize("name", SEGMENTATION)
def test_non_multiple_of_16_raises(name):
    with pytest.raises(ValueError, match="multiples of"):
        built(name)(torch.randn(1, 1, 72, 64))


@pytest.mark.parametrize("name", sorted(set(list_models()) - COMPOSITE))
def test_spec_rebuilds_same_architecture(name):
    model = built(name)
    spec = json.loads(json.dumps(model.spec))  # as it comes back out of a checkpoint
    assert spec["name"] == name
    with torch.device("meta"):  # shapes only: no memory, no init cost
        rebuilt = create_model(**spec)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes


def test_spec_carries_overrides_and_resolves_aliases():
    model = create_model("tiny", in_chans=3, num_classes=4, depth=2, decoder_channels=(32, 16, 16, 8))
    assert model.spec == {
        "name": "transunet_tiny",
        "in_chans": 3,
        "num_classes": 4,
        "depth": 2,
        "decoder_channels": [32, 16, 16, 8],
    }
    assert len(model.transformer.blocks) == 2
    rebuilt = create_model(**json.loads(json.dumps(model.spec)))
    assert rebuilt.spec == model.spec
    assert rebuilt.state_dict().keys() == model.state_dict().keys()
    with torch.device("meta"):
        assert create_model("base").spec["name"] == "transunet_base"


@pytest.mark.parametrize("name", SEGMENTATION)
def test_parameter_groups_partition_parameters(name):
    """The five groups are disjoint and cover every tensor (parameters and buffers); the sets are their unions."""
    from vemscale.models.groups import group_of

    model = built(name)
    groups = model.parameter_groups()
    assert set(GROUP_NAMES) <= set(groups) and GROUP_NAMES == ("cnn", "embed", "vit_blocks", "decoder", "head")
    everything = {n for n, _ in model.named_parameters()}
    parts = [set(groups[g]) for g in GROUP_NAMES]
    assert sum(len(p) for p in parts) == len(everything) and set().union(*parts) == everything
    assert all(group_of(model, k) is not None for k in model.state_dict())  # buffers (BN statistics) too
    cnn, embed, vit, decoder, head = parts
    assert cnn and decoder and head
    assert set(groups["encoder"]) == cnn | embed | vit == set(groups["retina"])
    assert set(groups["vit"]) == embed | vit == set(groups["transformer"])
    assert all(n.startswith("cnn.") for n in cnn) and all(n.startswith("head.") for n in head)
    if name.startswith("unet_resnet"):
        assert embed == vit == set()
    else:
        assert embed == {"patch_embed.weight", "patch_embed.bias", "transformer.pos_embed"}
        assert vit == {n for n in everything if n.startswith(("transformer.blocks.", "transformer.norm."))}


def test_unknown_name_lists_valid_names():
    with pytest.raises(UserError) as info:
        create_model("transunet_huge")
    message = str(info.value)
    assert "transunet_huge" in message
    for name in list_models():
        assert name in message
    assert isinstance(info.value, ValueError)


def test_non_json_option_is_a_user_error():
    with pytest.raises(UserError, match="JSON"):
        create_model("tiny", drop_rate=object())


def test_tiny_takes_three_channels():
    model = create_model("tiny", in_chans=3, num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3, 64, 64)
    with pytest.raises(ValueError, match="channel"):
        model(torch.randn(2, 1, 64, 64))


def test_position_embedding_interpolates_to_other_sizes():
    model = built("transunet_tiny")
    base_grid = model.transformer.grid_size
    assert base_grid == (14, 14)
    assert model.transformer.pos_embed_for((14, 14)) is model.transformer.pos_embed
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for size in (224, 320):
            x = torch.randn(1, 1, size, size)
            assert model(x).shape == (1, 2, size, size)
            assert model.encode(x).shape == (1, model.encode_channels, size // 16, size // 16)
        assert model.transformer.pos_embed_for((20, 20)).shape == (1, 400, model.encode_channels)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # same weights


@pytest.mark.parametrize("name,stride", [("transunet_tiny", 16), ("unet_resnet18", 32)])
def test_encode_gives_deepest_feature_map(name, stride):
    model = built(name)
    with torch.no_grad():
        z = model.encode(torch.randn(2, 1, 64, 96))
    assert z.shape == (2, model.encode_channels, 64 // stride, 96 // stride)
    assert model.input_multiple == stride


def test_tiny_trains_every_parameter():
    torch.manual_seed(0)
    model = create_model("tiny").train()
    x, y = torch.randn(2, 1, 64, 64), torch.randint(0, 2, (2, 64, 64))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused


def test_pixel_linear_is_one_linear_map_per_pixel():
    model = create_model("pixel_linear", in_chans=1, num_classes=2).eval()
    x = torch.randn(3, 1, 20, 36)
    with torch.no_grad():
        y = model(x)
        want = model.head.weight[:, 0, 0, 0].view(1, 2, 1, 1) * x + model.head.bias.view(1, 2, 1, 1)
    assert y.shape == (3, 2, 20, 36) and torch.allclose(y, want)
    assert model.parameter_groups()["head"] == ["head.weight", "head.bias"]
