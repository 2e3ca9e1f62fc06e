"""The peak-memory estimate: activation bytes measured on probe batches extrapolate to unseen batch shapes."""

from __future__ import annotations

import torch

from tunelab.data.batching import collate
from tunelab.data.template import IGNORE_INDEX, TokenizedSample
from tunelab.train.memory import estimate_peak_memory, fit_activation_model, saved_activation_bytes


def batch_of(rows: int, length: int, token: int = 5) -> dict[str, torch.Tensor]:
    samples = [TokenizedSample([token] * (length - r), [IGNORE_INDEX] * 4 + [token] * (length - r - 4), "t")
               for r in range(rows)]
    return collate([[s] for s in samples], pad_token_id=0, packed=False)


def test_saved_bytes_grow_with_tokens_and_exclude_parameters(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    cpu = torch.device("cpu")
    short = saved_activation_bytes(model, batch_of(2, 16), "fp32", cpu)
    long = saved_activation_bytes(model, batch_of(2, 64), "fp32", cpu)
    twice = saved_activation_bytes(model, batch_of(4, 64), "fp32", cpu)
    assert 0 < short < long
    # Linear in rows: the parameters autograd also saves (fp32, no cast copies) are not counted.
    assert abs(twice - 2 * long) < 0.1 * long


def test_a_probe_frees_its_activations_when_it_returns(tiny_model_dir):
    """The pack hook must not keep a saved output (log-softmax's, say) alive through its own grad_fn: a reference
    cycle only the garbage collector breaks, which held every probe's activations into training (+1.3 GB on the
    default model)."""
    import gc

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()

    def live_tensors() -> int:
        return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())

    gc.collect()
    gc.disable()
    try:
        before = live_tensors()
        saved_activation_bytes(model, batch_of(2, 32), "bf16", torch.device("cpu"))
        assert live_tensors() == before
    finally:
        gc.enable()


def test_fit_recovers_a_quadratic_footprint():
    lengths = [32, 64, 128]
    a, b, c = 1000.0, 300.0, 2.0
    measured = [a + 2 * (b * t + c * t * t) for t in lengths]
    fitted = fit_activation_model(lengths, measured, rows=2)
    assert [round(v, 6) for v in fitted] == [a, b, c]


def test_estimate_predicts_a_batch_it_did_not_probe(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    cpu = torch.device("cpu")
    estimate = estimate_peak_memory(model, [(6, 48)], packed=False, precision="fp32", device=cpu, pad_token_id=0,
                                    max_length=64, trained_fraction=0.8)
    direct = saved_activation_bytes(model, batch_of(6, 48), "fp32", cpu) / 2**20
    assert abs(estimate.activations_mb - direct) < 0.35 * direct + 0.5
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert estimate.optimizer_mb == 2 * estimate.gradients_mb == 2 * trainable * 4 / 2**20
    assert estimate.peak_mb > estimate.resident_mb > 0


def test_tunelab_bounds_onednns_kernel_cache_unless_the_user_set_it():
    import os
    import subprocess
    import sys

    import tunelab

    script = "import tunelab, os; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"
    environment = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    ours = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True, check=True)
    assert ours.stdout.strip() == tunelab.ONEDNN_PRIMITIVE_CACHE_CAPACITY
    theirs = subprocess.run([sys.executable, "-c", script], env={**environment, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "7"},
                            capture_output=True, text=True, check=True)
    assert theirs.stdout.strip() == "7"
