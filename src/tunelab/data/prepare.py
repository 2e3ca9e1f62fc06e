"""The whole data pipeline: read every row, validate, split, template and tokenise, before training
starts. Every bad row is reported at once, by file and line, in one DataError."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from tunelab.config import DataConfig, DataSource
from tunelab.data.columns import explain, rename_columns
from tunelab.data.formats import PAIR_FORMATS, RowError, Sample, detect_format, to_sample
from tunelab.data.sources import Record, read_records
from tunelab.data.template import ChatRenderer, TemplateError, TokenizedSample, tokenize_chat, tokenize_text
from tunelab.errors import DataError

_MAX_LISTED = 10
T = TypeVar("T")


@dataclass
class PreparedData:
    """Tokenised train and eval sets plus what a user should know about them."""

    train: list[TokenizedSample]
    eval: list[TokenizedSample]
    eval_samples: list[Sample]
    """Held-out samples in canonical form, for generation-based evaluation."""
    formats: dict[str, str] = field(default_factory=dict)
    """Detected format (and why) per data file."""
    truncated: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    source_weights: dict[str, float] = field(default_factory=dict)

    @property
    def stats(self) -> dict[str, object]:
        lengths = sorted(len(s.input_ids) for s in self.train)
        trainable = sum(s.trainable_tokens for s in self.train)
        total = sum(lengths)
        return {
            "train_samples": len(self.train),
            "eval_samples": len(self.eval),
            "train_tokens": total,
            "trainable_tokens": trainable,
            "trainable_fraction": round(trainable / total, 4) if total else 0.0,
            "max_length_seen": lengths[-1] if lengths else 0,
            "median_length": lengths[len(lengths) // 2] if lengths else 0,
            "truncated_samples": len(self.truncated),
            "dropped_samples": len(self.dropped),
            "formats": self.formats,
        }


def train_sources(config: DataConfig) -> list[DataSource]:
    if isinstance(config.train, list):
        return config.train
    return [DataSource(path=config.train)]


def load_samples(
    path: Path,
    fmt: str,
    system_prompt: str | None,
    problems: list[str],
    *,
    skip_unreadable: bool = False,
    columns: dict[str, str] | None = None,
) -> tuple[list[Sample], str, str, int]:
    """(canonical samples, format, why that format, rows in the file). Rows that cannot become samples go to
    `problems` as `file:line: why`; unreadable lines raise, or with `skip_unreadable` go there too. `columns` is
    data.columns (file columns read as tunelab's fields)."""
    already = len(problems)
    records = rename_columns(read_records(path, problems if skip_unreadable else None), columns, path)
    rows = len(records) + len(problems) - already
    if not rows:
        raise DataError("file holds no rows", where=str(path))
    fmt, why = file_format(records, fmt, path)
    if records and fmt in PAIR_FORMATS:
        raise DataError(needs_pair_objective(fmt, why), where=str(path))
    samples = []
    for record in records:
        try:
            sample = to_sample(record, fmt, system_prompt)
        except RowError as err:
            problems.append(f"{record.where}: {explain(str(err), columns)}")
            continue
        sample.source = Path(str(path)).stem
        samples.append(sample)
    return samples, fmt, why, rows


def file_format(records: list[Record], fmt: str, path: Path | str) -> tuple[str, str]:
    """(format, why): as configured, or detected from the columns of the file's first rows."""
    if fmt != "auto":
        return fmt, "set in the config"
    if not records:
        return "unknown", "no readable row"
    try:
        return detect_format([r.row for r in records])
    except RowError as err:
        raise DataError(str(err), where=str(path)) from None


def needs_pair_objective(fmt: str, why: str) -> str:
    """Why SFT cannot train on preference or feedback rows, and what would."""
    if fmt == "preference":
        return (f"rows hold preference pairs ({why}): supervised fine-tuning needs one reply to imitate, so "
                "these need a preference objective (DPO), which tunelab does not have yet; to fine-tune on the "
                "chosen replies alone, set data.format: preference_chosen")
    return (f"rows hold unpaired feedback ({why}): supervised fine-tuning cannot learn from replies labelled "
            "bad, so these need a feedback objective (KTO), which tunelab does not have yet")


def split_samples(samples: list[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """A seeded train/eval split; at least one eval sample when a fraction is asked for. Row kinds of every
    objective (SFT samples, preference pairs, feedback) split the same way."""
    if fraction <= 0 or len(samples) < 2:
        return samples, []
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(samples) * fraction))
    eval_ids = set(order[:n_eval])
    return (
        [s for i, s in enumerate(samples) if i not in eval_ids],
        [s for i, s in enumerate(samples) if i in eval_ids],
    )


def prepare_data(config: DataConfig, tokenizer, seed: int) -> PreparedData:
    """Read, validate, split and tokenise all data named by `config`. Raises DataError listing every bad
    row (missing fields, empty text, wrong roles, over-long samples, samples with nothing to train)."""
    problems: list[str] = []
    renderer = ChatRenderer(tokenizer, config.chat_template)
    try:
        renderer.template  # noqa: B018 - fail early when the template mode cannot work
    except TemplateError as err:
        raise DataError(str(err), where="data.chat_template") from None
    prepared = PreparedData(train=[], eval=[], eval_samples=[])
    train_samples: list[Sample] = []
    eval_samples: list[Sample] = []
    for source in train_sources(config):
        samples, fmt, why, _ = load_samples(source.path, source.format or config.format, config.system_prompt, problems,
                                            columns=config.columns)
        prepared.formats[str(source.path)] = f"{fmt} ({why})"
        prepared.source_weights[Path(str(source.path)).stem] = source.weight
        if config.eval is None:
            train_part, eval_part = split_samples(samples, config.eval_split, seed)
        else:
            train_part, eval_part = samples, []
        train_samples += weighted(train_part, source.weight, seed)
        eval_samples += eval_part
    if config.eval is not None:
        samples, fmt, why, _ = load_samples(config.eval, config.format, config.system_prompt, problems,
                                            columns=config.columns)
        prepared.formats[str(config.eval)] = f"{fmt} ({why})"
        eval_samples += samples
    prepared.train = _tokenize_all(train_samples, renderer, config, problems, prepared)
    prepared.eval = _tokenize_all(eval_samples, renderer, config, problems, prepared)
    prepared.eval_samples = [s for s in eval_samples if s.messages]
    raise_problems(problems)
    if not prepared.train:
        raise DataError("no training samples left after validation", where="data.train")
    return prepared


def prepare_eval_file(path: Path, config: DataConfig, tokenizer) -> tuple[list[TokenizedSample], list[Sample]]:
    """A whole file as an evaluation set: tokenised samples for loss, canonical samples for generation."""
    problems: list[str] = []
    renderer = ChatRenderer(tokenizer, config.chat_template)
    samples, _, _, _ = load_samples(path, config.format, config.system_prompt, problems, columns=config.columns)
    tokenized = _tokenize_all(samples, renderer, config, problems, PreparedData([], [], []))
    raise_problems(problems)
    return tokenized, [s for s in samples if s.messages]


def raise_problems(problems: list[str]) -> None:
    if problems:
        shown = "\n  ".join(problems[:_MAX_LISTED])
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise DataError(f"{len(problems)} invalid row(s):\n  {shown}{more}")


def weighted(samples: list[T], weight: float, seed: int) -> list[T]:
    """A source's rows repeated (weight > 1) or subsampled (weight < 1) for multi-task mixing."""
    if weight == 1 or not samples:
        return samples
    whole, part = divmod(weight, 1)
    chosen = samples * int(whole)
    extra = round(len(samples) * part)
    chosen += random.Random(seed + 1).sample(samples, extra)
    return chosen


def _tokenize_all(
    samples: list[Sample], renderer: ChatRenderer, config: DataConfig, problems: list[str], prepared: PreparedData
) -> list[TokenizedSample]:
    out: list[TokenizedSample] = []
    for sample in samples:
        if sample.text is not None:
            out += tokenize_text(sample, renderer.tokenizer, config.max_length)
            continue
        try:
            tokenized = tokenize_chat(sample, renderer, config.train_on)
        except TemplateError as err:
            problems.append(f"{sample.where}: {err}")
            continue
        length = len(tokenized.input_ids)
        if length > config.max_length:
            what = f"has {length} tokens, more than data.max_length={config.max_length}"
            if config.overlong == "error":
                problems.append(f"{sample.where}: {what} (data.overlong=error)")
                continue
            if config.overlong == "drop":
                prepared.dropped.append(f"{sample.where}: {what}; dropped")
                continue
            tokenized.input_ids = tokenized.input_ids[: config.max_length]
            tokenized.labels = tokenized.labels[: config.max_length]
            prepared.truncated.append(f"{sample.where}: {what}; cut to {config.max_length}")
        if tokenized.trainable_tokens == 0:
            problems.append(f"{sample.where}: no trainable token left (the reply lies beyond data.max_length)")
            continue
        out.append(tokenized)
    return out
