"""YAML -> nested dicts -> the dataclasses of :mod:`msgfm.config.schema`, every key and type checked.

Configs shipped with the package live in ``msgfm/configs/*.yaml`` and load by name;
a YAML file may start from another with ``_base_: NAME_OR_PATH`` and override
only what differs (the ablations do this)::

    cfg = load_config("msgfm_swinb_192", overrides=["model.moe.num_experts=4"])
"""
from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from msgfm.config.schema import RunConfig, config_error
from msgfm.errors import MissingFileError, UserError
from msgfm.sensors import SensorSpec, register_sensor

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"



def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and build nested dataclasses."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key)
            except ValueError as err:
                errors.append(str(err))
        config_error(key, f"expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            config_error(key, f"must be one of {list(args)}, got {value!r}")
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            config_error(key, f"expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            config_error(key, f"expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            config_error(key, f"expected a mapping, got {value!r}")
        return {_coerce(k, args[0], f"{key} (key)"): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            config_error(key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            config_error(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 2e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            config_error(key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            config_error(key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"config key '{key}': unsupported annotation {tp}")  # a bug in this module


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in data if k not in names]
    if unknown:
        where = f"'{prefix}.{unknown[0]}'" if prefix else f"'{unknown[0]}'"
        raise UserError(f"unknown config key {where}; valid keys{' under ' + repr(prefix) if prefix else ''}: "
                        f"{', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field is missing
        raise UserError(f"config section '{prefix or cls.__name__}': {err}") from None


def _merge(base: dict, update: dict) -> dict:
    """Recursive dict merge; lists and scalars in ``update`` replace those in ``base``."""
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_config_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise MissingFileError(f"config file {path} does not exist")
        return path
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if not shipped.exists():
        raise MissingFileError(f"no config named '{name_or_path}'; shipped configs: {', '.join(list_configs())} "
                               f"(or pass a path to a .yaml file)")
    return shipped


def list_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def read_yaml_tree(name_or_path: str | Path, seen: tuple[Path, ...] = ()) -> dict:
    path = resolve_config_path(name_or_path).resolve()
    if path in seen:
        raise UserError(f"config {path} inherits from itself through _base_")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise UserError(f"config {path}: {yaml_problem(err)}; fix the YAML syntax there") from None
    if not isinstance(data, dict):
        raise UserError(f"config {path} must hold a mapping at the top level")
    base = data.pop("_base_", None)
    if base is None:
        return data
    base_path = base if (path.parent / str(base)).suffix not in (".yaml", ".yml") else path.parent / str(base)
    return _merge(read_yaml_tree(base_path, seen + (path,)), data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``model.moe.num_experts=4`` -> (["model", "moe", "num_experts"], 4); values are YAML."""
    if "=" not in text:
        raise UserError(f"override '{text}' must look like dotted.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise UserError(f"override '{text}': empty component in the dotted key")
    try:
        return parts, yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise UserError(f"override '{text}': the value is not valid YAML ({yaml_problem(err, with_line=False)}); "
                        f"quote it for the shell, e.g. '{key}=[1, 2]' or '{key}=\"text: with colon\"'") from None


def yaml_problem(err: yaml.YAMLError, with_line: bool = True) -> str:
    """One line for a YAML syntax error: what is wrong and where (line and column, 1-based)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None and with_line else ""
    context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and context_mark is not None and with_line:
        context += f" that starts on line {context_mark.line + 1}"
    return f"{where}{problem}" + (f" ({context})" if context else "")


def apply_override(tree: dict, parts: list[str], value: Any, text: str) -> None:
    node = tree
    for i, part in enumerate(parts[:-1]):
        if isinstance(node.get(part), list) and parts[i + 1:]:
            # groups are addressed by name: data.groups.rgb.batch_size_per_gpu=64
            items = node[part]
            match = [g for g in items if isinstance(g, dict) and g.get("name") == parts[i + 1]]
            if not match:
                raise UserError(f"override '{text}': no entry named '{parts[i + 1]}' in '{part}' "
                                f"(names: {[g.get('name') for g in items if isinstance(g, dict)]})")
            apply_override(match[0], parts[i + 2:], value, text)
            return
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"override '{text}': '{part}' is not a section")
    node[parts[-1]] = value


def config_from_dict(tree: dict) -> RunConfig:
    """Build and validate a :class:`RunConfig`; registers sensors declared under ``sensors:``."""
    for name, spec in (tree.get("sensors") or {}).items():
        register_sensor(SensorSpec.from_dict(name, spec), replace=True)
    return from_dict(RunConfig, tree)


def load_config(name_or_path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Load a shipped config by name (``msgfm_swinb_192``) or a YAML path, then apply dotted overrides."""
    tree = read_yaml_tree(name_or_path)
    if "task" in tree and "task" not in {f.name for f in dataclasses.fields(RunConfig)}:
        raise UserError(f"'{name_or_path}' is a fine-tuning config (it has a 'task'); load it with "
                        f"msgfm.config.load_finetune_config or launchers/finetune.py")
    for text in overrides:
        parts, value = parse_override(text)
        apply_override(tree, parts, value, text)
    return config_from_dict(tree)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML that :func:`load_config` reads back to an equal config."""
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
