"""What the encoders share: the nesting limit and the error that names a field path (``meta.tags[2]``)."""

from __future__ import annotations

from infeed.errors import EncodeError

__all__ = ["MAX_DEPTH", "Unsupported"]

#: Deepest nesting of maps and lists that any codec writes or reads.
MAX_DEPTH = 64


class Unsupported(Exception):
    """Raised inside an encoder; each container it passes through records its key or index."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        #: Keys (str) and list indices (int), innermost first.
        self.path: list[str | int] = []

    def to_encode_error(self, codec: str) -> EncodeError:
        """Return the public error, naming the field path."""
        where = ""
        for part in reversed(self.path):
            where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else part)
        target = f"field {where!r}" if where else "the value"
        return EncodeError(f"{codec} cannot encode {target}: {self.reason}")
