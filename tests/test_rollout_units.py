"""Prompts, requests and shared-memory buckets, without an engine."""

from __future__ import annotations

import pytest
import torch

from harmony_mcore.records import REFRAME, REFRAME_SECTIONS, SOLVER, Question
from harmony_mcore.rollout.dispatch import build_requests, request_seed
from harmony_mcore.rollout.prompts import PromptTemplates
from harmony_mcore.sync.shm import ShmBucketWriter, read_bucket
from harmony_mcore.weights.hf_dir import buckets

Q = Question("q1", "Tom has 7 apples. He eats 2. How many are left?", "math", "5", "test")


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen3):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_qwen3)


def test_views_render_with_sections_and_strategies():
    t = PromptTemplates()
    solver, reframe = t.render(Q, SOLVER, ["Concretize"]), t.render(Q, REFRAME, ["Concretize", "Reverse"])
    assert Q.text in solver and "\\boxed{answer}" in solver
    assert all(f"{s}:" in reframe for s in REFRAME_SECTIONS) and "Concretize, Reverse" in reframe
    choice = Question("c", "Pick one. A) 1 B) 2", "choice", "B")
    assert "letter" in t.render(choice, SOLVER, [])
    with pytest.raises(ValueError, match="view 'other'"):
        t.render(Q, "other", [])


def test_chat_style_uses_the_chat_template(tokenizer):
    base = PromptTemplates().token_ids(tokenizer, Q, SOLVER, [])
    chat = PromptTemplates(style="chat").token_ids(tokenizer, Q, SOLVER, [])
    assert tokenizer.decode(chat).startswith("<|im_start|>user\n") and len(chat) > len(base)


def test_requests_cover_both_views_with_stable_seeds(tokenizer):
    reqs = build_requests([Q], PromptTemplates(), tokenizer, ["Concretize"], n=4, run_seed=0, step=3,
                          max_prompt_tokens=1000)
    assert [(r.qid, r.view, r.n) for r in reqs] == [("q1", SOLVER, 4), ("q1", REFRAME, 4)]
    assert reqs[0].seed == request_seed(0, 3, "q1", SOLVER) != reqs[1].seed
    with pytest.raises(ValueError, match="question 'q1': the solver prompt has"):
        build_requests([Q], PromptTemplates(), tokenizer, [], n=1, run_seed=0, step=0, max_prompt_tokens=5)


def test_shm_bucket_round_trip_is_bit_exact():
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(4, 6).t(), "c": torch.randn(7).to(torch.bfloat16),
               "d": torch.arange(5, dtype=torch.int64)}
    writer = ShmBucketWriter("test")
    try:
        for _ in range(3):  # slots are reused
            got = dict(read_bucket(writer.write(tensors)))
            assert got.keys() == tensors.keys()
            for k, v in tensors.items():
                assert got[k].dtype == v.dtype and torch.equal(got[k], v)
    finally:
        writer.close()


def test_buckets_never_split_a_group():
    t = torch.zeros(256)  # 1 KiB
    groups = [[("q", t), ("k", t), ("v", t)], [("o", t)], [("gate", t), ("up", t)]]
    out = list(buckets(groups, max_bytes=2048))
    assert [list(b) for b in out] == [["q", "k", "v"], ["o"], ["gate", "up"]]
