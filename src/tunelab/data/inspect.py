"""`tunelab data inspect`: what training would see in a data file, without loading a model.

The rows go through the training pipeline's own steps (read, detect the format, `to_sample`, template and
mask with `tokenize_chat` / `tokenize_text`), so formats, problems, token counts and masks are exactly what
`tunelab train` would get. Unlike training, a bad row does not stop the inspection: it is reported with its
file and line, and the statistics are computed on the rows that are valid. Preference and feedback data
are inspected by inspect_pairs.py; both reports are rendered for people by inspect_render.py.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from tunelab.config import DataConfig, TrainConfig, load_config
from tunelab.data.formats import Sample
from tunelab.data.inspect_render import LISTED, render_text, token_segments, write_length_histogram
from tunelab.data.preference import data_kind
from tunelab.data.prepare import load_samples, split_samples, train_sources
from tunelab.data.template import (
    IGNORE_INDEX,
    ChatRenderer,
    TemplateError,
    checked_renderer,
    tokenize_chat,
    tokenize_text,
)

if TYPE_CHECKING:
    from tunelab.data.inspect_pairs import PairInspectReport
    from tunelab.data.inspect_prompts import PromptInspectReport

__all__ = ["InspectReport", "inspect_data", "is_run_config", "length_stats", "render_text", "write_length_histogram"]


@dataclass(frozen=True)
class LengthStats:
    """Token counts per sample. p95 is the nearest-rank 95th percentile (a length some sample has)."""

    min: int = 0
    median: float = 0.0
    p95: int = 0
    max: int = 0
    total: int = 0


@dataclass
class FileSummary:
    """One inspected file: its role in the run, detected format and row counts."""

    path: str
    role: str
    """`train` or `eval`."""
    format: str
    format_reason: str
    rows: int
    invalid_rows: int


@dataclass
class ShownSample:
    """A sample as training sees it: (text, trained) pieces up to data.max_length."""

    where: str
    segments: list[tuple[str, bool]]
    tokens: int
    cut_tokens: int
    """Tokens beyond data.max_length (truncated or dropped by training, not shown)."""


class RowCounts:
    """Counts every inspect report gives, from its `files`, `problems` and `duplicates`."""

    target: str
    kind: str
    files: list[FileSummary]
    problems: list[str]
    duplicates: list[list[str]]

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    @property
    def invalid_rows(self) -> int:
        return len(self.problems)

    @property
    def duplicate_rows(self) -> int:
        """Rows that repeat an earlier row."""
        return sum(len(group) - 1 for group in self.duplicates)

    def files_json(self, limit: int) -> dict:
        """The keys every report's JSON starts with: what was read, and what could not be."""
        return {"target": self.target, "kind": self.kind, "files": [asdict(f) for f in self.files],
                "rows": self.rows, "invalid_rows": self.invalid_rows, "problems": self.problems[:limit]}


@dataclass
class InspectReport(RowCounts):
    kind: ClassVar[str] = "sft"
    target: str
    files: list[FileSummary]
    problems: list[str]
    """Every invalid row, as `file:line: why` in the training pipeline's words."""
    prompt_tokens: LengthStats
    """Untrained tokens per valid training sample (as written, before data.max_length)."""
    completion_tokens: LengthStats
    """Trained tokens per valid training sample."""
    total_tokens: LengthStats
    max_length: int
    overlong: str
    longer_than_max_length: list[str]
    """Chat samples that data.max_length truncates (or drops / rejects, per data.overlong)."""
    no_trainable_token_left: list[str]
    """Of those, the ones whose first max_length tokens hold no trained token."""
    chunked_documents: int
    """Raw-text documents split into several max_length chunks (nothing is lost)."""
    duplicates: list[list[str]]
    """Groups of training rows with identical canonical messages or text."""
    eval_source: str | None
    """Where eval samples come from (data.eval file or the seeded data.eval_split); None when there are none."""
    eval_samples: int
    eval_overlap: list[tuple[str, str]]
    """(eval row, training row) pairs with the identical prompt."""
    samples: list[ShownSample]
    lengths: list[int] = field(default_factory=list)
    """Total tokens of each valid training sample, for the histogram."""
    completion_lengths: list[int] = field(default_factory=list)

    @property
    def trainable_fraction(self) -> float:
        return self.completion_tokens.total / self.total_tokens.total if self.total_tokens.total else 0.0

    def to_json(self, limit: int = LISTED) -> dict:
        """The report as JSON-serialisable data with stable keys; lists are cut to `limit` entries."""
        return {
            "target": self.target,
            "files": [asdict(f) for f in self.files],
            "rows": self.rows,
            "invalid_rows": self.invalid_rows,
            "problems": self.problems[:limit],
            "tokens": {
                "samples": len(self.lengths),
                "prompt": asdict(self.prompt_tokens),
                "completion": asdict(self.completion_tokens),
                "total": asdict(self.total_tokens),
            },
            "trainable_fraction": round(self.trainable_fraction, 4),
            "max_length": {
                "limit": self.max_length,
                "overlong": self.overlong,
                "longer_samples": len(self.longer_than_max_length),
                "no_trainable_token_left": len(self.no_trainable_token_left),
                "longer_examples": self.longer_than_max_length[:limit],
                "no_trainable_examples": self.no_trainable_token_left[:limit],
                "chunked_documents": self.chunked_documents,
            },
            "duplicates": {"rows": self.duplicate_rows, "groups": self.duplicates[:limit]},
            "eval_overlap": {
                "eval": self.eval_source,
                "eval_samples": self.eval_samples,
                "overlapping": len(self.eval_overlap),
                "examples": [{"eval": e, "train": t} for e, t in self.eval_overlap[:limit]],
            },
            "samples": [
                {
                    "where": s.where,
                    "tokens": s.tokens,
                    "cut_tokens": s.cut_tokens,
                    "segments": [{"text": text, "trained": trained} for text, trained in s.segments],
                }
                for s in self.samples
            ],
        }


@dataclass
class _Measured:
    """Token counts of one valid sample."""

    sample: Sample
    prompt: int
    completion: int
    trainable_within_limit: int
    chunks: int = 1


@dataclass
class _FileResult:
    summary: FileSummary
    samples: list[Sample]
    """Valid canonical samples, the list training splits (before templating)."""
    measured: list[_Measured]
    problems: list[str]


def is_run_config(target: Path | str) -> bool:
    """Whether `target` names a run config (YAML) rather than a data file."""
    return Path(str(target)).suffix.lower() in {".yaml", ".yml"}


def inspect_data(
    target: Path | str,
    *,
    tokenizer,
    data_config: DataConfig | None = None,
    seed: int | None = None,
    samples_to_show: int = 2,
    completion_tokens: int = 0,
) -> InspectReport | PairInspectReport | PromptInspectReport:
    """What training would see in `target`: a data file (read with `data_config`'s settings), or a run config
    whose data.train sources are inspected (its own data section and train.seed unless given here).
    Preference and feedback data get a PairInspectReport (see inspect_pairs.py), prompt-only rows a
    PromptInspectReport (inspect_prompts.py; `completion_tokens` is the room a GRPO run leaves for completions).
    Raises DataError only when a whole file is unusable (missing, unknown type, undetectable format)."""
    config, seed = _settings(target, data_config, seed)
    kind = data_kind(config)
    if kind == "prompts":
        from tunelab.data.inspect_prompts import inspect_prompts  # it builds on this module

        return inspect_prompts(target, config, seed, tokenizer=tokenizer, samples_to_show=samples_to_show,
                               completion_tokens=completion_tokens)
    if kind != "sft":
        from tunelab.data.inspect_pairs import inspect_pairs  # it builds on this module

        return inspect_pairs(target, config, seed, tokenizer=tokenizer, samples_to_show=samples_to_show)
    renderer = checked_renderer(tokenizer, config.chat_template)
    shown: list[ShownSample] = []
    train_results = []
    for source in train_sources(config):
        fmt = source.format or config.format
        train_results.append(_inspect_file(source.path, fmt, "train", config, renderer, samples_to_show, shown))
    eval_result = None
    if config.eval is not None:
        eval_result = _inspect_file(config.eval, config.format, "eval", config, renderer, 0, shown)
    results = [*train_results, *([eval_result] if eval_result else [])]
    measured = [m for r in train_results for m in r.measured]
    max_length = config.max_length
    chat = [m for m in measured if m.sample.text is None]
    longer = [m for m in chat if m.prompt + m.completion > max_length]
    eval_source, eval_samples, overlap = _eval_overlap(train_results, eval_result, config, seed)
    return InspectReport(
        target=str(target),
        files=[r.summary for r in results],
        problems=[p for r in results for p in r.problems],
        prompt_tokens=length_stats([m.prompt for m in measured]),
        completion_tokens=length_stats([m.completion for m in measured]),
        total_tokens=length_stats([m.prompt + m.completion for m in measured]),
        max_length=max_length,
        overlong=config.overlong,
        longer_than_max_length=[m.sample.where for m in longer],
        no_trainable_token_left=[m.sample.where for m in longer if m.trainable_within_limit == 0],
        chunked_documents=sum(1 for m in measured if m.chunks > 1),
        duplicates=_duplicates([s for r in train_results for s in r.samples]),
        eval_source=eval_source,
        eval_samples=eval_samples,
        eval_overlap=overlap,
        samples=shown,
        lengths=[m.prompt + m.completion for m in measured],
        completion_lengths=[m.completion for m in measured],
    )


def _settings(target: Path | str, data_config: DataConfig | None, seed: int | None) -> tuple[DataConfig, int]:
    if is_run_config(target):
        if data_config is None:
            run = load_config(Path(target))
            data_config = run.data
            seed = run.train.seed if seed is None else seed
    else:
        data_config = (data_config or DataConfig()).model_copy(update={"train": Path(str(target))})
    return data_config, TrainConfig().seed if seed is None else seed


def length_stats(values: list[int]) -> LengthStats:
    """min / median / nearest-rank p95 / max / sum of `values` (all zero when empty)."""
    if not values:
        return LengthStats()
    ordered = sorted(values)
    p95 = ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]
    return LengthStats(ordered[0], float(statistics.median(ordered)), p95, ordered[-1], sum(ordered))


def _inspect_file(
    path: Path, fmt: str, role: str, config: DataConfig, renderer: ChatRenderer, to_show: int,
    shown: list[ShownSample],
) -> _FileResult:
    problems: list[str] = []
    samples, fmt, why, rows = load_samples(path, fmt, config.system_prompt, problems, skip_unreadable=True,
                                           columns=config.columns)
    measured = []
    for sample in samples:
        try:
            measured.append(_measure(sample, renderer, config, shown if len(shown) < to_show else None))
        except TemplateError as err:
            problems.append(f"{sample.where}: {err}")
    summary = FileSummary(str(path), role, fmt, why, rows, len(problems))
    return _FileResult(summary, samples, measured, problems)


def _measure(sample: Sample, renderer: ChatRenderer, config: DataConfig, shown: list[ShownSample] | None) -> _Measured:
    """Tokenise `sample` exactly as training does; append its rendering to `shown` when given."""
    tokenizer = renderer.tokenizer
    if sample.text is not None:
        chunks = tokenize_text(sample, tokenizer, config.max_length)
        input_ids = [t for c in chunks for t in c.input_ids]
        labels = [t for c in chunks for t in c.labels]
        measured = _Measured(sample, 0, len(input_ids), len(input_ids), len(chunks))
        limit = len(input_ids)
    else:
        tokenized = tokenize_chat(sample, renderer, config.train_on)
        input_ids, labels = tokenized.input_ids, tokenized.labels
        trained = tokenized.trainable_tokens
        within = sum(1 for label in labels[: config.max_length] if label != IGNORE_INDEX)
        measured = _Measured(sample, len(input_ids) - trained, trained, within)
        limit = config.max_length
    if shown is not None:
        segments = token_segments(tokenizer, input_ids[:limit], labels[:limit])
        shown.append(ShownSample(sample.where, segments, len(input_ids), max(0, len(input_ids) - limit)))
    return measured


def _canonical(sample: Sample) -> str:
    if sample.text is not None:
        return json.dumps({"text": sample.text})
    return json.dumps(sample.messages, sort_keys=True, ensure_ascii=False)


def _prompt_key(sample: Sample) -> str:
    """The conversation a reply is generated for: every turn before the last assistant reply."""
    if sample.text is not None:
        return json.dumps({"text": sample.text})
    return json.dumps(sample.messages[:-1], sort_keys=True, ensure_ascii=False)


def _duplicates(samples: list[Sample]) -> list[list[str]]:
    groups: dict[str, list[str]] = {}
    for sample in samples:
        groups.setdefault(_canonical(sample), []).append(sample.where)
    return [wheres for wheres in groups.values() if len(wheres) > 1]


def _eval_overlap(
    train_results: list[_FileResult], eval_result: _FileResult | None, config: DataConfig, seed: int
) -> tuple[str | None, int, list[tuple[str, str]]]:
    """Eval rows whose prompt also appears in training, with the eval set chosen the way training does."""
    if eval_result is not None:
        train = [s for r in train_results for s in r.samples]
        held_out = eval_result.samples
        source = str(config.eval)
    elif config.eval_split > 0:
        train, held_out = [], []
        for result in train_results:
            train_part, eval_part = split_samples(result.samples, config.eval_split, seed)
            train += train_part
            held_out += eval_part
        source = f"data.eval_split={config.eval_split}, seed {seed}"
    else:
        return None, 0, []
    first_seen: dict[str, str] = {}
    for sample in train:
        first_seen.setdefault(_prompt_key(sample), sample.where)
    overlap = [(s.where, first_seen[_prompt_key(s)]) for s in held_out if _prompt_key(s) in first_seen]
    return source, len(held_out), overlap
