"""YAML configs -> a checked `NeoXArgs`: merge files, apply command-line overrides, translate GPT-NeoX keys.

Every error is one line that names where the value came from (a file, or "command line").
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from megatron.config.needs import options_that_cannot_act
from megatron.config.neox_keys import NEOX_KEYS, REJECTED, SUPPORTED, TRANSLATED
from megatron.config.schema import NeoXArgs
from megatron.model.moe.lore import LoREConfig
from megatron.model.moe.lsh import LSHConfig
from megatron.model.moe.router import Balancing, build_router
from megatron.parallel.expert_parallel import check_ep_layout

log = logging.getLogger("megatron.config")
COMMAND_LINE = "command line"

class ConfigError(ValueError):
    """A bad config, reported in one line."""


def normalize_keys(value: Any) -> Any:
    """Hyphens and underscores are the same key, at every nesting level."""
    if isinstance(value, dict):
        return {str(k).replace("-", "_"): normalize_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalize_keys(v) for v in value]
    return value


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error: plain YAML keeps the
    last one without a word, so a duplicated setting would silently lose to its copy."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            key = key.replace("-", "_") if isinstance(key, str) else key  # hyphens and underscores: one key
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' is given twice (lines {seen[key]} and {key_node.start_mark.line + 1})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def read_yaml(path: str) -> dict[str, Any]:
    if Path(path).is_dir():
        raise ConfigError(f"{path}: is a folder, expected a .yml config file")
    if not Path(path).is_file():
        raise ConfigError(f"{path}: config file does not exist")
    try:
        data = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=UniqueKeyLoader)
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}:{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
    return normalize_keys(data)


def parse_command_line(argv: list[str]) -> tuple[list[str], list[str]]:
    """Positional arguments ending in .yml/.yaml are config files; the rest are `--key value` overrides.

    A launcher's `--local_rank=N` (or `--local_rank N`, `--local-rank=N`) is dropped wherever it stands:
    deepspeed/launcher/launch.py runs `python -u train.py --local_rank=N CONFIG ...` unless given
    --no_local_rank, and torch.distributed.launch passes --local-rank. The rank comes from the environment.
    """
    kept, i = [], 0
    while i < len(argv):
        if argv[i].split("=", 1)[0] in ("--local_rank", "--local-rank"):
            takes_next = "=" not in argv[i] and i + 1 < len(argv) and argv[i + 1].isdigit()
            i += 2 if takes_next else 1
            continue
        kept.append(argv[i])
        i += 1
    paths = []
    for i, arg in enumerate(kept):
        if arg.startswith("-"):
            return paths, kept[i:]
        if not arg.endswith((".yml", ".yaml")):
            raise ConfigError(f"{arg}: expected a .yml/.yaml config file or a --key value override")
        paths.append(arg)
    return paths, []


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    pairs, i = [], 0
    while i < len(overrides):
        arg = overrides[i]
        if not arg.startswith("--"):
            raise ConfigError(f"command line: expected --key value, got {arg!r}")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(overrides):
                raise ConfigError(f"command line: {arg} needs a value")
            key, raw = arg[2:], overrides[i + 1]
            i += 2
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        pairs.append((key.replace("-", "_"), normalize_keys(value)))
    return pairs


def set_dotted(values: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = values
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"command line: {dotted}: {part} is not a mapping")
    node[leaf] = value


def translate_neox_keys(values: dict[str, Any], origin: dict[str, str]) -> list[str]:
    """Reads GPT-NeoX's keys by the table in neox_keys.py; removes and returns the ones that are ignored."""
    ignored = []
    extra, where = values.pop("deepspeed_extra_args", None) or {}, origin.get("deepspeed_extra_args", COMMAND_LINE)
    if not isinstance(extra, dict):
        raise ConfigError(f"{where}: deepspeed_extra_args: expected a mapping of DeepSpeed config keys")
    for key, value in extra.items():  # NeoX hands these to DeepSpeed as if they were top-level keys
        if key in values and values[key] != value:
            raise ConfigError(f"{where}: deepspeed_extra_args.{key} contradicts {key}")
        values[key] = value
        origin.setdefault(key, where)
    check_unknown_keys(extra, origin)
    for key in [k for k in values if k not in NeoXArgs.model_fields]:
        entry = NEOX_KEYS.get(key)
        if entry is None or entry.kind in (SUPPORTED, TRANSLATED):  # SUPPORTED: all are schema fields
            continue
        if entry.kind == REJECTED and not entry.accepts(values[key]):
            fix = yaml.safe_dump(entry.default, default_flow_style=True).strip().removesuffix("...").strip()
            raise ConfigError(f"{origin.get(key, COMMAND_LINE)}: {key}: {values[key]!r} is not supported "
                              f"({entry.reason}); pass --{key} {fix}" + entry.hint.format(value=values[key]))
        del values[key]
        ignored.append(key)
    ignored += translate_deepspeed_blocks(values, origin)
    if "attention_config" in values:
        kinds = set()
        for entry in values.pop("attention_config") or []:
            kinds.update(entry[0] if isinstance(entry, list) and entry else [])
        unsupported = kinds - {"global", "flash"}
        if unsupported:
            raise ConfigError(f"{origin['attention_config']}: attention_config: {sorted(unsupported)} "
                              "not supported (only global or flash attention)")
        if "flash" in kinds:
            values.setdefault("attention_impl", "flash")
    if "lr" in values:
        lr, where = values.pop("lr"), origin.get("lr", COMMAND_LINE)
        optimizer = values.setdefault("optimizer", {}) or {}
        if not isinstance(optimizer, dict):
            raise ConfigError(f"{origin.get('optimizer', COMMAND_LINE)}: optimizer: expected a mapping with params")
        params = optimizer.setdefault("params", {}) or {}
        if where != COMMAND_LINE and "lr" in params and params["lr"] != lr:
            raise ConfigError(f"{where}: lr {lr!r} contradicts optimizer.params.lr {params['lr']!r}")
        params["lr"] = lr  # a command-line --lr overrides the file's optimizer block
        optimizer["params"], values["optimizer"] = params, optimizer
        origin.setdefault("optimizer", where)
    for old, new, where in (("expert_interval", "moe_expert_interval", "legacy MoE key"),
                            ("peak_theoretical_tflops", "peak_tflops", "NeoX key")):
        if old in values:
            if new in values and values[new] != values[old]:
                raise ConfigError(f"{origin.get(old, COMMAND_LINE)}: {old} ({where}) contradicts {new}")
            values[new] = values.pop(old)
            origin.setdefault(new, origin.get(old, COMMAND_LINE))
    if "expansion_factor" in values:
        factor, where = values.pop("expansion_factor"), origin.get("expansion_factor", COMMAND_LINE)
        if factor is not None:
            if values.get("intermediate_size") is not None:
                raise ConfigError(f"{where}: give either expansion_factor or intermediate_size, not both")
            if not isinstance(values.get("hidden_size"), int):
                raise ConfigError(f"{where}: expansion_factor needs hidden_size in the config")
            values["intermediate_size"] = int(factor * values["hidden_size"])
            origin.setdefault("intermediate_size", where)
    return ignored


def translate_deepspeed_blocks(values: dict[str, Any], origin: dict[str, str]) -> list[str]:
    """zero_optimization.stage -> zero_stage, fp16/bf16.enabled -> precision; their other settings are ignored."""
    ignored = []
    if "zero_optimization" in values:  # its stage maps onto FSDP2; bucket sizes, overlap, offload do not
        section, where = values.pop("zero_optimization") or {}, origin.get("zero_optimization", COMMAND_LINE)
        if not isinstance(section, dict):
            raise ConfigError(f"{where}: zero_optimization: expected a mapping with 'stage'")
        if "stage" in section:
            if "zero_stage" in values and values["zero_stage"] != section["stage"]:
                raise ConfigError(f"{where}: zero_optimization.stage contradicts zero_stage")
            values["zero_stage"] = section["stage"]
            origin.setdefault("zero_stage", where)
        ignored += [f"zero_optimization.{k}" for k in sorted(section) if k != "stage"]
    for key, precision in (("fp16", "fp16"), ("bf16", "bfloat16")):
        if key not in values:
            continue
        section, where = values.pop(key), origin.get(key, COMMAND_LINE)
        enabled = bool(section.get("enabled", False)) if isinstance(section, dict) else bool(section)
        if isinstance(section, dict):
            ignored += [f"{key}.{k}" for k in sorted(section) if k != "enabled"]
        if enabled:
            explicit = values.get("precision")
            if explicit is not None and str(explicit).replace("bf16", "bfloat16") != precision:
                raise ConfigError(f"{where}: {key}.enabled contradicts precision: {explicit}")
            values["precision"] = precision
            origin.setdefault("precision", where)
    return ignored


def check_unknown_keys(values: dict[str, Any], origin: dict[str, str]) -> None:
    known = set(NeoXArgs.model_fields) | set(NEOX_KEYS)
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{origin.get(key, COMMAND_LINE)}: unknown key '{key}'{hint}")


def describe_validation_error(err: ValidationError, origin: dict[str, str]) -> str:
    first = err.errors()[0]
    path = ".".join(str(p) for p in first["loc"])
    where = origin.get(str(first["loc"][0]), "defaults") if first["loc"] else "config"
    got = first.get("input")
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] in ("int_parsing", "int_type", "float_parsing", "float_type", "bool_parsing", "bool_type",
                         "literal_error", "string_type", "list_type", "dict_type", "greater_than_equal",
                         "less_than_equal", "greater_than", "less_than", "model_type", "tuple_type"):
        message = f"{message[0].lower()}{message[1:]}, got {got!r}"
    return f"{where}: {path}: {message}"


def batch_size_value(values: dict[str, Any], key: str, origin: dict[str, str]) -> int | None:
    """A batch-size key as an int before the schema sees it (the sizes are derived from each other first)."""
    value = values.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.isdigit())) \
            or int(value) < 1:
        raise ConfigError(f"{origin.get(key, COMMAND_LINE)}: {key}: expected a positive integer, got {value!r}")
    return int(value)


def fill_batch_sizes(values: dict[str, Any], dp: int, origin: dict[str, str] | None = None) -> None:
    micro, accum, total = (batch_size_value(values, key, origin or {}) for key in (
        "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"))
    if micro and accum and total:
        if micro * accum * dp != total:
            raise ConfigError(
                f"train_batch_size {total} != train_micro_batch_size_per_gpu {micro} x "
                f"gradient_accumulation_steps {accum} x data-parallel size {dp} (the number of ranks): leave "
                "gradient_accumulation_steps out to derive it from the ranks"
            )
    elif micro and total:
        if total % (micro * dp):
            raise ConfigError(f"train_batch_size {total} is not divisible by micro batch {micro} x data-parallel {dp}")
        values["gradient_accumulation_steps"] = total // (micro * dp)
    elif accum and total:
        if total % (accum * dp):
            raise ConfigError(f"train_batch_size {total} is not divisible by accumulation {accum} x data-parallel {dp}")
        values["train_micro_batch_size_per_gpu"] = total // (accum * dp)
    else:
        micro = micro or 4
        accum = accum or 1
        values["train_micro_batch_size_per_gpu"], values["gradient_accumulation_steps"] = micro, accum
        values["train_batch_size"] = micro * accum * dp


def check_combinations(args: NeoXArgs, data_parallel_size: int = 1) -> None:
    if args.head_dim is None and args.hidden_size % args.num_attention_heads:
        raise ConfigError(f"hidden_size {args.hidden_size} is not divisible by num_attention_heads "
                          f"{args.num_attention_heads}")
    if args.num_kv_heads and args.num_attention_heads % args.num_kv_heads:
        raise ConfigError(f"num_attention_heads {args.num_attention_heads} is not divisible by num_kv_heads "
                          f"{args.num_kv_heads}")
    if args.max_position_embeddings < args.seq_length:
        raise ConfigError(f"max_position_embeddings {args.max_position_embeddings} < seq_length {args.seq_length}")
    check_moe_settings(args)
    check_mla(args)
    if args.min_lr > args.lr:
        raise ConfigError(f"min_lr {args.min_lr} > optimizer.params.lr {args.lr}")
    if args.data_path and args.train_data_paths:
        raise ConfigError("give either data_path or train_data_paths, not both")
    for split in ("train", "valid", "test"):
        paths, weights = getattr(args, f"{split}_data_paths"), getattr(args, f"{split}_data_weights")
        if weights is not None and (paths is None or len(paths) != len(weights)):
            raise ConfigError(f"{split}_data_weights has {len(weights)} entries but {split}_data_paths has "
                              f"{len(paths or [])}")
    if args.model_type == "gpt" and not args.train_data_paths:  # one corpus split three ways
        train_share, valid_share, _ = (float(w) for w in args.split.replace("/", ",").split(",") if w.strip())
        if train_share == 0:
            raise ConfigError(f"split {args.split!r} gives training no documents: expected a positive first weight")
        if args.eval_interval and args.eval_iters and valid_share == 0 and not args.valid_data_paths:
            raise ConfigError(f"split {args.split!r} leaves no validation documents but eval_interval is "
                              f"{args.eval_interval}: give the second weight a share, or set eval_interval 0")
    moe_layers = moe_layer_indices(args)
    if args.is_moe and not moe_layers:
        raise ConfigError(f"moe_first_layer {args.moe_first_layer} leaves no MoE layer in num_layers "
                          f"{args.num_layers}: expected a layer index below {args.num_layers}")
    try:
        check_ep_layout(args.moe_expert_parallel_size, args.moe_num_experts, data_parallel_size)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if args.lsh_compression:
        for layer in args.lsh_layers or []:
            if layer not in moe_layers:
                raise ConfigError(f"lsh_layers: {layer} is not an MoE layer (MoE layers: {moe_layers})")
    if args.prepare_data and not args.data_path:
        raise ConfigError(f"prepare_data: {args.prepare_data} needs data_path (the dataset prefix to create)")
    if args.model_type == "dit":
        check_dit(args)


def check_moe_settings(args: NeoXArgs) -> None:
    """The model's own checks of its MoE settings (the router's, LoREConfig's, LSHConfig's), run on the config so
    that each rule has one copy and a setting the model would refuse is a one-line ConfigError before any build."""
    try:
        if args.is_moe:  # a 1-wide gate: only the settings matter here
            build_router(args.moe_router_type, hidden_size=1, num_experts=args.moe_num_experts, top_k=args.moe_top_k,
                         score_function=args.moe_router_score_function,
                         balancing=Balancing(args.moe_router_enable_expert_bias, args.moe_router_bias_update_rate,
                                             args.moe_lbl_scope),
                         num_groups=args.moe_router_num_groups, group_top_k=args.moe_router_group_top_k,
                         scaling_factor=args.moe_router_scaling_factor)
        else:  # a dense model builds no router, but its moe_top_k is still held to moe_num_experts
            build_router("topk", hidden_size=1, num_experts=args.moe_num_experts, top_k=args.moe_top_k)
        if args.lore_num_experts > 0:
            LoREConfig(args.lore_num_experts, args.lore_rank, args.lore_top_k, args.lore_mode,
                       args.lore_renormalize_weights,
                       Balancing(args.lore_router_enable_bias, args.lore_router_bias_update_rate, args.lore_lbl_scope))
        if args.lsh_compression:
            LSHConfig(args.lsh_num_hashes, args.lsh_hash_dim, args.lsh_error_compensation)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_mla(args: NeoXArgs) -> None:
    """Multi-head latent attention's own checks (megatron/model/mla.py), run on the config: its head dims, and the
    attention settings it cannot honour."""
    from megatron.model.mla import check_mla_settings, mla_config

    try:
        if mla_config(args.kv_lora_rank, args.q_lora_rank, args.qk_nope_head_dim, args.qk_rope_head_dim,
                      args.v_head_dim) is not None:
            check_mla_settings(args)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def moe_layer_indices(args: NeoXArgs) -> list[int]:
    """The layers the model will build as MoE layers (the model's own rule, MoEArchitecture.is_moe_layer)."""
    from megatron.model.moe.config import MoEArchitecture

    settings = MoEArchitecture(args.moe_num_experts, expert_interval=args.moe_expert_interval,
                               first_layer=args.moe_first_layer)
    return [i for i in range(args.num_layers) if settings.is_moe_layer(i)]


def check_dit(args: NeoXArgs) -> None:
    if args.image_size % args.patch_size:
        raise ConfigError(f"image_size {args.image_size} is not divisible by patch_size {args.patch_size}")
    if args.beta_start >= args.beta_end:
        raise ConfigError(f"beta_start {args.beta_start} must be below beta_end {args.beta_end}")
    if args.is_moe or args.lsh_compression:
        raise ConfigError("model_type dit: MoE keys (moe_num_experts, lsh_compression) are for GPT models")
    if args.image_dataset in ("folder", "latents") and not args.image_path:
        raise ConfigError(f"image_dataset {args.image_dataset} needs image_path")
    if args.image_dataset == "latents" and not args.image_labels_path:
        raise ConfigError("image_dataset latents needs image_labels_path (a .npy of integer labels)")
    if args.remix_num_basis:
        if args.remix_num_experts > args.diffusion_steps:
            raise ConfigError(f"remix_num_experts {args.remix_num_experts} > diffusion_steps {args.diffusion_steps}")


def load_config(paths: list[str], overrides: list[str] | tuple[str, ...] = (), data_parallel_size: int = 1) -> NeoXArgs:
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for path in paths:
        for key, value in read_yaml(path).items():
            if key in values:
                raise ConfigError(f"{path}: key '{key}' is also set in {origin[key]}")
            values[key], origin[key] = value, path
    check_unknown_keys(values, origin)
    for key, value in parse_overrides(list(overrides)):  # before NeoX keys are read: an override can undo one
        check_unknown_keys({key.split(".")[0]: value}, {})
        set_dotted(values, key, value)
        origin[key.split(".")[0]] = COMMAND_LINE
    ignored = translate_neox_keys(values, origin)

    fill_batch_sizes(values, data_parallel_size, origin)
    try:
        args = NeoXArgs.model_validate(values)
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err, origin)) from None
    unusable = options_that_cannot_act(args)
    if unusable:  # the first, as for every other error: one line
        key, needs = unusable[0]
        raise ConfigError(f"{origin.get(key, COMMAND_LINE)}: {key}: {getattr(args, key)!r} cannot act in this "
                          f"model: it needs {needs}")
    args.max_position_embeddings = args.max_position_embeddings or args.seq_length
    args.intermediate_size = args.intermediate_size or 4 * args.hidden_size
    args.moe_ffn_hidden_size = args.moe_ffn_hidden_size or args.intermediate_size
    args.lr_decay_iters = args.lr_decay_iters or args.train_iters
    check_combinations(args, data_parallel_size)
    if ignored:
        log.warning("ignored GPT-NeoX keys (speed, memory, launch or logging settings, or "
                    "at their defaults; see megatron/config/neox_keys.py): %s", ", ".join(ignored))
    object.__setattr__(args, "ignored_keys", ignored)
    object.__setattr__(args, "config_files", list(paths))
    return args


def check_data_files(args: NeoXArgs) -> None:
    """Every dataset prefix must exist (unless the bundled corpus is to be built) and so must vocab_file."""
    if args.model_type == "dit":
        for key in ("image_path", "image_labels_path", "remix_init_from"):
            path = getattr(args, key)
            if path and not Path(path).exists():
                raise ConfigError(f"{key}: {path} does not exist")
        return
    if args.vocab_file and Path(args.vocab_file).is_dir():
        raise ConfigError(f"vocab_file: {args.vocab_file} is a folder; expected the tokenizer's file (a .json, .model "
                          "or GPT-2 vocab.json)")
    if args.vocab_file and not Path(args.vocab_file).is_file():
        raise ConfigError(f"vocab_file: {args.vocab_file} does not exist")
    if args.tokenizer_type == "GPT2BPETokenizer" and not (args.merge_file and Path(args.merge_file).is_file()):
        raise ConfigError(f"merge_file: GPT2BPETokenizer needs an existing merge_file, got {args.merge_file}")
    if args.tokenizer_type != "CharLevelTokenizer" and not args.vocab_file:
        raise ConfigError(f"tokenizer_type {args.tokenizer_type} needs vocab_file")
    if not args.data_path and not args.train_data_paths:
        raise ConfigError("no training data: set data_path or train_data_paths")
    if args.prepare_data:
        if args.data_path.endswith(("/", "\\")) or Path(args.data_path).is_dir():
            raise ConfigError(f"data_path: {args.data_path} is a folder; expected the prefix to build the corpus at "
                              "(e.g. data/shakespeare/shakespeare_text_document)")
        return
    prefixes = [("data_path", args.data_path)] if args.data_path else []
    for split in ("train", "valid", "test"):
        prefixes += [(f"{split}_data_paths", p) for p in getattr(args, f"{split}_data_paths") or []]
    for key, prefix in prefixes:
        if prefix.endswith(("/", "\\")) or Path(prefix).is_dir():
            raise ConfigError(f"{key}: {prefix} is a folder; expected a dataset prefix, the path of its .bin/.idx "
                              "pair without the suffix (e.g. data/mydata_text_document)")
        for suffix in (".bin", ".idx"):
            if not Path(prefix + suffix).is_file():
                raise ConfigError(f"{key}: {prefix}{suffix} does not exist (expected a GPT-NeoX .bin/.idx "
                                  "dataset; make one with tools/preprocess_data.py)")


def check_machine(args: NeoXArgs) -> None:
    """What the config asks of this machine (a GPU, flash-attn, the grouped GEMM kernel) is here: one line each,
    before anything is built, instead of a traceback from deep inside the first forward."""
    import importlib.util

    import torch

    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        raise ConfigError("device: cuda, but this machine has no CUDA device: use device: auto or cpu")
    runs_on_cuda = cuda and args.device != "cpu"
    if args.attention_impl == "flash" and args.model_type == "gpt":
        if not runs_on_cuda:
            raise ConfigError("attention_impl: flash needs a CUDA device: use attention_impl: sdpa here")
        if importlib.util.find_spec("flash_attn") is None:
            raise ConfigError("attention_impl: flash needs the flash-attn package (pip install flash-attn), "
                              "or use attention_impl: sdpa")
    if args.moe_impl in ("grouped_gemm", "megablocks") and args.is_moe:
        from megatron.model.moe.kernels import load_gmm

        if not runs_on_cuda or load_gmm() is None:
            raise ConfigError(f"moe_impl: {args.moe_impl} needs a CUDA device and the grouped_gemm package "
                              "(pip install grouped_gemm): use moe_impl: auto here")
