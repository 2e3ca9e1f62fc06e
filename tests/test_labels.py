"""Label-likelihood classification on the tiny real model: scores are the log-probabilities a plain forward
gives, batching and padding change nothing, and a model trained to answer one label always picks it."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.config import load_config
from tunelab.data.formats import Sample
from tunelab.data.template import ChatRenderer
from tunelab.errors import ConfigError
from tunelab.eval.command import evaluate_model
from tunelab.eval.labels import evaluate_labels, resolve_labels, score_labels
from tunelab.infer.generate import GenerationOptions
from tunelab.train.run import train_run

LABELS = ["refund", "cancel order", "shipping"]
QUESTIONS = [f"order {n}: the {thing} is broken, what now?" for n in range(8) for thing in ("desk", "lamp", "chair")]


def _ask(question: str, answer: str) -> Sample:
    return Sample(question, [{"role": "user", "content": question}, {"role": "assistant", "content": answer}])


def _manual_logprob(model, tokenizer, prompt: str, reply: str) -> tuple[float, int]:
    """log P(reply tokens + <|im_end|>) after `prompt`, from one unbatched forward and log_softmax."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    reply_ids = tokenizer(reply + "<|im_end|>", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + reply_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    logprobs = logits[-ids.shape[1] :].float().log_softmax(-1)  # prompt tuning would prepend virtual positions
    total = sum(float(logprobs[len(prompt_ids) + i - 1, token]) for i, token in enumerate(reply_ids))
    return total, len(reply_ids)


def _with_method(model, method: str):
    """The tiny model as a method wraps it, with its new weights randomised so they change every score."""
    if method == "base":
        return model
    from tunelab.config import LoraMethod, PrefixMethod
    from tunelab.methods import METHODS

    config = LoraMethod(name="lora", r=4) if method == "lora" else PrefixMethod(name="prefix", num_virtual_tokens=3)
    wrapped = METHODS[method].apply(model, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in wrapped.parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.5)
    return wrapped.eval()


@pytest.mark.parametrize("method", ["base", "lora", "prefix"])
def test_label_scores_equal_a_manual_log_prob_computation(tiny_model_dir, method):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = _with_method(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval(), method)
    renderer = ChatRenderer(tokenizer)
    samples = [_ask("what is 1 plus 2?", "3"), _ask("hello world, a much longer question about the lazy dog", "x")]
    # batch_size 2: one prompt and its 3 labels per forward (padded labels); 6: both prompts of unequal length
    # together (padding between a short prompt and its labels).
    sums = score_labels(model, renderer, samples, LABELS, batch_size=2)
    together = score_labels(model, renderer, samples, LABELS, batch_size=6)
    means = score_labels(model, renderer, samples, LABELS, score="mean", batch_size=6)
    assert sums.shape == (2, 3)
    for i, sample in enumerate(samples):
        prompt = renderer.prompt(sample.messages)
        for k, label in enumerate(LABELS):
            total, count = _manual_logprob(model, tokenizer, prompt, label)
            assert sums[i, k].item() == pytest.approx(total, abs=1e-4)
            assert together[i, k].item() == pytest.approx(total, abs=1e-4)
            assert means[i, k].item() == pytest.approx(total / count, abs=1e-4)
    result = evaluate_labels(model, renderer, samples, LABELS)
    assert result.predictions == [LABELS[int(k)] for k in sums.argmax(dim=1)]


def test_label_set_defaults_to_the_distinct_references_and_rejects_bad_sets():
    assert resolve_labels(None, ["b", "a", "b"]) == ["a", "b"]
    assert resolve_labels(["x", "y"], ["a"]) == ["x", "y"]
    with pytest.raises(ConfigError, match="51 distinct references"):
        resolve_labels(None, [str(n) for n in range(51)])
    with pytest.raises(ConfigError, match="name the same label"):
        resolve_labels(["Cancel order", "cancel_order"], [])
    config = load_config(None, ["eval.labels=[refund, shipping]"])
    assert "label_accuracy" in config.eval.metrics  # giving labels asks for the metric


@pytest.fixture(scope="module")
def always_shipping(tiny_model_dir, tmp_path_factory):
    """A fully fine-tuned run trained to answer every question with `shipping`, on data whose reference is
    shipping. The untrained model prefers `refund` (2 tokens against shipping's 8 under this tokenizer)."""
    root = tmp_path_factory.mktemp("labels")
    data = root / "tickets.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": "shipping"}) + "\n" for q in QUESTIONS))
    config = load_config(
        None,
        [
            f"model={tiny_model_dir}",
            f"data.train={data}",
            "data.eval_split=0.25",
            "data.max_length=64",
            f"output_dir={root / 'run'}",
            "train.batch_size=4",
            "method.name=full",
            "train.max_steps=16",
            "train.lr=1e-2",
            "train.scheduler=constant",
            "train.precision=fp32",
            "train.eval_every=8",
            "eval.metrics=[label_accuracy]",
            f"eval.labels=[{', '.join(LABELS)}]",
            "eval.during_training=true",
            "eval.generate_samples=6",
            "eval.show_samples=0",
        ],
    )
    return train_run(config), root / "run", data


def test_a_model_trained_to_answer_shipping_always_picks_shipping(always_shipping):
    summary, run, data = always_shipping
    assert summary["metrics_after"]["label_accuracy"] == 1.0
    result = evaluate_model(str(run), data, ["label_accuracy"], options=GenerationOptions(), labels=LABELS,
                            baseline="base")
    assert result["label_accuracy"] == 1.0
    assert result["labels"] == LABELS
    assert result["label_confusion"] == {"shipping": {"shipping": len(QUESTIONS)}}
    base = result["baseline"]
    assert base["label_accuracy"] < 0.5
    assert sum(base["label_confusion"]["shipping"].values()) == len(QUESTIONS)
    assert result["comparison"]["differences"]["label_accuracy"]["difference"] == pytest.approx(
        1.0 - base["label_accuracy"]
    )
    # Logged at every evaluation during training, from the base model at step 0.
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["eval_label_accuracy"] for r in records if "eval_label_accuracy" in r}
    assert sorted(logged) == [0, 8, 16] and logged[0] == 0.0 and logged[16] == 1.0


def test_eval_command_scores_labels_and_writes_the_confusion(always_shipping, tmp_path):
    _, run, data = always_shipping
    result = CliRunner().invoke(
        app,
        ["eval", str(run), "--data", str(data), "--metrics", "loss", "--labels", "refund,shipping",
         "--label-score", "mean", "--limit", "5", "-o", str(tmp_path)],
    )
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output)
    assert scores["label_accuracy"] == 1.0 and scores["label_confusion"] == {"shipping": {"shipping": 5}}
    assert scores["loss"] < 1.0
    rows = [json.loads(line) for line in (tmp_path / "eval_samples.jsonl").read_text().splitlines()]
    assert [row["label"] for row in rows] == ["shipping"] * 5
    bad = CliRunner().invoke(app, ["eval", str(run), "--data", str(data), "--labels", "refund,Refund"])
    assert bad.exit_code == 2 and "--labels" in bad.output


def test_a_run_refuses_free_text_references_as_labels_before_writing_anything(tiny_model_dir, tmp_path):
    data = tmp_path / "free.jsonl"
    data.write_text("".join(json.dumps({"question": f"say {n}", "answer": f"number {n}"}) + "\n" for n in range(300)))
    out = tmp_path / "run"
    config = load_config(None, [f"model={tiny_model_dir}", f"data.train={data}", "data.eval_split=0.25",
                                f"output_dir={out}", "eval.metrics=[label_accuracy]"])
    with pytest.raises(ConfigError, match="75 distinct references") as raised:
        train_run(config)
    assert raised.value.where == "eval.labels"
    assert not out.exists()


@pytest.mark.integration
def test_shared_prompt_scores_equal_whole_sequence_scores_on_the_default_model(default_model_dir):
    """The real model, tokenizer and chat template (with its default system turn): reusing each prompt's cache
    for its labels gives the scores of running every (prompt, label) sequence whole."""
    from tunelab.eval.labels import grouped_logprobs, label_sequences, sequence_logprobs
    from tunelab.models.load import load_model, load_tokenizer

    tokenizer = load_tokenizer(default_model_dir)
    model = load_model(default_model_dir, device="cpu").eval()
    renderer = ChatRenderer(tokenizer)
    samples = [_ask(q, "x") for q in ("Is my order late?", "The desk arrived broken, I want my money back now.")]
    sequences = label_sequences(renderer, samples, ["low", "medium", "high"])
    shared, shared_counts = grouped_logprobs(model, sequences, 3, pad_token_id=tokenizer.pad_token_id, batch_size=6)
    whole, whole_counts = sequence_logprobs(model, sequences, pad_token_id=tokenizer.pad_token_id, batch_size=6)
    assert torch.equal(shared_counts, whole_counts) and bool((whole_counts >= 2).all())
    torch.testing.assert_close(shared, whole, rtol=0, atol=1e-3)
