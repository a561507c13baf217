"""One command-line style for every tool: ``python -m moe_morpheus.<tool> key=value ...``.

Tools that take an experiment (``train.py``, ``planning.budget``, ``planning.plan``,
``upcycle``) read Hydra overrides (``+experiment=moe_64e trainer.steps=5``); the few options of
their own are keys of a small dataclass written with the tool's prefix (``plan.gpus=8``). Tools
that take no experiment (``report``, ``inference.*``, ``data.tokenizer_training``,
``upcycle.sweep``) read only their dataclass's keys. Every tool answers ``--help`` with its keys,
defaults and meanings, and rejects a key it does not have with the one-line message ``train.py``
gives, naming the nearest real key.

Values are read as YAML (``3``, ``0.5``, ``true``, ``null``, ``[0.006,0.012]``) except for text
fields, which take the text as written: a prompt such as ``prompt=[MASK] is the capital`` is not
YAML.
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


def _parse_value(key: str, raw: str, tp: typing.Any) -> typing.Any:
    if tp is str or tp is Path:
        return None if raw == "null" else tp(raw)
    import yaml

    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ConfigError(f"{key}={raw}: not a value of type {getattr(tp, '__name__', tp)}") from None
    origin = typing.get_origin(tp) or tp
    if value is None:
        return None
    ok = {bool: lambda v: isinstance(v, bool), int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), list: lambda v: isinstance(v, list)}
    if origin in ok and not ok[origin](value):
        raise ConfigError(f"{key}={raw}: expected {getattr(origin, '__name__', origin)}")
    return float(value) if origin is float else value


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
    values: dict[str, typing.Any] = {}
    rest = []
    for arg in argv:
        key, equals, raw = arg.partition("=")
        if prefix is not None and key.startswith(prefix + "."):
            key = key[len(prefix) + 1:]
        elif prefix is not None and not key.startswith("-"):
            rest.append(arg)
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
        values[key] = _parse_value(arg.partition("=")[0], raw, types[key])
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
