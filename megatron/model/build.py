"""From the resolved config to the language model's own typed settings (the model never reads the config);
the DiT's builder is megatron/model/dit/config.py."""

from __future__ import annotations

from megatron.model.gpt import GPT, GPTConfig
from megatron.model.mla import mla_config
from megatron.model.moe import Balancing, Capacity, LoREConfig, MoEArchitecture, MoERuntime
from megatron.model.moe.kernels import resolve_moe_impl
from megatron.model.moe.lsh import LSHConfig
from megatron.model.rope import Llama3RopeScaling, YarnRopeScaling
from megatron.parallel.expert_parallel import ExpertParallel


def build_gpt(args, padded_vocab_size: int, expert_parallel: ExpertParallel | None = None) -> GPT:
    """The language model the config describes, built for this run (its MoE runtime: `expert_parallel`, the
    experts' kernels for the run's device, LSH, token dropping)."""
    return GPT(gpt_config_from_args(args, padded_vocab_size), moe_runtime_from_args(args, expert_parallel))


def moe_architecture_from_args(args) -> MoEArchitecture | None:
    if args.moe_num_experts <= 1:
        return None
    lore = None
    if args.lore_num_experts > 0:
        lore = LoREConfig(
            num_lores=args.lore_num_experts,
            rank=args.lore_rank,
            top_l=args.lore_top_k,
            mode=args.lore_mode,
            renormalize=args.lore_renormalize_weights,
            balancing=Balancing(args.lore_router_enable_bias, args.lore_router_bias_update_rate, args.lore_lbl_scope),
        )
    return MoEArchitecture(
        num_experts=args.moe_num_experts,
        top_k=args.moe_top_k,
        expert_interval=args.moe_expert_interval,
        first_layer=args.moe_first_layer,
        ffn_hidden_size=args.moe_ffn_hidden_size,
        jitter_eps=args.moe_jitter_eps,
        renormalize=args.moe_renormalize_weights,
        lbl_in_fp32=args.moe_lbl_in_fp32,
        router_type=args.moe_router_type,
        num_shared_experts=args.moe_num_shared_experts,
        score_function=args.moe_router_score_function,
        num_groups=args.moe_router_num_groups,
        group_top_k=args.moe_router_group_top_k,
        scaling_factor=args.moe_router_scaling_factor,
        router_bias=args.moe_router_bias,
        expert_biases=args.moe_use_bias_in_experts,
        balancing=Balancing(args.moe_router_enable_expert_bias, args.moe_router_bias_update_rate, args.moe_lbl_scope),
        lore=lore,
    )


def moe_runtime_from_args(args, expert_parallel: ExpertParallel | None = None) -> MoERuntime:
    if args.moe_num_experts <= 1:  # a dense model: no kernel to pick
        return MoERuntime()
    return MoERuntime(
        expert_parallel=expert_parallel,
        impl=resolve_moe_impl(args.moe_impl, getattr(args, "device", "auto")),  # for the device the run will use
        lsh=LSHConfig(args.lsh_num_hashes, args.lsh_hash_dim, args.lsh_error_compensation, args.seed,
                      args.lsh_rotation_refresh_interval) if args.lsh_compression else None,
        lsh_layers=None if args.lsh_layers is None else tuple(args.lsh_layers),
        capacity=Capacity(args.moe_train_capacity_factor, args.moe_eval_capacity_factor, args.moe_min_capacity,
                          args.moe_token_drop_policy) if args.moe_token_dropping else None,
    )


def rope_scaling_from_args(scaling) -> Llama3RopeScaling | YarnRopeScaling | None:
    """The rope_scaling block as the rotary embedding's scaling, by its `type`."""
    if scaling is None:
        return None
    kind = {"llama3": Llama3RopeScaling, "yarn": YarnRopeScaling}[scaling.type]
    return kind(**scaling.model_dump(exclude={"type"}))


def gpt_config_from_args(args, padded_vocab_size: int) -> GPTConfig:
    return GPTConfig(
        vocab_size=padded_vocab_size,
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        head_dim=args.head_dim,
        num_kv_heads=args.num_kv_heads,
        sliding_window_width=args.sliding_window_width,
        qk_norm=args.qk_norm,
        attention_sinks=args.attention_sinks,
        sliding_window_pattern=None if args.sliding_window_pattern is None else tuple(args.sliding_window_pattern),
        intermediate_size=args.intermediate_size,
        mlp_multiple_of=args.mlp_multiple_of,
        use_bias_in_mlp=args.use_bias_in_mlp,
        max_position_embeddings=args.max_position_embeddings,
        pos_emb=args.pos_emb,
        rotary_pct=args.rotary_pct,
        rotary_emb_base=args.rotary_emb_base,
        rope_scaling=rope_scaling_from_args(args.rope_scaling),
        norm=args.norm,
        norm_eps=args.rms_norm_epsilon if args.norm == "rmsnorm" else args.layernorm_epsilon,
        use_bias_in_norms=args.use_bias_in_norms,
        use_bias_in_attn_linear=args.use_bias_in_attn_linear,
        activation=args.activation,
        swiglu_alpha=args.swiglu_alpha,
        swiglu_limit=args.swiglu_limit,
        gpt_j_residual=args.gpt_j_residual,
        tie_embeddings=not args.no_weight_tying,
        init_method=args.init_method,
        output_layer_init_method=args.output_layer_init_method,
        init_method_std=args.init_method_std,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        checkpoint_activations=args.checkpoint_activations,
        attention_impl=args.attention_impl,
        mla=mla_config(args.kv_lora_rank, args.q_lora_rank, args.qk_nope_head_dim, args.qk_rope_head_dim,
                       args.v_head_dim),
        moe=moe_architecture_from_args(args),
        mtp_num_modules=args.mtp_num_modules,
    )

