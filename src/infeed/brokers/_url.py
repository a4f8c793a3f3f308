"""Parse a broker URL's query string into a backend's frozen config dataclass."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, TypeVar
from urllib.parse import parse_qsl

from infeed.config import convert_option
from infeed.errors import ConfigError

__all__ = ["parse_options"]

C = TypeVar("C")


def parse_options(query: str, config_cls: type[C], **fixed: Any) -> C:
    """Build ``config_cls`` from ``fixed`` fields plus the URL ``query`` options.

    Raises:
        ConfigError: naming an unknown option (with the nearest known one), a repeated
            option, or a value of the wrong type.
    """
    hints = typing.get_type_hints(config_cls)
    known = {f.name for f in dataclasses.fields(config_cls)} - set(fixed)  # type: ignore[arg-type]
    values: dict[str, Any] = dict(fixed)
    for name, raw in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(known))}"
            raise ConfigError(f"unknown option {name!r} for {config_cls.__name__}{hint}")
        if name in values:
            raise ConfigError(f"option {name!r} given twice")
        values[name] = convert_option(name, raw, hints[name])
    try:
        return config_cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad broker options: {exc}") from exc
