"""The typed config: one pydantic class per concern, combined into the flat `NeoXArgs` (NeoX keys are flat).

Field names are GPT-NeoX's wherever the concept exists there, and so are their defaults (the exceptions are
listed in neox_keys.DEFAULT_EXCEPTIONS); our extensions are marked.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

MAX_BIAS_UPDATE_RATE = 0.1  # the loss-free balancing bias's step, against router scores in [0, 1]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False)


class OptimizerParams(Strict):
    lr: float = Field(1e-3, gt=0)  # GPT-NeoX's defaults when a config has no optimizer block
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)

    @field_validator("betas")
    @classmethod
    def betas_in_unit_interval(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= beta < 1.0 for beta in value):
            raise ValueError(f"expected two Adam betas in [0, 1), got {list(value)}")
        return value


class OptimizerSpec(Strict):
    type: str = "Adam"
    params: OptimizerParams = OptimizerParams()

    @field_validator("type")
    @classmethod
    def adam_only(cls, value: str) -> str:
        if value.lower() not in ("adam", "adamw"):
            raise ValueError(f"expected Adam or AdamW (both mean AdamW with decoupled weight decay), got {value!r}")
        return value


class RopeScalingArgs(Strict):
    """Llama-3.1's RoPE frequency scaling (rope_type llama3): long wavelengths slowed by `factor`, short ones kept,
    the band between blended."""

    type: Literal["llama3"] = "llama3"
    factor: float = Field(8.0, gt=0)
    low_freq_factor: float = Field(1.0, gt=0)
    high_freq_factor: float = Field(4.0, gt=0)
    original_max_position_embeddings: int = Field(8192, ge=1)

    @field_validator("high_freq_factor")
    @classmethod
    def above_low(cls, value: float, info) -> float:
        if value <= info.data.get("low_freq_factor", 0.0):
            raise ValueError(f"expected high_freq_factor above low_freq_factor, got {value}")
        return value


class YarnRopeScalingArgs(Strict):
    """YaRN's RoPE scaling (rope_type yarn; DeepSeek-V3, gpt-oss): frequencies that turn fewer than beta_slow times
    over original_max_position_embeddings are divided by `factor`, ones turning more than beta_fast times are kept,
    a linear ramp between; cos and sin are multiplied by an attention factor from factor, mscale, mscale_all_dim."""

    type: Literal["yarn"]
    factor: float = Field(ge=1)
    original_max_position_embeddings: int = Field(ge=1)
    beta_fast: float = Field(32.0, gt=0)
    beta_slow: float = Field(1.0, gt=0)
    mscale: float = Field(1.0, gt=0)  # acts only with mscale_all_dim > 0 (transformers' rule)
    mscale_all_dim: float = Field(0.0, ge=0)
    truncate: bool = True  # the ramp's ends rounded out to whole dims (gpt-oss: false)

    @model_validator(mode="after")
    def fast_above_slow(self) -> YarnRopeScalingArgs:
        if self.beta_fast < self.beta_slow:  # equal is a step at that pair (Kimi-K2: both 1)
            raise ValueError(f"expected beta_fast at least beta_slow, got {self.beta_fast} and {self.beta_slow}")
        if self.mscale != 1.0 and not self.mscale_all_dim:
            raise ValueError(f"mscale {self.mscale} acts only with mscale_all_dim > 0 (transformers then scales by "
                             "mscale(factor) alone); expected mscale 1.0 or mscale_all_dim set")
        return self


def rope_scaling_type(value: Any) -> str:
    """The `type` of a rope_scaling block; absent means llama3, the one type there was before YaRN."""
    return (value.get("type") if isinstance(value, dict) else getattr(value, "type", None)) or "llama3"


RopeScaling = Annotated[Annotated[RopeScalingArgs, Tag("llama3")] | Annotated[YarnRopeScalingArgs, Tag("yarn")],
                        Discriminator(rope_scaling_type, custom_error_type="rope_scaling_type",
                                      custom_error_message="expected type llama3 or yarn")]


class ModelArgs(Strict):
    model_type: Literal["gpt", "dit"] = "gpt"  # ours: the model family (dit: see DiffusionArgs)
    num_layers: int = Field(2, ge=1)
    hidden_size: int = Field(128, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    head_dim: int | None = Field(None, ge=1)  # ours: each head's width; None: hidden_size // num_attention_heads
    seq_length: int = Field(128, ge=1)
    max_position_embeddings: int | None = Field(None, ge=1)
    pos_emb: Literal["rotary", "learned", "none"] = "learned"
    rotary_pct: float = Field(1.0, ge=0, le=1)
    rotary_emb_base: int = Field(10000, ge=1)
    rope_scaling: RopeScaling | None = None  # ours: Llama-3.1's or YaRN's scaled RoPE; None: plain RoPE
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    layernorm_epsilon: float = Field(1e-5, gt=0)
    rms_norm_epsilon: float = Field(1e-8, gt=0)
    activation: Literal["gelu", "relu", "silu", "swiglu", "geglu", "clamped_swiglu"] = "gelu"
    # ours: gpt-oss's clamped SwiGLU (activation: clamped_swiglu): gate clamped above at the limit, value to
    # [-limit, limit], out = (value + 1) * gate * sigmoid(alpha * gate)
    swiglu_alpha: float = Field(1.702, gt=0)
    swiglu_limit: float = Field(7.0, gt=0)
    mlp_multiple_of: int = Field(1, ge=1)  # NeoX: gated MLP widths (2/3 of intermediate_size) rounded up to this
    use_bias_in_mlp: bool = True
    num_kv_heads: int | None = Field(None, ge=1)  # NeoX: grouped-query attention; None: num_attention_heads
    sliding_window_width: int | None = Field(None, ge=1)  # NeoX: a query sees itself + the w keys before it
    qk_norm: bool = False  # ours: per-head RMSNorm of queries and keys before rotary (Qwen3)
    # ours: multi-head latent attention (DeepSeek-V2/V3, megatron/model/mla.py): kv_lora_rank set switches it on;
    # q_lora_rank None: the query is one projection; the three head dims are required with it
    kv_lora_rank: int | None = Field(None, ge=1)
    q_lora_rank: int | None = Field(None, ge=1)
    qk_nope_head_dim: int | None = Field(None, ge=1)
    qk_rope_head_dim: int | None = Field(None, ge=2)
    v_head_dim: int | None = Field(None, ge=1)
    attention_sinks: bool = False  # ours: a learned logit per query head that takes softmax mass, no value (gpt-oss)
    # ours: "sliding"/"full" per layer, repeated over the layers (gpt-oss: [sliding, full]); None: every layer slides
    sliding_window_pattern: list[Literal["sliding", "full"]] | None = Field(None, min_length=1)
    gpt_j_residual: bool = False
    no_weight_tying: bool = False
    make_vocab_size_divisible_by: int = Field(128, ge=1)
    init_method: Literal["normal", "scaled_normal", "small_init", "wang_init"] = "normal"
    output_layer_init_method: Literal["normal", "scaled_normal", "small_init", "wang_init"] = "scaled_normal"
    init_method_std: float = Field(0.02, gt=0)
    hidden_dropout: float = Field(0.0, ge=0, lt=1)
    attention_dropout: float = Field(0.0, ge=0, lt=1)
    intermediate_size: int | None = Field(None, ge=1)
    vocab_size: int | None = Field(None, ge=1)  # ours: when no tokenizer file is at hand (parameter counting)
    checkpoint_activations: bool = False
    loss_chunk_tokens: int = Field(0, ge=0)  # ours: LM head + loss this many tokens at a time; 0: full logits
    attention_impl: Literal["sdpa", "flash"] = "sdpa"
    use_bias_in_norms: bool = True
    use_bias_in_attn_linear: bool = True
    # ours: multi-token prediction (DeepSeek-V3, megatron/model/mtp.py): D sequential modules after the model, module
    # d predicting the token d + 1 places after the next one; training only (eval and generation use the main head)
    mtp_num_modules: int = Field(0, ge=0)
    mtp_loss_coeff: float = Field(0.1, ge=0)  # ours: weight of the modules' mean cross-entropy in the loss

    @field_validator("sliding_window_pattern")
    @classmethod
    def some_layer_slides(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and "sliding" not in value:
            raise ValueError(f"expected at least one 'sliding' layer, got {value} (no window: leave "
                             "sliding_window_width unset)")
        return value


class MoEArgs(Strict):
    moe_num_experts: int = Field(1, ge=1)
    moe_top_k: int = Field(1, ge=1)
    moe_expert_interval: int = Field(1, ge=1)
    # ours: the first MoE layer (0-based), then every moe_expert_interval-th. 0 is GPT-NeoX's placement;
    # interval - 1 is fairseq's `(i + 1) % interval == 0`, which the StructMoE paper's configs use
    moe_first_layer: int = Field(0, ge=0)
    moe_router_type: Literal["topk", "sinkhorn"] = "sinkhorn"
    moe_num_shared_experts: int = Field(0, ge=0)  # ours (DeepSeekMoE/Qwen-MoE): always-on experts beside the routed
    moe_jitter_eps: float | None = None
    moe_lbl_in_fp32: bool = False
    moe_loss_coeff: float = Field(0.01, ge=0)
    moe_zloss_coeff: float = Field(0.0, ge=0)
    moe_renormalize_weights: bool = False
    # ours, routing as trained today (moe/router.py): sigmoid scores with normalised top-k gates (DeepSeek-V3);
    # auxiliary-loss-free balancing, a choice-only bias per expert moved by rate * sign(mean load - load) after
    # each step (DeepSeek-V3); the Switch loss's load fractions per micro_batch, per sequence, or over the
    # global batch (all ranks and the step's micro-batches so far; Qwen). The same two for each expert's LoREs.
    moe_router_score_function: Literal["softmax", "sigmoid"] = "softmax"
    moe_router_enable_expert_bias: bool = False
    moe_router_bias_update_rate: float = Field(1e-3, ge=0)
    moe_lbl_scope: Literal["micro_batch", "sequence", "global_batch"] = "micro_batch"
    lore_router_enable_bias: bool = False
    lore_router_bias_update_rate: float = Field(1e-3, ge=0)
    lore_lbl_scope: Literal["micro_batch", "global_batch"] = "micro_batch"
    # ours (DeepSeek-V3): group-limited routing, the experts in moe_router_num_groups contiguous groups; a token keeps
    # the moe_router_group_top_k groups whose two best (bias-corrected) scores sum highest and picks its top-k
    # experts inside them; the chosen gates multiplied by moe_router_scaling_factor (routed_scaling_factor)
    moe_router_num_groups: int = Field(1, ge=1)
    moe_router_group_top_k: int = Field(1, ge=1)
    moe_router_scaling_factor: float = Field(1.0, gt=0)
    # ours (gpt-oss): a learned bias in the router's linear (not the loss-free expert bias above), and biases on
    # both projections of every expert (routed and shared; GPT-NeoX's experts have none, whatever use_bias_in_mlp)
    moe_router_bias: bool = False
    moe_use_bias_in_experts: bool = False
    @field_validator("moe_router_bias_update_rate", "lore_router_bias_update_rate")
    @classmethod
    def bias_rate_below_the_scores(cls, value: float) -> float:
        """Scores lie in [0, 1] and the bias moves by the rate every step, so past MAX_BIAS_UPDATE_RATE the bias
        alone decides routing within a few steps: the router's scores stop mattering."""
        if value > MAX_BIAS_UPDATE_RATE:
            raise ValueError(f"expected at most {MAX_BIAS_UPDATE_RATE} (the bias moves this much per step against "
                             f"scores in [0, 1], so a larger rate lets it alone decide routing within a few steps; "
                             f"DeepSeek-V3 uses 0.001), got {value}")
        return value

    moe_impl: Literal["auto", "native", "grouped_gemm", "megablocks"] = "auto"  # auto: by GPU (moe/kernels.py)
    moe_expert_parallel_size: int = Field(1, ge=1)  # GPT-NeoX/DeepSpeed name: ranks the experts are split over
    # bounded experts (pre-MegaBlocks GPT-NeoX / DeepSpeed names; moe/capacity.py): off, every routed slot is served.
    # On: each expert serves at most max(ceil(tokens x top_k x factor / experts), moe_min_capacity) slots per
    # micro-batch and rank, the train or eval factor by mode; ours: which slots past it are dropped
    moe_token_dropping: bool = False
    moe_train_capacity_factor: float = Field(1.0, gt=0)
    moe_eval_capacity_factor: float = Field(1.0, gt=0)
    moe_min_capacity: int = Field(4, ge=0)
    moe_token_drop_policy: Literal["position", "probs"] = "position"  # ours: first come first served, or by gate
    moe_receive_warning_factor: float = Field(4.0, ge=0)  # ours: warn when an EP rank receives > this x the mean rows
    moe_ffn_hidden_size: int | None = Field(None, ge=1)
    lore_num_experts: int = Field(0, ge=0)
    lore_rank: int = Field(0, ge=0)
    lore_top_k: int = Field(1, ge=1)
    lore_mode: Literal["entangled", "router_free", "standalone"] = "entangled"
    lore_loss_coeff: float = Field(0.0, ge=0)
    lore_renormalize_weights: bool = False
    # LSH-MoE (ours): rows bound for each expert replaced by cross-polytope LSH bucket centroids
    lsh_compression: bool = False
    lsh_num_hashes: int = Field(2, ge=1)
    lsh_hash_dim: int = Field(16, ge=1)  # rotation output dims: 2 x this many buckets per hash
    lsh_error_compensation: bool = True  # each row gets back E(centroid) + (x - centroid)
    lsh_rotation_refresh_interval: int = Field(0, ge=0)  # new random rotation every N steps; 0: never
    lsh_layers: list[int] | None = None  # transformer layer indices of the MoE layers to compress; None: all
    lsh_error_interval: int = Field(0, ge=0)  # every N steps log the output error vs the exact layer; 0: never
    # routing health (ours): warnings and metrics for starving experts/LoREs and collapsed layers; 0 disables each
    moe_health_min_share: float = Field(0.1, ge=0, le=1)  # dead below this x the fair share (1/E, or 1/M for LoREs)
    moe_health_patience: int = Field(3, ge=1)  # ... for this many log intervals in a row
    moe_health_min_entropy: float = Field(0.5, ge=0, le=1)  # collapsed below this normalised load entropy


class DiffusionArgs(Strict):
    """Ours: the DiT family (model_type: dit). Depth, width and heads are num_layers, hidden_size and
    num_attention_heads, as for GPT models."""

    image_size: int = Field(16, ge=1)
    image_channels: int = Field(1, ge=1)
    patch_size: int = Field(2, ge=1)
    num_classes: int = Field(10, ge=1)
    class_dropout_prob: float = Field(0.1, ge=0, lt=1)  # label dropout for classifier-free guidance
    mlp_ratio: float = Field(4.0, gt=0)
    learn_sigma: bool = False  # predict the variance too (improved DDPM's hybrid loss)
    diffusion_steps: int = Field(1000, ge=2)
    beta_start: float = Field(1e-4, gt=0)
    beta_end: float = Field(0.02, gt=0, lt=1)
    image_dataset: Literal["digits", "folder", "latents"] = "digits"  # digits: scikit-learn's 8x8, bundled
    image_path: str | None = None  # folder: class subfolders of images; latents: a .npy [N, C, H, W]
    image_labels_path: str | None = None  # latents: a .npy of N integer labels
    image_valid_fraction: float = Field(0.1, gt=0, lt=1)
    eval_timestep_intervals: int = Field(10, ge=1)  # validation loss reported per this many equal intervals
    fd_samples: int = Field(0, ge=0)  # at each evaluation, sample this many images for the Frechet distance
    sample_steps: int = Field(50, ge=1)  # DDIM steps for evaluation samples
    cfg_scale: float = Field(1.0, ge=0)  # classifier-free guidance of evaluation samples; 1: none
    # Remix-DiT: K basis models mixed into N timestep experts
    remix_num_basis: int = Field(0, ge=0)  # K; 0: a plain DiT
    remix_num_experts: int = Field(20, ge=1)  # N equal timestep intervals
    remix_mixer: Literal["softmax", "raw", "oracle"] = "softmax"
    remix_coeff_scope: Literal["global", "local"] = "global"
    remix_prior_weight: float = Field(1.0, ge=0)  # gamma at step 0 of the prior cross-entropy
    remix_prior_anneal_iters: int | None = Field(None, ge=0)  # gamma reaches 0 here; None: half of train_iters
    remix_coeff_lr: float | None = Field(None, gt=0)  # learning rate of the coefficients; None: the model's
    remix_expert_draw: Literal["step", "rank", "micro_batch"] = "step"  # who draws its own expert
    remix_init_from: str | None = None  # a plain DiT to copy into every basis: our save folder or an official .pt


class OptimizerArgs(Strict):
    optimizer: OptimizerSpec = OptimizerSpec()
    min_lr: float = Field(0.0, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    gradient_clipping: float = Field(1.0, ge=0)
    lr_decay_style: Literal["cosine", "linear", "constant"] = "linear"
    lr_decay_iters: int | None = Field(None, ge=1)
    warmup: float = Field(0.01, ge=0, le=1)


class TrainingArgs(Strict):
    train_iters: int = Field(100, ge=1)
    train_micro_batch_size_per_gpu: int | None = Field(None, ge=1)
    gradient_accumulation_steps: int | None = Field(None, ge=1)
    train_batch_size: int | None = Field(None, ge=1)
    precision: Literal["fp32", "bfloat16", "fp16"] = "fp32"
    seed: int = 1234
    eval_interval: int = Field(1000, ge=0)
    eval_iters: int = Field(100, ge=0)
    # lm-evaluation-harness tasks during training (megatron/training/task_eval.py, docs/evaluation.md)
    eval_tasks: list[str] | None = None  # NeoX's key: lm-eval task, group or tag names
    eval_tasks_interval: int | None = Field(None, ge=1)  # ours: every N steps and at the end; None: eval_interval
    eval_tasks_limit: int | None = Field(None, ge=1)  # ours: documents per task; None: all
    eval_tasks_num_fewshot: int | None = Field(None, ge=0)  # ours: None: each task's own
    eval_tasks_include_path: list[str] | None = None  # ours: folders of lm-eval task YAML files (local tasks)
    log_interval: int = Field(100, ge=1)
    exit_interval: int | None = Field(None, ge=1)  # NeoX: stop after this many steps of this run (then save)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    zero_stage: int = Field(0, ge=0, le=3)  # zero_optimization.stage: 0 DDP, 1-2 FSDP2 (ZeRO-2), 3 FSDP2 (ZeRO-3)
    distributed_timeout_minutes: float = Field(10.0, gt=0)  # Megatron: a collective waiting longer fails the run
    max_consecutive_nonfinite: int = Field(10, ge=1)  # ours: non-finite steps are skipped; this many in a row stop
    loss_spike_factor: float = Field(3.0, ge=0)  # ours: warn when an interval's loss > this x the recent median
    # ours: warn when a rank's own work per step (megatron/parallel/stragglers.py) stays this x the other ranks'
    # median for straggler_window log intervals; 0 switches the watch off
    straggler_factor: float = Field(2.0, ge=0)
    straggler_window: int = Field(3, ge=1)
    peak_tflops: float | None = Field(None, gt=0)  # ours: one device's peak for MFU; None: data sheet or a probe
    torch_compile: Literal["auto", "on", "off"] = "auto"  # ours: regional torch.compile; auto: on CUDA only

    @field_validator("precision", mode="before")
    @classmethod
    def bf16_alias(cls, value):
        return "bfloat16" if value == "bf16" else value

    @field_validator("straggler_factor")
    @classmethod
    def off_or_above_one(cls, value: float) -> float:
        if 0 < value <= 1:
            raise ValueError(f"expected 0 (off) or a factor above 1, got {value}")
        return value


class DataArgs(Strict):
    data_path: str | None = None
    train_data_paths: list[str] | None = None
    valid_data_paths: list[str] | None = None
    test_data_paths: list[str] | None = None
    train_data_weights: list[float] | None = None
    valid_data_weights: list[float] | None = None
    test_data_weights: list[float] | None = None
    split: str = "969, 30, 1"
    tokenizer_type: Literal["GPT2BPETokenizer", "HFTokenizer", "SPMTokenizer", "CharLevelTokenizer"] = (
        "GPT2BPETokenizer")
    vocab_file: str | None = None
    merge_file: str | None = None  # GPT2BPETokenizer only
    prepare_data: Literal["shakespeare"] | None = None  # ours: build the bundled corpus into data_path
    num_workers: int = Field(2, ge=0)
    data_impl: Literal["infer", "mmap"] = "infer"  # infer: what the .idx header says; we read mmap only

    @field_validator("train_data_weights", "valid_data_weights", "test_data_weights")
    @classmethod
    def weights_that_sample(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (min(value, default=0) < 0 or sum(value) <= 0):
            raise ValueError(f"expected non-negative weights with a positive sum, got {value}")
        return value

    @field_validator("split")
    @classmethod
    def three_weights(cls, value: str) -> str:
        parts = [p for p in value.replace("/", ",").split(",") if p.strip()]
        try:
            numbers = [float(p) for p in parts]
        except ValueError:
            numbers = []
        if len(numbers) != 3 or min(numbers) < 0 or sum(numbers) <= 0:
            raise ValueError(f"expected three non-negative weights like '969,30,1', got {value!r}")
        return value


class CheckpointArgs(Strict):
    save: str | None = None
    load: str | None = None
    checkpoint_factor: int = Field(1000, ge=1)
    keep_last_n_checkpoints: int | None = Field(None, ge=1)
    async_save: bool = False  # ours: write checkpoints on a background thread (only the copy to CPU stalls)
    overwrite_save: bool = False  # ours: a run that does not resume from `save` may write over its checkpoints


class LoggingArgs(Strict):
    use_wandb: bool = False
    wandb_project: str = "neox"
    wandb_group: str | None = None
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    tensorboard_dir: str | None = None
    log_dir: str | None = None


# pydantic lists fields of the last base first: this order prints model keys first.
class NeoXArgs(LoggingArgs, CheckpointArgs, DataArgs, TrainingArgs, OptimizerArgs, DiffusionArgs, MoEArgs,
               ModelArgs):
    """Every key the framework understands. Build it with `load_config`, which also checks combinations."""

    @property
    def lr(self) -> float:
        return self.optimizer.params.lr

    @property
    def is_moe(self) -> bool:
        return self.moe_num_experts > 1

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, values: dict) -> NeoXArgs:
        return cls.model_validate(values)


# What a checkpoint's model is: a resume whose config differs from the checkpoint's in any of these is refused,
# naming the key (a run's speed and memory settings, its losses' weights and its regularisation may change).
MODEL_KEYS = (
    "model_type", "num_layers", "hidden_size", "num_attention_heads", "head_dim", "num_kv_heads", "pos_emb",
    "rotary_pct",
    "rotary_emb_base", "rope_scaling", "norm", "layernorm_epsilon", "rms_norm_epsilon", "activation", "mlp_multiple_of",
    "use_bias_in_mlp", "sliding_window_width", "qk_norm", "gpt_j_residual", "no_weight_tying", "intermediate_size",
    "attention_sinks", "sliding_window_pattern", "mtp_num_modules",
    "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
    "use_bias_in_norms", "use_bias_in_attn_linear", "moe_num_experts", "moe_top_k", "moe_expert_interval",
    "moe_first_layer", "moe_router_type", "moe_router_score_function", "moe_router_enable_expert_bias",
    "lore_router_enable_bias", "moe_router_num_groups", "moe_router_group_top_k", "moe_router_scaling_factor",
    "moe_router_bias", "moe_use_bias_in_experts", "swiglu_alpha", "swiglu_limit", "moe_num_shared_experts",
    "moe_ffn_hidden_size", "moe_renormalize_weights",
    "lore_num_experts", "lore_rank", "lore_top_k", "lore_mode", "lore_renormalize_weights",
    "image_size", "image_channels", "patch_size", "num_classes", "mlp_ratio", "learn_sigma", "diffusion_steps",
    "remix_num_basis", "remix_num_experts", "remix_mixer", "remix_coeff_scope",
)
# Where a resumed run is in its data: its samples are counted in global batches of seq_length tokens.
DATA_POSITION_KEYS = ("train_batch_size", "seq_length")
