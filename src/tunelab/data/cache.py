"""Read, validate and tokenise one data file into Arrow tables, once: cached under
TUNELAB_HOME/cache/tokenized/<key>, memory-mapped on later runs.

The key hashes everything that decides the tokens: the file's full content (SHA-256; see `textio.file_digest`) and
its suffix (which reader), or a dataset's files (data/hf_datasets.py); the tokenizer (its whole serialised
definition and special tokens), the chat template text, every data setting that changes tokens (format,
system_prompt, chat_template, train_on, max_length, overlong), the versions of the libraries that render and
tokenise, and the source code of tunelab's reading and tokenising modules (so a code change never serves stale
rows). Settings that only pick and order rows (seed, eval_split, weights, shuffle, packing) are not in the key:
they act on the cached tables on every run.

An entry is built in a scratch folder and renamed into place, so a crash or Ctrl-C never leaves one that looks
complete; a file with invalid rows caches nothing. Entries are never rewritten: deleting one (or the whole folder)
is safe even while a run reads it, but overwriting its files in place would crash that run (SIGBUS).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa

from tunelab.config import DataConfig
from tunelab.data.arrow_store import TableWriter, TokenTable
from tunelab.data.columns import explain, rename_columns
from tunelab.data.formats import OBJECTIVE_FORMATS, RowError, file_format, needs_pair_objective, to_sample
from tunelab.data.layouts import layout_columns
from tunelab.data.sources import Record, iter_records, source_identity
from tunelab.data.template import ChatRenderer
from tunelab.data.tokenize import MAX_LISTED, tokenize_sample
from tunelab.errors import DataError, UserError

DATA_VERSION = 1
"""Bump when the layout of a cache entry changes."""

_KEYED_MODULES = ("sources.py", "hf_datasets.py", "formats.py", "template.py", "tokenize.py", "arrow_store.py",
                  "cache.py", "pairs.py", "row_table.py", "row_cache.py", "preference.py", "prompts.py")


def cache_root() -> Path:
    from tunelab.models.resolve import tunelab_home

    return tunelab_home() / "cache" / "tokenized"


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides the tokenizer's ids: its full serialised definition (vocabulary, merges,
    normaliser, pre-tokeniser, added tokens) and special tokens."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # Padding and truncation are call-time settings that any batched call leaves behind: not identity.
        definition = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("padding", "truncation")}
        digest.update(json.dumps(definition, sort_keys=True).encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        vocab_file = tokenizer.init_kwargs.get("vocab_file")
        if vocab_file and Path(vocab_file).is_file():
            digest.update(Path(vocab_file).read_bytes())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return digest.hexdigest()


@functools.cache
def _code_digest() -> str:
    folder = Path(__file__).parent
    digest = hashlib.sha256()
    for name in _KEYED_MODULES:
        digest.update((folder / name).read_bytes())
    return digest.hexdigest()


def cache_key(path: Path | str, fmt: str, config: DataConfig, renderer: ChatRenderer) -> tuple[str | None, dict]:
    """(key, what it was made of) for one data source read with format `fmt`; key None when the source's content
    cannot be pinned (then nothing is cached)."""
    import jinja2
    import tokenizers
    import transformers

    identity = source_identity(path)
    material = {
        "data_version": DATA_VERSION,
        "code": _code_digest(),
        **(identity or {}),
        "format": fmt,
        "system_prompt": config.system_prompt,
        "train_on": config.train_on,
        "max_length": config.max_length,
        "overlong": config.overlong,
        "chat_template": config.chat_template,
        "columns": config.columns,
        "template": renderer.template,
        "tokenizer": tokenizer_fingerprint(renderer.tokenizer),
        "versions": [transformers.__version__, tokenizers.__version__, jinja2.__version__],
    }
    key = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:32]
    return (key if identity is not None else None), material


def tokenized_file(
    path: Path | str, fmt: str, config: DataConfig, renderer: ChatRenderer, problems, *, use_cache: bool = True
) -> tuple[TokenTable | None, str]:
    """The tokenised table of one data file and how it was got: `hit` (from the cache), `miss` (built now and
    cached) or `off` (built in memory). None when the file holds invalid rows (they are added to `problems`)."""
    name = str(path)
    key, material = (cache_key(path, fmt, config, renderer) if use_cache else (None, None))
    return cached_table(
        name, key, material,
        build=lambda folder: _build(path, fmt, config, renderer, problems, folder),
        from_built=lambda built, meta: TokenTable(*built, meta, name),
        from_entry=lambda entry, meta: TokenTable(entry / "units.arrow", entry / "samples.arrow", meta, name),
    )


def cached_table(name: str, key: str | None, material: dict | None, *, build: Callable, from_built: Callable,
                 from_entry: Callable) -> tuple[Any, str]:
    """A table read from the cache entry `key`, or built now by `build(folder)` (-> (what it wrote, meta), or
    None when the file holds invalid rows) and cached; `key` None builds in memory (`build(None)`). Returns
    (table or None, `hit` | `miss` | `off`). The table kinds differ (SFT samples, objective rows); this is the
    one place that makes entries appear whole or not at all."""
    if key is None:
        built = build(None)
        return (from_built(*built) if built else None), "off"
    entry = cache_root() / key
    table = _open(entry, name, from_entry)
    if table is not None:
        return table, "hit"
    scratch = entry.parent / f".tmp-{key}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        scratch.mkdir(parents=True)
        built = build(scratch)
        if built is None:
            return None, "miss"
        meta = {**built[1], "key": material, "built_from": name}
        (scratch / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            scratch.rename(entry)
        except OSError:
            if not (entry / "meta.json").is_file():  # not a concurrent build that finished first
                raise
    except OSError as err:
        raise UserError(
            f"writing its tokenised rows to the cache under {entry.parent} failed ({err}); free space or fix "
            "permissions there, point TUNELAB_HOME elsewhere, or set data.cache: false",
            where=name,
        ) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    table = _open(entry, name, from_entry)
    if table is None:
        raise DataError(f"the tokenised-data cache entry {entry} cannot be read back", where=name)
    return table, "miss"


def _open(entry: Path, name: str, from_entry: Callable):
    """A complete, readable entry, or None (an unreadable one is removed, to be rebuilt)."""
    meta_file = entry / "meta.json"
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text())
        if meta.get("version") != DATA_VERSION:
            raise ValueError("old cache layout")
        table = from_entry(entry, meta)
    except (OSError, ValueError, KeyError, pa.ArrowException):
        shutil.rmtree(entry, ignore_errors=True)
        return None
    os.utime(meta_file)  # last use, for pruning old entries by age
    return table


def _build(path: Path | str, fmt: str, config: DataConfig, renderer: ChatRenderer, problems, folder: Path | None):
    """Stream the file's rows through validation and tokenisation into a TableWriter. Returns ((units, samples),
    meta) or None when a row was invalid (every problem of the file is in `problems`)."""
    name = str(path)
    already = len(problems)
    head, records, fmt, why, columns = streamed_rows(path, fmt, config.columns, problems)
    if head and fmt in OBJECTIVE_FORMATS:
        raise DataError(needs_pair_objective(fmt, why), where=name)
    writer = TableWriter(name, folder)
    notes: dict[str, list[str]] = {"truncated": [], "dropped": []}
    counts = {"truncated": 0, "dropped": 0}
    readable = invalid = 0
    for record in itertools.chain(head, records):
        readable += 1
        try:
            sample = to_sample(record, fmt, config.system_prompt)
        except RowError as err:
            invalid += 1
            problems.append(f"{record.where}: {explain(str(err), columns)}")
            continue
        result = tokenize_sample(sample, renderer, config)
        if result.problem:
            invalid += 1
            problems.append(result.problem)
            continue
        for kind in ("truncated", "dropped"):
            note = getattr(result, kind)
            if note:
                counts[kind] += 1
                if len(notes[kind]) < MAX_LISTED:
                    notes[kind].append(note[len(name) :])
        writer.add(sample, result.units)
    unreadable = len(problems) - already - invalid
    if not readable + unreadable:
        raise DataError("file holds no rows", where=name)
    if len(problems) > already:
        return None
    units, samples = writer.finish()
    meta = {
        "version": DATA_VERSION,
        "format": fmt,
        "format_reason": why,
        "rows": readable + unreadable,
        "samples": writer.num_samples,
        "units": writer.num_units,
        "tokens_sha256": writer.digest.hexdigest(),
        **counts,
        "truncated_notes": notes["truncated"],
        "dropped_notes": notes["dropped"],
    }
    return (units, samples), meta


def streamed_rows(path: Path | str, fmt: str, columns: dict[str, str], problems):
    """(the first rows, an iterator over the rest, format, why that format, the column mapping used) of a file read
    one row at a time: the format is detected from the first 20 readable rows; data.columns (or a known layout's
    mapping, see layouts.py) renames the file's columns to fields."""
    name = str(path)
    records = iter_records(path, problems)
    head = list(itertools.islice(records, 20))
    columns, layout = layout_columns([r.row for r in head], columns, fmt, name)
    head = rename_columns(head, columns, name)
    fmt, why = file_format(head, fmt, name)
    return head, (_renamed(record, columns or {}) for record in records), fmt, layout or why, columns


def _renamed(record: Record, columns: dict[str, str]) -> Record:
    """One streamed row with data.columns applied (the whole-file column check ran on the first rows)."""
    mapped = {field: column for field, column in columns.items() if column in record.row}
    if not mapped:
        return record
    row = {k: v for k, v in record.row.items() if k not in mapped.values()}
    row.update({field: record.row[column] for field, column in mapped.items()})
    return Record(row, record.where)
