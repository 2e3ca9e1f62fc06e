"""One test matrix for every method: it trains what it should, saves, reloads with identical outputs, and
merges into a plain model with equal outputs where merging makes sense."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from tunelab.config import load_config
from tunelab.errors import ConfigError
from tunelab.infer.generate import GenerationOptions, generate_replies
from tunelab.infer.load import load_for_inference
from tunelab.infer.merge import merge_adapter
from tunelab.train.run import train_run

QA = [{"question": f"what is {a} plus {b}?", "answer": f"{a + b}"} for a in range(6) for b in range(6)]
METHODS = ["full", "freeze", "lora", "dora", "rslora", "qlora", "ia3", "prompt", "prefix", "adapter"]
MERGEABLE = {"lora", "dora", "rslora", "qlora", "ia3"}
HIGH_LR = {"ia3", "prompt", "prefix", "adapter"}  # few parameters: they need a larger step to move in a few steps


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("methods") / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in QA))
    return path


@pytest.fixture(scope="module", params=METHODS)
def trained(request, tiny_model_dir, qa_file, tmp_path_factory):
    method = request.param
    out = tmp_path_factory.mktemp(method) / "run"
    lr = "3e-2" if method in HIGH_LR else "3e-3"
    config = load_config(None, [
        f"model={tiny_model_dir}", f"data.train={qa_file}", "data.eval_split=0.2", "data.max_length=64",
        f"method.name={method}", "train.epochs=2", f"train.lr={lr}", "train.batch_size=4", "train.precision=fp32",
        "eval.generate_samples=4", "eval.max_new_tokens=4", "eval.show_samples=0", f"output_dir={out}",
    ])
    return method, out, train_run(config)


def test_method_trains_only_its_parameters_and_lowers_eval_loss(trained):
    method, _, summary = trained
    assert summary["final_eval_loss"] < summary["base_eval_loss"]
    assert 0 < summary["trainable_parameters"] <= summary["total_parameters"]
    if method != "full":
        assert summary["trainable_parameters"] < summary["total_parameters"]


def test_saved_run_reloads_with_the_same_replies(trained):
    _, out, _ = trained
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    loaded = load_for_inference(out)
    replies = generate_replies(loaded.model, loaded.renderer, [s["prompt"] for s in samples],
                               GenerationOptions(max_new_tokens=4))
    assert replies == [s["fine_tuned"] for s in samples]


def test_merge_equals_unmerged_or_says_why_not(trained, tmp_path):
    method, out, _ = trained
    if method in ("full", "freeze"):
        with pytest.raises(ConfigError, match="full weights already"):
            merge_adapter(out, tmp_path / "merged")
        return
    if method == "adapter":
        with pytest.raises(ConfigError, match="non-linear"):
            merge_adapter(out, tmp_path / "merged")
        return
    if method not in MERGEABLE:
        with pytest.raises(ConfigError, match="nothing to fold into the model"):
            merge_adapter(out, tmp_path / "merged")
        return
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(merge_adapter(out, tmp_path / "merged"), dtype=torch.float32)
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    reference = load_for_inference(out).model
    if method == "qlora":
        # QLoRA trained on a 4-bit base; the merge goes into the full-precision base it was quantised from,
        # so the two differ by the quantisation error of the base, not by the adapter.
        from peft import PeftModel

        from tunelab.models.load import load_model

        base = load_model(reference.peft_config["default"].base_model_name_or_path)
        reference = PeftModel.from_pretrained(base, out)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, reference.eval()(input_ids=ids).logits,
                                   atol=1e-4, rtol=1e-4)


def test_bottleneck_adapters_start_as_the_identity_and_train_alone():
    from conftest import build_tiny_model
    from tunelab.config import AdapterMethod
    from tunelab.methods import bottleneck

    base = build_tiny_model(vocab_size=400).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        before = base(input_ids=ids).logits.clone()
    adapted = bottleneck.apply(base, AdapterMethod(name="adapter", reduction_factor=8, placement="both"))
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=ids).logits, before)
    trainable = {name for name, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("bottleneck_adapters.") for name in trainable)
    assert len(adapted.bottleneck_adapters) == 2 * len(adapted.model.layers)


DOMAIN = [f"Order {n} ships from warehouse {n % 7} within {n % 5 + 1} days by courier." for n in range(40)]


@pytest.mark.parametrize("method", METHODS)
def test_domain_text_and_a_task_mix_train_with_every_method(method, tiny_model_dir, qa_file, tmp_path):
    """Continued pretraining on raw text mixed with an instruction task: both held-out losses go down."""
    domain = tmp_path / "domain.jsonl"
    domain.write_text("".join(json.dumps({"text": line}) + "\n" for line in DOMAIN))
    lr = "3e-2" if method in HIGH_LR else "3e-3"
    mix = f"[{{path: {domain}, weight: 1}}, {{path: {qa_file}, weight: 2}}]"
    config = load_config(None, [
        f"model={tiny_model_dir}", f"data.train={mix}", "data.eval_split=0.2", "data.max_length=64",
        f"method.name={method}", "train.epochs=1", f"train.lr={lr}", "train.batch_size=4", "train.precision=fp32",
        "eval.generate_samples=0", "eval.show_samples=0", f"output_dir={tmp_path / 'run'}",
    ])
    summary = train_run(config)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = records[0], records[-1]
    assert summary["data"]["formats"] == {str(domain): "text (columns 'text')", str(qa_file): "qa (columns "
                                          "'question', 'answer')"}
    for source in ("domain", "qa"):
        assert last[f"eval_loss/{source}"] < first[f"eval_loss/{source}"], source


def test_qlora_gradients_are_unchanged_by_an_evaluation_pass(tiny_model_dir):
    """bitsandbytes repacks 4-bit weights for CPU inference on their first eval-mode pass; gradients through
    the frozen base must be the same after one as before."""
    from tunelab.config import QLoraMethod
    from tunelab.methods import lora
    from tunelab.models.load import load_model

    config = QLoraMethod(name="qlora", r=4)
    model = lora.apply(load_model(tiny_model_dir, quantization=lora.quantization(config, torch.float32)), config)
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8]])

    def first_layer_grads() -> list[torch.Tensor]:
        model.train()
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return [p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and "layers.0." in n]

    before = first_layer_grads()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    after = first_layer_grads()
    assert any(g.abs().sum() > 0 for g in before)
    for grad_before, grad_after in zip(before, after, strict=True):
        torch.testing.assert_close(grad_after, grad_before)


def test_prefix_tuning_starts_as_the_base_model_reading_the_init_text(tiny_model_dir):
    """Prefixes initialised from the model's own keys and values for a neutral instruction: before training,
    the prefixed model on X computes exactly what the base model computes on instruction + X."""
    from transformers import AutoTokenizer

    from tunelab.config import PrefixMethod
    from tunelab.methods import prompt_learning
    from tunelab.models.load import load_model

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    init = tokenizer(prompt_learning.PREFIX_INIT_TEXT, add_special_tokens=False)["input_ids"][:6]
    base = load_model(tiny_model_dir).eval()
    prefixed = prompt_learning.apply(load_model(tiny_model_dir), PrefixMethod(name="prefix", num_virtual_tokens=6))
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    with torch.no_grad():
        expected = base(input_ids=torch.tensor([init + ids[0].tolist()])).logits[:, len(init):]
        actual = prefixed.eval()(input_ids=ids).logits
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "full"])
def test_a_folded_copy_is_the_merged_model_cast_once_and_leaves_the_trained_one_alone(tiny_tokenizer, method):
    """folded_copy casts what no adapter merges into while copying and leaves training's cached casts behind:
    the same weights as a whole copy merged (merge_and_unload) then cast, bit for bit, and the trained model
    keeps its weights, adapters and training patches."""
    import copy

    from conftest import build_tiny_model
    from tunelab.config import RunConfig
    from tunelab.methods import METHODS, folded_copy
    from tunelab.methods.fused_lora import fuse_lora_layers, unfuse_lora_layers

    config = RunConfig.model_validate({"method": {"name": method}}).method
    model = METHODS[method].apply(build_tiny_model(len(tiny_tokenizer)), config)
    fused = fuse_lora_layers(model) if method in ("lora", "dora") else 0
    with torch.no_grad():  # adapters off their identity start, so merging them matters
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    ids = torch.tensor([tiny_tokenizer("what is 1 plus 2? the answer is 3")["input_ids"]])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as training leaves it: casts cached on the fused layers
        model(input_ids=ids)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    folded = folded_copy(model, torch.bfloat16)
    reference = copy.deepcopy(model)
    unfuse_lora_layers(reference)
    if hasattr(reference, "merge_and_unload"):
        reference = reference.merge_and_unload()
    expected = reference.to(torch.bfloat16).state_dict()
    got = folded.state_dict()
    assert got.keys() == expected.keys() and all(got[name].dtype == torch.bfloat16 for name in got)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[name], before[name]) for name in before)
    assert ("_tunelab_fused" in model.__dict__) == bool(fused)


def test_export_refuses_what_cannot_fold_and_serve_answers_virtual_tokens(trained, tmp_path):
    """Prompt/prefix tuning and bottleneck adapters cannot be one GGUF file, and say why; `tunelab serve` answers
    prompt and prefix tuning runs with the reply the run wrote for its own sample (tests/test_serve_virtual_tokens.py
    for the API)."""
    from tunelab.infer.gguf_export import export_gguf
    from tunelab.infer.serve import load_served

    method, out, _ = trained
    if method not in ("prompt", "prefix", "adapter"):
        pytest.skip("folds into its base: exported and served in tests/test_export.py and tests/test_serve.py")
    with pytest.raises(ConfigError, match="cannot be exported as one model file"):
        export_gguf(str(out), tmp_path / "run.gguf", "f16")
    assert not (tmp_path / "run.gguf").exists()
    if method != "adapter":  # virtual tokens: served one request at a time, by `tunelab generate`'s own loop
        from tunelab.infer.serve.request import Request, Sampling

        sample = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
        served = load_served(str(out))
        try:
            route = served.models["run"]
            ids = route.renderer.tokenizer(route.renderer.prompt(sample["prompt"]), add_special_tokens=False)
            ends, done = [], threading.Event()
            served.engine.submit(Request(ids["input_ids"], Sampling(4, temperature=0), route.adapter,
                                         on_text=lambda text: None, on_done=lambda end: (ends.append(end), done.set())))
            assert done.wait(60) and served.engine.one_at_a_time
            assert ends[0].text.strip() == sample["fine_tuned"]
        finally:
            served.engine.close()


def test_prefix_tuning_starts_a_sliding_window_model_from_real_keys_for_every_virtual_token(tmp_path):
    from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM

    from conftest import build_tokenizer
    from tunelab.methods.prompt_learning import real_token_prefix

    tokenizer = build_tokenizer()
    MistralForCausalLM(MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     sliding_window=8)).save_pretrained(tmp_path / "mistral")
    tokenizer.save_pretrained(tmp_path / "mistral")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "mistral")
    prefix = real_token_prefix(model, 20)  # more virtual tokens than the window keeps in transformers' own cache
    assert prefix.shape == (20, 2 * 2 * 2 * 16) and torch.isfinite(prefix).all()
    assert prefix[8:].abs().sum(dim=1).min() > 0
