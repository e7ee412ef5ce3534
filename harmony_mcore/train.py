"""The Self-Harmony test-time RL loop. Read `train` top to bottom: one step is

    questions -> dual-view rollout (vLLM) -> distributed pseudo-labels + rewards + advantages -> log-probs
    -> GRPO update (Megatron) -> weight sync -> metrics, periodic eval, periodic checkpoint

Everything heavy runs in Ray actors (harmony_mcore.cluster); this process only orchestrates.
"""

from __future__ import annotations

import signal
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from harmony_mcore.cluster import Cluster, launch, restart_engine, start_ray
from harmony_mcore.config import Config, ConfigError, check_inputs, model_arch, save_config
from harmony_mcore.data import load_questions
from harmony_mcore.evaluate import score_rollouts
from harmony_mcore.labels.batch import AnswerSample
from harmony_mcore.labels.diagnostics import CollapseDetector
from harmony_mcore.labels.io import write_samples
from harmony_mcore.mcore.checkpoint import read_meta
from harmony_mcore.metrics import MetricsLogger
from harmony_mcore.records import REFRAME, SOLVER, Question, Rollout
from harmony_mcore.report import write_report
from harmony_mcore.rollout.dispatch import build_requests, generate
from harmony_mcore.rollout.engine import SamplingSettings
from harmony_mcore.rollout.prompts import PromptTemplates
from harmony_mcore.run_dir import RunDir

EXIT_REQUEUE = 75  # checkpointed on SIGUSR1/SIGTERM: the launcher requeues the job and it resumes
MAX_ROLLBACKS = 3


class ResumeError(RuntimeError):
    """A checkpoint that this config may not continue from."""


class StopRun(RuntimeError):
    """The run stopped on purpose (collapse with action=stop)."""


def train(cfg: Config, resume: bool = False) -> int:
    preempted = catch_preemption()  # first: a signal during start-up must not kill the run uncheckpointed
    # Every input is checked before anything is written or started: a refused run leaves run_dir untouched.
    check_inputs(cfg)
    questions = load_questions(cfg.train.data)
    evals = load_questions(cfg.eval.data) if cfg.eval.data else [q for q in questions if q.ground_truth]
    by_id = {q.qid: q for q in questions}
    steps_per_epoch, total = steps_in(len(questions), cfg)
    arch = model_arch(cfg.model)
    run = RunDir(Path(cfg.logging.run_dir))
    start, state = 0, {"collapse": None, "rollbacks": 0}
    if resume and run.latest_checkpoint():
        start, state = check_resumable(cfg, *run.latest_checkpoint())
    elif resume:
        print(f"--resume: no checkpoint in {run.root / 'checkpoints'}; starting fresh from step 0", file=sys.stderr)
    run = RunDir.create(cfg.logging.run_dir)
    save_config(cfg, run.root / "config.yaml")
    start_ray(cfg)
    cluster = launch(cfg, arch, total, engine_config_dir(cfg))
    ctx = StepContext(cfg, cluster)
    detector = CollapseDetector(cfg.collapse)
    if state["collapse"]:
        detector.load_state_dict(state["collapse"])
    log = MetricsLogger(cfg, run, total, start)
    try:
        if start:
            cluster.on_all("load_checkpoint", str(run.latest_checkpoint()[1]))
        cluster.sync_weights(start, cfg.rollout.sync_bucket_mb)
        if start == 0 and cfg.eval.at_start and cfg.eval.every and evals:
            log.log(0, ctx.evaluate(evals))
        step = start
        while step < total:
            t0 = time.perf_counter()
            batch = step_questions(questions, step, steps_per_epoch, cfg.train.seed)
            rollouts = ctx.rollout(batch, step, state["rollbacks"])
            t1 = time.perf_counter()
            shards = shard_by_dp(batch, rollouts, cfg.parallel.dp)
            reports = cluster.first_per_dp(cluster.on_dp("score", shards, by_id, step))
            t2 = time.perf_counter()
            cluster.sleep_engines()  # colocated GPUs: the engines' memory goes to Megatron until the sync
            logprob = cluster.on_all("compute_logprobs")
            update = merge_rank_metrics(cluster.on_all("train_step"))
            t3 = time.perf_counter()
            sync = cluster.sync_weights(step + 1, cfg.rollout.sync_bucket_mb)  # wakes the engines
            t4 = time.perf_counter()
            row = step_metrics(shards, reports, update) | sync | {
                "epoch": step // steps_per_epoch, "weight_version": step + 1, "perf/gen_s": t1 - t0,
                "perf/labels_s": t2 - t1, "perf/logprob_s": max(m["logprob_s"] for m in logprob),
                "perf/update_s": update["update_s"], "perf/sync_s": t4 - t3, "perf/step_s": t4 - t0,
                "perf/gen_tokens_per_s": sum(len(r.response_ids) for r in rollouts) / max(t1 - t0, 1e-9)}
            if cfg.logging.dump_rollouts:
                dump_rollouts(run.rollouts, rollouts, by_id)
            step += 1
            if cfg.eval.every and evals and (step % cfg.eval.every == 0 or step == total):
                row |= ctx.evaluate(evals)
            verdict = detector.update(step - 1, row)
            if cfg.checkpoint.every and (step % cfg.checkpoint.every == 0 or step == total or preempted()):
                save(cluster, run, cfg, step, detector, state)
            log.log(step, row)
            log.progress(step - 1, row)
            if preempted():
                return EXIT_REQUEUE
            if verdict and verdict.action == "stop":
                raise StopRun(f"collapse at step {verdict.step}: {'; '.join(verdict.reasons)}")
            if verdict and verdict.action == "rollback":
                step = rollback(cluster, run, cfg, verdict.step - cfg.collapse.patience + 1, detector, state)
        if cfg.checkpoint.export_hf:
            cluster.on_all("export_hf", str(run.final_hf))
        return 0
    finally:
        log.close()
        cluster.shutdown()
        if run.metrics.exists():
            write_report(run.metrics, run.report, title=str(run.root))


class StepContext:
    """What the loop needs to sample: tokenizer, prompt templates, sampling settings, engine recovery."""

    def __init__(self, cfg: Config, cluster: Cluster):
        from transformers import AutoTokenizer

        self.cfg, self.cluster = cfg, cluster
        self.tokenizer = AutoTokenizer.from_pretrained(engine_config_dir(cfg))
        r = cfg.rollout
        self.templates = PromptTemplates(r.solver_prompt, r.reframe_prompt, r.prompt_style)
        self.sampling = SamplingSettings(r.temperature, r.top_p, r.max_response_tokens)

    def rollout(self, batch: list[Question], step: int, rollbacks: int) -> list[Rollout]:
        """Both views, n samples each, in one batched call per engine. A dead engine is restarted, given the
        current weights, and the batch is sampled again."""
        r = self.cfg.rollout
        requests = build_requests(batch, self.templates, self.tokenizer, r.strategies, n=r.n_per_view,
                                  run_seed=r.seed + 1000 * rollbacks, step=step, max_prompt_tokens=r.max_prompt_tokens)
        try:
            return generate(self.cluster.engines, requests, self.sampling)
        except Exception:
            dead = self.cluster.dead_engines()
            if not dead:
                raise
            for i in dead:
                restart_engine(self.cluster, self.cfg, i)
            self.cluster.sync_weights(step, r.sync_bucket_mb)
            return generate(self.cluster.engines, requests, self.sampling)

    def evaluate(self, questions: list[Question]) -> dict[str, float]:
        """avg@k / maj@k / pass@k of the solver view under the evaluation sampling settings."""
        e = self.cfg.eval
        requests = build_requests(questions, self.templates, self.tokenizer, self.cfg.rollout.strategies, n=e.k,
                                  run_seed=self.cfg.rollout.seed, step=-1, views=(SOLVER,),
                                  max_prompt_tokens=self.cfg.rollout.max_prompt_tokens)
        sampling = SamplingSettings(e.temperature, e.top_p, e.max_response_tokens or self.cfg.rollout.max_response_tokens)
        return score_rollouts(questions, generate(self.cluster.engines, requests, sampling), self.cfg.labels)


def engine_config_dir(cfg: Config) -> str:
    """Config and tokenizer the engines start from (weights come from the policy's first sync)."""
    return cfg.model.hf_dir()


def steps_in(num_questions: int, cfg: Config) -> tuple[int, int]:
    """(steps per epoch, total steps). Each epoch drops its last partial batch (a different one every epoch)."""
    per_epoch = num_questions // cfg.train.questions_per_step
    if per_epoch == 0:
        raise ConfigError(f"train.questions_per_step: train.data has {num_questions} questions, fewer than "
                          f"train.questions_per_step={cfg.train.questions_per_step}")
    total = per_epoch * cfg.train.epochs
    return per_epoch, min(total, cfg.train.max_steps) if cfg.train.max_steps else total


def step_questions(questions: list[Question], step: int, per_epoch: int, seed: int) -> list[Question]:
    """The questions of a step: a fixed permutation per epoch (seed, epoch), cut into consecutive batches."""
    epoch, index = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(len(questions))
    size = len(questions) // per_epoch
    return [questions[i] for i in order[index * size:(index + 1) * size]]


def shard_by_dp(batch: list[Question], rollouts: list[Rollout], dp: int) -> list[list[Rollout]]:
    """Question i of the step goes to DP rank i % dp, with all of its samples of both views."""
    rank_of = {q.qid: i % dp for i, q in enumerate(batch)}
    shards: list[list[Rollout]] = [[] for _ in range(dp)]
    for r in rollouts:
        shards[rank_of[r.qid]].append(r)
    return shards


def merge_rank_metrics(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Loss metrics exist on last-stage ranks (identical across TP); timings are maxed over ranks."""
    merged: dict[str, float] = {}
    for metrics in per_rank:
        for k, v in metrics.items():
            merged[k] = max(merged.get(k, v), v) if k.endswith("_s") else v
    return merged


def step_metrics(shards: list[list[Rollout]], reports: list, update: dict[str, float]) -> dict[str, float]:
    """Rewards, response lengths and label diagnostics of a step. reports: one ScoreReport per DP rank, its
    rewards in the order of that rank's shard."""
    rewards: dict[str, list[float]] = defaultdict(list)
    lengths: dict[str, list[int]] = defaultdict(list)
    for shard, report in zip(shards, reports):
        for rollout, reward in zip(shard, report.rewards):
            rewards[rollout.view].append(reward)
            lengths[rollout.view].append(len(rollout.response_ids))
    rollouts = [r for shard in shards for r in shard]
    row = dict(reports[0].diagnostics)  # global over the batch: identical on every rank
    row["reward/mean"] = float(np.mean([x for v in rewards.values() for x in v]))
    for view in (SOLVER, REFRAME):
        row[f"reward/{view}"] = float(np.mean(rewards[view])) if rewards[view] else 0.0
        row[f"response_len/{view}"] = float(np.mean(lengths[view])) if lengths[view] else 0.0
    row["truncated_share"] = float(np.mean([r.truncated for r in rollouts]))
    row["trained_sequences"] = float(sum(r.kept for r in reports))
    return row | update


def save(cluster: Cluster, run: RunDir, cfg: Config, step: int, detector: CollapseDetector, state: dict) -> None:
    extra = {"step": step, "model_hash": cfg.model_hash(), "collapse": detector.state_dict(),
             "rollbacks": state["rollbacks"]}
    cluster.on_all("save_checkpoint", str(run.checkpoint(step)), extra)
    run.prune(cfg.checkpoint.keep_last)


def check_resumable(cfg: Config, step: int, path) -> tuple[int, dict]:
    extra = read_meta(path).extra
    if extra.get("model_hash") != cfg.model_hash():
        raise ResumeError(f"{path}: the model section of the config changed since this checkpoint was written "
                          "(model.*); refusing to resume")
    return step, {"collapse": extra.get("collapse"), "rollbacks": extra.get("rollbacks", 0)}


def rollback(cluster: Cluster, run: RunDir, cfg: Config, good_before: int, detector: CollapseDetector,
             state: dict) -> int:
    """Restore the newest checkpoint written before the collapse signals began; sample differently from there."""
    target = run.latest_checkpoint(at_most=good_before)
    if target is None or state["rollbacks"] >= MAX_ROLLBACKS:
        raise StopRun(f"collapse with no good checkpoint to roll back to (rollbacks so far: {state['rollbacks']})")
    cluster.on_all("load_checkpoint", str(target[1]))
    cluster.sync_weights(target[0], cfg.rollout.sync_bucket_mb)
    detector.reset()
    state["rollbacks"] += 1
    return target[0]


def catch_preemption():
    """SIGUSR1 (SLURM's pre-timeout signal) or SIGTERM: finish the step, checkpoint, exit EXIT_REQUEUE."""
    flag = {"set": False}

    def handler(signum, _frame):
        flag["set"] = True

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, handler)
    return lambda: flag["set"]


def dump_rollouts(path, rollouts: list[Rollout], questions: dict[str, Question]) -> None:
    """Append a step's rollouts in the `harmony-mcore label` input format."""
    write_samples(path, [AnswerSample.from_rollout(r, questions[r.qid]) for r in rollouts], append=True)
