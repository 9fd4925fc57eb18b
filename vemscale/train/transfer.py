"""Start a model from a checkpoint's weights (transfer) and keep some of them fixed (freeze).

Both take a named set or a comma list of the parameter groups of `vemscale.models.groups` (cnn, embed,
vit_blocks, decoder, head). transfer: `all` (every tensor; the head is skipped when the class counts differ),
`encoder` / `retina` (cnn + embed + vit_blocks: RETINA's transfer), `vit` (embed + vit_blocks; older name
`transformer`), `none`. freeze: `none`, `vit_blocks` (RETINA's: the ViT blocks and their final norm), `vit`,
`encoder`, or groups: requires_grad=False on them (and BatchNorm layers in them kept in eval mode, so their
running statistics stay fixed too). Only transferred weights can be frozen. Every mismatch between the
checkpoint and the model is a UserError naming what differs.
"""

from __future__ import annotations

import logging
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vemscale.checkpoint import WEIGHTS_FILE, read_meta
from vemscale.errors import UserError
from vemscale.models.groups import SETS, group_of, matcher, resolve

log = logging.getLogger(__name__)

TRANSFERS = tuple(SETS)  # or a comma list of groups
FREEZES = ("none", "vit_blocks", "vit", "transformer", "encoder")  # or a comma list of groups
_SPEC_SKIP = {"name", "num_classes"}


def _local(path: str | Path) -> Path:
    """The checkpoint as a local directory (a cached copy when checkpoint.py can fetch remote ones)."""
    try:
        from vemscale.checkpoint import local_checkpoint
    except ImportError:  # a checkpoint module without remote support
        return Path(path)
    return Path(local_checkpoint(path))


def _net(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def _listing(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


def check_architecture(net: nn.Module, ckpt_spec: dict[str, Any], where: str) -> None:
    """UserError when the checkpoint's architecture (name, input channels, size options) is not the model's."""
    from vemscale.models import resolve_name

    spec = getattr(net, "spec", None) or {}
    ckpt_name = resolve_name(str(ckpt_spec.get("name")))
    name = resolve_name(str(spec.get("name", ckpt_name)))
    if ckpt_name != name:
        raise UserError(f"checkpoint {where} holds a {ckpt_name} but the model is {name}; set model.name={ckpt_name} "
                        "(or pre-train the architecture you fine-tune)")
    diffs = [f"{k}: checkpoint {ckpt_spec[k]!r}, model {spec[k]!r}" for k in sorted(set(spec) & set(ckpt_spec) - _SPEC_SKIP)
             if spec[k] != ckpt_spec[k]]
    if diffs:
        raise UserError(f"checkpoint {where} has another {name} configuration than the model: " + "; ".join(diffs))


def _specs(net: nn.Module, ckpt_spec: dict[str, Any]) -> str:
    fmt = lambda s: ", ".join(f"{k}={v}" for k, v in s.items())  # noqa: E731
    return f"checkpoint {fmt(ckpt_spec)}; model {fmt(getattr(net, 'spec', {}))}"


def select_weights(net: nn.Module, state: dict[str, torch.Tensor], transfer: str, where: str,
                   ckpt_spec: dict[str, Any] | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The checkpoint tensors `transfer` copies into net, and the keys skipped (a head of another class count)."""
    ckpt_spec = ckpt_spec or {}
    in_set = matcher(net, resolve(transfer))
    own = net.state_dict()
    wanted = [k for k in own if in_set(k)]
    if not wanted:
        raise UserError(f"transfer={transfer}: the model {getattr(net, 'spec', {}).get('name', type(net).__name__)} has no "
                        f"{transfer} part; use transfer=encoder or transfer=all")
    missing = [k for k in wanted if k not in state]
    extra = [k for k in state if in_set(k) and k not in own]
    if missing or extra:
        msg = f"checkpoint {where} does not match the model's {transfer} weights:"
        if missing:
            msg += f" missing {_listing(missing)};"
        if extra:
            msg += f" not in the model {_listing(extra)};"
        raise UserError(msg + f" the architectures differ ({_specs(net, ckpt_spec)})")
    chosen: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    bad: list[str] = []
    for k in wanted:
        if tuple(state[k].shape) == tuple(own[k].shape):
            chosen[k] = state[k]
        elif group_of(net, k) == "head":
            skipped.append(k)  # the head of another number of classes (e.g. the reconstruction head)
        else:
            bad.append(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}")
    if bad:
        raise UserError(f"checkpoint {where}: tensor shapes differ from the model's (checkpoint vs model): {_listing(bad, 4)}; "
                        f"the architectures differ ({_specs(net, ckpt_spec)})")
    return chosen, skipped


def _eval_only(self: nn.Module, mode: bool = True) -> nn.Module:
    """`train()` of a frozen normalisation layer: always eval, so running statistics stay fixed."""
    return nn.Module.train(self, False)


def freeze_group(net: nn.Module, freeze: str) -> int:
    """requires_grad=False on the groups of `freeze` (BatchNorm in them stays in eval mode); returns the count."""
    in_set = matcher(net, resolve(freeze, "freeze"))
    n = 0
    for name, p in net.named_parameters():
        if in_set(name):
            p.requires_grad_(False)
            n += 1
    for name, m in net.named_modules():
        if name and isinstance(m, nn.modules.batchnorm._BatchNorm) and any(
                in_set(f"{name}.{p}") for p, _ in m.named_parameters(recurse=False)):
            m.train = types.MethodType(_eval_only, m)
            m.eval()
    return n


def apply_init(model: nn.Module, init_path: str | Path, transfer: str = "all", freeze: str = "none") -> dict[str, Any]:
    """Load `transfer`'s part of the checkpoint at init_path into model (in place), then freeze `freeze`."""
    loaded, fixed = set(resolve(transfer)), set(resolve(freeze, "freeze"))
    if fixed - loaded:
        raise UserError(f"freeze={freeze} would fix weights that transfer={transfer} does not load (random ones: "
                        f"{', '.join(sorted(fixed - loaded))}); use transfer={freeze} or transfer=all")
    net = _net(model)
    where = repr(str(init_path))
    meta = read_meta(init_path)
    if meta.model.get("name") == "ensemble":
        raise UserError(f"checkpoint {where} is an ensemble (vemscale ensemble), for inference only; fine-tune from "
                        "one of its members: " + ", ".join(str(m.get("checkpoint")) for m in meta.metrics.get("members", [])))
    if transfer == "none":
        return {"transferred": 0, "frozen": 0, "skipped": []}
    check_architecture(net, meta.model, where)
    try:
        state = torch.load(_local(init_path) / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a corrupt file is the user's to replace
        raise UserError(f"checkpoint {where}: cannot read {WEIGHTS_FILE}: {err}") from None
    chosen, skipped = select_weights(net, state, transfer, where, meta.model)
    device = next(net.parameters()).device
    with torch.no_grad():
        own = net.state_dict()
        for k, v in chosen.items():
            own[k].copy_(v.to(device))
    frozen = freeze_group(net, freeze) if freeze != "none" else 0
    log.info("init from %s (%s checkpoint, iteration %d): transferred %d tensors (%s)%s%s", init_path, meta.kind,
             meta.iteration, len(chosen), transfer, f", skipped {_listing(skipped)}" if skipped else "",
             f", froze {frozen} parameters ({freeze})" if frozen else "")
    return {"transferred": len(chosen), "frozen": frozen, "skipped": skipped, "kind": meta.kind}


def check_init(init_path: str | Path, model_name: str, in_chans: int, num_classes: int, kwargs: dict[str, Any],
               transfer: str, freeze: str) -> dict[str, Any]:
    """Driver-side dry run of apply_init on a fresh CPU model, so a mismatch fails before workers start."""
    from vemscale.models import create_model

    model = create_model(model_name, in_chans=in_chans, num_classes=num_classes, **kwargs)
    return apply_init(model, init_path, transfer, freeze)
