"""Three fixes: a sampled reply of a prompt- or prefix-tuned model does not depend on the batch size; under
`torchrun` only rank 0 prints progress; an unreachable MLflow server fails the run at once, naming its URI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from test_distributed import one_thread_env, write_config

from tunelab.config import PrefixMethod, PromptMethod
from tunelab.data.template import ChatRenderer
from tunelab.infer.decode import RowNoise
from tunelab.infer.generate import GenerationOptions, generate_replies, sample_token_ids
from tunelab.methods.prompt_learning import apply
from tunelab.models.load import load_model
from tunelab.models.logprobs import uses_virtual_tokens
from tunelab.train.launch import free_port

VIRTUAL = [PromptMethod(name="prompt", num_virtual_tokens=4), PrefixMethod(name="prefix", num_virtual_tokens=4)]
QUESTIONS = ["What is 2+2?", "Say hi.", "Write one sentence about the sea, the wind and the moon at night.",
             "What is the capital of France?"]


@pytest.mark.parametrize("method", VIRTUAL, ids=["prompt", "prefix"])
def test_virtual_token_models_sample_the_same_replies_in_any_batch_size(tiny_model_dir, tiny_tokenizer, method):
    model = apply(load_model(tiny_model_dir, device="cpu"), method)
    assert uses_virtual_tokens(model)  # these decode by decode_with_virtual_tokens, not decode()
    renderer = ChatRenderer(tiny_tokenizer, "auto")
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
    sampled = {"max_new_tokens": 8, "do_sample": True, "temperature": 1.0, "top_p": 0.95, "seed": 3}
    alone = generate_replies(model, renderer, conversations, GenerationOptions(batch_size=1, **sampled))
    together = generate_replies(model, renderer, conversations, GenerationOptions(batch_size=4, **sampled))
    pairs = generate_replies(model, renderer, conversations, GenerationOptions(batch_size=3, **sampled))
    assert together == alone and pairs == alone
    greedy = generate_replies(model, renderer, conversations, GenerationOptions(max_new_tokens=8, batch_size=4))
    assert alone != greedy  # sampled, not argmax
    other_seed = generate_replies(model, renderer, conversations,
                                  GenerationOptions(batch_size=4, **{**sampled, "seed": 4}))
    assert other_seed != alone
    # GRPO's rollouts: the same completions whether the prompts' groups are decoded one prompt at a time or together
    prompts = [tiny_tokenizer(q)["input_ids"] for q in QUESTIONS]
    group = {"max_new_tokens": 6, "do_sample": True, "seed": 5, "repeats": 2}
    assert sample_token_ids(model, tiny_tokenizer, prompts, batch_size=1, **group) == \
        sample_token_ids(model, tiny_tokenizer, prompts, **group)


@pytest.mark.parametrize("method", VIRTUAL, ids=["prompt", "prefix"])
def test_virtual_token_replies_are_what_the_model_computes_in_a_padded_batch(tiny_model_dir, tiny_tokenizer, method):
    """Each sampled token is the Gumbel-max draw over PEFT's own forward (training's computation) of the unpadded
    prompt and the tokens before it, for prompts of different lengths decoded together: completion i's k-th draw
    is the k-th uniform vector of its own generator."""
    model = apply(load_model(tiny_model_dir, device="cpu"), method).eval()
    prompts = [tiny_tokenizer(q)["input_ids"] for q in QUESTIONS]
    completions, _ = sample_token_ids(model, tiny_tokenizer, prompts, max_new_tokens=5, do_sample=True, seed=11)
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        generator = RowNoise(11, torch.device("cpu")).generator(row)
        for k, token in enumerate(completion):
            ids = torch.tensor([prompt + completion[:k]])
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].float()
            uniform = torch.rand(logits.shape, generator=generator).clamp(min=1e-20, max=1 - 1e-7)
            assert token == (logits - torch.log(-torch.log(uniform))).argmax().item(), (row, k)


def torchrun(*arguments: str) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --nproc_per_node 2 -m tunelab.cli ARGUMENTS` (gloo on CPU)."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), "-m", "tunelab.cli", *arguments],
                          capture_output=True, text=True, env=one_thread_env(), timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_under_torchrun_only_the_main_process_prints(tiny_model_dir, tmp_path):
    config = write_config(tmp_path, tiny_model_dir, "run", 2)  # 5 steps: a progress line each
    plan = torchrun("train", str(config), "--dry-run", "--json").stdout
    assert json.loads(plan)["steps_planned"] == 5  # one JSON document, not one per process
    printed = torchrun("train", str(config)).stdout
    progress = re.findall(r"^step \d+/5 .*$", printed, flags=re.MULTILINE)
    assert [line.split(" |")[0] for line in progress] == [f"step {n}/5" for n in range(1, 6)], printed
    assert printed.count("saved to") == 1 and printed.count("data ") == 1


def test_an_unreachable_mlflow_server_stops_the_run_at_once_naming_it(tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from typer.testing import CliRunner

    from tunelab.cli import app

    for variable in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(variable, raising=False)  # MLflow's defaults: 7 retries with backoff, about 4 minutes
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    config = write_config(tmp_path, tiny_model_dir, "run", 2)
    started = time.monotonic()
    result = CliRunner().invoke(app, ["train", str(config), f"track.mlflow_uri={uri}", "track.to=[mlflow]"])
    assert time.monotonic() - started < 20
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())
    assert f"cannot use the MLflow tracking server {uri}: connection refused" in said, said
    assert not (tmp_path / "run").exists()
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # set for tunelab's own check only
