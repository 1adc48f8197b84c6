"""Job configuration: a dataclass per job, filled from a YAML/TOML file and overrides.

Every training job (pretraining, evaluation, fine-tuning) describes its knobs
as one dataclass. Each field carries ``metadata={"help": "...", "choices":
(...)}`` so the command line (``scratchgpt/cli.py``) can build its flags from
the dataclass alone. ``load_job_config`` reads a config file, applies
command-line overrides on top, and checks every value against the field's
type, so a typo in a file fails loudly instead of being silently ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class JobConfigError(ValueError):
    """A job config file or override that cannot be used (unknown key, wrong type, bad choice)."""


def read_config_file(path: Path) -> dict[str, Any]:
    """The mapping in a ``.yaml``/``.yml``, ``.toml`` or ``.json`` file."""
    path = Path(path)
    if not path.is_file():
        raise JobConfigError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise JobConfigError(f"config file {path}: unknown format {suffix!r}; use .yaml, .yml, .toml or .json")
    except JobConfigError:
        raise
    except Exception as e:  # yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError
        raise JobConfigError(f"config file {path} cannot be parsed: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise JobConfigError(f"config file {path} must hold a mapping of option names to values, not {type(data).__name__}")
    return data


def field_types(cls: type) -> dict[str, Any]:
    """Resolved type of each dataclass field (postponed annotations are strings)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def field_help(cls: type) -> dict[str, str]:
    """The one-line help of each field, for ``--help`` and docs."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls) if f.init}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, where: str) -> Any:
    """``value`` converted to ``tp`` when that is lossless; JobConfigError otherwise.

    Strings are accepted for numbers, booleans and paths because overrides may
    come from the command line as text, and YAML reads ``4e-4`` (no dot) as a
    string.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, where)
            except JobConfigError:
                continue
        raise JobConfigError(f"{where}: {value!r} is not a valid {_type_name(tp)}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise JobConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise JobConfigError(f"{where}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        items = [coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise JobConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise JobConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise JobConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise JobConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise JobConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise JobConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise JobConfigError(f"{where}: expected a string, got {value!r}")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value).expanduser()
        raise JobConfigError(f"{where}: expected a path, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise JobConfigError(f"{where}: {value!r} is not a valid {_type_name(tp)}")


def load_job_config(cls: type[T], path: Path | None = None, overrides: dict[str, Any] | None = None) -> T:
    """Build ``cls`` from a config file (optional) with ``overrides`` applied on top.

    Keys may use dashes or underscores (``batch-size`` = ``batch_size``).
    Overrides whose value is None are skipped: that is argparse's "flag not
    given". Unknown keys, wrong types and values outside a field's
    ``metadata["choices"]`` raise JobConfigError naming the key and the file.
    Errors raised by the dataclass's own ``__post_init__`` (ValueError) are
    re-raised as JobConfigError with the source named.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    types_ = field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    values: dict[str, Any] = {}
    sources: list[tuple[str, dict[str, Any]]] = []
    if path is not None:
        sources.append((f"config file {path}", read_config_file(Path(path))))
    if overrides:
        sources.append(("command line", {k: v for k, v in overrides.items() if v is not None}))
    for source, data in sources:
        for raw_key, value in data.items():
            key = str(raw_key).replace("-", "_")
            if key not in fields:
                known = ", ".join(sorted(fields))
                raise JobConfigError(f"{source}: unknown option {raw_key!r}. Known options: {known}")
            # On the command line the user typed a flag: name it as typed.
            where = f"--{key.replace('_', '-')}" if source == "command line" else f"{source}: option {raw_key!r}"
            value = coerce(value, types_[key], where)
            choices = fields[key].metadata.get("choices")
            if choices is not None and value is not None and value not in choices:
                raise JobConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
            values[key] = value
    try:
        return cls(**values)
    except JobConfigError:
        raise
    except (ValueError, TypeError) as e:
        origin = f" (from config file {path})" if path is not None else ""
        raise JobConfigError(f"invalid {cls.__name__}{origin}: {e}") from None


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-friendly dict of a job config (paths as strings), for run directories and logs."""

    def plain(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def add_job_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """``--config FILE`` plus a ``--field-name`` flag for every field of ``cls``, on an argparse parser.

    Every flag defaults to None ("not given"), so ``load_job_config`` applies
    only the flags actually typed. Booleans get ``--x/--no-x``, lists take
    several values (or one comma-separated value). Values stay strings here;
    ``load_job_config`` converts and checks them, so file values and flags
    share one set of error messages.
    """
    parser.add_argument("--config", type=Path, default=None, help="YAML, TOML or JSON file of options; flags override it")
    types_ = field_types(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = types_[f.name]
        inner = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        base = inner[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) else tp
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if "choices" in f.metadata:
            help_text += f" (one of: {', '.join(map(str, f.metadata['choices']))})"
        default = f.default if f.default is not dataclasses.MISSING else None
        if default is not None and not isinstance(default, (list, tuple, dict)):
            help_text += f" [default: {default}]"
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(base) in (list, tuple):
            parser.add_argument(flag, nargs="+", default=None, help=help_text, metavar=f.name.upper())
        else:
            parser.add_argument(flag, default=None, help=help_text, metavar=f.name.upper())


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """``cls`` from a namespace parsed with ``add_job_arguments``: the ``--config`` file, the typed flags on top.

    Other entries of the namespace (a CLI's verb and its own options) are not ``cls``'s and are left alone.
    """
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    return load_job_config(cls, args.config, {k: v for k, v in vars(args).items() if k in names})


def parse_job_args(cls: type[T], argv: list[str] | None = None, prog: str | None = None, description: str | None = None) -> T:
    """``--config FILE`` plus one flag per field, into a validated ``cls``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_job_arguments(parser, cls)
    return config_from_args(cls, parser.parse_args(argv))


def run_job_main(
    cls: type[T],
    job: Callable[[T], Any],
    argv: list[str] | None,
    prog: str,
    doc: str | None,
    errors: tuple[type[BaseException], ...] = (ValueError,),
) -> int:
    """A job's ``main``: flags into ``cls``, run ``job``; one of ``errors`` prints as ``error: ...`` and exits 2.

    Our jobs' errors subclass ValueError (bad flags, data, checkpoints), so a
    user sees one line that says what to fix, not a traceback.
    """
    try:
        job(parse_job_args(cls, argv, prog=prog, description=doc.splitlines()[0] if doc else None))
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
