"""Typed settings from one place: CLI flags, then ``INFEED_*`` variables, then ``infeed.toml``.

Precedence, highest first: explicit overrides (the CLI's flags), environment variables named
``INFEED_<FIELD>`` (``INFEED_BROKER``), the ``[infeed]`` table of ``infeed.toml`` (in the working
directory, or the file ``INFEED_CONFIG`` names), then the defaults below.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infeed.errors import ConfigError

__all__ = ["DEFAULT_BROKER_URL", "DEFAULT_CODEC", "Settings", "convert_option"]

#: The embedded default: a SQLite log under ./.infeed in the working directory.
DEFAULT_BROKER_URL = "sqlite:///./.infeed/infeed.db"
#: Codec used when a producer names none.
DEFAULT_CODEC = "msgpack"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def convert_option(name: str, raw: str, kind: Any) -> Any:
    """Convert the text ``raw`` of option ``name`` to the type ``kind``.

    ``kind`` is bool, int, float, str, a ``Literal``, or ``X | None``.

    Raises:
        ConfigError: naming the option and the value when it does not convert.
    """
    origin = typing.get_origin(kind)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if raw.lower() in {"", "none", "null"}:
            return None
        return convert_option(name, raw, args[0])
    if origin is typing.Literal:
        allowed = [str(a) for a in typing.get_args(kind)]
        if raw not in allowed:
            raise ConfigError(f"option {name}={raw!r}: expected one of {', '.join(allowed)}")
        return raw
    try:
        if kind is bool:
            low = raw.lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError(raw)
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
    except ValueError as exc:
        raise ConfigError(f"option {name}={raw!r} is not a valid {kind.__name__}") from exc
    return raw


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Process-wide defaults for the CLI and for objects built without explicit arguments.

    Attributes:
        broker: broker URL (``INFEED_BROKER``).
        codec: codec producers use (``INFEED_CODEC``).
        log_level: logging level name (``INFEED_LOG_LEVEL``).
    """

    broker: str = DEFAULT_BROKER_URL
    codec: str = DEFAULT_CODEC
    log_level: str = "INFO"

    @classmethod
    def load(
        cls,
        overrides: Mapping[str, object | None] | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        config_file: Path | None = None,
    ) -> Settings:
        """Resolve settings by precedence: ``overrides`` > environment > ``infeed.toml``.

        Args:
            overrides: values given explicitly (CLI flags); ``None`` values count as not given.
            environ: the environment to read (default ``os.environ``).
            config_file: the TOML file (default ``$INFEED_CONFIG`` or ``./infeed.toml``).

        Raises:
            ConfigError: for an unknown key, a bad value, or an unreadable TOML file.
        """
        env = os.environ if environ is None else environ
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        values: dict[str, Any] = {}

        path = config_file or Path(env.get("INFEED_CONFIG", "infeed.toml"))
        if config_file is not None or "INFEED_CONFIG" in env or path.exists():
            values.update(_read_toml(path, names))
        for name in names:
            raw = env.get(f"INFEED_{name.upper()}")
            if raw is not None:
                values[name] = convert_option(f"INFEED_{name.upper()}", raw, hints[name])
        for name, value in (overrides or {}).items():
            if name not in names:
                raise ConfigError(f"unknown setting {name!r}; known: {', '.join(names)}")
            if value is not None:
                values[name] = value
        return cls(**values)


def _read_toml(path: Path, names: list[str]) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read settings file {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    table = data.get("infeed", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [infeed] must be a table")
    for key in table:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{path}: unknown key {key!r} in [infeed]{hint}")
    return dict(table)
