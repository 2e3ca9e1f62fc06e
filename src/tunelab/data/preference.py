"""Preference and feedback data ready for the preference objectives (DPO-style pairs, KTO-style feedback).

Each reply becomes one TokenizedSample: the prompt untrained (labels -100), the reply and its end-of-turn
token trained. The prompt is rendered with `ChatRenderer.prompt` and tokenised on its own, exactly as
`generate` feeds a model, and the reply is tokenised after it; so the chosen and rejected sequences of a pair
start with the same prompt tokens, token for token, and the log-probabilities an objective compares are
those of the replies the model would generate. Only the final reply is trained, whatever data.train_on says.

Over-long sequences follow data.overlong: `truncate` cuts the reply's end and keeps the prompt whole,
`drop` leaves the row out, `error` reports it. Identical pairs (chosen == rejected) are left out and listed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tunelab.config import DataConfig
from tunelab.data.columns import rename_columns
from tunelab.data.formats import OBJECTIVE_FORMATS, PAIR_FORMATS, Sample
from tunelab.data.pairs import FeedbackSample, PairRow, PreferencePair, to_pair
from tunelab.data.prepare import (
    convert_rows,
    file_format,
    raise_problems,
    read_file_rows,
    split_samples,
    train_sources,
    weighted,
)
from tunelab.data.sources import read_records
from tunelab.data.template import (
    IGNORE_INDEX,
    ChatRenderer,
    TemplateError,
    TokenizedSample,
    checked_renderer,
    trained_spans,
)
from tunelab.errors import DataError

if TYPE_CHECKING:
    import torch

Messages = list[dict[str, str]]


@dataclass
class TokenizedPair:
    """A preference pair as token ids: both sequences begin with the same `prompt_length` prompt tokens."""

    chosen: TokenizedSample
    rejected: TokenizedSample
    prompt_length: int
    where: str
    source: str = ""
    reference_logps: tuple[float, float] | None = None
    """The reference model's summed log-probabilities of (chosen, rejected), when precomputed before training."""
    margin: float | None = None
    """The row's `margin` column: how far a reward model should score chosen above rejected."""


@dataclass
class TokenizedFeedback:
    """A feedback sample as token ids, with its label (True: a good reply)."""

    sample: TokenizedSample
    prompt_length: int
    label: bool
    where: str
    source: str = ""
    mismatched: TokenizedSample | None = None
    """This row's prompt followed by another row's reply: what KTO estimates its KL reference point from."""
    reference_logps: tuple[float, float] | None = None
    """The reference model's summed log-probabilities of (sample, mismatched), when precomputed."""


TokenizedRow = TokenizedPair | TokenizedFeedback


class RowList(list):
    """Tokenised rows in training order, with the token length of each row's longest sequence (`lengths`):
    what the batch planner reads."""

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((max(len(s.input_ids) for s in sequences_of(r)) for r in self), np.int64, count=len(self))


@dataclass
class PreparedPairs:
    """Tokenised train and eval rows for a preference objective, and what a user should know about them."""

    kind: str
    """`preference` (train/eval hold TokenizedPair) or `feedback` (TokenizedFeedback)."""
    train: list[TokenizedRow]
    eval: list[TokenizedRow]
    eval_rows: list[PairRow] = field(default_factory=list)
    """Held-out rows in canonical form, for generation-based evaluation (their prompts, chosen replies)."""
    formats: dict[str, str] = field(default_factory=dict)
    truncated: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    identical: list[str] = field(default_factory=list)
    """Pairs whose chosen and rejected replies are the same, left out (`file:line: why`)."""
    source_weights: dict[str, float] = field(default_factory=dict)

    @property
    def eval_samples(self) -> list[Sample]:
        """Held-out prompts with the reply to compare generations against (chosen replies; good feedback)."""
        samples = []
        for row in self.eval_rows:
            reply = row.chosen if isinstance(row, PreferencePair) else row.completion if row.label else None
            if reply is not None:
                samples.append(Sample(row.where, [*row.prompt, {"role": "assistant", "content": reply}],
                                      source=row.source))
        return samples

    @property
    def fingerprint(self) -> str:
        """Identifies the training rows in order; a resumed run must see the same ones to continue exactly."""
        digest = hashlib.sha256()
        for row in self.train:
            for sequence in sequences_of(row):
                digest.update(np.asarray(sequence.input_ids, np.int64).tobytes())
                digest.update(np.asarray(sequence.labels, np.int64).tobytes())
        return digest.hexdigest()

    @property
    def stats(self) -> dict[str, object]:
        sequences = [s for row in self.train for s in sequences_of(row)]
        lengths = sorted(len(s.input_ids) for s in sequences)
        trainable = sum(s.trainable_tokens for s in sequences)
        stats: dict[str, object] = {
            "kind": self.kind,
            "train_rows": len(self.train),
            "eval_rows": len(self.eval),
            "train_samples": len(self.train),  # a row is a sample here (the model card and report read these)
            "eval_samples": len(self.eval),
            "train_tokens": sum(lengths),
            "trainable_tokens": trainable,
            "trainable_fraction": trainable / max(1, sum(lengths)),
            "max_length_seen": lengths[-1] if lengths else 0,
            "median_length": lengths[len(lengths) // 2] if lengths else 0,
            "truncated_rows": len(self.truncated),
            "dropped_rows": len(self.dropped),
            "identical_pairs": len(self.identical),
            "formats": self.formats,
        }
        if self.kind == "feedback":
            stats["good"] = sum(1 for row in self.train if row.label)
            stats["bad"] = len(self.train) - stats["good"]
        return stats


def sequences_of(row: TokenizedRow) -> list[TokenizedSample]:
    """The token sequences of a row: chosen and rejected of a pair; the reply of a feedback sample, and its
    mismatched sequence once it has one."""
    if isinstance(row, TokenizedPair):
        return [row.chosen, row.rejected]
    return [row.sample] if row.mismatched is None else [row.sample, row.mismatched]


def add_mismatched(rows: list[TokenizedFeedback], max_length: int) -> None:
    """Give each feedback row its prompt followed by the reply of the next distinct row (in order, wrapping
    round): a reply that does not answer the prompt, fixed per row so a precomputed reference stays valid."""
    distinct = list({id(row): row for row in rows}.values())
    for index, row in enumerate(distinct):
        partner = distinct[(index + 1) % len(distinct)]
        prompt = row.sample.input_ids[: row.prompt_length]
        reply = partner.sample.input_ids[partner.prompt_length :]
        reply_labels = partner.sample.labels[partner.prompt_length :]
        ids = [*prompt, *reply][:max_length]
        labels = ([IGNORE_INDEX] * len(prompt) + reply_labels)[:max_length]
        row.mismatched = TokenizedSample(ids, labels, row.where, row.source)


def tokenize_prompt(prompt: Messages, renderer: ChatRenderer) -> tuple[str, list[int]]:
    """The prompt's text and token ids, as `generate` builds them."""
    text = renderer.prompt(prompt)
    return text, list(renderer.tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_reply(
    prompt: Messages, reply: str, renderer: ChatRenderer, prompt_text: str, prompt_ids: list[int]
) -> TokenizedSample:
    """Prompt ids (untrained) followed by the reply's ids, trained through its end-of-turn token.
    Raises TemplateError when the template does not render the prompt as a prefix of the conversation."""
    full, spans = trained_spans(renderer, [*prompt, {"role": "assistant", "content": reply}], "last_assistant")
    start, end = spans[0]
    if start != len(prompt_text) or not full.startswith(prompt_text):
        raise TemplateError(
            "the chat template renders the prompt differently when a reply follows; set data.chat_template: tunelab"
        )
    encoding = renderer.tokenizer(full[start:], add_special_tokens=False, return_offsets_mapping=True)
    reply_ids = list(encoding["input_ids"])
    reply_labels = [
        token if begin < end - start else IGNORE_INDEX
        for token, (begin, _) in zip(reply_ids, encoding["offset_mapping"], strict=True)
    ]
    return TokenizedSample([*prompt_ids, *reply_ids], [IGNORE_INDEX] * len(prompt_ids) + reply_labels, "")


def tokenize_pair(pair: PreferencePair, renderer: ChatRenderer) -> TokenizedPair:
    """Chosen and rejected sequences sharing one tokenisation of the prompt. Raises TemplateError."""
    text, ids = tokenize_prompt(pair.prompt, renderer)
    chosen = tokenize_reply(pair.prompt, pair.chosen, renderer, text, ids)
    rejected = tokenize_reply(pair.prompt, pair.rejected, renderer, text, ids)
    for sequence in (chosen, rejected):
        sequence.where, sequence.source = pair.where, pair.source
    return TokenizedPair(chosen, rejected, len(ids), pair.where, pair.source, margin=pair.margin)


def tokenize_feedback(sample: FeedbackSample, renderer: ChatRenderer) -> TokenizedFeedback:
    """The labelled reply after its prompt. Raises TemplateError."""
    text, ids = tokenize_prompt(sample.prompt, renderer)
    sequence = tokenize_reply(sample.prompt, sample.completion, renderer, text, ids)
    sequence.where, sequence.source = sample.where, sample.source
    return TokenizedFeedback(sequence, len(ids), sample.label, sample.where, sample.source)


def tokenize_row(row: PairRow, renderer: ChatRenderer) -> TokenizedRow:
    return tokenize_pair(row, renderer) if isinstance(row, PreferencePair) else tokenize_feedback(row, renderer)


def collate_pairs(pairs: list[TokenizedPair], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One padded batch of 2B rows for a pair objective: rows 0..B-1 the chosen, rows B..2B-1 the rejected
    sequences, with `targets` shifted as for SFT (so one forward pass scores both replies of every pair)."""
    from tunelab.data.batching import collate  # torch: only when batches are built

    rows = [[p.chosen] for p in pairs] + [[p.rejected] for p in pairs]
    return collate(rows, pad_token_id, packed=False)


def load_pairs(
    path: Path,
    fmt: str,
    system_prompt: str | None,
    problems: list[str],
    *,
    skip_unreadable: bool = False,
    columns: dict[str, str] | None = None,
) -> tuple[list[PairRow], str, str, int]:
    """(canonical rows, format, why that format, rows in the file), like `load_samples` for SFT data. Rows
    that cannot become pairs or feedback go to `problems` as `file:line: why`."""
    records, fmt, why, rows = read_file_rows(path, fmt, problems, skip_unreadable=skip_unreadable, columns=columns)
    if records and fmt not in PAIR_FORMATS:
        raise DataError(
            f"rows are '{fmt}' data ({why}), not preference pairs (prompt/chosen/rejected) or "
            "feedback (prompt/completion/label)",
            where=str(path),
        )
    return convert_rows(records, lambda r: to_pair(r, fmt, system_prompt), path, problems, columns), fmt, why, rows


def data_kind(config: DataConfig) -> str:
    """`sft`, `preference` or `feedback`: which kind of objective the configured data is for (the formats as
    configured, else detected from each file's columns). Raises DataError when sources mix kinds."""
    kinds: dict[str, str] = {}
    paths = [(s.path, s.format or config.format) for s in train_sources(config)]
    if config.eval is not None:
        paths.append((config.eval, config.format))
    for path, fmt in paths:
        if fmt == "auto":
            fmt, _ = file_format(rename_columns(read_records(path, []), config.columns, path), fmt, path)
        kinds[str(path)] = fmt if fmt in OBJECTIVE_FORMATS else "sft"
    if len(set(kinds.values())) > 1:
        listed = ", ".join(f"{p} ({k})" for p, k in kinds.items())
        raise DataError(f"the data files are for different objectives: {listed}", where="data.train")
    return next(iter(kinds.values()))


def prepare_preference_data(config: DataConfig, tokenizer, seed: int) -> PreparedPairs:
    """Read, validate, split and tokenise preference or feedback data, as `prepare_data` does for SFT: the same
    sources, weights, seeded split and max_length handling. Raises DataError listing every bad row."""
    kind = data_kind(config)
    if kind not in PAIR_FORMATS:
        raise DataError(
            "the data holds no preference pairs or feedback rows (columns prompt/chosen/rejected or "
            "prompt/completion/label) for a preference objective",
            where="data.train",
        )
    renderer = checked_renderer(tokenizer, config.chat_template)
    problems: list[str] = []
    prepared = PreparedPairs(kind=kind, train=[], eval=[])
    train_rows: list[PairRow] = []
    eval_rows: list[PairRow] = []
    for source in train_sources(config):
        rows, fmt, why, _ = load_pairs(source.path, source.format or config.format, config.system_prompt, problems,
                                       columns=config.columns)
        prepared.formats[str(source.path)] = f"{fmt} ({why})"
        prepared.source_weights[Path(str(source.path)).stem] = source.weight
        train_part, eval_part = (rows, []) if config.eval is not None else split_samples(rows, config.eval_split, seed)
        train_rows += weighted(train_part, source.weight, seed)
        eval_rows += eval_part
    if config.eval is not None:
        rows, fmt, why, _ = load_pairs(config.eval, config.format, config.system_prompt, problems,
                                       columns=config.columns)
        prepared.formats[str(config.eval)] = f"{fmt} ({why})"
        eval_rows += rows
    prepared.train = RowList(_tokenize_all(train_rows, renderer, config, problems, prepared))
    prepared.eval = _tokenize_all(eval_rows, renderer, config, problems, prepared)
    if kind == "feedback":
        for rows in (prepared.train, prepared.eval):
            if rows:
                add_mismatched(rows, config.max_length)
    kept = {row.where for row in prepared.eval}
    prepared.eval_rows = [row for row in eval_rows if row.where in kept]
    raise_problems(problems)
    if not prepared.train:
        raise DataError("no training rows left after validation", where="data.train")
    return prepared


def fit_to_length(row: TokenizedRow, config: DataConfig) -> tuple[str, str | None]:
    """What data.overlong does to `row`: (`keep` | `truncate` | `drop` | `error`, why). Truncation cuts the
    replies' ends in place and keeps the prompt; a prompt with no room left for its reply is an error."""
    limit = config.max_length
    longest = max(len(s.input_ids) for s in sequences_of(row))
    if longest <= limit:
        return "keep", None
    what = f"has {longest} tokens, more than data.max_length={limit}"
    if config.overlong in ("error", "drop"):
        return config.overlong, f"{what} (data.overlong={config.overlong})"
    if row.prompt_length >= limit:
        return "error", (
            f"the prompt alone has {row.prompt_length} tokens: no room for the reply within data.max_length={limit}"
        )
    for sequence in sequences_of(row):
        sequence.input_ids = sequence.input_ids[:limit]
        sequence.labels = sequence.labels[:limit]
    return "truncate", f"{what}; reply cut to {limit - row.prompt_length} tokens"


def _tokenize_all(
    rows: list[PairRow], renderer: ChatRenderer, config: DataConfig, problems: list[str], prepared: PreparedPairs
) -> list[TokenizedRow]:
    done: dict[int, TokenizedRow | None] = {}  # weighted sources repeat rows: tokenise and report each once
    out: list[TokenizedRow] = []
    for row in rows:
        if id(row) not in done:
            done[id(row)] = _tokenize_one(row, renderer, config, problems, prepared)
        if done[id(row)] is not None:
            out.append(done[id(row)])
    return out


def _tokenize_one(
    row: PairRow, renderer: ChatRenderer, config: DataConfig, problems: list[str], prepared: PreparedPairs
) -> TokenizedRow | None:
    """The tokenised row, or None with the reason filed under problems, identical or dropped."""
    if isinstance(row, PreferencePair) and row.identical:
        prepared.identical.append(f"{row.where}: chosen and rejected are identical; left out")
        return None
    try:
        tokenized = tokenize_row(row, renderer)
    except TemplateError as err:
        problems.append(f"{row.where}: {err}")
        return None
    action, why = fit_to_length(tokenized, config)
    if action == "error":
        problems.append(f"{row.where}: {why}")
        return None
    if action == "drop":
        prepared.dropped.append(f"{row.where}: {why}; dropped")
        return None
    if action == "truncate":
        prepared.truncated.append(f"{row.where}: {why}")
    return tokenized
