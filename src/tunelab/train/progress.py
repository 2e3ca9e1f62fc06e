"""The progress bar: step, loss, eval loss, tokens/s and ETA."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainingProgress:
    def __init__(self, console: Console, total_steps: int, start_step: int) -> None:
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            disable=console.quiet,
        )
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step, stats="")
        self.eval_loss: float | None = None

    def update(self, state, record: dict) -> None:
        if "eval_loss" in record:
            self.eval_loss = record["eval_loss"]
        stats = f"loss {record['loss']:.4f}"
        if self.eval_loss is not None:
            stats += f" | eval {self.eval_loss:.4f}"
        stats += f" | {record['tokens_per_second']:.0f} tok/s"
        self.progress.update(self.task, completed=state.step, stats=stats)

    def __enter__(self) -> TrainingProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()
