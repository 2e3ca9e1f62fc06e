"""Rows from the `datasets` library: a folder written by `save_to_disk`, or `hf:NAME`, anything `load_dataset`
takes (a hub id such as `hf:tatsu-lab/alpaca`, or a local dataset repository folder such as `hf:./my-set`).

A reference may end in options, as in `hf:glue?subset=mrpc&split=validation&revision=<commit>&streaming=true`;
DataSource's split/subset/revision/streaming fields are folded into the same form (config.py), so everything below
sees one string. The rows are then read, validated and cached exactly like a file's, each named `REF[index]`.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import DataError
from tunelab.textio import file_digest

HF_PREFIX = "hf:"
OPTIONS = ("split", "subset", "revision", "streaming")
_SAVED_MARKERS = ("dataset_dict.json", "state.json")
"""`save_to_disk` writes dataset_dict.json for a DatasetDict and state.json (+ dataset_info.json) for a Dataset."""


@dataclass(frozen=True)
class DatasetRef:
    """A parsed reference: where the dataset is, and which part of it."""

    text: str
    """As written in the config: what every message and row location names."""
    location: str
    """A hub id or a folder."""
    from_hub_loader: bool
    """True for `hf:` (load_dataset: hub ids and dataset repository folders); False for save_to_disk folders."""
    split: str | None = None
    subset: str | None = None
    revision: str | None = None
    streaming: bool = False

    @property
    def name(self) -> str:
        """A short name for the source (mix weights, per-source metrics): the dataset's last path part."""
        tail = Path(self.location.rstrip("/")).name or self.location
        return f"{tail}-{self.split}" if self.split else tail

    @property
    def local_folder(self) -> Path | None:
        folder = Path(self.location).expanduser()
        return folder if folder.is_dir() else None


def split_options(text: str) -> tuple[str, dict[str, str]]:
    """(`text` without its `?key=value&...` part, the options). Unknown keys are a DataError naming them."""
    base, _, query = text.partition("?")
    options: dict[str, str] = {}
    for part in filter(None, query.split("&")):
        key, sep, value = part.partition("=")
        if key not in OPTIONS or not sep or not value:
            raise DataError(f"unknown dataset option '{part}' (options: {', '.join(k + '=...' for k in OPTIONS)})",
                            where=text)
        options[key] = value
    return base, options


def is_saved_dataset(folder: Path) -> bool:
    return folder.is_dir() and any((folder / marker).is_file() for marker in _SAVED_MARKERS)


def parse_dataset_ref(text: str) -> DatasetRef | None:
    """The dataset `text` names, or None when it names a file (or nothing: the file reader says so)."""
    base, options = split_options(text) if "?" in text else (text, {})
    if base.startswith(HF_PREFIX):
        location, from_hub_loader = base[len(HF_PREFIX):], True
        if not location:
            raise DataError("name a dataset after 'hf:' (a hub id such as hf:tatsu-lab/alpaca, or a folder)",
                            where=text)
    elif Path(base).expanduser().is_dir():
        if not is_saved_dataset(Path(base).expanduser()):
            raise DataError("a folder, but not one written by datasets' save_to_disk (no dataset_dict.json or "
                            "state.json in it); for a dataset repository folder (data files and a README) write "
                            f"hf:{base}", where=text)
        location, from_hub_loader = str(Path(base).expanduser()), False
    else:
        if options:
            raise DataError("dataset options (?split=...) apply to hf: datasets and save_to_disk folders only",
                            where=text)
        return None
    streaming = options.get("streaming", "false").lower()
    if streaming not in ("true", "false"):
        raise DataError(f"streaming must be true or false, not '{options['streaming']}'", where=text)
    if streaming == "true" and not from_hub_loader:
        raise DataError("streaming applies to hf: datasets; a save_to_disk folder is memory-mapped already",
                        where=text)
    return DatasetRef(text, location, from_hub_loader, options.get("split"), options.get("subset"),
                      options.get("revision"), streaming == "true")


def with_options(path: str, **options: Any) -> str:
    """`path` with DataSource's split/subset/revision/streaming fields appended as options (None ones left out)."""
    given = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in options.items() if v not in (None, False)}
    if not given:
        return path
    base, existing = split_options(path) if "?" in path else (path, {})
    clash = sorted(k for k in given if k in existing and existing[k] != given[k])
    if clash:
        raise ValueError(f"{', '.join(clash)} given twice, differently: in the path and as a field")
    query = "&".join(f"{k}={v}" for k, v in {**existing, **given}.items())
    return f"{base}?{query}"


def iter_dataset_records(ref: DatasetRef) -> Iterator[tuple[dict, str]]:
    """(row, location) of every row of the referenced split, one at a time (memory-mapped or streamed)."""
    for index, row in enumerate(_split_rows(ref)):
        yield dict(row), f"{ref.text}[{index}]"


def dataset_identity(ref: DatasetRef) -> dict | None:
    """What the tokenised-rows cache keys a dataset by: a digest of its files (a local folder's, or the loaded
    split's Arrow files), or the hub commit a streamed split was read at. None when nothing pins the content (a
    streamed hub split whose commit cannot be resolved): that source is not cached."""
    parts = {"subset": ref.subset, "split": ref.split, "reader": "load_dataset" if ref.from_hub_loader else "disk"}
    folder = ref.local_folder
    if folder is not None:
        files = sorted(p for p in folder.rglob("*") if p.is_file() and ".cache" not in p.relative_to(folder).parts)
        digest = hashlib.sha256()
        for file in files:
            digest.update(f"{file.relative_to(folder)}\0{file_digest(file)}\0".encode())
        return {**parts, "folder_sha256": digest.hexdigest()}
    if ref.streaming:
        commit = _hub_commit(ref)
        return {**parts, "location": ref.location, "commit": commit} if commit else None
    rows = _split_rows(ref)
    return {**parts, "arrow_sha256": [file_digest(Path(f["filename"])) for f in rows.cache_files]}


def _hub_commit(ref: DatasetRef) -> str | None:
    from huggingface_hub import HfApi

    try:
        return HfApi().dataset_info(ref.location, revision=ref.revision).sha
    except Exception:  # noqa: BLE001 - offline, gated, or moved: the source is simply not cached
        return None


def _split_rows(ref: DatasetRef) -> Iterable[dict]:
    """The referenced split as a `datasets` Dataset (memory-mapped) or IterableDataset (streamed). A local folder
    is loaded afresh each time (its content may have changed since); a hub split once per process, since its cache
    key (its prepared Arrow files) and its read share the load."""
    return _split_of(ref, _load(ref)) if ref.local_folder is not None else _hub_split_rows(ref)


@functools.lru_cache(maxsize=8)
def _hub_split_rows(ref: DatasetRef) -> Iterable[dict]:
    return _split_of(ref, _load(ref))


def _split_of(ref: DatasetRef, loaded) -> Iterable[dict]:
    if hasattr(loaded, "keys"):  # a DatasetDict or IterableDatasetDict
        return _pick_split(ref, dict(loaded))
    if ref.split and getattr(loaded, "split", None) not in (None, ref.split):
        raise DataError(f"this dataset holds the split '{loaded.split}' only, not '{ref.split}'", where=ref.text)
    return loaded


def _pick_split(ref: DatasetRef, splits: dict[str, Any]):
    names = ", ".join(splits)
    if ref.split is not None:
        if ref.split not in splits:
            raise DataError(f"no split '{ref.split}' (splits: {names})", where=ref.text)
        return splits[ref.split]
    if "train" in splits:
        return splits["train"]
    if len(splits) == 1:
        return next(iter(splits.values()))
    base = ref.text.partition("?")[0]
    raise DataError(f"holds splits {names}: name one, e.g. {base}?split={next(iter(splits))}", where=ref.text)


def _offline_message(ref: DatasetRef) -> str:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return (f"HF_HUB_OFFLINE is set and '{ref.location}' is not in the datasets cache: unset it where the hub is "
                "reachable, or point data.train at a save_to_disk folder or the data files")
    return (f"cannot reach the Hugging Face hub to load '{ref.location}'. Where the hub is reachable, save it with "
            f"`datasets.load_dataset('{ref.location}').save_to_disk('FOLDER')`, copy FOLDER here and set data.train: "
            "FOLDER (or point data.train at its data files); if it is in the datasets cache already, set "
            "HF_HUB_OFFLINE=1 to read it from there")


def hub_resolvable(timeout: float = 5.0) -> bool:
    """Whether the hub's host name resolves: without a network, huggingface_hub retries each request for ~25 s
    before failing; this answers in milliseconds."""
    import socket
    import threading
    from urllib.parse import urlparse

    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    answer: list[bool] = []

    def resolve() -> None:
        try:
            socket.getaddrinfo(host, 443)
            answer.append(True)
        except OSError:
            answer.append(False)

    worker = threading.Thread(target=resolve, daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(answer and answer[0])


def _load(ref: DatasetRef):
    import datasets
    from huggingface_hub import constants

    if ref.from_hub_loader and ref.local_folder is None and not constants.HF_HUB_OFFLINE and not hub_resolvable():
        raise DataError(_offline_message(ref), where=ref.text)
    try:
        if not ref.from_hub_loader:
            return datasets.load_from_disk(ref.location)
        split = ref.split if not ref.streaming else None  # a streamed dict costs nothing; pick the split after
        # datasets keys its own cache of a local folder by file modification times, which miss a rewrite within
        # the clock's granularity; tunelab reads rows only when its digest of the folder changed, so prepare anew.
        fresh = "force_redownload" if ref.local_folder is not None and not ref.streaming else None
        return datasets.load_dataset(ref.location, ref.subset, split=split, revision=ref.revision,
                                     streaming=ref.streaming, download_mode=fresh)
    except ConnectionError:
        raise DataError(_offline_message(ref), where=ref.text) from None
    except FileNotFoundError as err:
        raise DataError(f"no such dataset on the hub or on disk ({first_line(err)})", where=ref.text) from None
    except ValueError as err:  # an unknown subset or split: datasets lists the valid ones
        raise DataError(first_line(err), where=ref.text) from None


def first_line(err: Exception) -> str:
    """An exception's first line: libraries put the cause there and pages of context after it."""
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
