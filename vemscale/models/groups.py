"""Parameter groups by name pattern (timm's `group_matcher` style): what `transfer` loads and `freeze` fixes.

Every model names five disjoint groups that together cover each of its tensors (`PARAM_GROUPS`, a regex
per group, matched against `state_dict` keys):

    cnn         the convolutional encoder (TransUNet's ResNetV2 with its stem; UNet-ResNet's ResNet)
    embed       the patch embedding and the position embedding
    vit_blocks  the transformer blocks and their final LayerNorm
    decoder     the upsampling path
    head        the last convolution (class logits, or the reconstruction of pre-training)

`transfer=` and `freeze=` take a named set or a comma list of groups (`transfer=cnn,embed`):

    all          every group
    encoder      cnn + embed + vit_blocks
    retina       cnn + embed + vit_blocks: RETINA's transfer (BaderLab/RETINA train.py loads every tensor
                 whose name holds neither 'decoder' nor 'segmentation_head')
    vit_blocks   RETINA's freeze (train.py: requires_grad=False for names starting 'transformer.encoder', the
                 blocks and encoder_norm; the embeddings and the ResNet stay trainable)
    vit          embed + vit_blocks; `transformer` is its older name (the earlier, non-RETINA recipe)
    none         nothing
"""

from __future__ import annotations

import re
from typing import Callable

from torch import nn

from vemscale.errors import UserError

GROUPS: tuple[str, ...] = ("cnn", "embed", "vit_blocks", "decoder", "head")
SETS: dict[str, tuple[str, ...]] = {
    "all": GROUPS,
    "encoder": ("cnn", "embed", "vit_blocks"),
    "retina": ("cnn", "embed", "vit_blocks"),  # BaderLab/RETINA train.py: all but 'decoder' / 'segmentation_head'
    "vit": ("embed", "vit_blocks"),
    "transformer": ("embed", "vit_blocks"),  # the earlier name of `vit`
    "none": (),
}


def resolve(spec: str, what: str = "transfer") -> tuple[str, ...]:
    """A named set or a comma list of groups -> the groups, in GROUPS order; UserError for an unknown name."""
    spec = str(spec).strip()
    if spec in SETS:
        return SETS[spec]
    names = [p.strip() for p in spec.split(",") if p.strip()]
    unknown = [n for n in names if n not in GROUPS]
    if unknown or not names:
        raise UserError(f"{what}={spec!r}: not a set ({', '.join(SETS)}) nor a comma list of groups "
                        f"({', '.join(GROUPS)})")
    return tuple(g for g in GROUPS if g in names)


def _net(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def patterns(model: nn.Module) -> dict[str, re.Pattern[str]]:
    net = _net(model)
    return {g: re.compile(p) for g, p in getattr(net, "PARAM_GROUPS", {}).items()}


def group_of(model: nn.Module, key: str) -> str | None:
    """The group of a state_dict key (None when no pattern matches: a model bug the tests rule out)."""
    for g, pat in patterns(model).items():
        if pat.search(key):
            return g
    return None


def matcher(model: nn.Module, groups: tuple[str, ...]) -> Callable[[str], bool]:
    """key -> whether it belongs to one of `groups`."""
    pats = [p for g, p in patterns(model).items() if g in groups]
    return lambda key: any(p.search(key) for p in pats)


def keys_of(model: nn.Module, groups: tuple[str, ...]) -> list[str]:
    """The state_dict keys of `groups`, in state_dict order."""
    match = matcher(model, groups)
    return [k for k in _net(model).state_dict() if match(k)]


def parameter_groups(model: nn.Module) -> dict[str, list[str]]:
    """Each group -> the names of its parameters (and the named sets as unions)."""
    net = _net(model)
    out: dict[str, list[str]] = {g: [] for g in GROUPS}
    for name, _ in net.named_parameters():
        g = group_of(net, name)
        if g is not None:
            out[g].append(name)
    for s, gs in SETS.items():
        if s not in ("all", "none"):
            out[s] = [n for g in gs for n in out[g]]
    return out
