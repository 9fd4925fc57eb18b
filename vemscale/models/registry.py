"""timm-style registry of named model configurations: ``@register_model`` builders, ``create_model``."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from ..errors import UserError

Builder = TypeVar("Builder", bound=Callable[..., nn.Module])

_MODELS: dict[str, Callable[..., nn.Module]] = {}
#: Short names accepted by :func:`create_model` in place of the canonical ones.
ALIASES: dict[str, str] = {"tiny": "transunet_tiny", "base": "transunet_base"}


def register_model(fn: Builder) -> Builder:
    """Register ``fn`` (called as ``fn(in_chans=, num_classes=, **kwargs)``) under its ``__name__``."""
    name = fn.__name__
    if name in _MODELS or name in ALIASES:
        raise ValueError(f"model {name!r} is already registered")
    _MODELS[name] = fn
    return fn


def list_models() -> list[str]:
    """The canonical names of all registered models, sorted (aliases not included)."""
    return sorted(_MODELS)


def resolve_name(name: str) -> str:
    """The canonical name for ``name`` (which may be an alias); UserError listing valid names if unknown."""
    canonical = ALIASES.get(name, name)
    if canonical not in _MODELS:
        aliases = ", ".join(f"{a} -> {c}" for a, c in sorted(ALIASES.items()))
        raise UserError(
            f"unknown model {name!r}; valid names: {', '.join(list_models())} (aliases: {aliases})"
        )
    return canonical


def create_model(name: str, in_chans: int = 1, num_classes: int = 2, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name`` (or an alias) with keyword overrides of its configuration.

    The model gets ``model.spec = {"name": canonical_name, "in_chans", "num_classes", **kwargs}``, a
    JSON-serialisable dict such that ``create_model(**model.spec)`` rebuilds the same architecture.
    """
    canonical = resolve_name(name)
    spec: dict[str, Any] = {"name": canonical, "in_chans": in_chans, "num_classes": num_classes, **kwargs}
    try:  # store the JSON form (tuples become lists), exactly what a checkpoint gives back
        spec = json.loads(json.dumps(spec))
    except (TypeError, ValueError) as e:
        raise UserError(f"model options must be JSON-serialisable (they go into checkpoints): {e}") from e
    model = _MODELS[canonical](in_chans=in_chans, num_classes=num_classes, **kwargs)
    model.spec = spec
    return model
