"""`tunelab score`: a reward model's score for the reply of every row of a file, written as JSONL."""

from __future__ import annotations

from pathlib import Path

import torch

from tunelab.data.formats import (
    PAIR_FORMATS,
    PROMPTS_FORMAT,
    RowError,
    as_text,
    file_format,
    prompt_messages,
    to_sample,
)
from tunelab.data.preference import tokenize_prompt, tokenize_reply
from tunelab.data.sources import read_records
from tunelab.data.template import TemplateError
from tunelab.errors import ConfigError, DataError
from tunelab.infer.batch import write_rows
from tunelab.infer.load import load_for_inference
from tunelab.objectives.pairs import collate_sequences
from tunelab.objectives.reward import sequence_rewards

REPLY_COLUMN = "reply"
"""What `tunelab generate` adds to every row it answers (infer/batch.py)."""


def score_file(run: str, input_path: Path, output_path: Path, *, batch_size: int = 8,
               max_length: int = 2048) -> int:
    """Score every row's last reply (prompt/completion, chat messages, alpaca, question/answer rows, or the
    prompt rows `tunelab generate` wrote with their `reply`) with the reward model in `run`: each row is written
    back with `score`. Bad rows fail before the model loads."""
    records = read_records(input_path)
    if not records:
        raise DataError("file holds no rows", where=str(input_path))
    generated = all(REPLY_COLUMN in record.row for record in records)
    fmt = None if generated else file_format(records, "auto", input_path)[0]
    if fmt in (*PAIR_FORMATS, PROMPTS_FORMAT):
        raise DataError(f"its rows are {fmt} rows; score reads one reply a row: prompt/completion, chat messages, "
                        f"alpaca, question/answer, or `tunelab generate`'s rows with their '{REPLY_COLUMN}'",
                        where=str(input_path))
    conversations, problems = [], []
    for record in records:
        try:
            if generated:
                prompt = prompt_messages({k: v for k, v in record.row.items() if k != REPLY_COLUMN})
                conversations.append([*prompt, {"role": "assistant",
                                                "content": as_text(record.row[REPLY_COLUMN], REPLY_COLUMN)}])
                continue
            sample = to_sample(record, fmt)
            if not sample.messages or sample.messages[-1]["role"] != "assistant":
                raise RowError("no reply to score (the last message must be the assistant's)")
            conversations.append(sample.messages)
        except RowError as err:
            problems.append(f"{record.where}: {err}")
    if problems:
        raise DataError(f"{len(problems)} invalid row(s):\n  " + "\n  ".join(problems[:10]))
    loaded = load_for_inference(run)
    if loaded.run_config is None or loaded.run_config.objective.name != "reward":
        raise ConfigError(f"{run} is not a reward model run (objective.name: reward)", where="score")
    sequences = []
    for record, messages in zip(records, conversations, strict=True):
        try:
            text, ids = tokenize_prompt(messages[:-1], loaded.renderer)
            sequence = tokenize_reply(messages[:-1], messages[-1]["content"], loaded.renderer, text, ids)
        except TemplateError as err:
            raise DataError(str(err), where=record.where) from None
        sequence.input_ids, sequence.labels = sequence.input_ids[:max_length], sequence.labels[:max_length]
        sequences.append(sequence)
    scores = reward_scores(loaded.model, sequences, pad_token_id=loaded.tokenizer.pad_token_id,
                           batch_size=batch_size)
    write_rows(output_path, [{**record.row, "score": score} for record, score in zip(records, scores, strict=True)])
    return len(scores)


@torch.no_grad()
def reward_scores(model, sequences, *, pad_token_id: int, batch_size: int = 8) -> list[float]:
    """The reward of each tokenised sequence, read at its last token."""
    model.eval()
    device = next(model.parameters()).device
    scores: list[float] = []
    for start in range(0, len(sequences), batch_size):
        batch = collate_sequences(sequences[start : start + batch_size], pad_token_id, False)
        scores += sequence_rewards(model, {k: v.to(device) for k, v in batch.items()}).tolist()
    return scores
