"""Reading whole files the way every tunelab input is read: text as UTF-8 (a leading byte-order mark dropped, a
file that is not UTF-8 named with the line of its first bad byte), content identity as a SHA-256 of every byte;
and replacing a run's small files so that a reader (or a crash) never meets half of one."""

from __future__ import annotations

import hashlib
import os
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


def file_digest(path: Path) -> str:
    """SHA-256 of the whole file, read in 4 MiB blocks (constant memory).

    Why all of it rather than size + mtime + a sample: an edit that keeps the size (a label fixed, a digit
    changed) within the mtime granularity, or a file restored with its old mtime (rsync -t, tar, cp -p), would
    pass such a key and train on stale tokens. Hashing reads at ~1.5 GB/s here: about a second per GB, next to
    minutes of tokenising."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(4 << 20):
            digest.update(block)
    return digest.hexdigest()


def replace_text(path: Path, text: str) -> None:
    """Write `text` to a scratch file beside `path`, then rename it over `path` (atomic on POSIX): the old file
    stays whole until the new one is."""
    path = Path(path)
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    scratch.write_text(text)
    os.replace(scratch, path)
