"""`tunelab merge RUN_A RUN_B ...` on two tiny real LoRA runs trained on different tasks: the combinations do what
their definitions say (checked against the adapters' own tensors), the merged model keeps both skills, DARE is
reproducible, and runs that cannot combine are refused, naming the run, with nothing written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.config import load_config
from tunelab.eval.command import evaluate_model
from tunelab.infer.generate import GenerationOptions
from tunelab.infer.merge import merge_adapter
from tunelab.infer.merge_adapters import Combination, merge_runs
from tunelab.train.run import train_run

TASKS = {  # two skills with a fixed pattern a tiny model learns in a few steps, and a number it cannot guess
    "qa": lambda i: {"question": f"question {i}?", "answer": f"the answer is {i}"},
    "fox": lambda i: {"question": f"hello {i}", "answer": f"The quick brown fox jumps over the lazy dog {i}."},
}


def _train(model_dir, data, out, *extra: str, method: tuple[str, ...] = ("method.r=4", "method.alpha=8")) -> None:
    train_run(load_config(None, [f"model={model_dir}", f"data.train={data}", f"output_dir={out}", *method,
                                 "train.max_steps=20", "train.lr=2e-2", "train.precision=fp32",
                                 "train.batch_size=4", "eval.generate_samples=0", "eval.before_after=false",
                                 *extra]))


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("merge-adapters")
    made = {}
    for task, row in TASKS.items():
        (folder / f"{task}.jsonl").write_text("".join(json.dumps(row(i)) + "\n" for i in range(12)))
        (folder / f"{task}-heldout.jsonl").write_text("".join(json.dumps(row(i)) + "\n" for i in range(40, 48)))
        made[task] = folder / task
        _train(tiny_model_dir, folder / f"{task}.jsonl", made[task], f"data.eval={folder / f'{task}-heldout.jsonl'}")
    return made


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _adapter_deltas(run) -> dict[str, torch.Tensor]:
    """Each adapted weight's change, scale * B @ A, straight from the run's adapter file (plain LoRA)."""
    config = json.loads((run / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    tensors = load_file(run / "adapter_model.safetensors")
    deltas = {}
    for key, a in tensors.items():
        if ".lora_A." in key:
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            deltas[name] = scale * b.float() @ a.float()
    return deltas


def test_linear_with_weights_one_and_zero_is_the_first_runs_own_merge(runs, tmp_path):
    merge_runs([runs["qa"], runs["fox"]], tmp_path / "combined", Combination("linear", (1.0, 0.0)))
    merge_adapter(runs["qa"], tmp_path / "single")
    combined, single = _weights(tmp_path / "combined"), _weights(tmp_path / "single")
    assert combined.keys() == single.keys()
    for name in single:
        assert torch.equal(combined[name], single[name]), name
    record = json.loads((tmp_path / "combined" / "merge.json").read_text())
    assert record["runs"] == [str(runs["qa"].resolve()), str(runs["fox"].resolve())]
    assert record["weights"] == [1.0, 0.0] and record["combination"] == "linear" and record["density"] is None
    assert (tmp_path / "combined" / "tokenizer.json").is_file()


@pytest.mark.parametrize("kind", ["linear", "cat"])
def test_linear_adds_each_runs_weighted_change_to_the_base(runs, tiny_model_dir, tmp_path, kind):
    merge_runs([runs["qa"], runs["fox"]], tmp_path / "out", Combination(kind, (0.6, -0.3)))
    base, merged = _weights(tiny_model_dir), _weights(tmp_path / "out")
    qa, fox = _adapter_deltas(runs["qa"]), _adapter_deltas(runs["fox"])
    assert qa.keys() == fox.keys() and len(qa) == 14  # 7 linear layers in each of 2 blocks
    for name, weight in base.items():
        expected = weight + 0.6 * qa[name] - 0.3 * fox[name] if name in qa else weight
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6, msg=name)
    assert any((0.6 * qa[n]).abs().max() > 1e-3 for n in qa)  # the runs did change the weights


def test_svd_keeps_the_linear_sum_cut_to_the_adapters_rank(runs, tiny_model_dir, tmp_path):
    merge_runs([runs["qa"], runs["fox"]], tmp_path / "out", Combination("svd"))
    base, merged = _weights(tiny_model_dir), _weights(tmp_path / "out")
    qa, fox = _adapter_deltas(runs["qa"]), _adapter_deltas(runs["fox"])
    for name in qa:
        exact = 0.5 * qa[name] + 0.5 * fox[name]  # rank up to 8
        u, s, vh = torch.linalg.svd(exact, full_matrices=False)
        torch.testing.assert_close(merged[name] - base[name], (u[:, :4] * s[:4]) @ vh[:4], rtol=0, atol=1e-5)


def _heldout_loss(model, data) -> float:
    return evaluate_model(str(model), data, ["loss"], options=GenerationOptions(batch_size=8))["loss"]


@pytest.mark.parametrize("kind", ["ties", "dare_ties"])
def test_ties_and_dare_ties_keep_both_skills(runs, tiny_model_dir, tmp_path, kind):
    out = tmp_path / kind
    merge_runs([runs["qa"], runs["fox"]], out, Combination(kind, density=0.5, seed=1))
    for task in TASKS:
        heldout = runs[task].parent / f"{task}-heldout.jsonl"
        base, alone = _heldout_loss(tiny_model_dir, heldout), _heldout_loss(runs[task], heldout)
        merged = _heldout_loss(out, heldout)
        print(f"{kind} {task}: held-out loss base {base:.3f}, its run {alone:.3f}, merged {merged:.3f}")
        # the tiny model's frozen tied head bounds how far any adapter gets (about 6.0 -> 5.1): keep a quarter of it
        assert merged < base - 0.25 * (base - alone), (task, base, alone, merged)


def test_dare_with_the_same_seed_gives_the_same_model(runs, tmp_path):
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        result = CliRunner().invoke(app, ["merge", str(runs["qa"]), str(runs["fox"]), "-o", str(tmp_path / name),
                                          "--combination", "dare_linear", "--density", "0.3", "--seed", str(seed)])
        assert result.exit_code == 0, result.output
    a, b, c = (_weights(tmp_path / name) for name in "abc")
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert not all(torch.equal(a[name], c[name]) for name in a)
    record = json.loads((tmp_path / "a" / "merge.json").read_text())
    assert (record["seed"], record["density"], record["weights"]) == (7, 0.3, [0.5, 0.5])


def _refused(arguments: list[str], output, says: list[str]) -> None:
    result = CliRunner().invoke(app, ["merge", *arguments, "-o", str(output)])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())  # rich wraps long lines
    for words in says:
        assert words in text, text
    assert not output.exists()


def test_runs_that_cannot_combine_are_refused_naming_them(runs, tiny_model_dir, tmp_path):
    qa, fox = str(runs["qa"]), str(runs["fox"])
    _refused([qa, fox, "--weights", "0.2,0.3,0.5"], tmp_path / "out", ["--weights", "3 weight(s) for 2 runs"])
    _refused([qa, fox, "--weights", "0.5,x"], tmp_path / "out", ["--weights", "0.5,x"])
    _refused([qa, fox, "--combination", "ties", "--density", "1.5"], tmp_path / "out", ["--density"])
    _refused([qa, "--weights", "1"], tmp_path / "out", ["--weights", "one run"])

    other_base = tmp_path / "other-base"
    shutil.copytree(tiny_model_dir, other_base)
    moved = tmp_path / "fox-on-other-base"
    shutil.copytree(runs["fox"], moved)
    config = (moved / "config.yaml").read_text()
    (moved / "config.yaml").write_text(config.replace(str(tiny_model_dir), str(other_base)))
    _refused([qa, str(moved)], tmp_path / "out", [str(moved), "same base model"])

    full = tmp_path / "full"
    _train(tiny_model_dir, runs["qa"].parent / "qa.jsonl", full, "train.max_steps=1",
           method=("method.name=full",))
    _refused([qa, str(full)], tmp_path / "out", [str(full), "full weights, not an adapter"])


@pytest.mark.parametrize("method", ["dora", "rslora"])
def test_dora_and_rslora_runs_fold_as_their_own_merge(runs, tiny_model_dir, tmp_path, method):
    """DoRA's trained magnitudes and rsLoRA's alpha / sqrt(r) scale survive combining: weights (0, 1) give the
    second run's own merge."""
    made = []
    for task in TASKS:
        made.append(tmp_path / task)
        _train(tiny_model_dir, runs[task].parent / f"{task}.jsonl", made[-1], "train.max_steps=3",
               method=(f"method.name={method}", "method.r=4", "method.alpha=8"))
    merge_runs(made, tmp_path / "combined", Combination("linear", (0.0, 1.0)))
    merge_adapter(made[1], tmp_path / "single")
    combined, single = _weights(tmp_path / "combined"), _weights(tmp_path / "single")
    assert any(not torch.equal(single[name], weight) for name, weight in _weights(tiny_model_dir).items())
    for name in single:
        torch.testing.assert_close(combined[name], single[name], rtol=0, atol=1e-6, msg=name)
    _refused([str(made[0]), str(runs["fox"])], tmp_path / "out", [str(runs["fox"]), f"a {method} run"])


def test_prompt_tuning_runs_are_refused(runs, tiny_model_dir, tmp_path):
    prompt = tmp_path / "prompt"
    _train(tiny_model_dir, runs["qa"].parent / "qa.jsonl", prompt, "train.max_steps=1", method=("method.name=prompt",))
    _refused([str(runs["qa"]), str(prompt)], tmp_path / "out", [str(prompt), "a prompt adapter", "LoRA, DoRA"])
