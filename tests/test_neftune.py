"""NEFTune (train.neftune_alpha): noise of each sample's own scale on training forwards only, and a run that uses it."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tunelab.config import load_config
from tunelab.data.batching import collate, shared_layout
from tunelab.data.template import IGNORE_INDEX, TokenizedSample
from tunelab.errors import ConfigError
from tunelab.models.neftune import NoisyEmbeddings, sample_lengths
from tunelab.train.run import train_run


def _sample(length: int, prefix: int = 0) -> TokenizedSample:
    ids = list(range(1, prefix + 1)) + [100 + length + i for i in range(length - prefix)]
    return TokenizedSample(ids, [IGNORE_INDEX] * (prefix + 1) + ids[prefix + 1:], "t")


def test_each_position_reads_its_own_samples_length_in_every_layout():
    samples = [_sample(5), _sample(9), _sample(3)]
    padded = collate([[s] for s in samples], pad_token_id=0, packed=False)
    assert sample_lengths(padded)[:, 0].tolist() == [5, 9, 3]
    row = collate([samples], pad_token_id=0, packed=True)
    assert sample_lengths(row)[0].tolist() == [5] * 5 + [9] * 9 + [3] * 3
    shared = [_sample(12, prefix=8), _sample(10, prefix=8), _sample(14, prefix=8)]
    batch, held = shared_layout([shared])
    assert held == [12, 2, 6]  # the prefix is held once; each sample still counts it in its length
    assert sample_lengths(batch)[0].tolist() == [12] * 12 + [10] * 2 + [14] * 6


def test_noise_has_each_samples_scale_in_training_and_none_without_gradients():
    torch.manual_seed(0)
    width, alpha = 64, 5.0
    embeddings = torch.nn.Embedding(600, width)
    noisy = NoisyEmbeddings(embeddings, alpha)
    samples = [_sample(40), _sample(160)]
    batch = collate([samples], pad_token_id=0, packed=True)
    clean = torch.nn.functional.embedding(batch["input_ids"], embeddings.weight).detach()
    with noisy.lengths_of(batch):
        noise = (embeddings(batch["input_ids"]) - clean).detach()[0]
        with torch.no_grad():
            assert torch.equal(embeddings(batch["input_ids"]), clean)
        embeddings.eval()
        assert torch.equal(embeddings(batch["input_ids"]).detach(), clean)
        embeddings.train()
    for part, length in ((noise[:40], 40), (noise[40:], 160)):
        bound = alpha / math.sqrt(length * width)
        assert part.abs().max() <= bound * (1 + 1e-6)
        assert part.abs().mean() == pytest.approx(bound / 2, rel=0.05)  # U(-b, b): mean |x| = b / 2
    assert torch.equal(embeddings(batch["input_ids"]).detach(), clean)  # outside a batch: no noise
    noisy.remove()
    assert "forward" not in embeddings.__dict__


def test_a_run_with_neftune_trains_on_noisy_inputs_and_other_objectives_refuse_it(tiny_model_dir, tmp_path):
    rows = [{"question": f"what is {a} plus {b}?", "answer": f"{a + b}"} for a in range(6) for b in range(6)]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def losses(name: str, *extra: str) -> list[float]:
        out = tmp_path / name
        train_run(load_config(None, [f"model={tiny_model_dir}", f"data.train={data}", "data.eval_split=0.2",
                                     f"output_dir={out}", "train.batch_size=4", "train.max_steps=8", "train.lr=3e-3",
                                     "train.precision=fp32", "eval.generate_samples=0", "eval.show_samples=0", *extra]))
        return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
                if '"loss"' in line]

    plain, noisy = losses("plain", "train.share_prefix=false"), losses("noisy", "train.neftune_alpha=15")
    assert noisy[-1] < noisy[0]  # it trains
    # bf16 decodes on a folded copy of the model, which must not keep the noise's forward over the float32 one
    assert len(losses("bf16", "train.neftune_alpha=5", "train.precision=bf16", "eval.generate_samples=2")) == 8
    assert noisy[0] != pytest.approx(plain[0], rel=1e-6)  # the first step's loss already saw the noise
    with pytest.raises(ConfigError, match="train.neftune_alpha"):
        load_config(None, [f"model={tiny_model_dir}", f"data.train={data}", "objective.name=dpo",
                           "train.neftune_alpha=5"])
