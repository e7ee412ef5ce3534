"""ArchSpec -> Megatron-Core TransformerConfig + GPTModel (this rank's pipeline stage).

The TransformerEngine layer spec is used when transformer_engine imports (GPU), Megatron's local spec otherwise.
Both store their weights under the same dist-checkpoint names, so checkpoints move freely between them.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import torch
import torch.nn.functional as F

from harmony_mcore.weights.arch import ArchSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SpecChoice = Literal["auto", "te", "local"]
AttentionChoice = Literal["sdpa", "unfused"]


def te_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def use_te_spec(choice: SpecChoice, device: str) -> bool:
    """TransformerEngine's layer spec: layer_spec=te, or auto where TE imports and Megatron runs on CUDA."""
    on_cuda = device == "cuda"
    if choice == "te" and not (te_available() and on_cuda):
        raise RuntimeError("model.layer_spec=te needs transformer_engine and a CUDA device")
    return choice == "te" or (choice == "auto" and te_available() and on_cuda)


def compiled_fusions(device: str) -> bool:
    """Megatron's torch.compile'd fusions: on CUDA, where Triton (which torch.compile generates GPU kernels with)
    is installed."""
    return device == "cuda" and importlib.util.find_spec("triton") is not None


def transformer_config(arch: ArchSpec, *, tp: int, pp: int, dtype: str = "float32", use_te: bool = False,
                       init_std: float = 0.02, recompute: bool = False, init_weights: bool = True,
                       device: str = "cpu"):
    """The Megatron TransformerConfig of `arch` (SwiGLU MLP, RMSNorm, RoPE, GQA, optional q/k norm, QKV bias).

    init_weights=False skips Megatron's random initialisation (weights are left uninitialised): only for models
    whose every parameter is loaded right after the build, where the init is most of the cost of a conversion."""
    from megatron.core.transformer import TransformerConfig

    torch_dtype = DTYPES[dtype]
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        init_method_std=init_std,
        perform_initialization=init_weights,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=False,
        params_dtype=torch_dtype,
        pipeline_dtype=torch_dtype,
        bf16=torch_dtype == torch.bfloat16,
        # The fusions Megatron offers without TE (SwiGLU and residual-add kernels that torch.compile builds with
        # Triton) on CUDA; the CPU keeps the unfused reference paths. Rope, softmax and layer-norm fusions need TE
        # or apex.
        bias_activation_fusion=use_te or compiled_fusions(device),
        bias_dropout_fusion=compiled_fusions(device),
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True,
        cuda_graph_scope=[],  # the default "full" is deprecated and warns on every build
        use_cpu_initialization=device != "cuda",
        recompute_granularity="full" if recompute else None,
        recompute_method="uniform" if recompute else None,
        recompute_num_layers=1 if recompute else None,
        # Micro-batches are padded to their own longest sequence, so pipeline stages exchange shapes first.
        # (Megatron ties this to its MoE token dispatcher's validation; the model has no experts.)
        variable_seq_lengths=True,
        moe_token_dispatcher_type="alltoall",
        # Losses return (sum, count): Megatron divides by the global count over micro-batches and DP ranks.
        calculate_per_token_loss=True,
    )


def layer_spec(arch: ArchSpec, use_te: bool, attention: AttentionChoice = "sdpa"):
    """TE's spec, or Megatron's local one with its core attention on torch SDPA (harmony_mcore.mcore.attention;
    attention="unfused" keeps Megatron's own, which materialises the s x s scores)."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_norm)
    spec = gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=arch.qk_norm, normalization="RMSNorm")
    if attention == "sdpa":
        from harmony_mcore.mcore.attention import SdpaAttention

        spec.submodules.self_attention.submodules.core_attention = SdpaAttention
    return spec


def build_gpt(arch: ArchSpec, padded_vocab: int, *, dtype: str = "float32", spec: SpecChoice = "auto",
              max_seq_len: int | None = None, recompute: bool = False, init_weights: bool = True,
              device: str = "cpu", attention: AttentionChoice = "sdpa"):
    """This rank's GPTModel (its pipeline stage) after `init_parallel(..., device)`, on that device. Random init
    (std 0.02), or none with init_weights=False when every parameter is loaded next (see transformer_config)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    te = use_te_spec(spec, device)
    config = transformer_config(arch, tp=ps.get_tensor_model_parallel_world_size(),
                                pp=ps.get_pipeline_model_parallel_world_size(), dtype=dtype, use_te=te,
                                recompute=recompute, init_weights=init_weights, device=device)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(arch, te, attention),
        vocab_size=padded_vocab,
        max_sequence_length=max_seq_len or arch.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=arch.tied_embeddings,
        parallel_output=True,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_theta),
        rope_scaling=arch.rope_scaling_factor is not None,
        rope_scaling_factor=arch.rope_scaling_factor or 8.0,
    )
    if device == "cuda":
        model.cuda(torch.cuda.current_device())
    return model


def layer_offset(model) -> int:
    """Global index of this stage's first transformer layer."""
    layers = model.decoder.layers
    return layers[0].layer_number - 1 if len(layers) else 0

