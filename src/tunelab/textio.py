"""Reading a whole text file the way every tunelab input is read: UTF-8, a leading byte-order mark dropped, and a
file that is not UTF-8 named with the line of its first bad byte."""

from __future__ import annotations

from pathlib import Path

from tunelab.errors import UserError


def read_utf8(path: Path, name: str, error: type[UserError]) -> str:
    """The file's text; raises `error` (ConfigError, DataError, ...) at `name:line` when it is not UTF-8."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise error(f"not valid UTF-8 (byte 0x{raw[err.start]:02x}); save the file as UTF-8",
                    where=f"{name}:{line}") from None
