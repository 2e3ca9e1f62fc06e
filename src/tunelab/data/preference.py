"""Preference and feedback data ready for the preference objectives (DPO-style pairs, KTO-style feedback).

Each reply becomes one TokenizedSample: the prompt untrained (labels -100), the reply and its end-of-turn
token trained. The prompt is rendered with `ChatRenderer.prompt` and tokenised on its own, exactly as
`generate` feeds a model, and the reply is tokenised after it; so the chosen and rejected sequences of a pair
start with the same prompt tokens, token for token, and the log-probabilities an objective compares are
those of the replies the model would generate. Only the final reply is trained, whatever data.train_on says.

Over-long sequences follow data.overlong: `truncate` cuts the reply's end and keeps the prompt whole,
`drop` leaves the row out, `error` reports it. Identical pairs (chosen == rejected, as text or as the tokens
left after truncation) are left out and listed.

Files go through the streamed, cached pipeline SFT data uses (data/row_cache.py): tokenised once into a
memory-mapped table, split and weighted by row index, each row built as a Python object only when a batch asks.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tunelab.config import DataConfig
from tunelab.data.columns import rename_columns
from tunelab.data.formats import OBJECTIVE_FORMATS, PAIR_FORMATS, Sample
from tunelab.data.layouts import layout_columns
from tunelab.data.pairs import FeedbackSample, PairRow, PreferencePair, to_pair
from tunelab.data.prepare import (
    convert_rows,
    file_format,
    nothing_left,
    raise_problems,
    read_file_rows,
    split_tables,
    tokenized_cache_status,
    train_sources,
)
from tunelab.data.row_cache import RowKind, RowTokens, tokenized_rows
from tunelab.data.row_table import RowTable, RowView
from tunelab.data.sources import iter_records
from tunelab.data.template import (
    IGNORE_INDEX,
    ChatRenderer,
    TemplateError,
    TokenizedSample,
    checked_renderer,
    trained_spans,
)
from tunelab.data.tokenize import MAX_LISTED
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


@dataclass
class PreparedPairs:
    """Tokenised train and eval rows for a preference objective, and what a user should know about them."""

    kind: str
    """`preference` (train/eval hold TokenizedPair) or `feedback` (TokenizedFeedback)."""
    train: RowView
    """In training order (mixing weights applied), built from memory-mapped tables on access."""
    eval: RowView
    eval_rows: RowView
    """Held-out rows in canonical form, for generation-based evaluation (their prompts, chosen replies)."""
    formats: dict[str, str] = field(default_factory=dict)
    truncated: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    identical: list[str] = field(default_factory=list)
    """Pairs whose chosen and rejected replies are the same, left out (`file:line: why`)."""
    source_weights: dict[str, float] = field(default_factory=dict)
    cache: dict[str, str] = field(default_factory=dict)
    """Per data file: `hit`, `miss` or `off` (see data/cache.py)."""
    counts: dict[str, int] = field(default_factory=dict)
    """How many rows were truncated, dropped or left out as identical (the lists above quote the first)."""

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
        return self.train.digest()

    @property
    def stats(self) -> dict[str, object]:
        lengths = np.sort(self.train.column("longest"))
        tokens = int(self.train.column("tokens").sum())
        trainable = int(self.train.column("trained").sum())
        stats: dict[str, object] = {
            "kind": self.kind,
            "train_rows": len(self.train),
            "eval_rows": len(self.eval),
            "train_samples": len(self.train),  # a row is a sample here (the model card and report read these)
            "eval_samples": len(self.eval),
            "train_tokens": tokens,
            "trainable_tokens": trainable,
            "trainable_fraction": trainable / max(1, tokens),
            "max_length_seen": int(lengths[-1]) if len(lengths) else 0,
            "median_length": int(lengths[len(lengths) // 2]) if len(lengths) else 0,
            "truncated_rows": self.counts.get("truncated", 0),
            "dropped_rows": self.counts.get("dropped", 0),
            "identical_pairs": self.counts.get("identical", 0),
            "formats": self.formats,
            "tokenized_cache": tokenized_cache_status(self.cache),
        }
        if self.kind == "feedback":
            stats["good"] = int(sum(row.label for row in self.train))
            stats["bad"] = len(self.train) - stats["good"]
        return stats


def sequences_of(row: TokenizedRow) -> list[TokenizedSample]:
    """The token sequences of a row: chosen and rejected of a pair; the reply of a feedback sample, and its
    mismatched sequence once it has one."""
    if isinstance(row, TokenizedPair):
        return [row.chosen, row.rejected]
    return [row.sample] if row.mismatched is None else [row.sample, row.mismatched]


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
    records, fmt, why, rows, columns = read_file_rows(path, fmt, problems, skip_unreadable=skip_unreadable,
                                                     columns=columns)
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
        if fmt == "auto":  # from the first rows, as training detects it
            unreadable: list[str] = []
            head = list(itertools.islice(iter_records(path, unreadable), 20))
            if not head and not unreadable:
                raise DataError("file holds no rows", where=str(path))
            if not head:  # no row to tell its kind by; whoever reads it lists its unreadable lines
                continue
            columns, _ = layout_columns([r.row for r in head], config.columns, fmt, str(path))
            fmt, _ = file_format(rename_columns(head, columns, path), fmt, path)
        kinds[str(path)] = fmt if fmt in OBJECTIVE_FORMATS else "sft"
    if len(set(kinds.values())) > 1:
        listed = ", ".join(f"{p} ({k})" for p, k in kinds.items())
        training_kinds = {kinds.get(str(path)) for path, _ in paths[:len(train_sources(config))]} - {None}
        where = "data.eval" if config.eval is not None and len(training_kinds) == 1 else "data.train"
        raise DataError(f"the data files are for different objectives: {listed}", where=where)
    return next(iter(kinds.values()), "sft")


def prepare_preference_data(config: DataConfig, tokenizer, seed: int) -> PreparedPairs:
    """Read, validate, split and tokenise preference or feedback data, as `prepare_data` does for SFT: the same
    sources, weights, seeded split, max_length handling and cached, memory-mapped tables. Raises DataError
    listing every bad row."""
    kind = data_kind(config)
    if kind not in PAIR_FORMATS:
        raise DataError(
            "the data holds no preference pairs or feedback rows (columns prompt/chosen/rejected or "
            "prompt/completion/label) for a preference objective",
            where="data.train",
        )
    renderer = checked_renderer(tokenizer, config.chat_template)
    row_kind = RowKind(
        "pairs", PAIR_FORMATS,
        lambda fmt, why: f"rows are '{fmt}' data ({why}), not preference pairs (prompt/chosen/rejected) or "
                         "feedback (prompt/completion/label)",
        convert=lambda record, fmt: to_pair(record, fmt, config.system_prompt),
        tokenize=lambda row: _row_tokens(row, renderer, config))
    problems: list[str] = []
    split = split_tables(config, seed, lambda path, fmt: tokenized_rows(path, fmt, row_kind, config, renderer,
                                                                        problems, use_cache=config.cache))
    raise_problems(problems)
    prepared = PreparedPairs(kind=kind, train=RowView(split.tables, split.train, _decode_tokenized),
                             eval=RowView(split.tables, split.eval, _decode_tokenized),
                             eval_rows=RowView(split.tables, split.eval, _decode_canonical),
                             formats=split.formats, source_weights=split.source_weights, cache=split.cache)
    for note in ("truncated", "dropped", "identical"):
        listed = [text for table in split.tables for text in table.notes(note)]
        setattr(prepared, note, listed[:MAX_LISTED])
        prepared.counts[note] = sum(table.meta[note] for table in split.tables)
    if kind == "feedback":
        for view in (prepared.train, prepared.eval):
            if len(view):
                view.pair_with_next_distinct(config.max_length)
    if not prepared.train:
        raise nothing_left("rows", {"left out as identical": (prepared.counts["identical"], prepared.identical),
                                    "dropped as over-long": (prepared.counts["dropped"], prepared.dropped)})
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


def _row_tokens(row: PairRow, renderer: ChatRenderer, config: DataConfig) -> RowTokens:
    """What one pair or feedback row becomes: its canonical JSON and token sequences, a problem, or a note."""
    if isinstance(row, PreferencePair) and row.identical:
        return RowTokens(notes={"identical": "chosen and rejected are identical; left out"})
    try:
        tokenized = tokenize_row(row, renderer)
    except TemplateError as err:
        return RowTokens(problem=str(err))
    action, why = fit_to_length(tokenized, config)
    if action == "error":
        return RowTokens(problem=why)
    if action == "drop":
        return RowTokens(notes={"dropped": f"{why}; dropped"})
    if isinstance(tokenized, TokenizedPair) and _same_tokens(tokenized.chosen, tokenized.rejected):
        return RowTokens(notes={"identical": f"chosen and rejected are identical within data.max_length="
                                             f"{config.max_length} (they differ only beyond it); left out"})
    if isinstance(row, PreferencePair):
        canonical = {"prompt": row.prompt, "chosen": row.chosen, "rejected": row.rejected, "margin": row.margin}
    else:
        canonical = {"prompt": row.prompt, "completion": row.completion, "label": row.label}
    return RowTokens(canonical, tokenized.prompt_length, sequences_of(tokenized),
                     notes={"truncated": why} if action == "truncate" else {})


def _same_tokens(chosen: TokenizedSample, rejected: TokenizedSample) -> bool:
    """The two sequences are token for token the same (after truncation): the pair's replies cannot be told
    apart, so a preference objective would learn nothing from it."""
    return chosen.input_ids == rejected.input_ids and chosen.labels == rejected.labels


def _decode_tokenized(table: RowTable, index: int) -> TokenizedRow:
    row = table.row(index)
    sequences = table.sequences(index)
    prompt_length = int(table.array("prompt_length")[index])
    where = table.where(index)
    if "chosen" in row:
        return TokenizedPair(sequences[0], sequences[1], prompt_length, where, table.source, margin=row["margin"])
    return TokenizedFeedback(sequences[0], prompt_length, bool(row["label"]), where, table.source)


def _decode_canonical(table: RowTable, index: int) -> PairRow:
    row = table.row(index)
    where = table.where(index)
    if "chosen" in row:
        return PreferencePair(where, row["prompt"], row["chosen"], row["rejected"], table.source, row["margin"])
    return FeedbackSample(where, row["prompt"], row["completion"], bool(row["label"]), table.source)
