"""How the server's engine decodes a prompt- or prefix-tuned model: one request at a time, by `tunelab generate`'s
loop (infer/generate.py's stream_with_virtual_tokens; merged KV caches cannot put the virtual tokens first), its
tokens handed out through the engine's own stop strings, streaming and finish_reason."""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

from tunelab.infer.decode import Sampling as DecodeSampling
from tunelab.infer.generate import decoding_model, stream_with_virtual_tokens

if TYPE_CHECKING:
    from tunelab.infer.serve.engine import Engine
    from tunelab.infer.serve.request import Request


def decode_alone(engine: Engine, request: Request) -> bool:
    """Decode one request of a prompt- or prefix-tuned model to its end (or until it is cancelled or the engine
    closes) by stream_with_virtual_tokens, as generate_replies decodes it with the same seed; unseeded sampling
    draws a seed of its own. False when the engine closed first: the request is left for the engine to end."""
    if request.cancelled.is_set():  # its client left while it waited
        return True
    sampling = request.sampling
    seed = secrets.randbits(63) if sampling.seed is None else sampling.seed
    shaped = DecodeSampling(sampling.temperature, sampling.top_p, seed) if sampling.temperature > 0 else None
    with decoding_model(engine.model, engine.precision) as decoder:
        for token in stream_with_virtual_tokens(decoder, request.prompt_ids, max_new_tokens=sampling.max_tokens,
                                                stop_ids=sorted(engine.stop_ids), sampling=shaped):
            if engine.closed:
                return False
            if request.cancelled.is_set():
                break
            engine.steps += 1
            if engine.hand_out(request, token):
                break
    return True
