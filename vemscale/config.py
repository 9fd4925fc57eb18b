"""Typed stage configs: pydantic models loaded from YAML plus dotted `key=value` overrides.

Every stage has one config model derived from `StageConfig`. Unknown keys are rejected with the list of
valid keys at that level, so a typo in a YAML file or on the command line fails before any work starts.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Annotated, Any, Iterable, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, ValidationError

from vemscale.errors import UserError

__all__ = ["Strict", "StageConfig", "PositiveTriple", "ConfigError", "load_config", "load_cli_config", "parse_overrides", "apply_overrides"]


class ConfigError(UserError):
    """A config file or override the user must fix; the message says what and where."""


def _split_triple(v: Any) -> Any:
    return [p for p in v.replace(" ", "").split(",")] if isinstance(v, str) else v


def _positive(v: tuple[int, int, int]) -> tuple[int, int, int]:
    if min(v) < 1:
        raise ValueError("must be three positive integers z,y,x")
    return v


#: z,y,x of positive integers, also given as "16,512,512" (block, shard and cell shapes)
PositiveTriple = Annotated[tuple[int, int, int], BeforeValidator(_split_triple), AfterValidator(_positive)]


class Strict(BaseModel):
    """Base for every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class StageConfig(Strict):
    """Fields every stage has: where its outputs go."""

    run_dir: Path = Path("runs/default")


C = TypeVar("C", bound=BaseModel)


def _parse_value(text: str) -> Any:
    """Parse an override value as YAML, so `3`, `0.1`, `true`, `[1,2]` and `a,b` all do what a user means."""
    if ":" in text and not text.lstrip().startswith(("[", "{")):
        # URLs and ranges (`s3://b/v`, `10:20`): YAML 1.1 would read `10:20` as the base-60 number 620
        return text
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if value is None and text.strip().lower() not in ("null", "none", "~", ""):
        return text
    if isinstance(value, str) and "," in value and not value.startswith(("[", "{")):
        parts = [yaml.safe_load(p) if p.strip() else p for p in value.split(",")]
        return parts
    return value


def _key_parts(key: str, item: str) -> list[str]:
    """`a.b.c` -> [a, b, c]; a bracketed part keeps its dots: `arms[vnc_to_cdeep3m.ssl].init` -> [arms, vnc_to_cdeep3m.ssl, init]."""
    parts = re.findall(r"\[([^\[\]]+)\]|([^.\[\]]+)", key)
    rebuilt = ".".join(f"[{b}]" if b else a for b, a in parts).replace(".[", "[")
    if not parts or rebuilt != key:
        raise ConfigError(f"override {item!r}: cannot read the key {key!r}; write nested keys as a.b.c, and a key "
                          "with dots in brackets, e.g. arms[vnc_to_cdeep3m.ssl].init=...")
    return [b or a for b, a in parts]


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """Turn `a.b=1 c=x` into a nested dict (`a[b.c]=1`: a key with dots); a token without `=` is an error that says so."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.iterations=200)")
        key, _, raw = item.partition("=")
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        node = out
        parts = _key_parts(key, item)
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part!r}")
        node[parts[-1]] = _parse_value(raw)
    return out


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _sub_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model behind a field annotation (plain or Optional), if there is one."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def check_keys(model: type[BaseModel], data: dict[str, Any], where: str = "") -> None:
    """Reject unknown keys anywhere in `data`, naming the valid keys at that level."""
    fields = model.model_fields
    aliases = {f.alias for f in fields.values() if f.alias}
    for key, value in data.items():
        if key not in fields and key not in aliases:
            path = f"{where}{key}"
            valid = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key {path!r}; valid keys{' under ' + where[:-1] if where else ''}: {valid}")
        sub = _sub_model(fields[key].annotation) if key in fields else None
        if sub is not None and isinstance(value, dict):
            check_keys(sub, value, f"{where}{key}.")


def _format_validation(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        lines.append(f"  {loc}: {e['msg']} (got {e.get('input')!r})")
    return "invalid config:\n" + "\n".join(lines)


def build_config(model: type[C], data: dict[str, Any]) -> C:
    """Validate a dict into `model`, turning pydantic errors into one readable ConfigError."""
    check_keys(model, data)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation(err)) from None


def _leaves(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def layer(model: type[BaseModel], base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`update` over `base`; when the result names a recipe (a model with `recipe_values`), its values go in
    between: they replace `base`'s (a config file, an earlier config) and `update`'s keys win over them."""
    merged = _deep_merge(base, update)
    name = merged.get("recipe")
    hook = getattr(model, "recipe_values", None)
    if hook is None or name in (None, "none") or not isinstance(name, str):
        return merged
    values = hook(name)
    given = _leaves(base)
    replaced = [f"{k} {given[k]!r} -> {v!r}" for k, v in _leaves(values).items() if k in given and given[k] != v]
    if replaced:
        logging.getLogger("vemscale.config").info("recipe=%s replaces: %s", name, "; ".join(replaced))
    return _deep_merge(_deep_merge(base, values), update)


def load_config(model: type[C], path: str | Path | None = None, overrides: Iterable[str] = ()) -> C:
    """Load `path` (YAML) if given, apply dotted overrides, validate into `model`."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of keys to values")
        data = loaded
    return build_config(model, layer(model, data, parse_overrides(overrides)))


def load_cli_config(model: type[C], items: Iterable[str], verbatim: Iterable[str] = ()) -> C:
    """`[config.yaml] key=value ...` from a command line -> `model`. Keys in `verbatim` are set as typed, not
    parsed as YAML (URLs with commas, ranges such as 10:20 that YAML 1.1 reads as base-60 numbers)."""
    items = list(items)
    path = items.pop(0) if items and "=" not in items[0] else None
    keep = set(verbatim)
    raw: dict[str, str] = {}
    rest = []
    for item in items:
        key, sep, value = item.partition("=")
        if sep and key in keep:
            raw[key] = value
        else:
            rest.append(item)
    fields = getattr(model, "model_fields", {})
    placeholders = [f"{k}=placeholder" for k in raw if k in fields and fields[k].is_required()]
    config = load_config(model, path, rest + placeholders)
    for key, value in raw.items():
        setattr(config, key, value)
    return config


def apply_overrides(config: C, overrides: Iterable[str]) -> C:
    """A copy of `config` with overrides applied and re-validated."""
    data, update = config.model_dump(mode="json"), parse_overrides(overrides)
    if "recipe" not in update:  # the config already holds its recipe's values and the user's keys over them
        return build_config(type(config), _deep_merge(data, update))
    return build_config(type(config), layer(type(config), data, update))


def absolute_url(url: str) -> str:
    """A local path made absolute (workers run in other directories); URLs with a scheme are kept."""
    import os

    if "://" in url or os.path.isabs(url):
        return url
    return os.path.abspath(url)


def dump_config(config: BaseModel, path: str | Path) -> None:
    """Write a config as YAML, the form a user can re-run with."""
    from vemscale.io.atomic import write_text

    write_text(path, yaml.safe_dump(json.loads(config.model_dump_json()), sort_keys=False))
