"""Driver side of rollouts: turn questions into dual-view requests and spread one batch over the engines."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import ray

from harmony_mcore.records import VIEWS, Question, Rollout
from harmony_mcore.rollout.engine import GenerationRequest, SamplingSettings
from harmony_mcore.rollout.prompts import PromptTemplates


def request_seed(run_seed: int, step: int, qid: str, view: str) -> int:
    """Stable per-request sampling seed (independent of batch composition, process and Python hash seed)."""
    digest = hashlib.sha256(f"{run_seed}/{step}/{qid}/{view}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def build_requests(questions: Sequence[Question], templates: PromptTemplates, tokenizer, strategies: list[str],
                   *, n: int, run_seed: int, step: int, max_prompt_tokens: int,
                   views: Sequence[str] = VIEWS) -> list[GenerationRequest]:
    """One request per (question, view), n samples each. A prompt over max_prompt_tokens is an error naming the
    question (truncating it would change the question)."""
    requests = []
    for q in questions:
        for view in views:
            ids = tuple(templates.token_ids(tokenizer, q, view, strategies))
            if len(ids) > max_prompt_tokens:
                raise ValueError(f"question {q.qid!r}: the {view} prompt has {len(ids)} tokens > "
                                 f"rollout.max_prompt_tokens={max_prompt_tokens}")
            requests.append(GenerationRequest(q.qid, view, ids, n, request_seed(run_seed, step, q.qid, view)))
    return requests


def generate(engines: list, requests: list[GenerationRequest], sampling: SamplingSettings) -> list[Rollout]:
    """Split the requests over the engines by question (both views of a question on one engine, one batched call
    per engine, all engines in parallel); rollouts come back in request order."""
    qids = sorted({r.qid for r in requests})
    engine_of = {qid: i % len(engines) for i, qid in enumerate(qids)}
    shares: list[list[GenerationRequest]] = [[] for _ in engines]
    for r in requests:
        shares[engine_of[r.qid]].append(r)
    futures = [e.generate.remote(share, sampling) for e, share in zip(engines, shares) if share]
    by_key: dict[tuple[str, str], list[Rollout]] = {}
    for batch in ray.get(futures):
        for rollout in batch:
            by_key.setdefault((rollout.qid, rollout.view), []).append(rollout)
    return [x for r in requests for x in by_key[(r.qid, r.view)]]
