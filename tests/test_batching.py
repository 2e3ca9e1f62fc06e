"""Batching: packed rows give the loss and gradients of the same samples run one by one."""

from __future__ import annotations

import torch

from conftest import build_tiny_model
from tunelab.data.batching import collate, pack_samples, plan_epoch
from tunelab.data.template import IGNORE_INDEX, TokenizedSample
from tunelab.objectives.sft import sft_loss_sum


def samples(n: int = 6) -> list[TokenizedSample]:
    rng = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        length = 5 + 3 * i
        ids = torch.randint(3, 300, (length,), generator=rng).tolist()
        labels = [IGNORE_INDEX] * (length // 2) + ids[length // 2 :]
        out.append(TokenizedSample(ids, labels, f"s{i}"))
    return out


def loss_and_grads(model, batch):
    model.zero_grad()
    loss_sum, tokens = sft_loss_sum(model, batch)
    (loss_sum / tokens).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return float(loss_sum.detach() / tokens), grads


def test_packed_batch_equals_unpacked_loss_and_gradients():
    model = build_tiny_model(vocab_size=400).float()
    data = samples()
    packed = collate([data[:3], data[3:]], pad_token_id=0, packed=True)
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == 2
    unpacked = collate([[s] for s in data], pad_token_id=0, packed=False)
    loss_p, grads_p = loss_and_grads(model, packed)
    loss_u, grads_u = loss_and_grads(model, unpacked)
    assert abs(loss_p - loss_u) < 1e-5
    for name, grad in grads_u.items():
        torch.testing.assert_close(grads_p[name], grad, atol=1e-5, rtol=1e-4)


def test_targets_never_cross_a_sample_boundary():
    data = samples(2)
    batch = collate([data], pad_token_id=0, packed=True)
    first = len(data[0].input_ids)
    assert batch["targets"][0, first - 1] == IGNORE_INDEX  # last token of sample 0 predicts nothing
    assert batch["position_ids"][0, first] == 0  # sample 1 starts its own positions


def test_pack_samples_fills_rows_without_overflow():
    lengths = [100, 60, 40, 30, 90, 10]
    rows = pack_samples(lengths, 128)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    assert len(rows) < len(lengths)


def test_epoch_plan_is_deterministic_and_differs_between_epochs():
    data = samples(20)
    a = plan_epoch(data, batch_size=4, seed=1, epoch=0).batches
    assert a == plan_epoch(data, batch_size=4, seed=1, epoch=0).batches
    assert a != plan_epoch(data, batch_size=4, seed=1, epoch=1).batches
    assert sorted(i for batch in a for row in batch for i in row) == list(range(20))


def plain_first_fit(lengths: list[int], max_length: int) -> list[list[int]]:
    """The definition: scan the rows in order, take the first with room, else open a new one."""
    rows: list[list[int]] = []
    space: list[int] = []
    for index, length in enumerate(lengths):
        length = min(length, max_length)
        for row_id, free in enumerate(space):
            if length <= free:
                rows[row_id].append(index)
                space[row_id] -= length
                break
        else:
            rows.append([index])
            space.append(max_length - length)
    return rows


def plain_plan(lengths, *, batch_size, seed, epoch, shuffle, group_by_length, packing, max_length):
    """The epoch plan written out with Python lists, as tunelab planned before plans became arrays."""
    import random

    rng = random.Random(seed * 1000 + epoch)
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    if packing:
        rows = [[order[i] for i in row] for row in plain_first_fit([lengths[i] for i in order], max_length)]
    else:
        if group_by_length:
            window = batch_size * 50
            order = [i for start in range(0, len(order), window)
                     for i in sorted(order[start : start + window], key=lambda i: lengths[i], reverse=True)]
        rows = [[i] for i in order]
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    if group_by_length and shuffle and not packing:
        rng.shuffle(batches)
    return batches


def test_first_fit_packs_exactly_like_the_plain_scan():
    import random

    rng = random.Random(0)
    for _ in range(200):
        capacity = rng.choice([8, 64, 512])
        lengths = [rng.randint(0, capacity + 20) for _ in range(rng.randint(0, 300))]
        assert pack_samples(lengths, capacity) == plain_first_fit(lengths, capacity)


def test_epoch_plan_matches_the_plain_plan_for_every_setting():
    import itertools
    import random

    rng = random.Random(1)
    lengths = [rng.randint(1, 90) for _ in range(1234)]
    data = [TokenizedSample([0] * n, [0] * n, str(i)) for i, n in enumerate(lengths)]
    for shuffle, group, packing in itertools.product([True, False], repeat=3):
        settings = dict(batch_size=7, seed=3, epoch=2, shuffle=shuffle, group_by_length=group, packing=packing,
                        max_length=128)
        assert plan_epoch(data, **settings).batches == plain_plan(lengths, **settings), settings
