"""What every objective reads from a causal LM: its hidden states, and log-probabilities of the trained tokens
through the output head, chunked.

The head runs only on positions that carry loss, so no logits are computed for prompt tokens and padding: on
a 49k vocabulary the head is a fifth of a small model's compute and most of its activation memory. Chunking
bounds the float32 upcast of the logits to one chunk at a time.
"""

from __future__ import annotations

import torch

from tunelab.data.template import IGNORE_INDEX
from tunelab.models import frozen_head
from tunelab.models.attention import segment_inputs
from tunelab.models.fused_ops import head_logprobs

HEAD_CHUNK = 1024  # trained positions per head matmul on accelerators
CPU_LOGITS_CHUNK_BYTES = 24 * 2**20
"""On CPU a chunk's float32 logits stay under glibc's largest mmap threshold (32 MB), so the allocator reuses
heap memory instead of mapping and page-faulting fresh pages for every chunk: on the default model (49k
vocabulary) 128-row chunks made a LoRA step 9% faster than 1024-row ones (256 rows, 50 MB: no gain)."""


def head_chunk_rows(vocab_size: int, device: torch.device) -> int:
    """Trained positions per head matmul."""
    if device.type != "cpu":
        return HEAD_CHUNK
    return max(16, min(HEAD_CHUNK, CPU_LOGITS_CHUNK_BYTES // (4 * vocab_size)))


def decoder_and_head(model):
    """The transformer body and the output projection of a (possibly PEFT-wrapped) causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def uses_virtual_tokens(model) -> bool:
    """Prompt and prefix tuning: PEFT's own forward must run, since it adds the learned inputs."""
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def hidden_states(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Last hidden states [B, T, H] for the batch (attention mask or packed position ids)."""
    if uses_virtual_tokens(model):
        out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                    output_hidden_states=True, logits_to_keep=1)
        # Prompt tuning prepends its virtual tokens: keep the positions of the real ones.
        return out.hidden_states[-1][:, -batch["input_ids"].shape[1] :]
    decoder, _ = decoder_and_head(model)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    return decoder(**inputs, **segment_inputs(model, batch), use_cache=False).last_hidden_state


def trained_token_logprobs(model, batch: dict[str, torch.Tensor], temperature: float = 1.0
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability of each trained target token [N] in float32, the mask [B, T] that picked them), in the
    order of the batch's positions (row by row).

    `batch["targets"]` holds the next-token labels already shifted (-100 where nothing is trained). `temperature`
    divides the logits, for the distribution completions were sampled from (GRPO)."""
    targets = batch["targets"]  # [B, T]
    hidden = hidden_states(model, batch)  # [B, T, H]
    keep = targets != IGNORE_INDEX
    selected = hidden[keep]  # [N, H]
    wanted = targets[keep]  # [N]
    _, head = decoder_and_head(model)
    return _head_logprobs(head, selected, wanted, temperature), keep


def sequence_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each sequence's trained tokens [S], their count [S]).

    `batch["sequence_ids"]` [B, T] says which of the S sequences each position belongs to, so the sums are the
    same whether sequences sit one per padded row or back to back in one padding-free row."""
    token_logps, keep = trained_token_logprobs(model, batch)  # [N]
    owners = batch["sequence_ids"][keep]  # [N]
    count = int(batch["sequence_count"])
    sums = token_logps.new_zeros(count).index_add(0, owners, token_logps)
    tokens = torch.zeros(count, dtype=torch.long, device=owners.device).index_add(
        0, owners, torch.ones_like(owners))
    return sums, tokens


def can_share_prompts(model) -> bool:
    """Whether completions can be scored after one shared pass over their prompt (see shared_prompt_logprobs):
    not with virtual tokens (PEFT's own forward must run) nor activation checkpointing (its layers drop the KV
    cache they would write)."""
    if uses_virtual_tokens(model):
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return not base.is_activation_checkpointing


def shared_prompt_logprobs(model, prompts: list[torch.Tensor], completions: list[torch.Tensor],
                           lengths: list[torch.Tensor], temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of every completion token [N] in float32, completion by completion, for groups of
    completions that share a prompt: group g is `prompts[g]` [P] followed by each row of `completions[g]`
    [G, L] (right-padded; `lengths[g]` [G] real tokens each).

    The prompt runs once per group and its KV cache, repeated G times, is what the completions attend to;
    gradients flow back through the copies into the one prompt pass. GRPO's completions are a few tokens after
    prompts of hundreds, so this does ~1/G of the work of scoring each prompt + completion row on its own, with
    the same values (tested against trained_token_logprobs)."""
    decoder, head = decoder_and_head(model)
    selected, wanted = [], []
    for prompt, rows, real in zip(prompts, completions, lengths, strict=True):
        out = decoder(input_ids=prompt[None], use_cache=True)
        last = out.last_hidden_state[:, -1]  # [1, H]: predicts each completion's first token
        group, width = rows.shape
        if width > 1:
            cache = out.past_key_values
            cache.batch_repeat_interleave(group)
            after = decoder(input_ids=rows[:, :-1], cache=cache, use_cache=True).last_hidden_state
            states = torch.cat([last.expand(group, 1, -1), after], dim=1)  # [G, L, H]
        else:
            states = last.expand(group, 1, -1)
        keep = torch.arange(width, device=rows.device)[None, :] < real[:, None]  # [G, L], row by row
        selected.append(states[keep])
        wanted.append(rows[keep])
    return _head_logprobs(head, torch.cat(selected), torch.cat(wanted), temperature)


def _head_logprobs(head, selected: torch.Tensor, wanted: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(head(h) / temperature)[target] for hidden states [N, H] and targets [N], chunked."""
    chunk = head_chunk_rows(head.weight.shape[0], selected.device)
    if frozen_head.fits(head):
        return frozen_head.frozen_head_logprobs(head, selected, wanted, temperature, chunk)
    pieces = []
    for start in range(0, selected.shape[0], chunk):
        logits = head(selected[start : start + chunk])  # [n, V]
        pieces.append(head_logprobs(head, logits, wanted[start : start + chunk], temperature))
    if not pieces:
        return selected.new_zeros(0, dtype=torch.float32)
    return torch.cat(pieces)
