"""Knowledge distillation (objective.name: distill): the generalized JSD against a definition written out here,
the objective's loss and gradients against full logits, the teacher checks, and a tiny student learning a tiny
teacher that tunelab fine-tuned."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tunelab.config import load_config
from tunelab.data.template import IGNORE_INDEX, TokenizedSample
from tunelab.objectives.distill import generalized_jsd, load_teacher, vocabulary_mismatch

EXAMPLE = Path(__file__).parent.parent / "examples" / "distill.yaml"

STUDENT = [[1.0, 2.0, 0.5, -1.0, 0.0], [0.0, 0.0, 3.0, 1.0, -2.0], [0.3, 0.3, 0.3, 0.3, 0.3]]
TEACHER = [[2.0, 0.0, 1.0, 0.0, 0.5], [1.0, -2.0, 0.5, 2.5, 0.0], [4.0, -1.0, 0.0, 0.0, 1.0]]


def softmax(logits: list[float], temperature: float) -> list[float]:
    exps = [math.exp(x / temperature) for x in logits]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def expected_divergence(student: list[float], teacher: list[float], beta: float, temperature: float) -> float:
    """The generalized JSD as the GKD paper (eq. 1) and TRL define it, with both KL limits."""
    p_s, p_t = softmax(student, temperature), softmax(teacher, temperature)
    if beta == 0:
        return kl(p_t, p_s)
    if beta == 1:
        return kl(p_s, p_t)
    mixture = [(1 - beta) * s + beta * t for s, t in zip(p_s, p_t, strict=True)]
    return beta * kl(p_t, mixture) + (1 - beta) * kl(p_s, mixture)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_generalized_jsd_equals_its_definition(beta, temperature):
    got = generalized_jsd(torch.tensor(STUDENT), torch.tensor(TEACHER), beta, temperature)
    want = [expected_divergence(s, t, beta, temperature) for s, t in zip(STUDENT, TEACHER, strict=True)]
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-6)


def test_generalized_jsd_limits_are_the_two_kls_and_jsd_is_symmetric_and_bounded():
    s, t = torch.tensor(STUDENT), torch.tensor(TEACHER)
    forward = [kl(softmax(b, 1), softmax(a, 1)) for a, b in zip(STUDENT, TEACHER, strict=True)]  # KL(teacher||student)
    reverse = [kl(softmax(a, 1), softmax(b, 1)) for a, b in zip(STUDENT, TEACHER, strict=True)]
    torch.testing.assert_close(generalized_jsd(s, t, 0.0), torch.tensor(forward))
    torch.testing.assert_close(generalized_jsd(s, t, 1.0), torch.tensor(reverse))
    assert forward != pytest.approx(reverse, rel=0.05)  # the two directions differ on these logits
    jsd = generalized_jsd(s, t, 0.5)
    torch.testing.assert_close(jsd, generalized_jsd(t, s, 0.5))
    assert bool((jsd > 0).all() and (jsd < math.log(2)).all())
    assert float(generalized_jsd(s, s, 0.5).abs().max()) < 1e-6 and float(generalized_jsd(s, s, 0.0).max()) == 0


def samples(tokenizer) -> list[TokenizedSample]:
    """Three replies after prompts of different lengths that start alike (labels -100 on the prompts)."""
    out = []
    shared = tokenizer.encode("system: user assistant question answer. ")
    for prompt, reply in [("hello world", "the capital of France is Paris"), ("question", "0123"),
                          ("What is the capital of France?", "Paris.")]:
        p, r = shared + tokenizer.encode(prompt), tokenizer.encode(reply) + [tokenizer.eos_token_id]
        out.append(TokenizedSample(p + r, [IGNORE_INDEX] * len(p) + r, "test"))
    return out


def full_logits_loss(student, teacher, batch, alpha: float, beta: float, temperature: float) -> torch.Tensor:
    """The same loss from whole [B, T, V] logits of plain forwards, per trained token, summed."""
    keep = batch["targets"] != IGNORE_INDEX
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
    logits = student(**inputs).logits[keep]
    with torch.no_grad():
        reference = teacher(**inputs).logits[keep]
    ce = torch.nn.functional.cross_entropy(logits, batch["targets"][keep], reduction="none")
    rows = [expected_divergence(a.tolist(), b.tolist(), beta, temperature) for a, b in zip(logits, reference,
                                                                                           strict=True)]
    torch.testing.assert_close(generalized_jsd(logits, reference, beta, temperature),
                               torch.tensor(rows), rtol=1e-4, atol=1e-6)
    return (alpha * ce + (1 - alpha) * generalized_jsd(logits, reference, beta, temperature)).sum()


@pytest.mark.parametrize("method", ["full", "lora"])  # a trained head through autograd; a frozen one cast once
def test_loss_and_gradients_equal_those_of_full_logits_in_every_batch_layout(tiny_tokenizer, method):
    from conftest import build_tiny_model
    from tunelab.config import DistillObjective as DistillConfig
    from tunelab.config import LoraMethod
    from tunelab.methods import METHODS
    from tunelab.models import frozen_head
    from tunelab.models.attention import MATMUL, attention_implementation
    from tunelab.models.logprobs import HEAD_CHUNK, decoder_and_head
    from tunelab.objectives.distill import DistillObjective

    student = build_tiny_model(len(tiny_tokenizer), seed=0)
    if method == "lora":
        student = METHODS["lora"].apply(student, LoraMethod(name="lora", dropout=0.0))
        with torch.no_grad():  # B away from 0, so the adapter changes the logits
            for name, param in student.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    assert frozen_head.fits(decoder_and_head(student)[1]) == (method == "lora")
    teacher = build_tiny_model(len(tiny_tokenizer), seed=1).eval().requires_grad_(False)
    config = DistillConfig(name="distill", teacher="unused", alpha=0.3, beta=0.3, temperature=2.0)
    objective = DistillObjective(config, teacher, pad_token_id=0, precision="fp32", batch_size=8,
                                tokenizer=tiny_tokenizer)
    rows = [[s] for s in samples(tiny_tokenizer)]
    padded = objective.collate(rows, 0, False)
    expected = full_logits_loss(student, teacher, padded, 0.3, 0.3, 2.0)
    expected.backward()
    want = {name: p.grad.clone() for name, p in student.named_parameters() if p.grad is not None}
    assert want
    student.zero_grad()

    padding_free = objective.collate(rows, 0, True)
    objective.share_prefix = True  # the samples' common prefix held once: the teacher reads that layout too
    shared = objective.collate(rows, 0, True)
    assert int(shared["shared_tokens"]) > 0
    layouts = [("padded", padded, None), ("padding-free", padding_free, MATMUL), ("shared prefix", shared, MATMUL)]
    for name, batch, attention in layouts:
        with attention_implementation(student, attention):
            loss, metrics = objective.loss_sum(student, batch)
        loss.backward()
        assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5), name
        trained = objective.count(batch)
        assert metrics["ce"][1] == metrics["distill/divergence"][1] == trained
        assert 0.3 * metrics["ce"][0] + 0.7 * metrics["distill/divergence"][0] == pytest.approx(float(loss.detach()),
                                                                                                rel=1e-5)
        for key, grad in want.items():
            torch.testing.assert_close(dict(student.named_parameters())[key].grad, grad, rtol=1e-4, atol=1e-6)
        student.zero_grad()
    assert sum(len(s.input_ids) for s in samples(tiny_tokenizer)) < HEAD_CHUNK  # one chunk here; see the next


def test_chunks_of_trained_tokens_give_the_same_loss_and_gradients(tiny_tokenizer, monkeypatch):
    from conftest import build_tiny_model
    from tunelab.config import DistillObjective as DistillConfig
    from tunelab.objectives import distill

    student = build_tiny_model(len(tiny_tokenizer), seed=0)
    teacher = build_tiny_model(len(tiny_tokenizer), seed=1).eval().requires_grad_(False)
    config = DistillConfig(name="distill", teacher="unused", beta=0.5)
    objective = distill.DistillObjective(config, teacher, pad_token_id=0, precision="fp32", batch_size=8,
                                tokenizer=tiny_tokenizer)
    batch = objective.collate([[s] for s in samples(tiny_tokenizer)], 0, False)
    whole, _ = objective.loss_sum(student, batch)
    whole.backward()
    want = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    monkeypatch.setattr(distill, "head_chunk_rows", lambda vocab, device: 3)  # 3 trained tokens a chunk
    chunked, _ = objective.loss_sum(student, batch)
    chunked.backward()
    assert float(chunked.detach()) == pytest.approx(float(whole.detach()), rel=1e-6)
    for got, grad in zip([p.grad for p in student.parameters()], want, strict=True):
        torch.testing.assert_close(got, grad)


def test_vocabulary_mismatch_names_the_size_or_the_special_token(tiny_tokenizer, monkeypatch):
    import conftest

    assert vocabulary_mismatch(tiny_tokenizer, conftest.build_tokenizer()) is None
    grown = conftest.build_tokenizer()
    grown.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    assert f"has {len(grown):,} tokens" in vocabulary_mismatch(tiny_tokenizer, grown)
    monkeypatch.setattr(conftest, "SPECIALS", list(reversed(conftest.SPECIALS)))  # same tokens, other ids
    reordered = conftest.build_tokenizer()
    assert len(reordered) == len(tiny_tokenizer)
    assert "the special token '<|endoftext|>' is id 0 for the student" in vocabulary_mismatch(tiny_tokenizer,
                                                                                              reordered)


def test_the_teacher_is_frozen_in_eval_mode_in_the_training_precision(tiny_model_dir, tiny_tokenizer):
    teacher = load_teacher(str(tiny_model_dir), tiny_tokenizer, device="cpu", precision="bf16")
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    assert load_teacher(str(tiny_model_dir), tiny_tokenizer, device="cpu", precision="fp32").dtype == torch.float32


def test_a_relative_teacher_is_found_beside_the_config_and_the_example_validates(tmp_path, monkeypatch):
    folder = tmp_path / "recipes"
    (folder / "runs" / "teacher").mkdir(parents=True)
    (folder / "distill.yaml").write_text("objective: {name: distill, teacher: runs/teacher}\n")
    monkeypatch.chdir(tmp_path)
    assert load_config(folder / "distill.yaml").objective.teacher == str(folder / "runs" / "teacher")
    example = load_config(EXAMPLE)
    assert example.objective.name == "distill" and example.model == "smollm2-135m-instruct"
    assert load_config(None, ["objective.name=distill", "objective.teacher=t",
                              "train.best_metric=eval_distill/divergence", "train.keep_best=true"])


QA = [{"question": f"what is {a} plus {b}?", "answer": f"the answer is {a + b}"} for a in range(6) for b in range(6)]
HELD_OUT = [{"question": f"what is {a} plus {b}?", "answer": f"the answer is {a + b}"} for a in (6, 7) for b in
            range(6)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_config(model: Path, train: Path, held_out: Path, out: Path, *overrides: str):
    return load_config(None, [
        f"model={model}", f"data.train={train}", f"data.eval={held_out}", "data.max_length=64", f"output_dir={out}",
        "train.batch_size=4", "train.precision=fp32", "eval.generate_samples=2", "eval.max_new_tokens=4",
        "eval.show_samples=0", "train.seed=3", *overrides])


@torch.no_grad()
def held_out_divergences(student, teacher, config) -> tuple[float, float]:
    """(forward KL(teacher || student), generalized JSD at beta 0.5) per trained token of the held-out rows, from
    plain whole-logit forwards: independent of the objective's code."""
    from tunelab.data.batching import collate
    from tunelab.data.prepare import prepare_data
    from tunelab.models.load import load_tokenizer

    data = prepare_data(config.data, load_tokenizer(Path(config.model)), config.train.seed)
    batch = collate([[s] for s in data.eval], 0, packed=False)
    keep = batch["targets"] != IGNORE_INDEX
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    s = torch.log_softmax(student(**inputs).logits[keep].float(), -1)
    t = torch.log_softmax(teacher(**inputs).logits[keep].float(), -1)
    forward = float((t.exp() * (t - s)).sum(-1).mean())
    m = torch.logaddexp(s + math.log(0.5), t + math.log(0.5))
    jsd = float((0.5 * (t.exp() * (t - m)).sum(-1) + 0.5 * (s.exp() * (s - m)).sum(-1)).mean())
    return forward, jsd


def trained_teacher(model_dir: Path, folder: Path) -> tuple[Path, Path, Path]:
    """(train data, held-out data, a teacher run fully fine-tuned on them: far from the untrained student)."""
    from tunelab.train.run import train_run

    train, held_out = write_jsonl(folder / "qa.jsonl", QA), write_jsonl(folder / "held_out.jsonl", HELD_OUT)
    teacher_run = folder / "teacher"
    train_run(run_config(model_dir, train, held_out, teacher_run, "method=full", "train.epochs=4",
                         "train.lr=3e-3", "eval.before_after=false", "eval.generate_samples=0"))
    return train, held_out, teacher_run


def test_a_student_learns_the_distribution_of_a_teacher_tunelab_fine_tuned(tiny_model_dir, tmp_path, home):
    from tunelab.infer.load import load_for_inference
    from tunelab.train.run import train_run

    train, held_out, teacher_run = trained_teacher(tiny_model_dir, tmp_path)
    out = tmp_path / "distilled"
    config = run_config(tiny_model_dir, train, held_out, out, "objective.name=distill",
                        f"objective.teacher={teacher_run}", "method=full", "train.epochs=4", "train.lr=3e-3",
                        "train.eval_every=9")
    summary = train_run(config)

    teacher = load_for_inference(teacher_run).model.eval()
    before = held_out_divergences(load_for_inference(tiny_model_dir).model.eval(), teacher, config)
    after = held_out_divergences(load_for_inference(out).model.eval(), teacher, config)
    print(f"held-out KL(teacher || student) {before[0]:.4f} -> {after[0]:.4f}, JSD {before[1]:.4f} -> {after[1]:.4f}")
    assert before[0] > 0.3  # the teacher's fine-tuning moved it well away from the student
    assert after[0] < 0.1 * before[0] and after[1] < 0.1 * before[1]

    # What the run logged is the objective on the held-out rows (default beta 0: the forward KL measured above).
    assert summary["eval_before"]["eval_distill/divergence"] == pytest.approx(before[0], rel=1e-3)
    assert summary["eval_after"]["eval_distill/divergence"] == pytest.approx(after[0], rel=1e-3)
    assert summary["final_eval_loss"] == pytest.approx(after[0], rel=1e-3)  # alpha 0: the loss is the divergence
    assert summary["eval_after"]["eval_perplexity"] == pytest.approx(math.exp(summary["eval_after"]["eval_ce"]))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "step" in r]
    assert {"distill/divergence", "ce"} <= set(steps[0]) and steps[-1]["loss"] < steps[0]["loss"]
    assert sum("eval_loss" in r for r in records) >= 3  # step 0, every 9 steps, the end

    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "summary.json",
                 "config.yaml", "metrics.jsonl"):
        assert (out / name).is_file(), name
    saved = load_config(out / "config.yaml")
    assert saved.objective.teacher == str(teacher_run.resolve())  # the run folder is enough on its own
    assert summary["objective"] == "distill" and summary["status"] == "completed"


def test_a_teacher_with_another_vocabulary_or_a_bad_beta_exits_2(tiny_model_dir, tmp_path):
    from conftest import build_tiny_model, build_tokenizer
    from tunelab.cli import app

    other = tmp_path / "other-vocab"
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    build_tiny_model(len(tokenizer)).save_pretrained(other)
    tokenizer.save_pretrained(other)
    data = write_jsonl(tmp_path / "qa.jsonl", QA[:8])
    runner = CliRunner()
    cases = [([f"objective.teacher={other}"], "objective.teacher"),
             ([f"objective.teacher={tiny_model_dir}", "objective.beta=1.5"], "objective.beta"),
             ([f"objective.teacher={tmp_path / 'missing'}"], "objective.teacher")]
    for overrides, where in cases:
        out = tmp_path / "out"
        config = tmp_path / "c.yaml"
        config.write_text(f"model: {tiny_model_dir}\noutput_dir: {out}\ndata: {{train: {data}}}\n")
        result = runner.invoke(app, ["train", str(config), "objective.name=distill", *overrides])
        assert result.exit_code == 2, result.output
        assert where in result.output, result.output
        assert not out.exists()


@pytest.mark.integration
def test_the_recipe_distils_the_default_model_into_itself_from_zero(default_model_dir, tmp_path):
    """examples/distill.yaml on the real default model with the model itself as the teacher: LoRA starts as the
    base model, so the divergence starts at 0 (up to bf16 rounding of the teacher's weights), and the student's
    cross-entropy is SFT's."""
    from tunelab.train.run import train_run

    out = tmp_path / "distill"
    config = load_config(EXAMPLE, [f"objective.teacher={default_model_dir}", "train.max_steps=2",
                                   "train.eval_every=100", "data.eval_split=0.02", "eval.generate_samples=0",
                                   f"output_dir={out}"])
    summary = train_run(config)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in records if r.get("step") == 1)
    assert 0 <= first["distill/divergence"] < 5e-3 and first["ce"] > 0.5
    assert summary["eval_before"]["eval_loss"] < 5e-3
    assert summary["eval_before"]["eval_perplexity"] == pytest.approx(math.exp(summary["eval_before"]["eval_ce"]))
    assert summary["status"] == "completed" and (out / "adapter_model.safetensors").is_file()


def test_a_distillation_run_resumes_exactly(tiny_model_dir, tiny_tokenizer, tmp_path):
    from conftest import build_tiny_model, interrupted_at_step
    from tunelab.train.run import train_run

    teacher = tmp_path / "random-teacher"  # another random model: the untrained student is far from it
    build_tiny_model(len(tiny_tokenizer), seed=1).save_pretrained(teacher)
    tiny_tokenizer.save_pretrained(teacher)
    train, held_out = write_jsonl(tmp_path / "qa.jsonl", QA), write_jsonl(tmp_path / "held_out.jsonl", HELD_OUT)
    steps = ["objective.name=distill", f"objective.teacher={teacher}", "objective.beta=0.5", "objective.alpha=0.2",
             "train.max_steps=6", "train.save_every=2", "train.lr=3e-3", "eval.before_after=false",
             "eval.generate_samples=0"]
    straight = train_run(run_config(tiny_model_dir, train, held_out, tmp_path / "straight", *steps))
    with interrupted_at_step(4):
        train_run(run_config(tiny_model_dir, train, held_out, tmp_path / "resumed", *steps))
    resumed = train_run(run_config(tiny_model_dir, train, held_out, tmp_path / "resumed", *steps), resume=True)
    assert resumed["steps"] == 6
    assert resumed["final_train_loss"] == pytest.approx(straight["final_train_loss"], rel=1e-5)
    assert resumed["final_eval_loss"] == pytest.approx(straight["final_eval_loss"], rel=1e-5)
