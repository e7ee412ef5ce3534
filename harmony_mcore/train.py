"""The Self-Harmony test-time RL loop. Read `train` top to bottom: one step is

    questions -> dual-view rollout (vLLM) -> distributed pseudo-labels + rewards + advantages -> log-probs
    -> GRPO update (Megatron) -> weight sync -> metrics, periodic eval, periodic checkpoint

Everything heavy runs in Ray actors (harmony_mcore.cluster); this process only orchestrates. How a run stops on
SIGTERM, SIGINT or SIGUSR1: `Stop`; which checkpoint `--resume` continues from: `resume_point`.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from harmony_mcore.batching import balance
from harmony_mcore.cluster import Cluster, WeightSyncFailed, launch, restart_engine, start_ray, stop_ray
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
from harmony_mcore.run_dir import Intact, RunDir

EXIT_REQUEUE = 75  # stopped by a signal, its progress checkpointed: the launcher requeues, --resume continues
EXIT_INTERRUPTED = 130  # a second SIGINT: stopped at once, without a checkpoint (128 + SIGINT, as shells report)
MAX_ROLLBACKS = 3


class ResumeError(RuntimeError):
    """A checkpoint that this config may not continue from."""


class StopRun(RuntimeError):
    """The run stopped on purpose (collapse with action=stop)."""


def train(cfg: Config, resume: bool = False) -> int:
    stop = Stop()  # first: from here on SIGTERM, SIGINT and SIGUSR1 end the run the documented way (see Stop)
    run, cluster, log = RunDir(Path(cfg.logging.run_dir)), None, None
    try:
        # Every input is checked before anything is written or started: a refused run leaves run_dir untouched.
        check_inputs(cfg)
        questions = load_questions(cfg.train.data)
        evals = load_questions(cfg.eval.data) if cfg.eval.data else [q for q in questions if q.ground_truth]
        by_id = {q.qid: q for q in questions}
        steps_per_epoch, total = steps_in(len(questions), cfg)
        arch = model_arch(cfg.model)
        found = resume_point(run) if resume else Intact(None)  # its files checked against their manifest
        start, state = check_resumable(cfg, found.checkpoint)
        run = RunDir.create(cfg.logging.run_dir)
        for damaged in found.damaged:
            run.set_aside(damaged, "damaged")
        save_config(cfg, run.root / "config.yaml")
        cluster = start_cluster(cfg, arch, total)
        sampler = Sampler(cfg, cluster)
        detector = CollapseDetector(cfg.collapse)
        if state["collapse"]:
            detector.load_state_dict(state["collapse"])
        log = MetricsLogger(cfg, run, total, start)
        if start:
            cluster.on_all("load_checkpoint", str(found.checkpoint[1]))
        sampler.sync(start)
        if start == 0 and cfg.eval.at_start and cfg.eval.every and evals:
            log.log(0, sampler.evaluate(evals))
        stop.training()  # from here a stop signal lets the step finish, then checkpoints
        step = start
        while step < total:
            t0 = time.perf_counter()
            batch = step_questions(questions, step, steps_per_epoch, cfg.train.seed)
            rollouts = sampler.rollout(batch, step, state["rollbacks"])
            t1 = time.perf_counter()
            shards = shard_by_dp(batch, rollouts, cfg.parallel.dp)
            reports = cluster.first_per_dp(cluster.on_dp("score", shards, by_id, step))
            t2 = time.perf_counter()
            cluster.sleep_engines()  # colocated GPUs: the engines' memory goes to Megatron until the sync
            logprob = cluster.on_all("compute_logprobs")
            update = merge_rank_metrics(cluster.on_all("train_step"))
            t3 = time.perf_counter()
            sync = sampler.sync(step + 1)  # wakes the engines; one that dies meanwhile is restarted
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
                row |= sampler.evaluate(evals)
            verdict = detector.update(step - 1, row)
            if stop() or cfg.checkpoint.every and (step % cfg.checkpoint.every == 0 or step == total):
                save(cluster, run, cfg, step, detector, state)
            log.log(step, row)
            log.progress(step - 1, row)
            if stop():
                return stop.after_step(step, run.checkpoint(step))
            if verdict and verdict.action == "stop":
                raise StopRun(f"collapse at step {verdict.step}: {'; '.join(verdict.reasons)}")
            if verdict and verdict.action == "rollback":
                step = rollback(sampler, run, verdict.step - cfg.collapse.patience + 1, detector, state)
        if cfg.checkpoint.export_hf:
            cluster.on_all("export_hf", str(run.final_hf))
        return 0
    except KeyboardInterrupt:  # raised by Stop's handler: a signal during start-up, or a second SIGINT
        if not stop():
            raise
        return stop.interrupted(run)
    finally:
        stop.cleaning_up()  # further signals are only acknowledged
        if log is not None:
            log.close()
        if cluster is not None:
            cluster.shutdown(grace_s=5.0 if stop.at_once else 30.0)
        if log is not None and run.metrics.exists():
            write_report(run.metrics, run.report, title=str(run.root))
        stop.restore()


def start_cluster(cfg: Config, arch, total: int) -> Cluster:
    """Ray and every actor (harmony_mcore.cluster). A start that fails or is interrupted stops what it started:
    no Cluster exists yet to shut down."""
    try:
        start_ray(cfg)
        return launch(cfg, arch, total, engine_config_dir(cfg))
    except BaseException:
        stop_ray()
        raise


class Stop:
    """How the signals a cluster sends end a run (docs/launch.md, "Stopping a run"):

    * SIGUSR1 (SLURM's warning before the time limit), SIGTERM (preemption, `scancel`, `kill`) or SIGINT (Ctrl-C)
      while training: the step finishes, a checkpoint is written, `train` returns EXIT_REQUEUE.
    * the same during start-up (inputs, Ray, the actors and engines, loading the checkpoint, the first sync and
      evaluation): no step has run, so there is nothing new to save; start-up is abandoned at once and
      `train` returns EXIT_REQUEUE, the newest checkpoint being what a resume continues from.
    * SIGINT once a stop was asked for (a second Ctrl-C): at once, without a checkpoint, EXIT_INTERRUPTED.
    Every way out stops every process of the run first (`train`'s finally: Cluster.shutdown, or stop_ray during
    start-up); signals that arrive while it cleans up are only acknowledged.

    Abandoning raises KeyboardInterrupt from the handler: Ray's blocking calls let only that exception through
    (as a new one), so `train` asks this object what it meant. The handlers are installed first thing in `train`
    (start_ray keeps them in force over Ray's own) and the previous ones are put back at its end."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal: str | None = None  # name of the first stop signal
        self.at_once = False
        self._phase = "starting"  # -> "training" -> "stopping" (abandoning or cleaning up)
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def __call__(self) -> bool:
        """Whether a stop was asked for."""
        return self.signal is not None

    def training(self) -> None:
        self._phase = "training"

    def cleaning_up(self) -> None:
        self._phase = "stopping"

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, _frame) -> None:
        name = signal.Signals(signum).name
        if self._phase == "stopping":
            _say(f"{name}: already stopping, cleaning up")
        elif self.signal is None:
            self.signal = name
            if self._phase == "starting":
                self._phase = "stopping"
                _say(f"{name} during start-up: stopping now (no step has run: nothing to checkpoint)")
                raise KeyboardInterrupt
            _say(f"{name}: finishing this step, then a checkpoint and exit {EXIT_REQUEUE} (Ctrl-C again stops at "
                 "once, without a checkpoint)")
        elif signum == signal.SIGINT:
            self.at_once, self._phase = True, "stopping"
            _say("SIGINT again: stopping at once, without a checkpoint")
            raise KeyboardInterrupt
        else:
            _say(f"{name}: already stopping after this step")

    def after_step(self, step: int, checkpoint: Path) -> int:
        self._phase = "stopping"
        print(f"stopped by {self.signal} after step {step}: checkpoint {checkpoint}; continue with --resume",
              file=sys.stderr)
        return EXIT_REQUEUE

    def interrupted(self, run: RunDir) -> int:
        """train's exit status once the handler abandoned the run."""
        newest = run.latest_checkpoint()
        where = f"the newest checkpoint is {newest[1]}" if newest else "no checkpoint exists yet"
        if self.at_once:
            print(f"stopped at once (a second SIGINT): the step in progress is lost; {where}", file=sys.stderr)
            return EXIT_INTERRUPTED
        print(f"stopped by {self.signal} during start-up; {where}; continue with --resume", file=sys.stderr)
        return EXIT_REQUEUE


def _say(message: str) -> None:
    """One line on stderr from a signal handler (os.write: print could re-enter a write that it interrupted)."""
    os.write(2, f"[harmony-mcore] {message}\n".encode())


class Sampler:
    """Sampling from the engines: tokenizer, prompt templates, sampling settings, engine recovery; both views for
    training (`rollout`) and the solver view for evaluation (`evaluate`)."""

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
            self.sync(step)
            return generate(self.cluster.engines, requests, self.sampling)

    def sync(self, version: int) -> dict[str, float]:
        """Push the policy's weights into every engine, which then serve `version`. An engine that dies or hangs
        during the sync is restarted and the sync runs again, as in `rollout`; a sync that fails otherwise (or
        leaves a rank stuck in the transfer) stops the run with WeightSyncFailed saying why."""
        try:
            return self.cluster.sync_weights(version, self.cfg.rollout.sync_bucket_mb)
        except WeightSyncFailed as failure:
            if not (failure.recoverable and failure.dead):
                raise
            print(f"warning: {failure}; restarting engine(s) {failure.dead} and syncing again", file=sys.stderr)
            for i in failure.dead:
                restart_engine(self.cluster, self.cfg, i)
            return self.cluster.sync_weights(version, self.cfg.rollout.sync_bucket_mb)

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
    """Each question, with all of its samples of both views, to one DP rank, balancing the ranks' tokens
    (harmony_mcore.batching.balance)."""
    tokens: dict[str, int] = defaultdict(int)
    for r in rollouts:
        tokens[r.qid] += len(r.prompt_ids) + len(r.response_ids)
    rank_of = dict(zip((q.qid for q in batch), balance([tokens[q.qid] for q in batch], dp)))
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


def resume_point(run: RunDir) -> Intact:
    """`--resume`: the newest intact checkpoint, its files checked against its manifest before anything starts
    (RunDir.newest_intact). Each damaged newer one is named in a warning (and set aside as step_N.damaged once the
    run starts); one without a manifest is accepted with a warning. ResumeError, naming every damaged file, when
    checkpoints exist but none is intact."""
    found = run.newest_intact()
    if found.checkpoint is None and found.damaged:
        files = "; ".join(f"{path.name}/{problem}" for path, problems in found.damaged.items() for problem in problems)
        raise ResumeError(f"--resume: no intact checkpoint in {run.root / 'checkpoints'}: {files} (restore the files, "
                          "or start afresh in another run directory)")
    warn_damaged(found)
    if found.checkpoint is None:
        print(f"--resume: no checkpoint in {run.root / 'checkpoints'}; starting fresh from step 0", file=sys.stderr)
    elif not found.verified:
        print(f"warning: {found.checkpoint[1]} has no manifest (written before checkpoints carried one): its files "
              "cannot be verified; resuming from it", file=sys.stderr)
    return found


def warn_damaged(found: Intact) -> None:
    for path, problems in found.damaged.items():
        instead = f"; using {found.checkpoint[1].name} instead" if found.checkpoint else ""
        print(f"warning: skipping damaged checkpoint {path}: {'; '.join(problems)}{instead}", file=sys.stderr)


def check_resumable(cfg: Config, checkpoint: tuple[int, Path] | None) -> tuple[int, dict]:
    """(first step, driver state) of a run that continues from `checkpoint` (None: a fresh run)."""
    if checkpoint is None:
        return 0, {"collapse": None, "rollbacks": 0}
    step, path = checkpoint
    extra = read_meta(path).extra
    if extra.get("model_hash") != cfg.model_hash():
        raise ResumeError(f"{path}: the model section of the config changed since this checkpoint was written "
                          "(model.*); refusing to resume")
    return step, {"collapse": extra.get("collapse"), "rollbacks": extra.get("rollbacks", 0)}


def rollback(sampler: Sampler, run: RunDir, good_before: int, detector: CollapseDetector, state: dict) -> int:
    """Restore the newest intact checkpoint written before the collapse signals began (damaged ones skipped, as
    on resume); sample differently from there. The checkpoints after it are set aside (step_N.rolled_back), so
    that the replayed steps can write theirs."""
    found = run.newest_intact(at_most=good_before) if state["rollbacks"] < MAX_ROLLBACKS else Intact(None)
    warn_damaged(found)
    if found.checkpoint is None:
        raise StopRun(f"collapse with no good checkpoint to roll back to (rollbacks so far: {state['rollbacks']})")
    target_step, target = found.checkpoint
    for step, path in run.checkpoints():
        if step > target_step:
            run.set_aside(path, "damaged" if path in found.damaged else "rolled_back")
    sampler.cluster.on_all("load_checkpoint", str(target))
    sampler.sync(target_step)
    detector.reset()
    state["rollbacks"] += 1
    return target_step


def dump_rollouts(path, rollouts: list[Rollout], questions: dict[str, Question]) -> None:
    """Append a step's rollouts in the `harmony-mcore label` input format."""
    write_samples(path, [AnswerSample.from_rollout(r, questions[r.qid]) for r in rollouts], append=True)
