"""On-policy distillation (objective.lmbda, objective.seq_kd: GKD as TRL's GKDTrainer does it): which micro-batches
are sampled, that the divergence is taken on the student's (or the teacher's) own samples, that a tiny student
learns a tiny teacher from its own samples, that a resumed run makes the same choices, and bad values."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_distill import HELD_OUT, QA, held_out_divergences, run_config, samples, trained_teacher, write_jsonl
from typer.testing import CliRunner

from tunelab.config import DistillObjective as DistillConfig
from tunelab.data.template import IGNORE_INDEX, TokenizedSample
from tunelab.infer.generate import sample_token_ids
from tunelab.objectives.distill import DistillObjective
from tunelab.objectives.distill_samples import (
    SampledReply,
    reply_sources,
    reply_start,
    sampling_seed,
    with_reply,
)


def objective_for(teacher, tokenizer, **fields) -> DistillObjective:
    config = DistillConfig(name="distill", teacher="unused", **fields)
    return DistillObjective(config, teacher, pad_token_id=tokenizer.pad_token_id, precision="fp32", batch_size=8,
                            tokenizer=tokenizer, seed=7)


def test_which_micro_batches_are_sampled_follows_lmbda_the_seed_and_the_step():
    assert reply_sources(0.0, False, 1, 5, 4) == ["data"] * 4
    assert reply_sources(0.0, True, 1, 5, 4) == ["teacher"] * 4  # seq_kd: every batch lmbda does not draw
    assert reply_sources(1.0, True, 1, 5, 4) == ["student"] * 4
    draws = [reply_sources(0.3, True, 1, step, 2) for step in range(500)]
    assert draws == [reply_sources(0.3, True, 1, step, 2) for step in range(500)]  # a function of (seed, step)
    share = sum(d.count("student") for d in draws) / 1000
    assert 0.25 < share < 0.35 and {s for d in draws for s in d} == {"student", "teacher"}
    assert draws != [reply_sources(0.3, True, 2, step, 2) for step in range(500)]  # another seed, other draws


def test_the_prompt_is_everything_before_the_last_reply_and_only_the_new_reply_is_trained():
    ids = [10, 11, 12, 13, 14, 15, 16, 17, 18]  # prompt, reply 1, turn, reply 2, trailing newline
    labels = [IGNORE_INDEX, IGNORE_INDEX, 12, 13, IGNORE_INDEX, 15, 16, 17, IGNORE_INDEX]
    sample = TokenizedSample(ids, labels, "x:1", "qa")
    assert reply_start(sample) == 5
    replaced = with_reply(sample, 5, [40, 41, 2])
    assert replaced.input_ids == [10, 11, 12, 13, 14, 40, 41, 2]
    assert replaced.labels == [IGNORE_INDEX] * 5 + [40, 41, 2]  # earlier replies are prompt now, as in TRL
    assert (replaced.where, replaced.source) == ("x:1", "qa")
    assert reply_start(TokenizedSample([1, 2], [IGNORE_INDEX] * 2, "x:2")) is None


def full_logit_divergence(student, teacher, batch, beta: float, temperature: float) -> torch.Tensor:
    """The generalized JSD summed over a batch's trained tokens, from whole logits of plain forwards, written out."""
    keep = batch["targets"] != IGNORE_INDEX
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    s = torch.log_softmax(student(**inputs).logits[keep].float() / temperature, -1)
    t = torch.log_softmax(teacher(**inputs).logits[keep].float() / temperature, -1)
    m = torch.logaddexp(s + math.log(1 - beta), t + math.log(beta))
    return (beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)).sum()


def test_lmbda_1_takes_the_divergence_on_the_students_own_samples(tiny_tokenizer):
    from conftest import build_tiny_model
    from tunelab.config import LoraMethod
    from tunelab.methods import METHODS

    student = METHODS["lora"].apply(build_tiny_model(len(tiny_tokenizer), seed=0), LoraMethod(name="lora",
                                                                                              dropout=0.0))
    with torch.no_grad():  # B away from 0, so the adapter changes what the student samples
        for name, param in student.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    teacher = build_tiny_model(len(tiny_tokenizer), seed=1).eval().requires_grad_(False)
    objective = objective_for(teacher, tiny_tokenizer, lmbda=1.0, alpha=0.3, beta=0.4, temperature=1.5,
                              max_new_tokens=12)
    data = samples(tiny_tokenizer)
    step_rows = [[[data[0]], [data[1]]], [[data[2]]]]  # two micro-batches
    rows, metrics = objective.rollout(student, step_rows, 3)
    assert metrics["distill/on_policy"] == (2.0, 2)

    prompts = [s.input_ids[: reply_start(s)] for s in data]
    want, cut = sample_token_ids(student, tiny_tokenizer, prompts, max_new_tokens=12, do_sample=True,
                                 temperature=1.5, top_p=1.0, seed=sampling_seed(7, 3, "student"))
    got = [item for rows_ in rows for row in rows_ for item in row]
    assert all(isinstance(item, SampledReply) and item.by == "student" for item in got)
    assert student.training  # back in training mode after sampling
    eos = tiny_tokenizer.eos_token_id
    for item, prompt, reply, truncated in zip(got, prompts, want, cut, strict=True):
        assert item.sample.input_ids == prompt + reply  # the prompt, then the student's draw under the step's seed
        assert item.sample.labels == [IGNORE_INDEX] * len(prompt) + reply  # loss on the sampled tokens alone
        assert (reply[-1] == eos) != truncated and (truncated == (len(reply) == 12))  # a finished one ends at eos
        assert eos not in reply[:-1]  # nothing after the end of the turn
    assert metrics["distill/sampled_length"] == (float(sum(map(len, want))), 3)
    assert metrics["distill/sampled_clipped_ratio"] == (float(sum(cut)), 3)
    assert [item.sample.input_ids for item in got] != [s.input_ids for s in data]

    for micro, replies in zip(rows, [want[:2], want[2:]], strict=True):
        batch = objective.collate(micro, tiny_tokenizer.pad_token_id, False)
        assert objective.count(batch) == sum(map(len, replies))  # trained tokens: the sampled ones
        loss, logged = objective.loss_sum(student, batch)
        with torch.no_grad():
            expected = full_logit_divergence(student, teacher, batch, 0.4, 1.5)
        assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)  # the divergence alone: no alpha
        assert "ce" not in logged and logged["distill/divergence"][0] == pytest.approx(float(expected), rel=1e-5)
        loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters() if p.requires_grad)


def test_a_prompt_tuned_student_samples_with_its_virtual_tokens(tiny_tokenizer):
    from conftest import build_tiny_model
    from tunelab.config import PromptMethod
    from tunelab.methods import METHODS
    from tunelab.models.logprobs import uses_virtual_tokens

    student = METHODS["prompt"].apply(build_tiny_model(len(tiny_tokenizer), seed=0),
                                      PromptMethod(name="prompt", num_virtual_tokens=4))
    teacher = build_tiny_model(len(tiny_tokenizer), seed=1).eval().requires_grad_(False)
    objective = objective_for(teacher, tiny_tokenizer, lmbda=1.0, max_new_tokens=8)
    data = samples(tiny_tokenizer)
    rows, _ = objective.rollout(student, [[[s] for s in data]], 0)
    prompts = [s.input_ids[: reply_start(s)] for s in data]
    replies = [row[0].sample.input_ids[len(p):] for row, p in zip(rows[0], prompts, strict=True)]
    options = {"max_new_tokens": 8, "do_sample": True, "temperature": 1.0, "top_p": 1.0,
               "seed": sampling_seed(7, 0, "student")}
    assert uses_virtual_tokens(student)  # so these draws come from decode_with_virtual_tokens
    assert replies == sample_token_ids(student, tiny_tokenizer, prompts, **options)[0]
    loss, _ = objective.loss_sum(student, objective.collate(rows[0], tiny_tokenizer.pad_token_id, False))
    assert math.isfinite(float(loss)) and float(loss) > 0


def test_seq_kd_trains_on_the_teachers_samples_with_alpha_as_sequence_level_kd(tiny_tokenizer):
    from conftest import build_tiny_model

    student = build_tiny_model(len(tiny_tokenizer), seed=0)
    teacher = build_tiny_model(len(tiny_tokenizer), seed=1).eval().requires_grad_(False)
    objective = objective_for(teacher, tiny_tokenizer, seq_kd=True, alpha=0.3, max_new_tokens=10)
    data = samples(tiny_tokenizer)
    rows, metrics = objective.rollout(student, [[[s] for s in data]], 5)
    assert metrics["distill/on_policy"] == (0.0, 1)
    prompts = [s.input_ids[: reply_start(s)] for s in data]
    want, _ = sample_token_ids(teacher, tiny_tokenizer, prompts, max_new_tokens=10, do_sample=True, temperature=1.0,
                               top_p=1.0, seed=sampling_seed(7, 5, "teacher"))
    assert [row[0].by for row in rows[0]] == ["teacher"] * 3
    assert [row[0].sample.input_ids for row in rows[0]] == [p + w for p, w in zip(prompts, want, strict=True)]
    batch = objective.collate(rows[0], tiny_tokenizer.pad_token_id, False)
    loss, logged = objective.loss_sum(student, batch)
    assert 0.3 * logged["ce"][0] + 0.7 * logged["distill/divergence"][0] == pytest.approx(float(loss), rel=1e-5)
    assert not hasattr(objective_for(teacher, tiny_tokenizer), "rollout")  # lmbda 0, no seq_kd: no sampling at all


def test_a_stand_in_micro_batch_is_not_sampled_nor_logged(tiny_tokenizer):
    # under --nproc a process without rows in a micro-batch trains a stand-in with weight 0 (loop.share_weights)
    from conftest import build_tiny_model

    student = build_tiny_model(len(tiny_tokenizer), seed=0)
    teacher = build_tiny_model(len(tiny_tokenizer), seed=1).eval().requires_grad_(False)
    objective = objective_for(teacher, tiny_tokenizer, lmbda=1.0, max_new_tokens=6)
    data = samples(tiny_tokenizer)
    rows, metrics = objective.rollout(student, [[[data[0]]], [[data[1]]]], 2, 0.0, weights=[1.0, 0.0])
    assert isinstance(rows[0][0][0], SampledReply) and rows[1][0][0] is data[1]  # the stand-in keeps its row
    assert metrics["distill/on_policy"] == (1.0, 1) and metrics["distill/sampled_length"][1] == 1
    _, alone = objective.rollout(student, [[[data[1]]]], 2, 0.0, weights=[0.0])
    assert "distill/on_policy" not in alone and "distill/sampled_length" not in alone


def step_records(folder) -> dict[int, dict]:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if "loss" in r and "step" in r}


def test_a_student_learns_the_teacher_from_its_own_samples(tiny_model_dir, tmp_path, home):
    from tunelab.infer.load import load_for_inference
    from tunelab.train.run import train_run

    train, held_out, teacher_run = trained_teacher(tiny_model_dir, tmp_path)
    out = tmp_path / "on-policy"
    config = run_config(tiny_model_dir, train, held_out, out, "objective.name=distill",
                        f"objective.teacher={teacher_run}", "objective.lmbda=1", "objective.max_new_tokens=12",
                        "method=full", "train.epochs=4", "train.lr=3e-3", "eval.before_after=false",
                        "eval.generate_samples=0")
    summary = train_run(config)
    teacher = load_for_inference(teacher_run).model.eval()
    before = held_out_divergences(load_for_inference(tiny_model_dir).model.eval(), teacher, config)
    after = held_out_divergences(load_for_inference(out).model.eval(), teacher, config)
    print(f"on-policy: held-out KL(teacher || student) {before[0]:.4f} -> {after[0]:.4f}, "
          f"JSD {before[1]:.4f} -> {after[1]:.4f}")
    assert before[0] > 0.3 and after[0] < 0.25 * before[0] and after[1] < 0.35 * before[1]
    steps = step_records(out)
    assert all(r["distill/on_policy"] == 1.0 and 1 <= r["distill/sampled_length"] <= 12 for r in steps.values())
    assert "ce" not in steps[1] and "seconds/rollout" in steps[1]
    first, last = steps[1]["distill/sampled_length"], steps[max(steps)]["distill/sampled_length"]
    rollout = sum(r["seconds/rollout"] for r in steps.values())
    update = sum(r["seconds/update"] for r in steps.values())
    print(f"sampled reply length {first:.1f} -> {last:.1f} tokens; {len(steps)} steps: sampling {rollout:.1f} s, "
          f"updates {update:.1f} s")
    assert summary["status"] == "completed"


def test_which_steps_are_on_policy_is_the_same_after_a_resume(tiny_model_dir, tiny_tokenizer, tmp_path, home):
    from conftest import build_tiny_model, interrupted_at_step
    from tunelab.train.run import train_run

    teacher = tmp_path / "random-teacher"
    build_tiny_model(len(tiny_tokenizer), seed=1).save_pretrained(teacher)
    tiny_tokenizer.save_pretrained(teacher)
    train, held_out = write_jsonl(tmp_path / "qa.jsonl", QA), write_jsonl(tmp_path / "held_out.jsonl", HELD_OUT)
    steps = ["objective.name=distill", f"objective.teacher={teacher}", "objective.lmbda=0.5",
             "objective.seq_kd=true", "objective.max_new_tokens=6", "objective.alpha=0.2", "train.grad_accum=2",
             "train.max_steps=6", "train.save_every=2", "train.lr=3e-3", "eval.before_after=false",
             "eval.generate_samples=0", "method.dropout=0.1"]
    straight = train_run(run_config(tiny_model_dir, train, held_out, tmp_path / "straight", *steps))
    with interrupted_at_step(4):
        train_run(run_config(tiny_model_dir, train, held_out, tmp_path / "resumed", *steps))
    resumed = train_run(run_config(tiny_model_dir, train, held_out, tmp_path / "resumed", *steps), resume=True)
    one, two = step_records(tmp_path / "straight"), step_records(tmp_path / "resumed")
    shares = [one[step]["distill/on_policy"] for step in sorted(one)]
    print("on-policy share per step:", shares)
    assert sorted(one) == sorted(two) == list(range(1, 7)) and len(set(shares)) > 1  # a mix of choices
    for step in one:
        for key in ("distill/on_policy", "distill/sampled_length", "loss"):
            assert two[step][key] == pytest.approx(one[step][key], rel=1e-5), (step, key)
    assert resumed["final_eval_loss"] == pytest.approx(straight["final_eval_loss"], rel=1e-5)


def test_a_bad_lmbda_or_max_new_tokens_exits_2_naming_the_key_and_a_dry_run_plans(tiny_model_dir, tmp_path, home):
    from tunelab.cli import app

    data = write_jsonl(tmp_path / "qa.jsonl", QA[:8])
    runner = CliRunner()
    out = tmp_path / "out"
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {tiny_model_dir}\noutput_dir: {out}\ndata: {{train: {data}}}\n")
    base = ["train", str(config), "objective.name=distill", f"objective.teacher={tiny_model_dir}"]
    for override, where in [("objective.lmbda=1.5", "objective.lmbda"),
                            ("objective.max_new_tokens=0", "objective.max_new_tokens"),
                            ("objective.seq_kd=maybe", "objective.seq_kd")]:
        result = runner.invoke(app, [*base, override])
        assert result.exit_code == 2, result.output
        assert where in result.output, result.output
        assert not out.exists()
    plans = []
    for overrides in (["objective.lmbda=0"], ["objective.lmbda=1", "objective.max_new_tokens=200"]):
        result = runner.invoke(app, [*base, *overrides, "--dry-run", "--json"])
        assert result.exit_code == 0, result.output
        plans.append(json.loads(result.output[result.output.index("{"):]))
    assert [plan["status"] for plan in plans] == ["dry-run"] * 2 and not out.exists()
    # the estimate plans for sampled rows: prompts plus 200 new tokens, longer than the data's rows
    activations = [plan["memory_estimate"]["activations_mb"] for plan in plans]
    print(f"estimated activations: {activations[0]} MB on the data's rows, {activations[1]} MB with samples")
    assert activations[1] > 1.5 * activations[0], activations


def test_sampling_needs_a_prompt_train_on_all_is_refused_and_a_raw_text_row_keeps_its_text(tiny_tokenizer, tmp_path):
    from conftest import build_tiny_model
    from tunelab.config import load_config
    from tunelab.errors import ConfigError

    with pytest.raises(ConfigError, match="data.train_on=all"):
        load_config(None, ["objective.name=distill", "objective.teacher=x", "objective.lmbda=0.5",
                           "data.train_on=all"])
    student = build_tiny_model(len(tiny_tokenizer), seed=0)
    teacher = build_tiny_model(len(tiny_tokenizer), seed=1).eval().requires_grad_(False)
    text = TokenizedSample([5, 6, 7, 8], [5, 6, 7, 8], "notes.txt:1")  # raw text: every token trained, no prompt
    rows, metrics = objective_for(teacher, tiny_tokenizer, lmbda=1.0, max_new_tokens=4).rollout(
        student, [[[text]]], 0)
    assert rows[0][0][0] is text and "distill/sampled_length" not in metrics  # was: decoding an empty prompt


def test_a_sharded_student_cannot_sample_its_replies():
    from tunelab.config import load_config
    from tunelab.errors import ConfigError
    from tunelab.train.distributed import Ranks
    from tunelab.train.sharding import check_several_processes

    config = load_config(None, ["objective.name=distill", "objective.teacher=x", "objective.lmbda=0.5",
                                "train.distributed=fsdp"])
    with pytest.raises(ConfigError, match="lmbda") as refused:
        check_several_processes(config, Ranks(rank=0, world_size=2))
    assert refused.value.where == "train.distributed"
    check_several_processes(config.model_copy(update={"objective": config.objective.model_copy(
        update={"lmbda": 0.0, "seq_kd": True})}), Ranks(rank=0, world_size=2))  # the teacher samples unsharded


def test_the_attention_is_chosen_for_the_sampled_lengths_not_the_datas(tmp_path, home):
    # A sliding-window model whose data rows fit the window picked the matmul path, which applies no window, for
    # sampled rows longer than it: the loss differed from sdpa's (which applies the window) by 3e-4 relative.
    from transformers import MistralConfig, MistralForCausalLM

    from conftest import build_tokenizer
    from tunelab.train.run import train_run

    tokenizer = build_tokenizer()
    for name, seed in (("student", 0), ("teacher", 1)):
        torch.manual_seed(seed)
        MistralForCausalLM(MistralConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
            pad_token_id=0, eos_token_id=2, sliding_window=40)).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    train = write_jsonl(tmp_path / "qa.jsonl", QA[:8])
    held_out = write_jsonl(tmp_path / "held.jsonl", HELD_OUT[:4])
    losses = {}
    for attention in ("auto", "sdpa"):
        out = tmp_path / attention
        train_run(run_config(tmp_path / "student", train, held_out, out, "objective.name=distill",
                             f"objective.teacher={tmp_path / 'teacher'}", "objective.lmbda=1.0",
                             "objective.max_new_tokens=40", "method.name=lora", "method.dropout=0.0",
                             "train.max_steps=1", "eval.before_after=false", "eval.generate_samples=0",
                             f"train.attention={attention}"))
        losses[attention] = step_records(out)[1]["loss"]
    assert losses["auto"] == pytest.approx(losses["sdpa"], rel=2e-5)
