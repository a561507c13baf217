"""One command-line style for every tool: ``python -m moe_morpheus.<tool> key=value ...``.

Tools that take an experiment (``train.py``, ``planning.budget``, ``planning.plan``,
``upcycle``) read Hydra overrides (``+experiment=moe_64e trainer.steps=5``); the few options of
their own are keys of a small dataclass written with the tool's prefix (``plan.gpus=8``). Tools
that take no experiment (``report``, ``inference.*``, ``data.train_tokenizer``,
``upcycle.sweep``) read only their dataclass's keys. Every tool answers ``--help`` with its keys,
defaults and meanings, and rejects a key it does not have with the one-line message ``train.py``
gives, naming the nearest real key.

Values are typed by their field: ``3``, ``1e-3``, ``true``, ``null`` (only where the field may be
empty), lists as ``[0.006,0.012]``; text is taken as written, so a prompt such as
``prompt=[MASK] is the capital`` is not parsed.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from moe_morpheus.config.errors import ConfigError
from moe_morpheus.config.keys import field_types, unknown_key

T = TypeVar("T")


def option(default=dataclasses.MISSING, *, help: str, factory=dataclasses.MISSING):
    """A dataclass field with the text ``--help`` prints; no default = the key is required."""
    return dataclasses.field(default=default, default_factory=factory, metadata={"help": help})


def _scalar(key: str, raw: object, tp: typing.Any) -> typing.Any:
    """``raw`` (a YAML value or text) as ``tp``: ``1e-3`` is a float, ``true`` a bool."""
    try:
        if tp is bool and str(raw).lower() in ("true", "false"):
            return str(raw).lower() == "true"
        if tp is int and not isinstance(raw, (bool, float)):
            return int(str(raw))
        if tp is float and not isinstance(raw, bool):
            return float(str(raw))
        if tp in (str, Path):
            return tp(str(raw))
    except ValueError:
        pass
    raise ConfigError(f"{key}={raw}: expected {getattr(tp, '__name__', tp)}")


def _parse_value(key: str, raw: str, tp: typing.Any, optional: bool) -> typing.Any:
    if raw in ("null", ""):
        if optional:
            return None
        raise ConfigError(f"{key}={raw}: {key} needs a value, it cannot be empty")
    if typing.get_origin(tp) is not list:
        return _scalar(key, raw, tp)  # text as written: a prompt such as "[MASK] is" is not YAML
    import yaml

    try:
        items = yaml.safe_load(raw)
    except yaml.YAMLError:
        items = None
    if not isinstance(items, list):
        raise ConfigError(f"{key}={raw}: expected a list, e.g. {key}=[1,2]")
    (item_type,) = typing.get_args(tp)
    return [_scalar(key, item, item_type) for item in items]


def help_text(schema: type, prog: str, summary: str, prefix: str | None = None) -> str:
    """``--help``: usage, the summary, then one line per key with its default."""
    head = f"usage: python -m {prog} " + (f"[Hydra overrides] {prefix}.key=value ..." if prefix else "key=value ...")
    lines = [head, "", summary.strip(), "", "keys:"]
    for f in dataclasses.fields(schema):
        if f.default is not dataclasses.MISSING:
            default = f"default {'null' if f.default is None else f.default}"
        elif f.default_factory is not dataclasses.MISSING:
            default = f"default {f.default_factory()}"
        else:
            default = "required"
        name = f"{prefix}.{f.name}" if prefix else f.name
        lines.append(f"  {name:<22} {f.metadata.get('help', '')} ({default})")
    return "\n".join(lines)


def parse_options(schema: type[T], argv: Sequence[str], *, prog: str, summary: str,
                  prefix: str | None = None) -> tuple[T, list[str]]:
    """``(options, rest)``: ``schema`` filled from the ``key=value`` arguments of ``argv``.

    With ``prefix``, only ``prefix.key=value`` arguments are options and the rest are returned
    (Hydra overrides for the experiment); without it, every argument must be a key of ``schema``.
    ``--help`` prints :func:`help_text` and exits 0. Raises ConfigError for an unknown key, a value
    of the wrong type or a required key left out.
    """
    if "--help" in argv or "-h" in argv:
        print(help_text(schema, prog, summary, prefix))
        raise SystemExit(0)
    types = field_types(schema)
    hints = typing.get_type_hints(schema)
    values: dict[str, typing.Any] = {}
    rest = []
    for arg in argv:
        written, equals, raw = arg.partition("=")
        key = written
        if prefix is not None and key.startswith(prefix + "."):
            key = key[len(prefix) + 1:]
        elif prefix is not None and (equals or key.startswith("~")) and not key.startswith("-"):
            rest.append(arg)  # a Hydra override (~key deletes a key)
            continue
        if not equals or key.startswith("-"):
            flag = key.lstrip("-").replace("-", "_")
            example = f"{prefix}.{flag}" if prefix else flag
            if flag not in types:
                example = f"{prefix}.{next(iter(types))}" if prefix else next(iter(types))
            raise ConfigError(f"{arg}: arguments are key=value, e.g. {example}=... "
                              f"(python -m {prog} --help lists the keys)")
        if prefix is None and (message := unknown_key(key, schema)):
            raise ConfigError(message)
        if prefix is not None and key not in types:
            names = [f"{prefix}.{name}" for name in types]
            near = difflib.get_close_matches(f"{prefix}.{key}", names, n=1, cutoff=0.6)
            hint = f": did you mean {near[0]}?" if near else ""
            raise ConfigError(f"unknown key {prefix}.{key}{hint} (keys of {prefix}: {', '.join(names)})")
        if key in values:
            raise ConfigError(f"{written} is given twice: give it once")
        optional = type(None) in typing.get_args(hints[key])
        values[key] = _parse_value(written, raw, types[key], optional)
    missing = [f.name for f in dataclasses.fields(schema) if f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        names = [f"{prefix}.{m}" if prefix else m for m in missing]
        raise ConfigError(f"missing {', '.join(n + '=...' for n in names)} (python -m {prog} --help lists the keys)")
    return schema(**values), rest


def fail(error: Exception | str) -> int:
    """The one-line ``error: ...`` every tool prints for bad input; the exit code 2 (usage)."""
    print(f"error: {error}", file=sys.stderr)
    return 2
