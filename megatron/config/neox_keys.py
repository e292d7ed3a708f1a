"""Every GPT-NeoX config key, classified: how a key of a real GPT-NeoX config is read here.

Taken from GPT-NeoX commit ea7aefd8f8e183256992d9fede4d7c71a46d67a5 (2026-05-20): the dataclass fields of
megatron/neox_arguments/neox_args.py and deepspeed_args.py (listed, with their defaults, in
tests/data/neox_arguments.tsv), plus the MoE keys NeoX had before its MegaBlocks rewrite (LEGACY_MOE_KEYS).
Each key is exactly one kind:

- SUPPORTED: a field of our schema with the same name and meaning.
- TRANSLATED: mapped onto our fields by `translate_neox_keys` (precision, zero_stage, attention_impl, ...).
- IGNORED: only tunes speed, memory, launching, checkpoint files or logging back-ends we lack, is derived by
  NeoX itself (a value in a file is overwritten), or has no effect unless another key takes a value we
  reject. Accepted, removed and reported as ignored.
- REJECTED (REJECTED_UNLESS_DEFAULT): a non-default value would change the model or training in a way we do
  not support. Accepted (and reported) at NeoX's default or an equivalent value, else a one-line ConfigError.

A key in neither NeoX's namespace nor our schema stays an unknown-key error with a "did you mean".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron.config.schema import NeoXArgs

NEOX_COMMIT = "ea7aefd8f8e183256992d9fede4d7c71a46d67a5"
LEGACY_MOE_COMMIT = "4c9f10816d15a8173fc8779a4c261c3f7dff5155"  # the parent of NeoX's "Dmoe integration" (d11df961)

SUPPORTED, TRANSLATED, IGNORED, REJECTED = "supported", "translated", "ignored", "rejected_unless_default"


@dataclass(frozen=True)
class NeoXKey:
    kind: str
    reason: str = ""
    default: Any = None  # REJECTED: NeoX's default, the value accepted
    also: tuple = ()  # REJECTED: further values that mean the same as the default
    hint: str = ""  # REJECTED: appended to the error; {value} is the value given

    def accepts(self, value: Any) -> bool:
        """A REJECTED key's value is harmless when it is the default, an equivalent, or a disabled DeepSpeed block."""
        if value == self.default or value in self.also:
            return True
        return self.default is None and isinstance(value, dict) and (not value or value.get("enabled") is False)


def _group(kind: str, reason: str, names: str) -> dict[str, NeoXKey]:
    return {name: NeoXKey(kind, reason) for name in names.split()}


SUPPORTED_KEYS = _group(SUPPORTED, "same name and meaning in our schema", """
    precision num_layers hidden_size intermediate_size mlp_multiple_of num_attention_heads num_kv_heads seq_length
    max_position_embeddings norm layernorm_epsilon rms_norm_epsilon pos_emb no_weight_tying
    make_vocab_size_divisible_by activation init_method_std rotary_pct rotary_emb_base init_method
    output_layer_init_method gpt_j_residual use_bias_in_norms use_bias_in_attn_linear use_bias_in_mlp
    zero_stage lr_decay_style lr_decay_iters min_lr warmup use_wandb wandb_group wandb_project log_dir
    tensorboard_dir log_interval seed tokenizer_type data_path train_data_paths test_data_paths valid_data_paths
    train_data_weights valid_data_weights test_data_weights data_impl save load checkpoint_factor train_iters
    eval_iters keep_last_n_checkpoints eval_interval split vocab_file merge_file num_workers exit_interval
    attention_dropout hidden_dropout weight_decay checkpoint_activations moe_num_experts moe_expert_interval
    moe_top_k moe_router_type moe_lbl_in_fp32 moe_jitter_eps train_batch_size train_micro_batch_size_per_gpu
    gradient_accumulation_steps optimizer gradient_clipping
""")

SUPPORTED_KEYS["eval_tasks"] = NeoXKey(SUPPORTED, "lm-eval task names: NeoX's eval.py runs them on a checkpoint; "
                                   "ours during training (eval_tasks_interval) and tools/eval_tasks.py")

TRANSLATED_KEYS = {
    "fp16": NeoXKey(TRANSLATED, "DeepSpeed block: enabled -> precision: fp16; loss-scale settings ignored"),
    "bf16": NeoXKey(TRANSLATED, "DeepSpeed block: enabled -> precision: bfloat16; other settings ignored"),
    "zero_optimization": NeoXKey(TRANSLATED, "DeepSpeed block: stage -> zero_stage; buckets/overlap/offload ignored"),
    "attention_config": NeoXKey(TRANSLATED, "global -> our attention; flash -> attention_impl: flash; others rejected"),
    "expansion_factor": NeoXKey(TRANSLATED, "MLP width as a multiple of hidden_size -> intermediate_size"),
    "peak_theoretical_tflops": NeoXKey(TRANSLATED, "one device's peak for MFU -> peak_tflops"),
    "deepspeed_extra_args": NeoXKey(TRANSLATED, "more DeepSpeed config: each key is read as a top-level key"),
    # NeoX derives it from optimizer.params.lr, but `--lr X` is how people set it: it must take effect
    "lr": NeoXKey(TRANSLATED, "the learning rate -> optimizer.params.lr (a command-line --lr overrides the file's)"),
}

_FUSED = "a fused kernel or kernel choice (speed only)"
_LAUNCH = "launching and cluster settings (our launch/ scripts and the environment decide)"
_DERIVED = "derived by NeoX itself from other keys or the environment (a value in a file is overwritten)"
_LOG = "logging, monitoring or profiling back-ends we do not have"
_MEMORY = "activation-memory or communication tuning (the computed model and updates are the same)"
_TEXTGEN = "text generation and evaluation only (not read in training)"
_INERT = "no effect unless {} (which is rejected)"

IGNORED_KEYS = {
    **_group(IGNORED, _FUSED, """
        layernorm_fusion rmsnorm_fusion use_flashattn_swiglu scaled_upper_triang_masked_softmax_fusion
        scaled_masked_softmax_fusion bias_gelu_fusion bias_dropout_fusion rope_fusion fused_kernels_build_path
        fp16_lm_cross_entropy attention_softmax_in_fp32 apply_query_key_layer_scaling use_cpu_initialization
        te_columnparallel te_rowparallel te_layernorm_mlp te_mha te_fp8_format te_fp8_wgrad te_fp8_amax_history_len
        te_fp8_amax_compute_algo te_fp8_margin te_fp8_mha mmap_warmup onnx_safe
    """),
    **_group(IGNORED, _LAUNCH, """
        hostfile include exclude num_nodes num_gpus master_port master_addr launcher force_multi autotuning_run
        no_ssh_check comment account deepspeed deepspeed_mpi deepspeed_slurm distributed_backend lazy_mpu_init
        use_shared_fs adlr_autoresume adlr_autoresume_interval deepscale deepscale_config autotuning
    """),
    **_group(IGNORED, _DERIVED, """
        world_size is_pipe_parallel local_rank rank user_script iteration do_train do_valid do_test global_num_gpus
        padded_vocab_size optimizer_type zero_reduce_scatter zero_contiguous_gradients zero_reduce_bucket_size
        zero_allgather_bucket_size clip_grad batch_size config_files git_hash dynamic_loss_scale curriculum_seqlen
    """),
    **_group(IGNORED, _LOG, """
        wandb_run_name wandb_team wandb_host wandb_init_all_ranks use_comet comet_workspace comet_project
        comet_experiment_name comet_tags comet_others comet_experiment log_grad_pct_zeros log_param_norm
        log_grad_norm log_optimizer_states log_gradient_noise_scale gradient_noise_scale_n_batches
        gradient_noise_scale_cpu_offload memory_profiling memory_profiling_path profile profile_step_start
        profile_step_stop profile_backward steps_per_print wall_clock_breakdown dump_state flops_profiler
        tensorboard wandb csv_monitor comms_logger char_level_ppl
    """),
    **_group(IGNORED, _MEMORY, """
        sequence_parallel output_layer_parallelism pipe_partition_method checkpoint_num_layers
        deepspeed_activation_checkpointing contiguous_checkpointing checkpoint_in_cpu synchronize_each_layer
        partition_activations activation_checkpointing fp32_allreduce prescale_gradients gradient_predivide_factor
        sparse_gradients communication_data_type data_types
    """),
    **_group(IGNORED, "fp16 loss scaling (ours is dynamic, torch.amp.GradScaler)", """
        hysteresis loss_scale loss_scale_window min_scale
    """),
    **_group(IGNORED, "checkpoint files and storage (training is unchanged; we save every checkpoint_factor steps)", """
        s3_path s3_chunk_size checkpoint_validation_with_forward_pass no_save_optim no_save_rng extra_save_iters
        rotary_save_freqs_buffer checkpoint
    """),
    **_group(IGNORED, "serving weights or data to other processes (a service we lack; training is unchanged)", """
        serve_model_weights weight_server_port online_dataserver_ips online_dataserver_ports
    """),
    **_group(IGNORED, _TEXTGEN, """
        text_gen_type precompute_model_name temperature top_p top_k return_logits maximum_tokens prompt_end
        sample_input_file sample_output_file num_samples recompute eval_results_prefix
    """),
    **_group(IGNORED, _INERT.format("norm: scalenorm"), "scalenorm_epsilon"),
    **_group(IGNORED, _INERT.format("pos_emb: rpe"), "rpe_num_buckets rpe_max_distance"),
    **_group(IGNORED, _INERT.format("attention_config names sparse, gmlp, mamba or rwkv layers"), """
        sparsity_config gmlp_attn_dim mamba_selective_scan_fusion mamba_causal_conv_fusion mamba_inner_func_fusion
        mamba_selective_fp32_params mamba_use_bias_in_conv mamba_use_bias_in_linears dim_att head_size ffn_dim
    """),
    **_group(IGNORED, _INERT.format("num_unique_layers is set"), "param_sharing_style"),
    **_group(IGNORED, _INERT.format("train_impl is dpo, kto, rm or reinforce"), """
        dpo_fp32 dpo_reference_free dpo_beta kto_fp32 kto_desirable_weight kto_undesirable_weight kto_beta
        fp32_reinforce kl_impl kl_div_beta reinforce_leave_one_out z_loss
    """),
    **_group(IGNORED, _INERT.format("dataset_impl: pairwise or pack_impl is not packed"), "allow_chopped"),
    **_group(IGNORED, _INERT.format("weight_by_num_documents is true"), "weighted_sampler_alpha"),
    **_group(IGNORED, _INERT.format("use_mup is true"), """
        base_shapes_file mup_init_scale mup_attn_temp mup_output_temp mup_embedding_mult mup_rp_embedding_mult
        mup_width_scale
    """),
    **_group(IGNORED, "a BERT leftover GPT-NeoX's GPT data pipeline never reads", "short_seq_prob"),
}


def _rejected(default: Any, reason: str, *also: Any, hint: str = "") -> NeoXKey:
    return NeoXKey(REJECTED, reason, default, also, hint)


_POST = "post-training data (DPO, KTO, reward models) is not supported"
REJECTED_KEYS = {
    "pipe_parallel_size": _rejected(0, "only data and expert parallelism; 1, a single stage, is the same model", 1),
    "model_parallel_size": _rejected(1, "only data and expert parallelism", 0, hint=(
        " (NeoX padded the vocabulary to make_vocab_size_divisible_by x {value}: multiply "
        "make_vocab_size_divisible_by by {value} to keep that size)")),
    "use_qk_layernorm": _rejected(False, "layer norm on queries and keys is not built"),
    "opt_pos_emb_offset": _rejected(0, "OPT's learned position offset is not built"),
    "num_unique_layers": _rejected(None, "sharing parameters between layers is not built"),
    "gpt_j_tied": _rejected(False, "GPT-J's tied residual norms are not built"),
    "soft_prompt_tuning": _rejected(None, "soft prompt tuning is not supported"),
    "use_bnb_optimizer": _rejected(False, "bitsandbytes 8-bit Adam is not supported (AdamW only)"),
    "lr_decay_fraction": _rejected(None, "set lr_decay_iters instead"),
    "override_lr_scheduler": _rejected(False, "the schedule always comes from the config"),
    "use_checkpoint_lr_scheduler": _rejected(False, "the schedule always comes from the config"),
    "eod_mask_loss": _rejected(False, "masking the loss at end-of-document tokens is not supported"),
    "train_label_data_paths": _rejected(None, "label datasets (loss masks) are not supported"),
    "valid_label_data_paths": _rejected(None, "label datasets (loss masks) are not supported"),
    "test_label_data_paths": _rejected(None, "label datasets (loss masks) are not supported"),
    **{f"{split}_reward_data_paths": _rejected(None, _POST) for split in ("train", "valid", "test")},
    **{f"{sign}_{split}_{kind}paths": _rejected(None, _POST) for sign in ("pos", "neg")
       for split in ("train", "valid", "test") for kind in ("data_", "label_data_")},
    "weight_by_num_documents": _rejected(False, "dataset weights come from *_data_weights only"),
    "pack_impl": _rejected("packed", "documents are always packed into full sequences"),
    "dataset_impl": _rejected("gpt2", "only GPT-NeoX's gpt2 .bin/.idx datasets are supported"),
    "train_impl": _rejected("normal", "only language-model pretraining (no DPO, KTO, RM or REINFORCE)"),
    "checkpoint_scale": _rejected("linear", "checkpoints are saved every checkpoint_factor steps"),
    "no_load_optim": _rejected(False, "a resumed run always loads the optimizer state"),
    "no_load_rng": _rejected(False, "a resumed run always loads the random state"),
    "finetune": _rejected(False, "loading weights only and restarting the step count is not supported"),
    "train_epochs": _rejected(None, "set train_iters instead"),
    "use_mup": _rejected(False, "muP is not supported"),
    "coord_check": _rejected(False, "muP coordinate checks are not supported"),
    "save_base_shapes": _rejected(False, "muP base shapes are not supported"),
    "scheduler": _rejected(None, "DeepSpeed's LR schedulers are not supported (use lr_decay_style)"),
    "amp": _rejected(None, "Apex AMP is not supported (use an fp16 or bf16 block, or precision)"),
    "curriculum_learning": _rejected(None, "sequence-length curricula are not supported"),
    "sparse_attention": _rejected(None, "sparse attention is not supported"),
    "data_efficiency": _rejected(None, "DeepSpeed data efficiency (curricula, token dropping) is not supported"),
    "elasticity": _rejected(None, "DeepSpeed's elasticity, a search for a batch size that several GPU counts "
                                  "share, is not supported; an elastic torchrun launch keeps train_batch_size and "
                                  "derives the accumulation from the ranks (launch/torchrun_elastic.sh)"),
    "compression_training": _rejected(None, "quantisation/pruning during training is not supported"),
}

# Sliding-window attention is ours exactly when the schema has the field.
if "sliding_window_width" in NeoXArgs.model_fields:
    SUPPORTED_KEYS["sliding_window_width"] = NeoXKey(SUPPORTED, "same name and meaning in our schema")
else:
    REJECTED_KEYS["sliding_window_width"] = _rejected(None, "sliding-window attention is not built")

# MoE keys of NeoX before the MegaBlocks rewrite (DeepSpeed MoE and the first MegaBlocks version).
LEGACY_MOE_KEYS = {
    "expert_interval": NeoXKey(TRANSLATED, "the old name of moe_expert_interval (its old default was 2: set it)"),
    "moe_expert_parallel_size": NeoXKey(SUPPORTED, "same name and meaning in our schema"),
    "moe_loss_coeff": NeoXKey(SUPPORTED, "same meaning in our schema (the old NeoX default was 0.1, ours 0.01)"),
    "moe_type": _rejected("megablocks", "only MegaBlocks-style grouped experts (dropless, or bounded by "
                                        "moe_token_dropping); DeepSpeed MoE is not built"),
    "moe_glu": _rejected(False, "NeoX documented it as gated experts but never passed it to MegaBlocks, whose "
                                "experts stayed ungated; set activation (e.g. swiglu) for gated experts"),
    **_group(SUPPORTED, "same name and meaning in our schema (DeepSpeed MoE's capacity rule; moe/capacity.py)", """
        moe_token_dropping moe_train_capacity_factor moe_eval_capacity_factor moe_min_capacity
    """),
    "use_tutel": NeoXKey(IGNORED, _FUSED),
    "create_moe_param_group": NeoXKey(IGNORED, "optimizer parameter-group bookkeeping for DeepSpeed MoE"),
    "enable_expert_tensor_parallelism": NeoXKey(IGNORED, _INERT.format("model_parallel_size > 1")),
    "moe_use_residual": NeoXKey(IGNORED, _INERT.format("moe_type: deepspeed")),
}

NEOX_KEYS: dict[str, NeoXKey] = {**SUPPORTED_KEYS, **TRANSLATED_KEYS, **IGNORED_KEYS, **REJECTED_KEYS,
                                 **LEGACY_MOE_KEYS}

# Where our default differs from NeoX's on purpose (every other SUPPORTED key has NeoX's default;
# tests/unit/test_neox_keys.py checks both). docs/neox_compat.md explains each.
DEFAULT_EXCEPTIONS = {
    "num_layers": "NeoX has none (required); ours: a tiny model for quick runs",
    "hidden_size": "NeoX has none (required); ours: a tiny model for quick runs",
    "num_attention_heads": "NeoX has none (required); ours: a tiny model for quick runs",
    "seq_length": "NeoX has none (required); ours: a tiny model for quick runs",
    "train_iters": "NeoX has none (required unless train_epochs); ours: 100",
    "precision": "NeoX's None means fp32 unless an fp16/bf16 block is enabled: the same",
    "zero_stage": "NeoX's None is overwritten by zero_optimization.stage (default 0): the same",
    "gradient_accumulation_steps": "NeoX's 1 with a train_batch_size that disagrees is an error; ours derives it",
    "checkpoint_factor": "NeoX requires it when save is set; ours: 1000",
    "use_wandb": "NeoX's None turns wandb on when a W&B API key is found; ours: off unless asked",
    "split": "NeoX writes '969, 30, 1', the same weights",
    "optimizer": "NeoX's None means Adam, lr 0.001, betas (0.9, 0.999), eps 1e-8: our OptimizerSpec's defaults",
}

