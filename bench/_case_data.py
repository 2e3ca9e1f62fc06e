"""The benchmark's data: the bundled support tickets as the same rows, in the same order, for both tools,
and the long-sequence variant. Every 10th row is held out for the harness's evaluation."""

from __future__ import annotations

import json
import random
from pathlib import Path

EVAL_EVERY = 10  # every 10th row of the dataset is held out (60 of 600)
LONG_INSTRUCTION = (
    "Below are several customer support tickets, numbered. List the intent of every ticket, in order, "
    "as a JSON array of strings."
)


def ticket_rows() -> list[dict]:
    import tunelab

    path = Path(tunelab.__file__).parent / "datasets" / "support_tickets.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def ticket_chat(row: dict) -> list[dict]:
    user = f"{row['instruction']}\n\n{row['input']}" if row.get("input") else row["instruction"]
    return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]


def long_chat(tickets: list[dict]) -> list[dict]:
    listed = "\n\n".join(f"Ticket {i}: {t['input']}" for i, t in enumerate(tickets, 1))
    intents = [json.loads(t["output"])["intent"] for t in tickets]
    return [{"role": "user", "content": f"{LONG_INSTRUCTION}\n\n{listed}"},
            {"role": "assistant", "content": json.dumps(intents)}]


def long_chats(rows: list[dict], count: int, tokenizer, max_length: int, seed: int) -> list[list[dict]]:
    """`count` conversations whose user message holds 400-900 tokens of tickets, each under max_length."""
    rng = random.Random(seed)

    def length(messages: list[dict]) -> int:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    chats = []
    for _ in range(count):
        target = rng.randint(400, 900)
        tickets = [rng.choice(rows)]
        while True:
            candidate = [*tickets, rng.choice(rows)]
            messages = long_chat(candidate)
            user_tokens = len(tokenizer(messages[0]["content"], add_special_tokens=False)["input_ids"])
            if length(messages) > max_length:
                break
            tickets = candidate
            if user_tokens >= target:
                break
        chats.append(long_chat(tickets))
    return chats


def write_case_data(case, folder: Path, model_path: Path, steps: int, batch_size: int, seed: int) -> dict:
    """The same rows, in the same order, as chat `messages` (tunelab) and conversational prompt/completion
    (TRL, so its completion-only loss applies), plus held-out chat rows for the harness's eval."""
    rows = ticket_rows()
    train_rows = [r for i, r in enumerate(rows) if i % EVAL_EVERY != EVAL_EVERY - 1]
    eval_rows = [r for i, r in enumerate(rows) if i % EVAL_EVERY == EVAL_EVERY - 1]
    if case.data == "short":
        train, held_out = [ticket_chat(r) for r in train_rows], [ticket_chat(r) for r in eval_rows]
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        train = long_chats(train_rows, steps * batch_size, tokenizer, case.max_length, seed)
        held_out = long_chats(eval_rows, 16, tokenizer, case.max_length, seed + 1)
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "train_chat": folder / "train_chat.jsonl",
        "train_prompt_completion": folder / "train_prompt_completion.jsonl",
        "eval_chat": folder / "eval_chat.jsonl",
    }
    files["train_chat"].write_text("".join(json.dumps({"messages": m}) + "\n" for m in train))
    files["train_prompt_completion"].write_text(
        "".join(json.dumps({"prompt": m[:-1], "completion": m[-1:]}) + "\n" for m in train)
    )
    files["eval_chat"].write_text("".join(json.dumps({"messages": m}) + "\n" for m in held_out))
    return {key: str(path) for key, path in files.items()} | {"train_rows": len(train), "eval_rows": len(held_out)}


PREFERENCES = Path(__file__).resolve().parent.parent / "src/tunelab/datasets/support_preferences.jsonl"


def write_preference_data(folder: Path, steps: int, batch_size: int, eval_pairs: int = 48) -> dict:
    """The bundled preference pairs (correct JSON vs the base model's own reply) in TRL's conversational form,
    which tunelab reads as well: the first steps x batch of every ten pairs but the tenth for training, in
    order, and the tenth ones held out."""
    rows = [json.loads(line) for line in PREFERENCES.read_text().splitlines() if line.strip()]
    convert = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]
    train = [r for i, r in enumerate(convert) if i % EVAL_EVERY != EVAL_EVERY - 1][: steps * batch_size]
    held_out = [r for i, r in enumerate(convert) if i % EVAL_EVERY == EVAL_EVERY - 1][:eval_pairs]
    folder.mkdir(parents=True, exist_ok=True)
    files = {"train_pairs": folder / "train_pairs.jsonl", "eval_pairs": folder / "eval_pairs.jsonl"}
    files["train_pairs"].write_text("".join(json.dumps(r) + "\n" for r in train))
    files["eval_pairs"].write_text("".join(json.dumps(r) + "\n" for r in held_out))
    return {key: str(path) for key, path in files.items()} | {"train_rows": len(train), "eval_rows": len(held_out)}


PROMPTS = Path(__file__).resolve().parent.parent / "src/tunelab/datasets/support_prompts.jsonl"


def write_prompt_data(folder: Path, steps: int, batch_size: int, eval_prompts: int = 32) -> dict:
    """The bundled support prompts (each ticket with its correct JSON as `answer`) in TRL's conversational form,
    which tunelab reads as well: the first steps x batch of every ten rows but the tenth for training, in order,
    and the tenth ones held out."""
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    convert = [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in rows]
    train = [r for i, r in enumerate(convert) if i % EVAL_EVERY != EVAL_EVERY - 1][: steps * batch_size]
    held_out = [r for i, r in enumerate(convert) if i % EVAL_EVERY == EVAL_EVERY - 1][:eval_prompts]
    folder.mkdir(parents=True, exist_ok=True)
    files = {"train_prompts": folder / "train_prompts.jsonl", "eval_prompts": folder / "eval_prompts.jsonl"}
    files["train_prompts"].write_text("".join(json.dumps(r) + "\n" for r in train))
    files["eval_prompts"].write_text("".join(json.dumps(r) + "\n" for r in held_out))
    return {key: str(path) for key, path in files.items()} | {"train_rows": len(train), "eval_rows": len(held_out)}
