"""The one typed config tree: dataclasses, loaded from YAML with `key.sub=value` overrides (OmegaConf).

    cfg = load_config("configs/cpu_tiny.yaml", ["parallel.tp=2", "rollout.n_per_view=8"])

Unknown keys and values of the wrong type fail with the full key named (OmegaConf); value ranges and
cross-field rules (parallel layout, batch shapes) fail in `validate` with the key named too. Megatron's own
configs are built from this tree in one place (harmony_mcore.mcore.model) and never passed around.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from harmony_mcore.checks import ConfigError, is_finite
from harmony_mcore.checks import require as _require
from harmony_mcore.labels.config import CollapseConfig, LabelConfig, RewardConfig
from harmony_mcore.rollout.prompts import REFRAME_TEMPLATE, SOLVER_TEMPLATE
from harmony_mcore.weights.arch import ArchError, ArchSpec
from harmony_mcore.weights.presets import PresetError, preset_config

DEFAULT_STRATEGIES = ["Concretize", "Generalize", "Domain Shift", "Add Noise", "Reverse",
                      "Incremental Complexity", "Focus on Constraints", "Point-of-View Shift"]


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
    attention: Literal["sdpa", "unfused"] = "sdpa"  # local spec's core attention: torch SDPA, or Megatron's own
    vocab_multiple: int = 128
    recompute: bool = False

    def hf_dir(self) -> str:
        """The HF directory of config and tokenizer files: hf_path, or the copy inside mcore_path."""
        return self.hf_path or str(Path(self.mcore_path) / "hf")


@dataclass
class ParallelConfig:
    """Megatron layout: world = tp * pp * dp policy ranks.

    micro_batching: tokens (default) packs each rank's sequences, longest first, into micro-batches of at most
    max_tokens_per_micro_batch padded tokens (0: micro_batch_size x (rollout.max_prompt_tokens +
    rollout.max_response_tokens), the fixed layout's worst case) and balances the ranks' token loads
    (harmony_mcore.batching); fixed cuts micro_batch_size sequences in arrival order."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    micro_batch_size: int = 8
    micro_batching: Literal["tokens", "fixed"] = "tokens"
    max_tokens_per_micro_batch: int = 0  # tokens layout; 0: micro_batch_size x (max prompt + response) tokens
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
    tis_cap: truncated importance sampling, each token's policy loss weighted by min(p_trainer / p_rollout, cap)
    (the standard correction for inference/training mismatch, e.g. bf16 engines; the published recipe uses 2).
    null (default): off. The mismatch itself is logged every step either way (mismatch/*).
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
    tis_cap: float | None = None


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
    """console: "all" shows every process's output (Ray forwards the actors'); "ours" shows our progress and
    results only, the actors' output going to <run_dir>/logs/<actor>.log (harmony_mcore.console)."""

    run_dir: str = "runs/default"
    console: Literal["all", "ours"] = "all"
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
    """YAML file (optional, with the files it extends: `config_layers`) + `key.sub=value` overrides ->
    validated Config. Precedence, lowest first: the defaults here, the bases (farthest first), the file, the
    overrides."""
    try:
        merged = OmegaConf.structured(Config)
        if path is not None:
            for layer, node in config_layers(path):
                try:
                    merged = OmegaConf.merge(merged, node)
                except OmegaConfBaseException as e:
                    if layer == Path(path):
                        raise
                    raise ConfigError(f"{layer} (base of {path}): {_omegaconf_message(e)}") from None
        bad = [o for o in overrides if "=" not in o or not o.partition("=")[0].strip()]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(_omegaconf_message(e)) from None
    except ValueError as e:  # raised by a section's __post_init__, already naming its key
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e)) from None
    validate(cfg)
    return cfg


BASE_KEY = "base"


def config_layers(path: str | Path) -> list[tuple[Path, DictConfig]]:
    """The YAML file and the files it extends, the farthest base first, each without its `base:` key.

    A file extends another with a top-level `base: <path>` (relative to the file's own directory). The
    result is the base with the file's keys merged over it (mappings key by key; values and lists replaced),
    exactly what one file holding the merged content would give. Bases chain; a cycle, a missing base or a
    `base:` that is not a path is refused with the files named."""
    layers: list[tuple[Path, DictConfig]] = []
    current = Path(path)
    while True:
        if not current.is_file():
            raise ConfigError(f"{current}: config file not found"
                              + (f" (the base of {layers[-1][0]})" if layers else ""))
        if any(current.resolve() == seen.resolve() for seen, _ in layers):
            loop = " -> ".join(str(p) for p in [*(seen for seen, _ in layers), current])
            raise ConfigError(f"{path}: the `{BASE_KEY}:` chain loops: {loop}")
        node = _load_yaml(current)
        base = node.pop(BASE_KEY, None)
        layers.append((current, node))
        if base is None:
            return layers[::-1]
        if not isinstance(base, str) or not base.strip():
            raise ConfigError(f"{current}: {BASE_KEY}: must be the path of the YAML config this file extends "
                              f"(relative to {current.parent}), got {base!r}")
        current = current.parent / base


def resolve_yaml(path: str | Path) -> DictConfig:
    """The file's content merged over its bases (`config_layers`), as one mapping with no `base:` key."""
    return OmegaConf.merge(*(node for _, node in config_layers(path)))


def _omegaconf_message(e: OmegaConfBaseException) -> str:
    """One line naming the key: OmegaConf's first message line (its other lines repeat types and keys)."""
    text = (e.msg or str(e)).strip().splitlines()[0]
    section = re.match(r"Merge error: (\w+) is not a subclass of (\w+)\. value: (.*)", text)
    if not e.full_key and section:  # a whole section given as a scalar ("model: 5", "parallel=3")
        name = next((f.name for f in fields(Config) if f.type == section.group(2)), "<root>")
        return f"{name}: must be a section of keys ({name}.<key>=value), got {section.group(3)}"
    if text.startswith("Incompatible value 'None'"):
        text += " (an empty `key=` override is null" + ("; write key=\"''\" for an empty text)" if "'str'" in text
                                                        else ")")
    return f"{e.full_key or '<root>'}: {text}"


def _load_yaml(path: Path):
    """The YAML file as an OmegaConf node; ConfigError naming the file (and line) when it cannot be read."""
    import yaml

    try:
        node = OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config ({err.strerror or err})") from None
    if not OmegaConf.is_dict(node):
        raise ConfigError(f"{path}: expected a mapping of config sections (model:, parallel:, ...), "
                          f"got a {type(node).__name__}")
    return node


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def validate(cfg: Config) -> None:
    """Ranges of every numeric field and the cross-field rules OmegaConf's typing cannot express, then the
    parallel layout against the model's architecture when one can be read (model.hf_path's config.json,
    model.mcore_path's harmony.json or model.preset): every refusal names its key, before anything starts.

    Files that must exist to train are `check_inputs`' business: a config is also loaded to plan a cluster
    before the weights are downloaded (`harmony-mcore plan`)."""
    _require_finite(cfg)
    m, p, r, g, o, t, e = cfg.model, cfg.parallel, cfg.rollout, cfg.grpo, cfg.optim, cfg.train, cfg.eval
    _require(bool(m.hf_path or m.mcore_path or m.preset), "model.hf_path",
             "set model.hf_path (or model.mcore_path / model.preset)")
    _require(m.vocab_multiple >= 1, "model.vocab_multiple", f"must be >= 1, got {m.vocab_multiple}")
    _require(p.max_tokens_per_micro_batch >= 0, "parallel.max_tokens_per_micro_batch", "must be >= 0 (0: automatic)")
    for key in ("tp", "pp", "dp", "micro_batch_size", "threads_per_rank"):
        _require(getattr(p, key) >= 1, f"parallel.{key}", f"must be >= 1, got {getattr(p, key)}")
    for key in ("engines", "engine_tp", "n_per_view", "max_prompt_tokens", "max_response_tokens", "sync_bucket_mb"):
        _require(getattr(r, key) >= 1, f"rollout.{key}", f"must be >= 1, got {getattr(r, key)}")
    _require(r.temperature > 0, "rollout.temperature", f"must be > 0, got {r.temperature}")
    _require(0 < r.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {r.top_p}")
    _require(r.seed >= 0, "rollout.seed", f"must be >= 0, got {r.seed}")
    _require(0 < r.gpu_memory_utilization < 1, "rollout.gpu_memory_utilization",
             f"must be in (0, 1), got {r.gpu_memory_utilization}")
    _require(len(r.strategies) > 0 and all(s.strip() for s in r.strategies), "rollout.strategies",
             "must name at least one reframing strategy, none of them blank")
    _check_prompt(r.solver_prompt, "rollout.solver_prompt")
    _check_prompt(r.reframe_prompt, "rollout.reframe_prompt")
    _require(list(cfg.labels.views) == ["solver", "reframe"], "labels.views",
             "the trainer generates the views [solver, reframe]")
    _require(0 <= g.clip_low < 1, "grpo.clip_low", f"must be in [0, 1), got {g.clip_low}")
    _require(g.clip_high >= 0, "grpo.clip_high", f"must be >= 0, got {g.clip_high}")
    _require(g.dual_clip is None or g.dual_clip > 1, "grpo.dual_clip", "must be > 1 (or null)")
    _require(g.kl_coef >= 0, "grpo.kl_coef", f"must be >= 0, got {g.kl_coef}")
    _require(g.entropy_coef >= 0, "grpo.entropy_coef", f"must be >= 0, got {g.entropy_coef}")
    _require(g.updates_per_step >= 1, "grpo.updates_per_step", "must be >= 1")
    _require(g.tis_cap is None or g.tis_cap >= 1, "grpo.tis_cap", "must be >= 1 (or null: off)")
    _require(o.lr > 0 and 0 <= o.min_lr <= o.lr, "optim.lr", "need lr > 0 and 0 <= min_lr <= lr")
    _require(0 <= o.warmup_ratio < 1, "optim.warmup_ratio", "must be in [0, 1)")
    _require(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    _require(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping)")
    for key in ("adam_beta1", "adam_beta2"):
        _require(0 <= getattr(o, key) < 1, f"optim.{key}", f"must be in [0, 1), got {getattr(o, key)}")
    _require(o.adam_eps > 0, "optim.adam_eps", f"must be > 0, got {o.adam_eps}")
    _require(t.questions_per_step >= 1, "train.questions_per_step", f"must be >= 1, got {t.questions_per_step}")
    _require(t.epochs >= 1, "train.epochs", f"must be >= 1, got {t.epochs}")
    _require(t.max_steps is None or t.max_steps >= 1, "train.max_steps", "must be >= 1 (or null)")
    _require(t.seed >= 0, "train.seed", f"must be >= 0, got {t.seed}")
    _require(t.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", "must be >= 1")
    _require(t.questions_per_step % p.dp == 0, "train.questions_per_step",
             f"{t.questions_per_step} questions do not split over parallel.dp={p.dp} ranks")
    sequences = t.questions_per_step * 2 * r.n_per_view // p.dp
    _require(sequences % g.updates_per_step == 0, "grpo.updates_per_step",
             f"{sequences} sequences per data-parallel rank do not split into {g.updates_per_step} updates")
    _require(e.k >= 1, "eval.k", f"must be >= 1, got {e.k}")
    _require(e.every >= 0, "eval.every", f"must be >= 0 (0 disables), got {e.every}")
    _require(e.temperature > 0, "eval.temperature", f"must be > 0, got {e.temperature}")
    _require(0 < e.top_p <= 1, "eval.top_p", f"must be in (0, 1], got {e.top_p}")
    _require(e.max_response_tokens >= 0, "eval.max_response_tokens",
             f"must be >= 0 (0: rollout.max_response_tokens), got {e.max_response_tokens}")
    _require(cfg.checkpoint.every >= 0, "checkpoint.every", f"must be >= 0 (0 disables), got {cfg.checkpoint.every}")
    _require(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", f"must be >= 1, got {cfg.checkpoint.keep_last}")
    _require(bool(cfg.logging.run_dir.strip()), "logging.run_dir", "must name a directory")
    _require(cfg.ray.num_cpus is None or cfg.ray.num_cpus >= 1, "ray.num_cpus", "must be >= 1 (or null)")
    from harmony_mcore.runtime import transport_for

    transport_for(r.transport, on_gpu=True, colocated=r.placement == "colocated")  # the placement rules; the
    # GPU rule waits for the resources (harmony_mcore.runtime.decide)
    found = _readable_arch(m)
    if found is not None:
        _check_layout(cfg, *found)


def _require_finite(cfg: Config) -> None:
    """Every float of every section (lists included) is a number: NaN and infinities pass no range check."""
    for section, values in asdict(cfg).items():
        for key, value in values.items():
            items = value if isinstance(value, list) else [value]
            for item in items:
                if isinstance(item, float):
                    _require(is_finite(item), f"{section}.{key}", f"must be a finite number, got {value!r}")


_PROMPT_FIELDS = {"question": "\0question\0", "strategies": "strategies", "s0": "s0", "s1": "s1", "s2": "s2"}


def _check_prompt(template: str, key: str) -> None:
    """The template renders as harmony_mcore.rollout.prompts does, and holds the question."""
    try:
        text = template.format(**_PROMPT_FIELDS)
    except KeyError as err:
        raise ConfigError(f"{key}: unknown placeholder {{{err.args[0]}}}; placeholders are {{question}} "
                          "{strategies} {s0} {s1} {s2}, and literal braces are written {{ }}") from None
    except (IndexError, ValueError, AttributeError) as err:
        raise ConfigError(f"{key}: not a valid template ({type(err).__name__}: {err}); placeholders are "
                          "{question} {strategies} {s0} {s1} {s2}, and literal braces are written {{ }}") from None
    _require(_PROMPT_FIELDS["question"] in text, key, "must contain the {question} placeholder")


def _json_object(path: Path, key: str) -> dict:
    """A JSON file that must hold an object (config.json, harmony.json), errors naming the key."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{key}: cannot read {path}: {err}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{key}: {path} is not valid JSON ({err.msg} at line {err.lineno})") from None
    _require(isinstance(value, dict), key, f"{path} must hold a JSON object")
    return value


def _readable_arch(m: ModelConfig) -> tuple[ArchSpec, str] | None:
    """(ArchSpec, where it was read) from model.hf_path/config.json, else model.mcore_path/harmony.json, else
    model.preset; None when none of them can be read (yet). A file that exists but does not describe a
    supported model is an error naming its key, and so is an unknown preset."""
    try:
        preset = preset_config(m.preset) if m.preset else None
    except PresetError as err:
        raise ConfigError(str(err)) from None
    hf_config = Path(m.hf_path) / "config.json"
    if m.hf_path and hf_config.is_file():
        try:
            return ArchSpec.from_hf_config(_json_object(hf_config, "model.hf_path")), str(hf_config)
        except (ArchError, ValueError, TypeError) as err:
            if isinstance(err, ConfigError):
                raise
            raise ConfigError(f"model.hf_path: {hf_config}: {err}") from None
    meta = Path(m.mcore_path) / "harmony.json"
    if m.mcore_path and meta.is_file():
        arch = _json_object(meta, "model.mcore_path").get("arch")
        try:
            return ArchSpec.from_dict(arch), str(meta)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"model.mcore_path: {meta}: no valid 'arch' ({err})") from None
    if preset is not None:
        return ArchSpec.from_hf_config(preset), f"preset {m.preset}"
    return None


def model_arch(m: ModelConfig) -> ArchSpec:
    """The model's ArchSpec (see `_readable_arch`); ConfigError naming model.hf_path when none is readable."""
    found = _readable_arch(m)
    if found is None:
        raise ConfigError("model.hf_path: no architecture to read: set model.hf_path to a Hugging Face directory "
                          "(config.json), model.mcore_path to a converted checkpoint (harmony.json) or model.preset")
    return found[0]


def _check_layout(cfg: Config, arch: ArchSpec, source: str) -> None:
    """The parallel layout and sequence length against the architecture (the rules `harmony-mcore plan` checks
    per model; the cluster's size is the planner's business), all problems in one message."""
    from harmony_mcore.mcore.parallel import layout_errors

    p, r = cfg.parallel, cfg.rollout
    padded = arch.padded_vocab_size(cfg.model.vocab_multiple)
    problems = layout_errors(arch, tp=p.tp, pp=p.pp, padded_vocab=padded)
    engine_sizes = ((arch.num_heads, "attention heads"), (arch.num_query_groups, "query groups (KV heads)"),
                    (padded, "padded vocab rows"))
    problems += [f"rollout.engine_tp={r.engine_tp} does not divide the {n} {what}"
                 for n, what in engine_sizes if n % r.engine_tp]
    response = max(r.max_response_tokens, cfg.eval.max_response_tokens)  # the engines' max_model_len
    if r.max_prompt_tokens + response > arch.max_position_embeddings:
        which = "rollout" if response == r.max_response_tokens else "eval"
        longest = r.max_prompt_tokens + response
        problems.append(f"rollout.max_prompt_tokens + {which}.max_response_tokens = {longest} exceeds the "
                        f"model's {arch.max_position_embeddings} positions")
    if problems:
        key = re.match(r"[a-z_]+\.[a-z_]+", problems[0])
        raise ConfigError(f"{key.group(0) if key else 'parallel.tp'}: impossible layout for {source}: "
                          + "; ".join(problems))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def check_inputs(cfg: Config) -> None:
    """Everything a training run reads is there, each refusal naming its key: the weights (model.hf_path, a
    Hugging Face directory with config, tokenizer and weights matching the config; or model.mcore_path, a complete
    converted checkpoint that fits the model), the question files (train.data, eval.data) and a usable
    logging.run_dir. Reads file headers only: the trainer runs it before it writes or starts anything."""
    m = cfg.model
    _require(bool(m.hf_path or m.mcore_path), "model.hf_path",
             "training needs weights: set model.hf_path (a Hugging Face directory) or model.mcore_path (a converted "
             "checkpoint); model.preset only names an architecture")
    if m.hf_path:
        _check_hf_dir(Path(m.hf_path), "model.hf_path", weights=not m.mcore_path)
    if m.mcore_path:
        _check_mcore_dir(m)
    _require(bool(cfg.train.data), "train.data", "set the question file to train on")
    for key, value in (("train.data", cfg.train.data), ("eval.data", cfg.eval.data)):
        _require(not value or Path(value).exists(), key, f"{value} does not exist")
    _check_run_dir(Path(cfg.logging.run_dir))


def _check_hf_dir(path: Path, key: str, *, weights: bool) -> None:
    """An HF directory with config.json and tokenizer files; with `weights`, safetensors matching the config."""
    _require(path.exists(), key, f"{path} does not exist")
    _require(path.is_dir(), key, f"{path} is not a directory")
    _require((path / "config.json").is_file(), key, f"{path} has no config.json (not a Hugging Face model directory)")
    _require(any((path / name).is_file() for name in TOKENIZER_FILES), key,
             f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    if weights:
        from safetensors import SafetensorError

        from harmony_mcore.weights.validate import validate_hf_dir

        try:
            validate_hf_dir(path)
        except (ValueError, KeyError, OSError, SafetensorError) as err:  # ArchError, WeightMismatchError, JSON
            raise ConfigError(f"{key}: {err}" if str(path) in str(err) else f"{key}: {path}: {err}") from None


def _check_mcore_dir(m: ModelConfig) -> None:
    """A complete harmony_mcore checkpoint whose architecture and padded vocab fit the model."""
    from harmony_mcore.fsutil import PARTIAL_SUFFIX
    from harmony_mcore.mcore.checkpoint import CheckpointError, check_compatible, read_meta

    path, key = Path(m.mcore_path), "model.mcore_path"
    _require(not path.name.endswith(PARTIAL_SUFFIX), key,
             f"{path} is an unfinished write ({PARTIAL_SUFFIX}); use a complete checkpoint")
    _require(path.exists(), key, f"{path} does not exist")
    _require(path.is_dir(), key, f"{path} is not a directory")
    try:
        meta = read_meta(path)
    except CheckpointError as err:
        raise ConfigError(f"{key}: {err}") from None
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{key}: {path / 'harmony.json'} is damaged ({type(err).__name__}: {err})") from None
    _require((path / "dist").is_dir(), key, f"{path} is an incomplete checkpoint (no dist/ directory)")
    if not m.hf_path:
        _check_hf_dir(path / "hf", key, weights=False)
    arch = model_arch(m)
    try:
        check_compatible(meta, arch, arch.padded_vocab_size(m.vocab_multiple), str(path))
    except CheckpointError as err:
        raise ConfigError(f"{key}: {err} (model.vocab_multiple={m.vocab_multiple})") from None


def _check_run_dir(path: Path) -> None:
    _require(not path.exists() or path.is_dir(), "logging.run_dir", f"{path} exists and is not a directory")
    existing = next(p for p in (path, *path.parents) if p.exists())
    _require(existing.is_dir() and os.access(existing, os.W_OK | os.X_OK), "logging.run_dir",
             f"cannot create or write {path} ({existing} is not a writable directory)")
