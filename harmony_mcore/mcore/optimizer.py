"""The optimizer path of a policy rank, one and the same on every machine: Megatron DDP with the
DistributedOptimizer (fp32 master weights and Adam moments sharded over the data-parallel ranks, gradients
reduce-scattered; fp32 or bf16 model parameters) and Megatron's OptimizerParamScheduler (linear warm-up, then
cosine or constant).

On CPU the same classes run over gloo (torch 2.13's gloo has reduce-scatter and all-gather-into-tensor); only the
CUDA assumptions are patched (harmony_mcore.mcore.cpu_compat). What CI tests is what GPU users run, except the Adam
kernel: TransformerEngine's or apex's FusedAdam where installed, torch.optim.AdamW elsewhere (every CPU machine,
and GPU machines without TE and apex).

Megatron-Core 0.16.1's DistributedOptimizer mishandles torch.optim.AdamW's per-parameter `step` when loading a
checkpoint (FusedAdam keeps its step in the param groups, so TE/apex users never meet these). `prepare_load` and
`finish_load` correct exactly those three places; each is a no-op with FusedAdam:
1. `sharded_state_dict(is_loading=True)` calls `state_dict()`, which asserts one `step` over an optimizer state
   that a fresh optimizer does not have yet: the state is allocated first, at step 0 (overwritten by the load).
2. The `fully_reshardable` load copies every key of the live state, `step` included, from tensors that do not
   carry it (the format restores step from the param groups): the live step is passed through unchanged.
3. `load_state_dict` gives every parameter the SAME step tensor, which AdamW then increments once per parameter
   per update (wrong bias correction after a resume): each parameter gets its own copy.
"""

from __future__ import annotations

import torch

from harmony_mcore.config import Config


def build(gpt, cfg: Config, total_updates: int):
    """(DDP-wrapped model, optimizer, lr scheduler) of this rank's stage `gpt`."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o, config = cfg.optim, gpt.config
    model = DistributedDataParallel(
        config=config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                 use_distributed_optimizer=True),
        module=gpt,
    )
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
                        clip_grad=o.grad_clip, bf16=cfg.model.dtype == "bfloat16",
                        params_dtype=config.params_dtype, use_distributed_optimizer=True),
        [model], use_gloo_process_groups=True,  # the checkpoint gather runs over the gloo DP group
    )
    for opt in _distributed(optimizer):
        _pass_live_step_through(opt)
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = model.no_sync
    warmup = int(o.warmup_ratio * total_updates)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup else o.lr, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=max(total_updates, warmup + 1), lr_decay_style=o.decay, start_wd=o.weight_decay,
        end_wd=o.weight_decay, wd_incr_steps=max(total_updates, 1), wd_incr_style="constant",
    )
    return model, optimizer, scheduler


def _distributed(optimizer) -> list:
    """The DistributedOptimizer instances inside Megatron's (possibly chained) optimizer."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _torch_adam() -> bool:
    from megatron.core.optimizer import distrib_optimizer

    return not distrib_optimizer.HAVE_APEX_OR_TE


def prepare_load(optimizer) -> None:
    """Before `sharded_state_dict(is_loading=True)`: allocate a fresh torch-AdamW state (fix 1)."""
    if not _torch_adam():
        return
    for opt in _distributed(optimizer):
        if len(opt.optimizer.state) == 0:
            opt.init_state_fn(opt.optimizer, opt.config)
            for state in opt.optimizer.state.values():
                state["step"] = torch.tensor(0.0)


def finish_load(optimizer) -> None:
    """After `load_state_dict`: one step tensor per parameter (fix 3)."""
    if not _torch_adam():
        return
    for opt in _distributed(optimizer):
        for state in opt.optimizer.state.values():
            if "step" in state:
                state["step"] = state["step"].clone()


def _pass_live_step_through(opt) -> None:
    """Fix 2, on this optimizer instance only."""
    if not _torch_adam():
        return
    copy_states = opt._set_main_param_and_optimizer_states

    def set_states(model_param, tensors: dict) -> None:
        group, order = opt.model_param_group_index_map[model_param]
        live = opt.optimizer.state[opt.optimizer.param_groups[group]["params"][order]]
        if "step" in live and "step" not in tensors:
            tensors = {**tensors, "step": live["step"]}
        copy_states(model_param, tensors)

    opt._set_main_param_and_optimizer_states = set_states
