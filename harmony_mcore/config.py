"""The one typed config tree: dataclasses, loaded from YAML with `key.sub=value` overrides (OmegaConf).

    cfg = load_config("configs/cpu_tiny.yaml", ["parallel.tp=2", "rollout.n_per_view=8"])

Unknown keys and values of the wrong type fail with the full key named (OmegaConf); value ranges and
cross-field rules (parallel layout, batch shapes) fail in `validate` with the key named too. Megatron's own
configs are built from this tree in one place (harmony_mcore.mcore.model) and never passed around.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from harmony_mcore.labels.config import CollapseConfig, LabelConfig, RewardConfig
from harmony_mcore.rollout.prompts import REFRAME_TEMPLATE, SOLVER_TEMPLATE

DEFAULT_STRATEGIES = ["Concretize", "Generalize", "Domain Shift", "Add Noise", "Reverse",
                      "Incremental Complexity", "Focus on Constraints", "Point-of-View Shift"]


class ConfigError(ValueError):
    """A config key or value that cannot be used, naming the key."""


@dataclass
class ModelConfig:
    """The policy. `hf_path` gives the architecture, tokenizer and starting weights (HF directory);
    `mcore_path` optionally starts from a converted checkpoint instead (tools/convert_hf_to_mcore.py);
    `preset` names a built-in architecture (harmony_mcore.weights.presets) for planning without weights."""

    hf_path: str = ""
    mcore_path: str = ""
    preset: str = ""
    dtype: Literal["float32", "bfloat16"] = "float32"
    layer_spec: Literal["auto", "te", "local"] = "auto"
    vocab_multiple: int = 128
    recompute: bool = False


@dataclass
class ParallelConfig:
    """Megatron layout: world = tp * pp * dp policy ranks. micro_batch_size sequences per pipeline micro-batch."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    micro_batch_size: int = 8
    threads_per_rank: int = 1  # torch threads of each CPU rank (several ranks share few cores)


@dataclass
class RolloutConfig:
    """vLLM engines and the dual-view sampling.

    n_per_view samples of the solver view and n_per_view of the reframe view per question, in one generate call.
    prompt_style: "base" plain-text prompts, "chat" the tokenizer's chat template (instruct models).
    gpu_memory_utilization: on CPU, the fraction of RAM vLLM reserves for its KV cache (keep it small).
    placement: colocated (engines share the policy's GPUs, sleeping while Megatron trains) or disaggregated.
    transport: weight sync path; auto = CUDA IPC when colocated on GPU, NCCL when disaggregated, shared memory on
    CPU.
    cpu_weight_layout (vLLM-CPU engines only): packed is vLLM's own oneDNN-prepacked weights, the fastest CPU
    generation, but every sync goes through vLLM's layer-wise reload and repack (~12x a memory copy of the
    weights); plain keeps each weight as loaded (torch GEMMs, ~1.1-1.3x slower generation here) in /dev/shm,
    where the trainer writes new weights directly (~1.8x a memory copy). Plain pays off when the sync dominates
    the step (large model, short rollouts). Figures: tools/bench_weight_sync.py, tools/bench_rollout.py.
    """

    engines: int = 1
    engine_tp: int = 1
    placement: Literal["colocated", "disaggregated"] = "colocated"
    n_per_view: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_prompt_tokens: int = 256
    max_response_tokens: int = 128
    seed: int = 0
    prompt_style: Literal["base", "chat"] = "base"
    solver_prompt: str = SOLVER_TEMPLATE  # placeholders: {question}
    reframe_prompt: str = REFRAME_TEMPLATE  # placeholders: {question} {strategies} {s0} {s1} {s2}
    strategies: list[str] = field(default_factory=lambda: list(DEFAULT_STRATEGIES))
    gpu_memory_utilization: float = 0.1
    enforce_eager: bool = True
    sync_bucket_mb: int = 64
    transport: Literal["auto", "shm", "cuda_ipc", "nccl"] = "auto"
    sleep_while_training: bool = True
    cpu_weight_layout: Literal["packed", "plain"] = "packed"


@dataclass
class GRPOConfig:
    """GRPO objective (formulas in harmony_mcore.rl.grpo).

    loss_agg: token_mean (every token of the batch weighs the same) or seq_mean (mean per sequence, then over
    sequences). clip_low/clip_high: ratio clipped to [1 - clip_low, 1 + clip_high] (clip-higher when larger).
    dual_clip: c > 1 bounds the loss of negative-advantage tokens at c * |A| (None: off).
    kl_coef / kl_type: KL-to-reference loss term, k1 (log-ratio) or k3 (low-variance, the published setting).
    adv_norm: grpo (mean and std per (question, view) group) or dr_grpo (mean only).
    dynamic_sampling: drop (question, view) groups whose rewards are all equal (zero advantage).
    updates_per_step: optimizer steps per training step (the rollout batch is split into that many mini-batches).
    """

    loss_agg: Literal["token_mean", "seq_mean"] = "token_mean"
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    kl_coef: float = 0.005
    kl_type: Literal["k1", "k3"] = "k3"
    entropy_coef: float = 0.0
    adv_norm: Literal["grpo", "dr_grpo"] = "grpo"
    dynamic_sampling: bool = False
    updates_per_step: int = 1


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay to min_lr (Megatron's OptimizerParamScheduler)."""

    lr: float = 3e-6
    min_lr: float = 0.0
    warmup_ratio: float = 0.1
    decay: Literal["cosine", "constant"] = "cosine"
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8


@dataclass
class TrainConfig:
    """The test-time loop over `data` (questions; ground truth, if any, used only for metrics)."""

    data: str = ""
    questions_per_step: int = 8
    epochs: int = 1
    max_steps: int | None = None
    seed: int = 1234
    max_nonfinite_steps: int = 3  # consecutive skipped steps (NaN/inf loss or gradients) before stopping


@dataclass
class EvalConfig:
    """Periodic evaluation: avg@k / maj@k / pass@k on `data` (default: the training questions' ground truth)."""

    data: str = ""
    every: int = 10
    k: int = 16
    temperature: float = 0.8
    top_p: float = 0.95
    max_response_tokens: int = 0  # 0: rollout.max_response_tokens
    at_start: bool = True


@dataclass
class CheckpointConfig:
    every: int = 10
    keep_last: int = 2
    export_hf: bool = True  # write an HF directory of the final policy


@dataclass
class LoggingConfig:
    run_dir: str = "runs/default"
    tensorboard: bool = True
    wandb_project: str = ""
    progress: bool = True
    dump_rollouts: bool = False  # rollouts.jsonl in the `harmony-mcore label` input format


@dataclass
class RayConfig:
    """address "" starts a local cluster; "auto" joins the one launch/ started. num_cpus overrides the logical CPU
    count of a local cluster (Ray counts physical cores; TP x PP ranks + engines need more slots than 2 cores)."""

    address: str = ""
    num_cpus: int | None = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    labels: LabelConfig = field(default_factory=LabelConfig)
    rewards: RewardConfig = field(default_factory=RewardConfig)
    collapse: CollapseConfig = field(default_factory=CollapseConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    def model_hash(self) -> str:
        """Identity of what the checkpoints hold: changing it between runs refuses a resume."""
        return hashlib.sha256(json.dumps(asdict(self.model), sort_keys=True).encode()).hexdigest()[:16]


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """YAML file (optional) + `key.sub=value` overrides -> validated Config."""
    try:
        merged = OmegaConf.structured(Config)
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"{path}: config file not found")
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{e.full_key or '<root>'}: {e.msg}") from None
    except ValueError as e:  # raised by a section's __post_init__, already naming its key
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e)) from None
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def validate(cfg: Config) -> None:
    """Ranges and cross-field rules OmegaConf's typing cannot express."""
    m, p, r, g, o, t, e = cfg.model, cfg.parallel, cfg.rollout, cfg.grpo, cfg.optim, cfg.train, cfg.eval
    _require(bool(m.hf_path or m.mcore_path or m.preset), "model.hf_path",
             "set model.hf_path (or model.mcore_path / model.preset)")
    _require(m.vocab_multiple >= 1, "model.vocab_multiple", "must be >= 1")
    for key in ("tp", "pp", "dp", "micro_batch_size", "threads_per_rank"):
        _require(getattr(p, key) >= 1, f"parallel.{key}", "must be >= 1")
    for key in ("engines", "engine_tp", "n_per_view", "max_prompt_tokens", "max_response_tokens", "sync_bucket_mb"):
        _require(getattr(r, key) >= 1, f"rollout.{key}", "must be >= 1")
    _require(r.temperature > 0, "rollout.temperature", "must be > 0")
    _require(0 < r.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
    _require(0 < r.gpu_memory_utilization < 1, "rollout.gpu_memory_utilization", "must be in (0, 1)")
    _require(len(r.strategies) > 0, "rollout.strategies", "must name at least one reframing strategy")
    _require(list(cfg.labels.views) == ["solver", "reframe"], "labels.views",
             "the trainer generates the views [solver, reframe]")
    _require(0 <= g.clip_low < 1 and g.clip_high >= 0, "grpo.clip_low", "clip_low in [0, 1), clip_high >= 0")
    _require(g.dual_clip is None or g.dual_clip > 1, "grpo.dual_clip", "must be > 1 (or null)")
    _require(g.kl_coef >= 0 and g.entropy_coef >= 0, "grpo.kl_coef", "kl_coef and entropy_coef must be >= 0")
    _require(g.updates_per_step >= 1, "grpo.updates_per_step", "must be >= 1")
    _require(o.lr > 0 and 0 <= o.min_lr <= o.lr, "optim.lr", "need lr > 0 and 0 <= min_lr <= lr")
    _require(0 <= o.warmup_ratio < 1, "optim.warmup_ratio", "must be in [0, 1)")
    _require(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping)")
    _require(t.questions_per_step >= 1 and t.epochs >= 1, "train.questions_per_step",
             "questions_per_step and epochs must be >= 1")
    _require(t.max_steps is None or t.max_steps >= 1, "train.max_steps", "must be >= 1 (or null)")
    _require(t.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", "must be >= 1")
    _require(t.questions_per_step % p.dp == 0, "train.questions_per_step",
             f"{t.questions_per_step} questions do not split over parallel.dp={p.dp} ranks")
    sequences = t.questions_per_step * 2 * r.n_per_view // p.dp
    _require(sequences % g.updates_per_step == 0, "grpo.updates_per_step",
             f"{sequences} sequences per data-parallel rank do not split into {g.updates_per_step} updates")
    _require(e.k >= 1 and e.every >= 0, "eval.k", "k >= 1 and every >= 0 (0 disables)")
    _require(cfg.checkpoint.every >= 0 and cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last",
             "every >= 0 (0 disables) and keep_last >= 1")
    if r.placement == "colocated" and r.transport == "nccl":
        raise ConfigError("rollout.transport: nccl broadcast is for disaggregated engines; colocated uses cuda_ipc")
