"""`tunelab merge` as a library: fold a trained adapter into its base model, giving a plain checkpoint any tool can
load, or combine several runs' adapters first (merge_adapters.py). Both paths check runs and save through the
helpers here, so their refusals and their output folders cannot drift apart."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.config import load_config
from tunelab.data.template import ChatRenderer
from tunelab.errors import ConfigError, ModelError
from tunelab.infer.load import is_run_dir
from tunelab.methods import METHODS, bottleneck
from tunelab.models.load import load_model, load_tokenizer
from tunelab.models.resolve import resolve_model, staged_folder

if TYPE_CHECKING:
    from tunelab.infer.merge_adapters import Combination


def merge(run_dirs: Sequence[Path], output: Path, combination: Combination | None = None, *,
          overwrite: bool = False) -> Path:
    """Write one run's adapter folded into its base, or several runs' adapters combined as `combination` says
    (default linear, an average) and folded, to `output`; what `tunelab merge` does.

    Everything that can be refused is refused (ConfigError or ModelError naming the option or run) before a model
    is loaded, including an `output` that cannot be written; a refused or failed merge leaves no folder behind."""
    from tunelab.cli_common import check_output_folder
    from tunelab.infer.load import refuse_unfinished_run
    from tunelab.infer.merge_adapters import Combination, plan_merge, write_merge

    run_dirs = list(run_dirs)
    if not run_dirs:
        raise ConfigError("give a run directory to merge", where="merge")
    combination = combination or Combination()
    with _new_folders_removed_on_failure(output):
        if len(run_dirs) == 1:
            given = combination.options_given()
            if given:
                raise ConfigError(f"{given[0]} applies when combining several runs; one run's adapter is folded in "
                                  "as trained", where=given[0])
            refuse_unfinished_run(run_dirs[0])
            check_output_folder(output, "--output")
            return merge_adapter(run_dirs[0], output, overwrite=overwrite)
        plan = plan_merge(run_dirs, output, combination, overwrite=overwrite)
        check_output_folder(output, "--output")
        return write_merge(plan)


@contextmanager
def _new_folders_removed_on_failure(output: Path) -> Iterator[None]:
    """Remove the folders above `output` that the output check made, if the merge is refused after it (an adapter
    that does not load, a run that cannot merge): a refused merge leaves nothing behind."""
    missing = [folder for folder in output.absolute().parents if not folder.exists()]  # the deepest first
    try:
        yield
    except BaseException:
        for folder in missing:
            with suppress(OSError):  # not empty: something else wrote there meanwhile
                folder.rmdir()
        raise


def merge_adapter(run_dir: Path, output: Path, *, overwrite: bool = False) -> Path:
    """Write base + adapter as one full-precision model to `output` (safetensors, tokenizer, the chat template the
    run trained with). A QLoRA adapter is merged into the full-precision base it was quantised from; a reward
    model keeps its score head (transformers' AutoModelForSequenceClassification loads it)."""
    check_run_dir(run_dir)
    if (run_dir / bottleneck.CONFIG_FILE).is_file():
        raise ConfigError(f"{run_dir} cannot be merged: {bottleneck.CANNOT_MERGE}", where="merge")
    if not (run_dir / "adapter_config.json").is_file():
        raise ConfigError(f"{run_dir} holds full weights already: there is no adapter to merge", where="merge")
    check_adapter_weights(run_dir)
    check_merge_output(run_dir, output, overwrite)
    from peft import PeftModel

    config = load_config(run_dir / "config.yaml")
    why_not = getattr(METHODS[config.method.name], "CANNOT_MERGE", None)
    if why_not:
        raise ConfigError(f"{run_dir} cannot be merged: {why_not}", where="merge")
    tokenizer = load_tokenizer(run_dir)
    head = {"head": "reward", "pad_token_id": tokenizer.pad_token_id} if config.objective.name == "reward" else {}
    base = load_model(resolve_model(config.model), device="cpu", **head)
    with adapter_load_refused(run_dir):
        merged = PeftModel.from_pretrained(base, run_dir).merge_and_unload()
    template = ChatRenderer(tokenizer, config.data.chat_template).portable_template
    return save_merged(merged, tokenizer, template, output)


def check_run_dir(run_dir: Path) -> None:
    """ModelError naming `run_dir` unless it is a tunelab run directory (config.yaml beside weights or an adapter)."""
    if not (run_dir.is_dir() and is_run_dir(run_dir)):
        raise ModelError("not a tunelab run directory", where=str(run_dir))


def check_adapter_weights(run_dir: Path) -> None:
    """ModelError naming `run_dir` when its adapter_config.json has no adapter_model.safetensors beside it (a copy
    cut short), before the base model is loaded for nothing."""
    if not (run_dir / "adapter_model.safetensors").is_file():
        raise ModelError("the run's adapter weights (adapter_model.safetensors) are missing", where=str(run_dir))


@contextmanager
def adapter_load_refused(run_dir: Path) -> Iterator[None]:
    """Turn a failure to load `run_dir`'s adapter into a ModelError naming the run, not a traceback."""
    try:
        yield
    except Exception as err:  # a damaged adapter_config.json or safetensors file: peft and safetensors raise many kinds
        raise ModelError(f"cannot load the adapter ({type(err).__name__}: {err})", where=str(run_dir)) from None


def save_merged(model, tokenizer, chat_template: str | None, output: Path,
                extra_files: dict[str, str] | None = None) -> Path:
    """Write a merged model to `output` as a plain folder: safetensors, the tokenizer carrying `chat_template` (the
    run's portable template, so the model prompts as the run trained) and `extra_files` (name: text). The folder
    replaces `output` only once complete, so an interrupted save never looks like a model."""
    tokenizer.chat_template = chat_template
    with staged_folder(output) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return output


def check_merge_output(run_dir: Path, output: Path, overwrite: bool) -> None:
    """Refuse an output that holds something (unless overwrite) or that is the run or a folder above it, which
    replacing would delete."""
    run, target = run_dir.resolve(), output.resolve()
    if target == run or target in run.parents:
        raise ConfigError(f"{output} is the run directory or holds it: the merged model would replace the run; "
                          "choose another folder", where="--output")
    if output.exists() and not output.is_dir():
        raise ConfigError(f"{output} is a file; the merged model is a folder", where="--output")
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise ConfigError(f"{output} already exists; pass --overwrite to replace it", where="--output")
