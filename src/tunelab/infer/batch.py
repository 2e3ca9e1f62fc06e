"""`tunelab generate`: replies for every row of a file, written as JSONL."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from tunelab.data.formats import RowError, prompt_messages
from tunelab.data.sources import read_records
from tunelab.errors import DataError
from tunelab.infer.generate import GenerationOptions, generate_replies
from tunelab.infer.load import compute_precision, load_generator


def generate_file(model: str, input_path: Path, output_path: Path, options: GenerationOptions,
                  system: str | None = None) -> int:
    """Read every prompt first (bad rows fail before the model loads), generate, write atomically."""
    records = read_records(input_path)
    conversations, problems = [], []
    for record in records:
        try:
            conversations.append(prompt_messages(record.row, system))
        except RowError as err:
            problems.append(f"{record.where}: {err}")
    if problems:
        raise DataError(f"{len(problems)} invalid row(s):\n  " + "\n  ".join(problems[:10]))
    loaded = load_generator(model)
    options = replace(options, precision=compute_precision(loaded))  # decode as the run computed
    replies = generate_replies(loaded.model, loaded.renderer, conversations, options)
    write_rows(output_path, [{**record.row, "reply": reply} for record, reply in zip(records, replies, strict=True)])
    return len(replies)


def write_rows(output_path: Path, rows: list[dict]) -> None:
    """JSONL written beside the target and renamed into place: an interrupted command leaves no half file."""
    partial = output_path.with_name(output_path.name + ".partial")
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with open(partial, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    partial.rename(output_path)
