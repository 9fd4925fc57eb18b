"""`vemscale convert`: published weights give the same encoder features as the model they came from.

References are the source libraries' own models with random weights: timm's `vit_base_r50_s16_224` (the
R50-ViT-B/16 hybrid) and torchvision's `resnet50` (MoCo checkpoints wrap the same keys), and for the
TransUNet/RETINA layout a transformer block written from TransUNet's vit_seg_modeling.py (separate query,
key, value and out projections, attention_norm / ffn_norm LayerNorms, fc1-GELU-fc2)."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from vemscale.errors import UserError
from vemscale.models import create_model
from vemscale.models.convert import convert_file, convert_state_dict


@pytest.fixture(scope="module")
def hybrid():
    torch.manual_seed(0)
    return timm.create_model("vit_base_r50_s16_224", pretrained=False, num_classes=0, class_token=False,
                             global_pool="", in_chans=1).eval()  # "" keeps the final norm (avg moves it to fc_norm)


def test_timm_hybrid_gives_timms_encoder_features(hybrid, tmp_path):
    ours = create_model("base", in_chans=1, num_classes=2).eval()
    ours.load_state_dict(convert_state_dict(hybrid.state_dict(), ours), strict=False)
    x = torch.randn(2, 1, 224, 224)
    with torch.no_grad():
        want = hybrid.forward_features(x)  # (B, 196, 768) after the final norm
        got = ours.encode(x).flatten(2).transpose(1, 2)
    assert want.shape == got.shape == (2, 196, 768)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the file path: a checkpoint that finetune's init= loads (transfer=encoder)
    torch.save({"state_dict": {"module." + k: v for k, v in hybrid.state_dict().items()}}, tmp_path / "w.pth")
    res = convert_file(tmp_path / "w.pth", tmp_path / "ckpt", "base")
    assert res["layout"] == "timm_hybrid" and res["tensors"] == len([k for k in ours.state_dict()
                                                                    if k.split(".")[0] in ("cnn", "patch_embed", "transformer")])
    from vemscale.train.transfer import apply_init

    fresh = create_model("base", in_chans=1, num_classes=2).eval()
    apply_init(fresh, res["checkpoint"], transfer="encoder")
    with torch.no_grad():
        torch.testing.assert_close(fresh.encode(x).flatten(2).transpose(1, 2), want, atol=1e-5, rtol=1e-5)


def test_class_token_and_rgb_stem_are_adapted():
    """ImageNet-style weights (class token, RGB stem): the class token's position goes, and the stem is adapted
    as timm itself adapts RGB weights to in_chans=1 (adapt_input_conv), so our CNN equals timm's 1-channel model
    loaded from them. (Under weight standardisation that is not the same as grey repeated on 3 channels.)"""
    from timm.models import adapt_input_conv

    torch.manual_seed(1)
    rgb = timm.create_model("vit_base_r50_s16_224", pretrained=False, num_classes=0).eval()
    ours = create_model("base", in_chans=1, num_classes=2).eval()
    w = convert_state_dict(rgb.state_dict(), ours)
    torch.testing.assert_close(w["transformer.pos_embed"], rgb.pos_embed[:, 1:].detach())
    ours.load_state_dict(w, strict=False)
    grey = timm.create_model("vit_base_r50_s16_224", pretrained=False, num_classes=0, in_chans=1).eval()
    state = dict(rgb.state_dict())
    stem = "patch_embed.backbone.stem.conv.weight"
    state[stem] = adapt_input_conv(1, state[stem])
    grey.load_state_dict(state)
    x = torch.rand(1, 1, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours.cnn(x), grey.patch_embed.backbone(x), atol=1e-5, rtol=1e-5)


def test_moco_resnet50_gives_torchvisions_features(tmp_path):
    from torchvision.models import resnet50

    torch.manual_seed(2)
    tv = resnet50(weights=None).eval()
    moco = {"state_dict": {**{f"module.encoder_q.{k}": v for k, v in tv.state_dict().items()},
                           **{f"module.encoder_k.{k}": v for k, v in tv.state_dict().items()},
                           "module.queue": torch.zeros(128, 16), "module.queue_ptr": torch.zeros(1)}}
    torch.save(moco, tmp_path / "moco.pth")
    res = convert_file(tmp_path / "moco.pth", tmp_path / "ckpt", "unet_resnet50")
    assert res["layout"] == "resnet"
    from vemscale.checkpoint import load_checkpoint

    ours, _ = load_checkpoint(res["checkpoint"])
    x = torch.rand(1, 1, 128, 128)
    body = torch.nn.Sequential(*list(tv.children())[:-2])  # up to layer4
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), body(x.repeat(1, 3, 1, 1)), atol=1e-4, rtol=1e-4)


def _transunet_block(p: dict[str, torch.Tensor], x: torch.Tensor, heads: int) -> torch.Tensor:
    """One TransUNet encoder layer (vit_seg_modeling.py Block / Attention / Mlp), from its own tensor names."""
    ln = lambda t, n: torch.nn.functional.layer_norm(t, t.shape[-1:], p[f"{n}.weight"], p[f"{n}.bias"], 1e-6)  # noqa: E731
    lin = lambda t, n: t @ p[f"{n}.weight"].T + p[f"{n}.bias"]  # noqa: E731
    h = ln(x, "attention_norm")
    b, n, d = h.shape
    split = lambda t: t.view(b, n, heads, d // heads).permute(0, 2, 1, 3)  # noqa: E731
    q, k, v = split(lin(h, "attn.query")), split(lin(h, "attn.key")), split(lin(h, "attn.value"))
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
    ctx = (att @ v).permute(0, 2, 1, 3).reshape(b, n, d)
    x = x + lin(ctx, "attn.out")
    h = ln(x, "ffn_norm")
    return x + lin(torch.nn.functional.gelu(lin(h, "ffn.fc1")), "ffn.fc2")


def test_transunet_layout_maps_every_tensor_and_its_attention():
    """A TransUNet/RETINA state dict (key names from TransUNet's vit_seg_modeling*.py), filled with random
    tensors: every encoder tensor of ours is set, and a converted block computes TransUNet's block."""
    torch.manual_seed(3)
    ours = create_model("tiny", in_chans=1, num_classes=2).eval()
    own = ours.state_dict()
    d, layers = own["transformer.pos_embed"].shape[-1], 4
    state = {"transformer.embeddings.position_embeddings": torch.randn(1, 196, d),
             "transformer.embeddings.patch_embeddings.weight": torch.randn(d, 256, 1, 1),
             "transformer.embeddings.patch_embeddings.bias": torch.randn(d),
             "transformer.encoder.encoder_norm.weight": torch.randn(d),
             "transformer.encoder.encoder_norm.bias": torch.randn(d),
             "transformer.embeddings.hybrid_model.root.conv.weight": torch.randn(32, 1, 7, 7),
             "transformer.embeddings.hybrid_model.root.gn.weight": torch.randn(32),
             "transformer.embeddings.hybrid_model.root.gn.bias": torch.randn(32),
             "decoder.conv_more.0.weight": torch.randn(8, d, 3, 3),  # not encoder: ignored
             "segmentation_head.0.weight": torch.randn(2, 16, 3, 3)}
    widths = {1: (32, 64), 2: (64, 128), 3: (128, 256)}  # tiny: one unit per block; (in, out) channels
    for blk, (cin, cout) in widths.items():
        mid = cout // 4
        u = f"transformer.embeddings.hybrid_model.body.block{blk}.unit1"
        state |= {f"{u}.conv1.weight": torch.randn(mid, cin, 1, 1), f"{u}.conv2.weight": torch.randn(mid, mid, 3, 3),
                  f"{u}.conv3.weight": torch.randn(cout, mid, 1, 1), f"{u}.downsample.weight": torch.randn(cout, cin, 1, 1)}
        for gn, c in (("gn1", mid), ("gn2", mid), ("gn3", cout), ("gn_proj", cout)):
            state |= {f"{u}.{gn}.weight": torch.randn(c), f"{u}.{gn}.bias": torch.randn(c)}
    hidden = own["transformer.blocks.0.mlp.fc1.weight"].shape[0]
    for i in range(layers):
        pre = f"transformer.encoder.layer.{i}"
        for n in ("attn.query", "attn.key", "attn.value", "attn.out"):
            state |= {f"{pre}.{n}.weight": torch.randn(d, d) * 0.05, f"{pre}.{n}.bias": torch.randn(d) * 0.05}
        state |= {f"{pre}.ffn.fc1.weight": torch.randn(hidden, d) * 0.05, f"{pre}.ffn.fc1.bias": torch.randn(hidden),
                  f"{pre}.ffn.fc2.weight": torch.randn(d, hidden) * 0.05, f"{pre}.ffn.fc2.bias": torch.randn(d),
                  f"{pre}.attention_norm.weight": torch.randn(d), f"{pre}.attention_norm.bias": torch.randn(d),
                  f"{pre}.ffn_norm.weight": torch.randn(d), f"{pre}.ffn_norm.bias": torch.randn(d)}
    w = convert_state_dict(state, ours, "transunet")
    assert set(w) == {k for k in own if k.split(".")[0] in ("cnn", "patch_embed", "transformer")}
    assert torch.equal(w["cnn.stages.1.blocks.0.downsample.norm.weight"],
                       state["transformer.embeddings.hybrid_model.body.block2.unit1.gn_proj.weight"])
    ours.load_state_dict(w, strict=False)
    x = torch.randn(2, 10, d)
    p = {k[len("transformer.encoder.layer.2."):]: v for k, v in state.items() if k.startswith("transformer.encoder.layer.2.")}
    with torch.no_grad():
        torch.testing.assert_close(ours.transformer.blocks[2](x), _transunet_block(p, x, heads=3), atol=1e-4, rtol=1e-4)


def test_bad_weights_fail_with_the_keys_named(hybrid, tmp_path):
    state = dict(hybrid.state_dict())
    del state["blocks.3.attn.qkv.weight"]
    with pytest.raises(UserError, match=r"missing \['transformer.blocks.3.attn.qkv.weight'\]"):
        convert_state_dict(state, create_model("base", in_chans=1, num_classes=2))
    with pytest.raises(UserError, match="do not fit transunet_tiny"):
        convert_state_dict(hybrid.state_dict(), create_model("tiny", in_chans=1, num_classes=2))
    with pytest.raises(UserError, match="cannot tell the layout"):
        convert_state_dict({"foo.weight": torch.zeros(1)}, create_model("tiny"))
    with pytest.raises(UserError, match="does not exist"):
        convert_file(tmp_path / "none.pth", tmp_path / "out", "base")
    assert not (tmp_path / "out").exists()
