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
from tunelab.errors import ConfigError, ModelError
from tunelab.eval.command import evaluate_model
from tunelab.infer.generate import GenerationOptions
from tunelab.infer.merge import merge, merge_adapter
from tunelab.infer.merge_adapters import Combination, combine, merge_runs
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
    merge_runs([runs["qa"], runs["fox"]], out, Combination(kind, density=0.5, seed=1 if kind == "dare_ties" else None))
    for task in TASKS:
        heldout = runs[task].parent / f"{task}-heldout.jsonl"
        base, alone = _heldout_loss(tiny_model_dir, heldout), _heldout_loss(runs[task], heldout)
        merged = _heldout_loss(out, heldout)
        print(f"{kind} {task}: held-out loss base {base:.3f}, its run {alone:.3f}, merged {merged:.3f}")
        # the tiny model's frozen tied head bounds how far any adapter gets (about 6.0 -> 5.1): keep a quarter of it
        assert merged < base - 0.25 * (base - alone), (task, base, alone, merged)


def _ties_by_hand(vectors: list[list[float]], weights: tuple[float, ...], density: float, majority_sign: str):
    """mergekit's TIES (generalized_task_arithmetic.py) entry by entry: keep each run's largest `density` of changes,
    weight them, elect the sign of their sum (total) or of most of them (frequency), and divide the agreeing
    weighted changes' sum by the agreeing runs' weights (|w|: see below), 1 where none agrees."""
    kept = []
    for vector in vectors:
        largest = set(sorted(range(len(vector)), key=lambda i: -abs(vector[i]))[:int(density * len(vector))])
        kept.append([x if i in largest else 0.0 for i, x in enumerate(vector)])
    result = []
    for i in range(len(vectors[0])):
        weighted = [w * k[i] for w, k in zip(weights, kept, strict=True)]
        votes = sum(weighted) if majority_sign == "total" else sum((x > 0) - (x < 0) for x in weighted)
        sign = 1 if votes >= 0 else -1
        agree = [j for j, x in enumerate(weighted) if x * sign > 0]
        divisor = sum(abs(weights[j]) for j in agree) or 1.0
        result.append(sum(weighted[j] for j in agree) / divisor)
    return result


def test_ties_weighs_the_sign_election_and_divides_by_the_agreeing_weights():
    """As mergekit: weights (1, 0) give the first run exactly (PEFT's ties gave half of it where the runs agree),
    only the weights' ratios matter, and a negative weight subtracts its run's change."""
    a, b, c = [1.0, 2.0, -3.0, 4.0], [1.0, -2.0, -3.0, 0.5], [-5.0, 1.0, 1.5, -0.1]
    assert combine([torch.tensor(a), torch.tensor(b)], Combination("ties", (1, 0), 1.0).check(2), 4).tolist() == a
    mixed = combine([torch.tensor(a), torch.tensor(b)], Combination("ties", (0.6, 0.4), 1.0).check(2), 4)
    torch.testing.assert_close(mixed, torch.tensor([1.0, 2.0, -3.0, 2.6]))  # (.6+.4)/1, 1.2/.6, (-1.8-1.2)/1, 2.6/1
    cases = [([a, b], (1.0, 0.0)), ([a, b], (0.6, 0.4)), ([a, b], (3.0, 2.0)), ([a, b, c], (1.0, 1.0, 1.0)),
             ([a, b, c], (0.5, 0.2, 2.0)), ([a, b], (1.0, -1.0)), ([a, c], (0.0, -2.0))]
    for vectors, weights in cases:
        for density in (1.0, 0.5):
            for sign in ("total", "frequency"):
                combination = Combination("ties", weights, density, sign).check(len(vectors))
                mixed = combine([torch.tensor(v) for v in vectors], combination, 4)
                expected = torch.tensor(_ties_by_hand(vectors, weights, density, sign))
                torch.testing.assert_close(mixed, expected, msg=str((vectors, weights, density, sign)))
    # where tunelab departs from mergekit, which divides by the signed weights' sum: entry 1 is a's 2 and -b's 2,
    # whose weights sum to 0 (mergekit takes 1 and gives 4), and weights (0, -2) would give +c there, not -c
    assert combine([torch.tensor(a), torch.tensor(b)], Combination("ties", (1, -1), 1.0).check(2), 4)[1] == 2.0
    subtracted = combine([torch.tensor(a), torch.tensor(c)], Combination("ties", (0, -2), 1.0).check(2), 4)
    torch.testing.assert_close(subtracted, -torch.tensor(c))


def test_ties_with_weights_one_and_zero_is_the_first_runs_own_merge(runs, tmp_path):
    merge_adapter(runs["qa"], tmp_path / "single")
    for kind in ("ties", "dare_ties"):
        result = CliRunner().invoke(app, ["merge", str(runs["qa"]), str(runs["fox"]), "-o", str(tmp_path / kind),
                                          "--combination", kind, "--weights", "1,0", "--density", "1"])
        assert result.exit_code == 0, result.output
        combined, single = _weights(tmp_path / kind), _weights(tmp_path / "single")
        for name in single:
            assert torch.equal(combined[name], single[name]), (kind, name)
        record = json.loads((tmp_path / kind / "merge.json").read_text())
        assert record["majority_sign_method"] == "total"
        assert record["seed"] == (0 if kind == "dare_ties" else None)


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
    missing = [folder for folder in output.parents if not folder.exists()]
    result = CliRunner().invoke(app, ["merge", *arguments, "-o", str(output)])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())  # rich wraps long lines
    for words in says:
        assert words in text, text
    assert not output.exists()
    assert not any(folder.exists() for folder in missing), missing  # nor the folders above it


def test_options_a_merge_does_not_use_and_a_run_given_twice_are_refused(runs, tmp_path):
    qa, fox = str(runs["qa"]), str(runs["fox"])
    out = tmp_path / "new" / "parent" / "out"
    _refused([qa, fox, "--weights", "1,x"], out, ["--weights"])
    _refused([qa, "--majority-sign", "bogus"], out, ["--majority-sign", "one run"])
    _refused([qa, "--seed", "3"], out, ["--seed", "one run"])
    _refused([qa, fox, "--majority-sign", "frequency"], out, ["--majority-sign", "linear elects no sign"])
    _refused([qa, fox, "--combination", "dare_linear", "--majority-sign", "total"], out, ["--majority-sign"])
    _refused([qa, fox, "--combination", "ties", "--majority-sign", "bogus"], out, ["'bogus' is not total"])
    _refused([qa, fox, "--combination", "ties", "--seed", "1"], out, ["--seed", "ties drops nothing at random"])
    _refused([qa, fox, "--combination", "svd", "--seed", "1"], out, ["--seed"])
    for seed in (2**70, 2**63, -1):  # torch.manual_seed overflowed on 2**70 as a traceback, after loading the runs
        _refused([qa, fox, "--combination", "dare_ties", "--seed", str(seed)], out, ["--seed", f"{seed} is not a seed"])
    _refused([qa, qa], out, [f"{qa} is given twice"])
    again = str(runs["qa"].parent / ".." / runs["qa"].parent.name / "qa")
    _refused([qa, fox, again], out, [f"{again} is given twice (as {qa})"])


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
    _refused([str(full)], tmp_path / "new" / "parent" / "out", [str(full), "holds full weights already"])

    damaged = tmp_path / "damaged"
    shutil.copytree(runs["fox"], damaged)
    (damaged / "adapter_model.safetensors").write_bytes(b"not safetensors")
    _refused([qa, str(damaged)], tmp_path / "new" / "parent" / "out", [str(damaged), "cannot load the adapter"])
    (damaged / "adapter_model.safetensors").unlink()
    _refused([qa, str(damaged)], tmp_path / "out", [str(damaged), "adapter_model.safetensors) are missing"])


def test_the_library_merge_does_what_the_command_does(runs, tmp_path):
    """`merge` is `tunelab merge` for a Python user: one run folded as trained, several combined, options one
    run does not use refused, and a refused merge leaves no folder behind."""
    out = tmp_path / "new" / "out"
    with pytest.raises(ConfigError, match="applies when combining several runs") as refused:
        merge([runs["qa"]], out, Combination(density=0.5))
    assert refused.value.where == "--density"
    with pytest.raises(ConfigError, match="is not a seed") as refused:
        merge([runs["qa"], runs["fox"]], out, Combination("dare_linear", seed=2**64))
    assert refused.value.where == "--seed"
    damaged = tmp_path / "damaged"
    shutil.copytree(runs["fox"], damaged)
    (damaged / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelError, match="cannot load the adapter"):
        merge([runs["qa"], damaged], out)
    assert not (tmp_path / "new").exists()
    assert merge([runs["qa"]], tmp_path / "single") == tmp_path / "single"
    merge([runs["qa"], runs["fox"]], tmp_path / "combined", Combination(weights=(1.0, 0.0)))
    combined, single = _weights(tmp_path / "combined"), _weights(tmp_path / "single")
    assert combined.keys() == single.keys() and all(torch.equal(combined[n], single[n]) for n in single)
    assert json.loads((tmp_path / "combined" / "merge.json").read_text())["combination"] == "linear"


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
