"""Does training see exactly what generation will? For each chat sample this compares training's tokens with
the tokens `generate` builds for the same conversation prefix, and audits the loss mask turn by turn:

(a) prompt_match: the training tokens before each trained reply equal, token for token, what `generate` feeds
    the model for the conversation up to that reply (`encode_prompts` in infer/generate.py, the same code).
(b) end_of_turn: a token generation stops on follows each trained reply before the next turn, and is trained,
    so the model learns to stop where `generate` stops.
(c) masks: every token from a reply's first token through its end-of-turn token is trained, and nothing else
    is: no system or user turn, no template text, no reply that data.train_on leaves out.
(d) no_leak: a reply's trained run ends at its end-of-turn token; nothing after it (the turn's trailing
    template text, later turns) is trained.

template.py's character-level prefix check cannot see merges at the boundary: a generation prompt ending in a
space is a character prefix of the conversation, yet the space is a token of its own at inference and part of
the reply's first word in training. Only comparing tokens catches that.
"""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

from tunelab.config import DataConfig
from tunelab.data.formats import Sample
from tunelab.data.template import (
    IGNORE_INDEX,
    ChatRenderer,
    TemplateError,
    TokenizedSample,
    checked_renderer,
    tokenize_chat,
)
from tunelab.data.template_report import CHECKS, CheckResult, Failure, TemplateCheckReport, failure_lines
from tunelab.errors import DataError

TRAIN_CHECK_SAMPLES = 32
"""Conversations `tunelab train` checks before it writes anything (a few milliseconds)."""
_SHOWN = 8


def generation_stop_ids(tokenizer, model_path: Path | str | None = None) -> list[int]:
    """The tokens `generate` stops on for the model at `model_path` (default: where the tokenizer was loaded
    from): `stop_token_ids` itself, given the generation config the model would load."""
    from transformers import AutoConfig, GenerationConfig

    from tunelab.infer.generate import stop_token_ids

    folder = Path(str(model_path or getattr(tokenizer, "name_or_path", "") or ""))
    config = None
    if str(folder) not in ("", ".") and (folder / "generation_config.json").is_file():
        config = GenerationConfig.from_pretrained(folder)
    elif str(folder) not in ("", ".") and (folder / "config.json").is_file():
        config = GenerationConfig.from_model_config(AutoConfig.from_pretrained(folder))
    return stop_token_ids(SimpleNamespace(generation_config=config), tokenizer)


def prompt_token_ids(renderer: ChatRenderer, conversation: list[dict[str, str]]) -> list[int]:
    """The unpadded ids `generate` feeds the model to produce the conversation's last reply."""
    from tunelab.infer.generate import encode_prompts

    encoded = encode_prompts(renderer, [conversation])
    return encoded["input_ids"][0][encoded["attention_mask"][0].bool()].tolist()


def check_conversation(
    sample: Sample,
    renderer: ChatRenderer,
    train_on: str,
    stop_ids: list[int],
    tokenized: TokenizedSample | None = None,
) -> tuple[dict[str, Failure | None], int]:
    """Per check, this conversation's failure (None: passed; absent: not checked) and its trained replies.
    `tokenized` audits given ids and labels instead of training's own `tokenize_chat` of the sample."""
    tokenizer = renderer.tokenizer
    messages = sample.messages
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    chosen = replies[-1:] if train_on == "last_assistant" else replies
    text = renderer.render(messages)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoding["input_ids"]), [begin for begin, _ in encoding["offset_mapping"]]
    labels, template_error = None, None
    try:
        tokenized = tokenized or tokenize_chat(sample, renderer, train_on)  # what training trains on
        ids, labels = tokenized.input_ids, tokenized.labels
    except TemplateError as err:
        template_error = str(err)
    outcome: dict[str, Failure | None] = {}
    starts = {}
    for i in chosen:
        prompt = prompt_token_ids(renderer, messages[: i + 1])
        if ids[: len(prompt)] != prompt:
            at = next((t for t, (a, b) in enumerate(zip(ids, prompt, strict=False)) if a != b), len(ids))
            message = f"message {i} (assistant): training's tokens differ from generate's prompt at token {at}"
            if template_error:
                message += f" ({template_error})"
            tokens = {
                "training": _show(tokenizer, ids, labels, at - 3, at + 5),
                "generate": _show(tokenizer, prompt, None, at - 3, at + 5),
            }
            outcome["prompt_match"] = Failure(sample.where, message, tokens)
            return outcome, len(chosen)  # the rest needs each reply to start where generation starts
        starts[i] = len(prompt)
    outcome["prompt_match"] = None
    if labels is None:
        outcome["masks"] = Failure(sample.where, template_error or "")
        return outcome, len(chosen)
    # A reply's text is looked for from where generation starts, not in the template text before it.
    anchors = _content_anchors(text, messages, {i: offsets[p] for i, p in starts.items() if p < len(offsets)})
    spans: dict[int, tuple[int, int]] = {}
    ends: dict[int, int] = {}
    outcome["end_of_turn"] = None
    for i in chosen:
        p, (_, reply_end) = starts[i], anchors[i]
        if reply_end < 0:
            outcome["masks"] = Failure(
                sample.where,
                f"message {i} (assistant): the reply's text is not in the training text after the generation prompt",
            )
            return outcome, len(chosen)
        next_start = anchors[i + 1][0] if i + 1 < len(messages) and anchors[i + 1][0] >= 0 else len(text)
        inside = [t for t in range(p, len(ids)) if offsets[t] < next_start]
        eot = next((t for t in inside if offsets[t] >= reply_end and ids[t] in stop_ids), None)
        if eot is None:
            after = [t for t in inside if offsets[t] >= reply_end]
            stops = ", ".join(repr(tokenizer.decode([s])) for s in stop_ids) or "none: no EOS token is known"
            failure = Failure(
                sample.where,
                f"message {i} (assistant): no token generate stops on ({stops}) follows the reply before the next turn",
                {"after the reply": _show(tokenizer, ids, labels, after[0] if after else p, len(ids))},
            )
            spans[i] = (p, max([t for t in inside if offsets[t] < reply_end], default=p))
        else:
            spans[i] = (p, eot)
            ends[i] = eot
            failure = None
            if labels[eot] == IGNORE_INDEX:
                failure = Failure(
                    sample.where,
                    f"message {i} (assistant): its end-of-turn token {tokenizer.decode([ids[eot]])!r} is not trained",
                    {"end of the reply": _show(tokenizer, ids, labels, eot - 4, eot + 2)},
                )
        outcome["end_of_turn"] = outcome["end_of_turn"] or failure
    if train_on != "all":
        outcome.update(_mask_outcome(sample.where, tokenizer, ids, offsets, labels, spans, ends, anchors, messages))
    return outcome, len(chosen)


def _mask_outcome(where, tokenizer, ids, offsets, labels, spans, ends, anchors, messages) -> dict[str, Failure | None]:
    """(c) and (d): the trained tokens are exactly each reply through its end-of-turn token."""
    expected = {t for start, end in spans.values() for t in range(start, end + 1)}
    span_starts = {start for start, _ in spans.values()}
    leak = None
    leaked: set[int] = set()
    for i, eot in ends.items():
        run = []
        t = eot + 1
        while t < len(ids) and labels[t] != IGNORE_INDEX and t not in span_starts:
            run.append(t)
            t += 1
        if run and leak is None:
            leak = Failure(
                where,
                f"message {i} (assistant): {len(run)} token(s) after its end-of-turn token are trained",
                {f"from its end of turn, token {eot}": _show(tokenizer, ids, labels, eot, run[-1] + 1)},
            )
        leaked.update(run)
    missing = sorted(t for t in expected - set(ends.values()) if labels[t] == IGNORE_INDEX)  # (b) has the EOT
    extra = sorted(t for t, label in enumerate(labels) if label != IGNORE_INDEX and t not in expected | leaked)
    masks = None
    if missing:
        masks = Failure(
            where,
            f"{len(missing)} reply token(s) not trained",
            {f"from token {missing[0]}": _show(tokenizer, ids, labels, missing[0], missing[0] + 8)},
        )
    elif extra:
        places = sorted({_place(anchors, messages, offsets[t]) for t in extra})
        masks = Failure(
            where,
            f"{len(extra)} token(s) outside the replies are trained: {', '.join(places)}",
            {f"from token {extra[0]}": _show(tokenizer, ids, labels, extra[0], extra[0] + 8)},
        )
    return {"masks": masks, "no_leak": leak}


def _content_anchors(text: str, messages: list[dict[str, str]], floors: dict[int, int]) -> list[tuple[int, int]]:
    """(start, end) character span of each message's content in the rendered text, found in order;
    (-1, -1) where a template changed the content beyond recognition."""
    anchors, at = [], 0
    for message in messages:
        content = message["content"].strip()
        start = text.find(content, max(at, floors.get(len(anchors), 0)))
        anchors.append((start, start + len(content)) if start >= 0 else (-1, -1))
        at = start + len(content) if start >= 0 else at
    return anchors


def _place(anchors, messages, offset: int) -> str:
    """Which message a character offset lies in, for people."""
    for j, (start, end) in enumerate(anchors):
        if 0 <= start <= offset < end:
            return f"message {j} ({messages[j]['role']})"
    return "template text"


def _show(tokenizer, ids: list[int], labels: list[int] | None, start: int, end: int) -> list[str]:
    """Tokens ids[start:end] decoded one by one; trained ones in [[double brackets]]."""
    start, end = max(0, start), min(len(ids), end, max(0, start) + 2 * _SHOWN)
    shown = []
    for t in range(start, end):
        piece = repr(tokenizer.decode([ids[t]]))
        shown.append(f"[[{piece}]]" if labels is not None and labels[t] != IGNORE_INDEX else piece)
    return shown


def check_samples(
    samples: list[Sample], renderer: ChatRenderer, train_on: str, stop_ids: list[int]
) -> tuple[dict[str, CheckResult], int]:
    """Every check over `samples` (chat samples), and the number of trained replies checked."""
    results = {name: CheckResult() for name in CHECKS}
    replies = 0
    for sample in samples:
        outcome, count = check_conversation(sample, renderer, train_on, stop_ids)
        replies += count
        for name, failure in outcome.items():
            result = results[name]
            result.checked += 1
            if failure is not None:
                result.failed += 1
                result.first = result.first or failure
    return results, replies


def sample_conversations(samples: list[Sample], limit: int | None, seed: int) -> list[Sample]:
    """Distinct chat samples: all, or a seeded `limit` of them in data order."""
    unique = list({id(s): s for s in samples if s.messages}.values())
    if limit is None or limit >= len(unique):
        return unique
    keep = set(random.Random(seed).sample(range(len(unique)), limit))
    return [s for i, s in enumerate(unique) if i in keep]


def verify_before_training(samples: list[Sample], renderer: ChatRenderer, train_on: str, seed: int) -> None:
    """Check a seeded sample of the training conversations; raise DataError (before a run writes anything)
    when training would see something other than what `generate` builds or masks the wrong tokens."""
    chosen = sample_conversations(samples, TRAIN_CHECK_SAMPLES, seed)
    if not chosen:
        return
    results, _ = check_samples(chosen, renderer, train_on, generation_stop_ids(renderer.tokenizer))
    failed = {name: r for name, r in results.items() if r.failed}
    if failed:
        lines = [f"the chat template check failed on {len(chosen)} sampled conversation(s):"]
        for name, result in failed.items():
            lines += failure_lines(name, result)
        lines.append(
            "`tunelab data check-template CONFIG` checks every conversation; data.chat_template: tunelab "
            "switches to tunelab's own template"
        )
        raise DataError("\n  ".join(lines))


def check_data(
    config: DataConfig,
    *,
    tokenizer,
    model_path: Path | str | None,
    model_name: str,
    target: str,
    seed: int = 0,
    limit: int | None = None,
) -> TemplateCheckReport:
    """`tunelab data check-template`: every check on every chat sample of the configured data (train and
    eval files), or a seeded `limit` of them. Rows that cannot become samples are counted, not checked."""
    from tunelab.data.preference import data_kind
    from tunelab.data.prepare import load_samples, train_sources

    if data_kind(config) != "sft":
        raise DataError(
            "check-template checks chat data for supervised fine-tuning; preference and feedback "
            "pairs tokenise the prompt with generate's own code by construction",
            where=target,
        )
    renderer = checked_renderer(tokenizer, config.chat_template)
    problems: list[str] = []
    samples: list[Sample] = []
    paths = [(s.path, s.format or config.format) for s in train_sources(config)]
    paths += [(config.eval, config.format)] if config.eval is not None else []
    for path, fmt in paths:
        samples += load_samples(path, fmt, config.system_prompt, problems, skip_unreadable=True)[0]
    chat = [s for s in samples if s.messages]
    chosen = sample_conversations(chat, limit, seed)
    stop_ids = generation_stop_ids(tokenizer, model_path)
    results, replies = check_samples(chosen, renderer, config.train_on, stop_ids)
    template = (
        "none"
        if renderer.template is None
        else (
            "tunelab fallback" if renderer.template != getattr(tokenizer, "chat_template", None) else "tokenizer's own"
        )
    )
    return TemplateCheckReport(
        target=target,
        model=model_name,
        template=template,
        train_on=config.train_on,
        conversations=len(chat),
        checked=len(chosen),
        replies=replies,
        text_samples=len(samples) - len(chat),
        invalid_rows=len(problems),
        stop_tokens=[tokenizer.decode([s]) for s in stop_ids],
        checks=results,
    )
