"""`vemscale convert`: published encoder weights -> a vemscale checkpoint that `finetune init=` starts from.

    vemscale convert R50_ViT_B16.pth runs/init_vitb --model base              # timm vit_base_r50_s16_224
    vemscale convert retina_pretrained.pth runs/init_retina --model base      # TransUNet / RETINA layout
    vemscale convert cem500k_mocov2_resnet50.pth runs/init_cem --model unet_resnet50  # MoCo / torchvision R50
    vemscale finetune configs/finetune_vnc_mito.yaml init=runs/init_vitb transfer=encoder

Layouts (detected from the keys, or `--layout`):

- `timm_hybrid`: timm's R50-ViT-B/16 hybrid (`patch_embed.backbone.*` ResNetV2, `patch_embed.proj`, `blocks.*`,
  `norm`, `pos_embed`, `cls_token`) -> `transunet_base` (`cnn`, `patch_embed`, `transformer`). The class
  token is dropped and its position embedding with it, as TransUNet does when it loads ViT weights
  (`load_from` in TransUNet's vit_seg_modeling.py); the encoder then computes exactly timm's features of a
  model without a class token (tests: atol 1e-5).
- `transunet`: TransUNet / RETINA checkpoints (`transformer.embeddings.hybrid_model.root/body`,
  `transformer.embeddings.patch_embeddings`, `position_embeddings`, `transformer.encoder.layer.N.{attn.query,
  key,value,out; attention_norm; ffn_norm; ffn.fc1, fc2}`, `encoder_norm`): the same tensors; q, k, v are
  stacked into timm's fused `qkv`. Their ResNet pads its 7x7 stem by 3 and max-pools without padding where
  ours pads "same", so features match away from the image border, not bit for bit.
- `resnet`: torchvision / timm ResNet-50 (`conv1`, `bn1`, `layerN.*`), and MoCo checkpoints of one
  (`module.encoder_q.*`, CEM500K's MoCoV2) -> `unet_resnet50`'s `cnn`; `fc`, MoCo's key encoder and queue go.

Input channels: an RGB stem becomes grey by summing its weights over the channels, as timm adapts pretrained
weights to `in_chans=1` (`adapt_input_conv`): exactly a grey image repeated on 3 channels for plain convs
(ResNet-50), close to it under the hybrid's weight-standardised stem. Only the encoder is converted; the
decoder and head start random, so fine-tune with `transfer=encoder`. Every missing, unexpected or
wrong-shaped tensor is a UserError naming it.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import torch

from vemscale.errors import UserError

__all__ = ["LAYOUTS", "detect_layout", "convert_state_dict", "convert_file", "add_arguments", "run_cli"]

LAYOUTS = ("timm_hybrid", "transunet", "resnet")
_PREFIXES = ("module.", "encoder_q.", "backbone.", "model.")


def _strip(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Unwrap {"state_dict": ...} / {"model": ...} and DDP / MoCo prefixes; drop MoCo's key encoder and queue."""
    for key in ("state_dict", "model", "model_state_dict"):
        if key in state and isinstance(state[key], dict):
            state = state[key]
    out = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            continue
        if k.startswith(("module.encoder_k.", "encoder_k.")) or k in ("queue", "queue_ptr", "module.queue",
                                                                       "module.queue_ptr"):
            continue
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def detect_layout(state: dict[str, torch.Tensor]) -> str:
    keys = set(state)
    if any(k.startswith("transformer.embeddings.hybrid_model.") for k in keys):
        return "transunet"
    if any(k.startswith("patch_embed.backbone.") for k in keys):
        return "timm_hybrid"
    if "conv1.weight" in keys and any(k.startswith("layer1.") for k in keys):
        return "resnet"
    if any(k.startswith(("cnn.", "transformer.blocks.")) for k in keys):
        raise UserError("these weights are already in vemscale's layout: pass the checkpoint directory to "
                        "finetune init= directly")
    sample = ", ".join(sorted(keys)[:6])
    raise UserError(f"cannot tell the layout of these weights (keys like {sample}); supported: timm "
                    "vit_base_r50_s16 hybrid, TransUNet/RETINA, torchvision/timm/MoCo ResNet-50")


def _timm_hybrid_key(k: str) -> str | None:
    if k.startswith("patch_embed.backbone."):
        return "cnn." + k[len("patch_embed.backbone."):]
    if k.startswith("patch_embed.proj."):
        return "patch_embed." + k[len("patch_embed.proj."):]
    if k.startswith(("blocks.", "norm.")):
        return "transformer." + k
    if k == "pos_embed":
        return "transformer.pos_embed"
    return None  # cls_token, head, fc_norm: not part of our encoder


_TU_UNIT = re.compile(r"transformer\.embeddings\.hybrid_model\.body\.block(\d+)\.unit(\d+)\.(\w+)\.(\w+)$")
_TU_LAYER = re.compile(r"transformer\.encoder\.layer\.(\d+)\.(.+)$")
_TU_BLOCK = {"attention_norm": "norm1", "ffn_norm": "norm2", "ffn.fc1": "mlp.fc1", "ffn.fc2": "mlp.fc2",
             "attn.out": "attn.proj"}
_TU_UNIT_PART = {"conv1": "conv1", "gn1": "norm1", "conv2": "conv2", "gn2": "norm2", "conv3": "conv3", "gn3": "norm3",
                 "downsample": "downsample.conv", "gn_proj": "downsample.norm"}


def _transunet(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    out: dict[str, torch.Tensor] = {}
    unused: list[str] = []
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        m = _TU_UNIT.match(k)
        if m:
            block, unit, part, param = int(m[1]), int(m[2]), m[3], m[4]
            if part in _TU_UNIT_PART:
                out[f"cnn.stages.{block - 1}.blocks.{unit - 1}.{_TU_UNIT_PART[part]}.{param}"] = v
                continue
        if k.startswith("transformer.embeddings.hybrid_model.root."):
            rest = k[len("transformer.embeddings.hybrid_model.root."):]
            part, param = rest.split(".", 1)
            if part in ("conv", "gn"):
                out[f"cnn.stem.{'conv' if part == 'conv' else 'norm'}.{param}"] = v
                continue
        if k.startswith("transformer.embeddings.patch_embeddings."):
            out["patch_embed." + k.rsplit(".", 1)[1]] = v
            continue
        if k == "transformer.embeddings.position_embeddings":
            out["transformer.pos_embed"] = v
            continue
        if k.startswith("transformer.encoder.encoder_norm."):
            out["transformer.norm." + k.rsplit(".", 1)[1]] = v
            continue
        m = _TU_LAYER.match(k)
        if m:
            i, rest = int(m[1]), m[2]
            name, param = rest.rsplit(".", 1)
            if name in ("attn.query", "attn.key", "attn.value"):
                qkv.setdefault((i, param), {})[name.split(".")[1]] = v
                continue
            if name in _TU_BLOCK:
                out[f"transformer.blocks.{i}.{_TU_BLOCK[name]}.{param}"] = v
                continue
        unused.append(k)
    for (i, param), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise UserError(f"layer {i}: attention {param} has {sorted(parts)}, needs query, key and value")
        # timm's fused qkv Linear: output rows [q; k; v], each split into heads the same way as TransUNet's
        out[f"transformer.blocks.{i}.attn.qkv.{param}"] = torch.cat([parts["query"], parts["key"], parts["value"]], 0)
    return out, unused


def _resnet(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    out, unused = {}, []
    for k, v in state.items():
        if k.startswith("fc.") or k.startswith("head"):
            unused.append(k)
        else:
            out["cnn." + k] = v
    return out, unused


def convert_state_dict(state: dict[str, Any], model: torch.nn.Module, layout: str | None = None) -> dict[str, torch.Tensor]:
    """Our encoder's tensors from `state` in `layout` (detected when None), checked against `model`."""
    from timm.models import adapt_input_conv

    state = _strip(state)
    layout = layout or detect_layout(state)
    if layout not in LAYOUTS:
        raise UserError(f"layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    if layout == "timm_hybrid":
        mapped = {_timm_hybrid_key(k): v for k, v in state.items()}
        mapped.pop(None, None)
        if "transformer.pos_embed" in mapped and "cls_token" in state:  # drop the class token's position
            mapped["transformer.pos_embed"] = mapped["transformer.pos_embed"][:, 1:]
    elif layout == "transunet":
        mapped, _ = _transunet(state)
    else:
        mapped, _ = _resnet(state)
    from vemscale.models.groups import SETS, keys_of

    own = model.state_dict()
    wanted = keys_of(model, SETS["encoder"])
    missing = [k for k in wanted if k not in mapped]
    extra = [k for k in mapped if k not in own]
    if missing or extra:
        name = getattr(model, "spec", {}).get("name", type(model).__name__)
        raise UserError(f"{layout} weights do not fit {name}'s encoder: missing {missing[:6]}"
                        f"{f' (+{len(missing) - 6})' if len(missing) > 6 else ''}, unexpected {extra[:6]}"
                        f"{f' (+{len(extra) - 6})' if len(extra) > 6 else ''}; is --model the right architecture "
                        "(base for R50-ViT-B/16, unet_resnet50 for ResNet-50)?")
    stem = "cnn.stem.conv.weight" if "cnn.stem.conv.weight" in own else "cnn.conv1.weight"
    if stem in mapped and mapped[stem].shape[1] != own[stem].shape[1]:
        mapped[stem] = adapt_input_conv(own[stem].shape[1], mapped[stem])
    bad = [f"{k} {tuple(mapped[k].shape)} (want {tuple(own[k].shape)})" for k in wanted
           if tuple(mapped[k].shape) != tuple(own[k].shape)]
    if bad:
        raise UserError(f"{layout} weights have other shapes than the model's encoder: {bad[:4]}")
    return {k: mapped[k].to(own[k].dtype) for k in wanted}


def convert_file(src: str | Path, dest: str | Path, model_name: str, in_chans: int = 1,
                 layout: str | None = None) -> dict[str, Any]:
    """Read a weights file, convert its encoder into `model_name`, save a vemscale checkpoint at `dest`."""
    from vemscale.checkpoint import CheckpointMeta, save_checkpoint
    from vemscale.models import create_model

    try:
        state = torch.load(src, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"weights file {str(src)!r} does not exist") from None
    except Exception as err:  # noqa: BLE001 - not a torch file, or one that needs code to unpickle
        raise UserError(f"{str(src)!r} is not a torch weights file that loads without running code: "
                        f"{type(err).__name__}: {str(err)[:200]}") from None
    if not isinstance(state, dict):
        raise UserError(f"{str(src)!r} holds a {type(state).__name__}, not a state dict")
    model = create_model(model_name, in_chans=in_chans, num_classes=1)
    detected = layout or detect_layout(_strip(state))
    weights = convert_state_dict(state, model, detected)
    model.load_state_dict(weights, strict=False)
    meta = CheckpointMeta(kind="pretrain", model=model.spec, classes=["reconstruction"],
                          train_config={"converted_from": str(Path(src).resolve()), "layout": detected,
                                        "tensors": len(weights)})
    path = save_checkpoint(dest, model, meta)
    return {"checkpoint": str(path), "layout": detected, "model": model.spec["name"], "tensors": len(weights),
            "finetune": f"vemscale finetune <config> init={path} transfer=encoder"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("weights", help="a .pth/.pt state dict (timm hybrid ViT, TransUNet/RETINA, ResNet-50/MoCo)")
    parser.add_argument("dest", help="the vemscale checkpoint directory to write")
    parser.add_argument("--model", default="base", help="target architecture (base = transunet_base, unet_resnet50)")
    parser.add_argument("--in-chans", type=int, default=1, help="input channels of the target (1 for grey EM)")
    parser.add_argument("--layout", choices=LAYOUTS, default=None, help="the weights' key layout (default: detect)")


def run_cli(args: argparse.Namespace) -> dict[str, Any]:
    return convert_file(args.weights, args.dest, args.model, args.in_chans, args.layout)
