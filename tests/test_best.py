"""Task metrics during training and the best checkpoint by any metric, on the tiny real model: logged at every
evaluation from the base model at step 0, early stopping on a higher-is-better metric, and the best step's
weights restored at the end, also after --resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tunelab.config import load_config
from tunelab.data.prepare import prepare_data
from tunelab.data.template import ChatRenderer
from tunelab.errors import ConfigError
from tunelab.eval.evaluate import evaluate_generations
from tunelab.infer.generate import GenerationOptions
from tunelab.train.best import BestTracker, best_path, metric_mode, save_best
from tunelab.train.checkpoint import TrainerState, load_trainable_state, trainable_state
from tunelab.train.run import train_run

QUESTIONS = [f"order {n}: the {thing} is broken, what now?" for n in range(8) for thing in ("desk", "lamp", "chair")]
EVAL_EVERY, PATIENCE, SUBSET = 2, 3, 4


@pytest.fixture(scope="module")
def tickets(tmp_path_factory):
    path = tmp_path_factory.mktemp("best") / "tickets.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": "shipping"}) + "\n" for q in QUESTIONS))
    return path


def config_for(tiny_model_dir, data, out, *overrides):
    """Full fine-tuning at a high constant rate: chrF on the subset rises unevenly, then saturates."""
    return load_config(
        None,
        [
            f"model={tiny_model_dir}",
            f"data.train={data}",
            "data.eval_split=0.25",
            "data.max_length=64",
            f"output_dir={out}",
            "method.name=full",
            "train.batch_size=4",
            "train.lr=1e-2",
            "train.scheduler=constant",
            "train.precision=fp32",
            "train.max_steps=40",
            f"train.eval_every={EVAL_EVERY}",
            "eval.metrics=[exact_match, chrf]",
            "eval.during_training=true",
            f"eval.during_training_samples={SUBSET}",
            "eval.generate_samples=6",
            "eval.max_new_tokens=8",
            "eval.show_samples=0",
            *overrides,
        ],
    )


EARLY_STOP = ["train.best_metric=eval_chrf", f"train.early_stopping_patience={PATIENCE}"]


def simulate(values: dict[int, float], mode: str, patience: int) -> tuple[int, int | None]:
    """(best step, step early stopping stops at) by the documented rule: strict improvement, ties do not count."""
    best_step, best, waited = None, None, 0
    for step in sorted(values):
        better = best is None or (values[step] > best if mode == "max" else values[step] < best)
        if better:
            best_step, best, waited = step, values[step], 0
        else:
            waited += 1
            if waited >= patience:
                return best_step, step
    return best_step, None


def evaluations(run) -> dict[int, dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if "eval_loss" in r}


@pytest.fixture(scope="module")
def early_stopped(tiny_model_dir, tickets, tmp_path_factory):
    out = tmp_path_factory.mktemp("early") / "run"
    config = config_for(tiny_model_dir, tickets, out, *EARLY_STOP, "train.save_every=2", "train.keep_checkpoints=100")
    return train_run(config), out, config


def test_task_metrics_are_logged_at_every_evaluation_from_the_base_model_at_step_0(early_stopped, tiny_model_dir):
    summary, run, config = early_stopped
    logged = evaluations(run)
    stop = summary["steps"]
    assert sorted(logged) == list(range(0, stop + 1, EVAL_EVERY))
    assert all({"eval_exact_match", "eval_chrf"} <= set(record) for record in logged.values())
    assert json.loads((run / "baseline.json").read_text())["eval_chrf"] == logged[0]["eval_chrf"]
    assert (run / "plots" / "task_metrics.png").is_file()  # the report draws the curves
    # The logged numbers are the metrics of that step's weights on the first SUBSET held-out samples.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    subset = prepare_data(config.data, tokenizer, config.train.seed).eval_samples[:SUBSET]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    options = GenerationOptions(max_new_tokens=8, seed=config.train.seed)
    step = next(s for s, r in logged.items() if s and 0 < r["eval_chrf"] < 100)  # a step between the extremes
    for at in (0, step):
        if at:
            load_trainable_state(model, load_file(run / "checkpoints" / f"step-{at:06d}" / "trainable.safetensors"))
        scores, _ = evaluate_generations(model, ChatRenderer(tokenizer), subset, ["exact_match", "chrf"], options)
        assert scores["chrf"] == pytest.approx(logged[at]["eval_chrf"])
        assert scores["exact_match"] == pytest.approx(logged[at]["eval_exact_match"])


def test_early_stopping_follows_a_higher_is_better_metric_and_restores_its_best_step(early_stopped):
    summary, run, _ = early_stopped
    chrf = {step: r["eval_chrf"] for step, r in evaluations(run).items() if step}  # the baseline is no candidate
    best_step, stop = simulate(chrf, "max", PATIENCE)
    assert stop is not None and stop < 40, "chrF should stop improving well before the last step"
    assert simulate(chrf, "min", PATIENCE)[0] != best_step  # the mode decides, so this test checks it
    state = summary["trainer_state"]
    assert state["extra"]["early_stopped_at"] == stop == summary["steps"]
    assert summary["best"] == {"metric": "eval_chrf", "mode": "max", "step": best_step, "value": chrf[best_step],
                               "restored": True}
    assert best_step != stop and state["extra"]["restored_best_step"] == best_step
    # The saved model is the best step's weights, as checkpointed at that step.
    at_best = load_file(run / "checkpoints" / f"step-{best_step:06d}" / "trainable.safetensors")
    final = load_file(run / "model.safetensors")
    assert set(at_best) <= set(final)
    for name, tensor in at_best.items():
        torch.testing.assert_close(final[name], tensor, rtol=0, atol=0)
    # Best files kept: the best, and each one a kept checkpoint refers to (all checkpoints are kept here).
    referred = {json.loads(p.read_text())["best_step"] for p in (run / "checkpoints").glob("*/state.json")}
    kept = {p.name for p in (run / "best").iterdir()}
    assert kept == {best_path(run, step).name for step in referred | {best_step}}


def test_resume_then_finish_restores_the_best_weights(tiny_model_dir, tickets, tmp_path, monkeypatch, early_stopped):
    straight_summary, straight, _ = early_stopped
    best_step = straight_summary["best"]["step"]
    overrides = [*EARLY_STOP, "train.save_every=4"]
    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def interrupt_after_best(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == best_step + 2:  # steps 1..best+1 done: the best weights exist only in the run dir
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    out = tmp_path / "resumed"
    monkeypatch.setattr(torch.optim.AdamW, "step", interrupt_after_best)
    with pytest.raises(KeyboardInterrupt):
        train_run(config_for(tiny_model_dir, tickets, out, *overrides))
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    resumed = train_run(config_for(tiny_model_dir, tickets, out, *overrides), resume=True)
    assert resumed["steps"] == straight_summary["steps"]
    assert resumed["trainer_state"]["extra"]["restored_best_step"] == best_step
    assert resumed["best"] == straight_summary["best"]
    final, expected = load_file(out / "model.safetensors"), load_file(straight / "model.safetensors")
    for name, tensor in expected.items():
        torch.testing.assert_close(final[name], tensor, rtol=1e-5, atol=1e-6)


def kept_steps(run_dir) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in (run_dir / "best").glob("step-*.safetensors"))


def test_best_files_stay_while_a_checkpoint_refers_to_them(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    first = trainable_state(model)
    checkpoint = tmp_path / "checkpoints" / "step-000004"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.json").write_text(json.dumps({"step": 4, "best_step": 2}))
    save_best(tmp_path, model, 2, "eval_chrf", 10.0)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    save_best(tmp_path, model, 6, "eval_chrf", 20.0)
    assert kept_steps(tmp_path) == [2, 6]
    (checkpoint / "state.json").write_text(json.dumps({"step": 8, "best_step": 6}))
    save_best(tmp_path, model, 8, "eval_chrf", 30.0)
    assert kept_steps(tmp_path) == [6, 8]
    # Resuming from a checkpoint whose best is step 2 would need that file; restore reads what is on disk.
    config = load_config(None, ["train.keep_best=true"]).train
    tracker = BestTracker(config, tmp_path, model)
    state = TrainerState(step=10, best_step=2)
    tracker.restore(state)
    assert "best_not_restored" in state.extra  # step 2 was dropped once no checkpoint referred to it
    state = TrainerState(step=10, best_step=6)
    save_best(tmp_path, AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), 6, "x", 1.0)
    tracker.restore(state)
    for name, tensor in trainable_state(model).items():
        torch.testing.assert_close(tensor, first[name], rtol=0, atol=0)
    assert state.extra["restored_best_step"] == 6


def test_best_metric_is_checked_before_training():
    assert metric_mode("eval_loss") == "min" and metric_mode("eval_loss/tickets") == "min"
    assert metric_mode("eval_exact_match") == "max" and metric_mode("eval_exact_match", "min") == "min"
    with pytest.raises(ConfigError, match="eval.during_training: true"):
        load_config(None, ["train.best_metric=eval_exact_match"])
    with pytest.raises(ConfigError, match="choose one of eval_loss, eval_perplexity, eval_exact_match"):
        load_config(None, ["eval.during_training=true", "train.best_metric=eval_rouge1"])
    with pytest.raises(ConfigError, match="not an eval metric"):
        load_config(None, ["train.best_metric=exact_match"])
    with pytest.raises(ConfigError, match="needs eval data"):
        load_config(None, ["train.keep_best=true", "data.eval_split=0"])
    config = load_config(None, ["eval.during_training=true", "eval.metrics=[rouge]", "train.best_metric=eval_rougeL"])
    assert config.train.best_metric == "eval_rougeL"
