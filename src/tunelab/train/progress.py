"""The progress bar: step, loss, eval loss, tokens/s and ETA."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainingProgress:
    """A live bar in a terminal; plain lines (about 20 per run, plus every eval) in logs and CI."""

    def __init__(self, console: Console, total_steps: int, start_step: int) -> None:
        self.console = console
        self.total_steps = total_steps
        self.live = console.is_terminal
        self.line_every = max(1, total_steps // 20)
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            disable=console.quiet or not self.live,
        )
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step, stats="")
        self.eval_loss: float | None = None
        self.eval_reward: float | None = None

    def update(self, state, record: dict) -> None:
        if "eval_loss" in record:
            self.eval_loss = record["eval_loss"]
            self.eval_reward = record.get("eval_reward")
        stats = f"loss {record['loss']:.4f}" if record.get("loss") is not None else "skipped"
        if "reward" in record:  # GRPO: the loss is ~0 by construction; the reward is what moves
            stats += f" | reward {record['reward']:.3f}"
        if self.eval_reward is not None:
            stats += f" | eval reward {self.eval_reward:.3f}"
        elif self.eval_loss is not None:
            stats += f" | eval {self.eval_loss:.4f}"
        stats += f" | {record['tokens_per_second']:.0f} tok/s"
        self.progress.update(self.task, completed=state.step, stats=stats)
        if not self.live and (state.step % self.line_every == 0 or "eval_loss" in record):
            self.console.print(f"step {state.step}/{self.total_steps} | {stats}", highlight=False)

    def __enter__(self) -> TrainingProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()
