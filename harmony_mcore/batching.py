"""How a step's sequences are laid out for training: questions over data-parallel ranks, sequences into
micro-batches. Plain functions of sequence lengths.

RL responses range from a few tokens to thousands, and a micro-batch is padded to its longest sequence. Cutting
the batch into micro-batches of a fixed number of sequences in arrival order pads most of it away; here:

* `balance`: each question (with all its samples of both views, as the labeller needs) goes to a data-parallel
  rank so that the ranks' token loads are as even as the greedy longest-first rule makes them (each question, in
  decreasing token count, to the least loaded rank; ties to the lower index).
* `pack`: a rank's sequences, sorted longest first, cut into contiguous micro-batches whose padded size
  (count x longest, rounded up to `pad_multiple`) stays within `max_tokens`, choosing the cuts that minimise

      sum over micro-batches (overhead_tokens + count x longest)

  by dynamic programming over the sorted list (exact; O(n x max_tokens / shortest) steps): padding is paid
  against a fixed cost per micro-batch (kernel launches, weight reads; `overhead_tokens`, in tokens). A sequence
  longer than `max_tokens` gets a micro-batch of its own. A pipeline needs `min_batches` micro-batches (one per
  stage) to keep its stages busy, so the fullest micro-batch is split until there are that many (or one sequence
  each).

Grouping never changes the loss: it is a token mean over the whole global batch (each micro-batch returns its sum
and token count; Megatron divides by the global count).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

OVERHEAD_TOKENS = 256  # a micro-batch's fixed cost, in tokens of work (pack)


def padded_len(length: int, pad_multiple: int) -> int:
    return -(-length // pad_multiple) * pad_multiple


def balance(loads: Sequence[int], ranks: int) -> list[int]:
    """The rank of each item (e.g. a question's total tokens), longest-processing-time first."""
    totals = [0] * ranks
    rank_of = [0] * len(loads)
    for i in sorted(range(len(loads)), key=lambda i: (-loads[i], i)):
        r = min(range(ranks), key=lambda k: (totals[k], k))
        rank_of[i] = r
        totals[r] += loads[i]
    return rank_of


def pack(lengths: Sequence[int], max_tokens: int, *, pad_multiple: int = 1, min_batches: int = 1,
         overhead_tokens: int = OVERHEAD_TOKENS) -> list[list[int]]:
    """Indices of the sequences of each micro-batch (longest first within and across micro-batches)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    n = len(order)
    padded = np.array([padded_len(lengths[i], pad_multiple) for i in order], dtype=np.int64)  # (n,) descending
    best = np.full(n + 1, np.inf)  # best[j]: least cost of cutting the first j sorted sequences
    best[0] = 0.0
    cut = np.zeros(n + 1, dtype=np.int64)  # cut[j]: where the last micro-batch of that best cutting starts
    for i in range(n):  # a micro-batch starting at sorted position i, of k = 1 .. fit sequences
        fit = max(1, min(n - i, max_tokens // int(padded[i])))
        cost = best[i] + overhead_tokens + np.arange(1, fit + 1) * padded[i]
        ends = slice(i + 1, i + fit + 1)
        better = cost < best[ends]
        best[ends] = np.where(better, cost, best[ends])
        cut[ends] = np.where(better, i, cut[ends])
    batches: list[list[int]] = []
    j = n
    while j > 0:
        batches.append([order[k] for k in range(cut[j], j)])
        j = int(cut[j])
    batches.reverse()
    while len(batches) < min_batches:
        fullest = max(range(len(batches)), key=lambda b: (len(batches[b]), -b))
        if len(batches[fullest]) < 2:
            break
        half = len(batches[fullest]) // 2
        batches[fullest:fullest + 1] = [batches[fullest][:half], batches[fullest][half:]]
    return batches


def padding_share(lengths: Sequence[int], batches: Sequence[Sequence[int]], pad_multiple: int = 1) -> float:
    """Share of the padded token slots that hold padding."""
    slots = sum(len(b) * padded_len(max(lengths[i] for i in b), pad_multiple) for b in batches if b)
    return 1.0 - sum(lengths) / slots if slots else 0.0
