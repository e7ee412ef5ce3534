"""Micro-batch packing and data-parallel balance (harmony_mcore.batching) on hand-computed cases."""

from __future__ import annotations

from harmony_mcore.batching import balance, pack, padded_len, padding_share


def test_pack_cuts_the_sorted_sequences_at_the_least_cost():
    lengths = [10, 100, 30, 95, 12, 40]  # sorted: 100 (1), 95 (3), 40 (5), 30 (2), 12 (4), 10 (0); budget 200
    # a costly micro-batch: fewest micro-batches first ([100, 95] = 200, [40, 30, 12, 10] = 4 x 40 = 160)
    assert pack(lengths, 200, overhead_tokens=1000) == [[1, 3], [5, 2, 4, 0]]
    # a free micro-batch: no padding at all, one sequence each
    assert pack(lengths, 200, overhead_tokens=0) == [[1], [3], [5], [2], [4], [0]]
    # 20 tokens each: [100, 95] 220 < 195 + 40; [40, 30] + [12, 10] = 80 + 24 + 40 = 144, the least of the tail
    assert pack(lengths, 200, overhead_tokens=20) == [[1, 3], [5, 2], [4, 0]]
    assert padding_share(lengths, [[1, 3], [5, 2], [4, 0]]) == 1 - 287 / (200 + 80 + 24)


def test_pack_rounds_to_the_pad_multiple_and_isolates_oversized_sequences():
    assert padded_len(17, 16) == 32 and padded_len(32, 16) == 32
    assert sorted(map(len, pack([17, 17, 17], 64, pad_multiple=16, overhead_tokens=1000))) == [1, 2], \
        "2 x 32 = 64 fits, a third does not"
    assert pack([500, 3], 64) == [[0], [1]], "a sequence over the budget gets a micro-batch of its own"


def test_pack_splits_until_every_pipeline_stage_has_a_micro_batch():
    assert pack([5, 5, 5, 5], 1000) == [[0, 1, 2, 3]]
    assert pack([5, 5, 5, 5], 1000, min_batches=2) == [[0, 1], [2, 3]]
    assert pack([5, 5, 5, 5], 1000, min_batches=4) == [[0], [1], [2], [3]]
    assert pack([5], 1000, min_batches=4) == [[0]], "never an empty micro-batch"


def test_balance_longest_first_to_the_least_loaded_rank():
    # 90 -> r0, 80 -> r1, 40 -> r1 (80 < 90), 30 -> r0 (90 < 120), 10 -> r0 (120 = 120: lower index)
    assert balance([40, 90, 10, 80, 30], 2) == [1, 0, 0, 1, 0]
    assert balance([5, 5, 5], 3) == [0, 1, 2]


def test_token_packing_pads_far_less_than_fixed_micro_batches_on_skewed_lengths():
    import numpy as np

    rng = np.random.default_rng(0)
    lengths = [int(x) for x in np.clip(rng.lognormal(5.0, 1.0, 256), 16, 3072)]
    fixed = [list(range(i, i + 4)) for i in range(0, 256, 4)]
    assert padding_share(lengths, fixed) > 0.5
    assert padding_share(lengths, pack(lengths, 4 * 3072)) < 0.1
