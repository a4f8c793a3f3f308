"""``CodecRegistry``: codec name -> codec, passed explicitly (there is no global registry)."""

from __future__ import annotations

from collections.abc import Iterable

from infeed.codecs.base import Codec
from infeed.codecs.json import JsonCodec
from infeed.codecs.msgpack import MsgpackCodec

__all__ = ["CodecRegistry", "default_registry"]


class CodecRegistry:
    """Codecs by name, so a consumer can decode whatever codec a message's header names.

    Args:
        codecs: codecs to register at once.

    Raises:
        TypeError, ValueError: as for :meth:`register`.
    """

    __slots__ = ("_codecs",)

    def __init__(self, codecs: Iterable[Codec] = ()) -> None:
        self._codecs: dict[str, Codec] = {}
        for codec in codecs:
            self.register(codec)

    def register(self, codec: Codec, *, replace: bool = False) -> None:
        """Add ``codec`` under ``codec.name``.

        Raises:
            TypeError: ``codec`` does not implement the Codec protocol.
            ValueError: the name is not a non-empty printable ASCII token, or is taken and not ``replace``.
        """
        if not isinstance(codec, Codec):
            raise TypeError(f"{type(codec).__qualname__} does not implement the Codec protocol")
        name = codec.name
        if (
            not isinstance(name, str)
            or not name
            or not name.isascii()
            or not name.isprintable()
            or " " in name
        ):
            raise ValueError(
                f"a codec name must be a non-empty ASCII token (it travels in a header), got {name!r}"
            )
        if name in self._codecs and not replace:
            raise ValueError(f"codec {name!r} is already registered; pass replace=True to replace it")
        self._codecs[name] = codec

    def get(self, name: str) -> Codec:
        """Return the codec called ``name``.

        Raises:
            KeyError: naming it and the registered names.
        """
        try:
            return self._codecs[name]
        except KeyError:
            raise KeyError(f"no codec {name!r}; registered: {', '.join(self._codecs) or 'none'}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._codecs

    @property
    def names(self) -> tuple[str, ...]:
        """The registered codec names."""
        return tuple(self._codecs)

    def __repr__(self) -> str:
        return f"CodecRegistry({', '.join(self._codecs)})"


def default_registry() -> CodecRegistry:
    """Return a new registry holding ``msgpack`` (the default) and ``json``."""
    return CodecRegistry([MsgpackCodec(), JsonCodec()])
