"""`tunelab generate`: replies for every row of a file, written as JSONL."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from tunelab.data.formats import RowError, prompt_messages
from tunelab.data.sources import read_records
from tunelab.errors import DataError
from tunelab.infer.generate import GenerationOptions, context_length, generate_replies
from tunelab.infer.load import LoadedModel, compute_precision, load_generator


def generate_file(model: str, input_path: Path, output_path: Path, options: GenerationOptions,
                  system: str | None = None) -> int:
    """Read every prompt first (bad rows fail before the model loads), generate, write atomically."""
    records = read_records(input_path)
    if not records:
        raise DataError("file holds no rows", where=str(input_path))
    conversations, problems = [], []
    for record in records:
        try:
            conversations.append(prompt_messages(record.row, system))
        except RowError as err:
            problems.append(f"{record.where}: {err}")
    if problems:
        raise DataError(f"{len(problems)} invalid row(s):\n  " + "\n  ".join(problems[:10]))
    loaded = load_generator(model)
    refuse_overlong_prompts(loaded, conversations, [record.where for record in records], options.max_new_tokens)
    options = replace(options, precision=compute_precision(loaded))  # decode as the run computed
    replies = generate_replies(loaded.model, loaded.renderer, conversations, options)
    write_rows(output_path, [{**record.row, "reply": reply} for record, reply in zip(records, replies, strict=True)])
    return len(replies)


def refuse_overlong_prompts(loaded: LoadedModel, conversations: list[list[dict[str, str]]], wheres: list[str],
                            max_new_tokens: int) -> None:
    """Raise DataError naming every row whose prompt and max_new_tokens pass the model's context, before any is
    generated: past it the model reads positions it never trained on and replies nonsense without a warning
    (`tunelab serve` answers such a request with 400 context_length_exceeded)."""
    context = context_length(loaded.model)
    if context is None:
        return
    tokenizer, too_long, longest = loaded.tokenizer, [], 0
    for conversation, where in zip(conversations, wheres, strict=True):
        length = len(tokenizer(loaded.renderer.prompt(conversation), add_special_tokens=False)["input_ids"])
        longest = max(longest, length)
        if length + max_new_tokens > context:
            too_long.append(f"{where}: the prompt has {length} tokens")
    if not too_long:
        return
    fix = f"; shorten them or lower --max-new-tokens to {context - longest}" if longest < context else "; shorten them"
    raise DataError(f"{len(too_long)} row(s) with --max-new-tokens {max_new_tokens} pass the model's context of "
                    f"{context} tokens{fix}:\n  " + "\n  ".join(too_long[:10]))


def write_rows(output_path: Path, rows: Iterable[dict]) -> None:
    """JSONL written beside the target and renamed into place: an interrupted or failed write (a full disk) leaves
    no half file, and the scratch file is removed."""
    partial = output_path.with_name(output_path.name + ".partial")
    try:
        output_path.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "w") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
        partial.replace(output_path)
    except OSError as err:
        raise DataError(f"cannot write it: {err.strerror or err}", where=str(output_path)) from None
    finally:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
