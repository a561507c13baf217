"""Which dotted keys a configuration schema has, and the one-line error for a key it has not.

Hydra rejects an unknown key written as ``trainer.x=1``, but ``+trainer.x=1`` (the form its own
error message suggests) adds the key, and ``OmegaConf.to_object`` then sets it as a stray
attribute that nothing reads: the run trains as if it had not been written. So the command line
is checked before composition and the composed config after it, both against the dataclasses.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import re
import types
import typing
from collections.abc import Iterable, Iterator, Mapping

from moe_morpheus.config.errors import ConfigError

# The segment of a dotted key under a dict field whose keys the user names (data.sources.<name>).
ANY_NAME = "<name>"


def _unwrap(tp: typing.Any) -> typing.Any:
    """``X | None`` -> ``X``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def field_types(cls: type) -> dict[str, typing.Any]:
    """Field name -> type of the dataclass ``cls`` (``X | None`` read as ``X``)."""
    hints = typing.get_type_hints(cls)
    return {f.name: _unwrap(hints[f.name]) for f in dataclasses.fields(cls)}


def schema_keys(schema: type, prefix: str = "") -> list[str]:
    """Every dotted key of ``schema``, sections and values (``data``, ``data.sources.<name>.path``)."""
    keys = []
    for name, tp in field_types(schema).items():
        key = f"{prefix}{name}"
        keys.append(key)
        if dataclasses.is_dataclass(tp):
            keys += schema_keys(tp, f"{key}.")
        elif typing.get_origin(tp) is dict and dataclasses.is_dataclass(value := _unwrap(typing.get_args(tp)[1])):
            keys += schema_keys(value, f"{key}.{ANY_NAME}.")
    return keys


def _nearest(key: str, keys: list[str]) -> list[str]:
    """The real keys ``key`` most likely meant, among ``keys`` (its own section's first)."""
    leaf = key.rpartition(".")[2]
    # The name in another section (seed -> data.seed, trainer.seed, upcycle.seed), or an
    # abbreviation the schema uses (learning_rate -> lr).
    initials = "".join(word[0] for word in leaf.split("_") if word)
    for name in (leaf, initials if len(initials) > 1 else None):
        if same := [k for k in keys if k.rpartition(".")[2] == name]:
            return same
    return difflib.get_close_matches(key, keys, n=1, cutoff=0.6)


def _either(names: list[str]) -> str:
    """a, b or c"""
    return " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


def unknown_key(key: str, schema: type) -> str | None:
    """None when the dotted ``key`` names a field of ``schema`` (any name under a dict field);
    else the error message, which names the key and the nearest real one."""
    tp: typing.Any = schema
    parts = key.split(".")
    for i, part in enumerate(parts):
        if dataclasses.is_dataclass(tp):
            fields = field_types(tp)
            if part in fields:
                tp = fields[part]
                continue
            section = ".".join(parts[:i])
            siblings = [f"{section}.{name}" if section else name for name in fields]
            others = [k for k in schema_keys(schema) if ANY_NAME not in k and k not in siblings]
            nearest = _nearest(".".join(parts[:i + 1]), siblings + others)
            hint = f": did you mean {_either(nearest)}?" if nearest else ""
            where = f"keys of {section}" if section else "top-level keys"
            return f"unknown config key {key}{hint} ({where}: {', '.join(fields)})"
        if typing.get_origin(tp) is dict:
            tp = _unwrap(typing.get_args(tp)[1])
            continue
        return f"unknown config key {key}: {'.'.join(parts[:i])} is a value, it has no keys"
    return None


def _dotted(node: Mapping, prefix: str = "") -> Iterator[str]:
    for name, value in node.items():
        key = f"{prefix}{name}"
        yield key
        if isinstance(value, Mapping):
            yield from _dotted(value, f"{key}.")


def check_keys(config: Mapping, schema: type) -> None:
    """Raise ConfigError for the first key of the nested mapping ``config`` that ``schema`` has not."""
    for key in _dotted(config):
        if message := unknown_key(key, schema):
            raise ConfigError(message)


# Values Hydra reads back unchanged without quotes (paths, timestamps, numbers).
_PLAIN_VALUE = re.compile(r"[A-Za-z0-9_/.:-]+")


def override(key: str, value: object) -> str:
    """``key=value`` as a Hydra override that reads back as ``value``, quoted when the value holds
    override syntax: a multirun job's folder is named after its overrides
    (``0_+experiment=moe_8e,trainer.seed=1``), whose ``=`` and ``,`` fail to parse unquoted."""
    text = str(value)
    if _PLAIN_VALUE.fullmatch(text):
        return f"{key}={text}"
    return f"{key}='" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def override_key(override: str) -> str:
    """The dotted key of a Hydra override: ``+trainer.lr=1``, ``++trainer.lr=1``, ``~trainer.lr``."""
    return override.split("=", 1)[0].lstrip("~+")


def check_overrides(overrides: Iterable[str], schema: type, groups: Iterable[str]) -> None:
    """Raise ConfigError for the first override whose key ``schema`` has not, with or without
    ``+``. Group selections (``model=NAME``, ``+experiment=NAME``, ``hydra/launcher=NAME``,
    ``group@package=NAME``) and Hydra's own ``hydra.*`` keys are not schema keys and pass."""
    groups = set(groups)
    for override in overrides:
        key = override_key(override)
        if key in groups or "/" in key or "@" in key or key == "hydra" or key.startswith("hydra."):
            continue
        if message := unknown_key(key, schema):
            raise ConfigError(message)


# File systems allow 255 bytes per name; Hydra's override_dirname of a sweep with a dozen
# overrides is longer (a two-job test sweep: 287 bytes), and a value with ``/`` nests folders.
FOLDER_NAME_MAX_BYTES = 200


def folder_name(overrides: str, limit: int = FOLDER_NAME_MAX_BYTES) -> str:
    """A multirun job's folder name from its overrides (Hydra's ``override_dirname``), the same
    on every launch so that a rerun finds the job again: ``/`` written ``%2F``, and a name over
    ``limit`` bytes cut to its first ``limit - 13`` bytes plus ``~`` and 12 hex digits of the
    whole name's SHA-256 (two jobs that differ only past the cut stay apart)."""
    name = overrides.replace("/", "%2F")
    raw = name.encode()
    if len(raw) <= limit:
        return name
    digest = hashlib.sha256(raw).hexdigest()[:12]
    return raw[:limit - 13].decode(errors="ignore") + "~" + digest
