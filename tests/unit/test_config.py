"""Config merge, aliases, overrides, GPT-NeoX compatibility and one-line errors."""

from pathlib import Path

import pytest

from megatron.config import ConfigError, NeoXArgs, check_data_files, load_config, parse_command_line

NEOX = Path(__file__).resolve().parents[1] / "data" / "neox"
NEOX_125M = [str(NEOX / "125M.yml"), str(NEOX / "local_setup.yml")]  # as GPT-NeoX's README runs it


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_files_merge_in_order_and_overrides_win(tmp_path):
    model = write(tmp_path, "model.yml", "num_layers: 6\nhidden_size: 256\nnum_attention_heads: 8\n")
    local = write(tmp_path, "local.yml", "train_iters: 50\nsave: runs/a\n")
    args = load_config([model, local], ["--train_iters", "30", "--save=runs/b"])
    assert (args.num_layers, args.hidden_size, args.train_iters, args.save) == (6, 256, 30, "runs/b")
    assert args.config_files == [model, local]


def test_a_key_given_twice_names_both_files(tmp_path):
    a = write(tmp_path, "a.yml", "train_iters: 10\n")
    b = write(tmp_path, "b.yml", "train-iters: 20\n")
    with pytest.raises(ConfigError, match=r"b\.yml: key 'train_iters' is also set in .*a\.yml"):
        load_config([a, b])


def test_hyphens_and_underscores_are_the_same_key(tmp_path):
    path = write(tmp_path, "c.yml", "train-micro-batch-size-per-gpu: 3\noptimizer: {type: Adam, params: {lr: 0.01}}\n")
    args = load_config([path], ["--gradient-accumulation-steps", "2"])
    assert args.train_micro_batch_size_per_gpu == 3 and args.gradient_accumulation_steps == 2
    assert args.train_batch_size == 6 and args.lr == 0.01


def test_yaml_and_dotted_overrides():
    args = load_config([], ["--optimizer", "{type: AdamW, params: {lr: 0.002, betas: [0.8, 0.9]}}",
                            "--train_data_paths", "[a, b]", "--optimizer.params.eps", "1e-6"])
    assert args.optimizer.params.lr == 0.002 and args.optimizer.params.betas == (0.8, 0.9)
    assert args.optimizer.params.eps == 1e-6 and args.train_data_paths == ["a", "b"]


def test_unknown_key_suggests_the_right_one(tmp_path):
    path = write(tmp_path, "d.yml", "hiden_size: 64\n")
    with pytest.raises(ConfigError, match=r"d\.yml: unknown key 'hiden_size' \(did you mean 'hidden_size'\?\)"):
        load_config([path])
    with pytest.raises(ConfigError, match=r"command line: unknown key 'trian_iters'"):
        load_config([], ["--trian_iters", "3"])


def test_wrong_type_and_bad_choice_name_file_and_key(tmp_path):
    path = write(tmp_path, "e.yml", "hidden_size: abc\n")
    with pytest.raises(ConfigError, match=r"e\.yml: hidden_size: .*integer.*'abc'"):
        load_config([path])
    path = write(tmp_path, "f.yml", "norm: batchnorm\n")
    with pytest.raises(ConfigError, match=r"f\.yml: norm: .*'layernorm' or 'rmsnorm'.*'batchnorm'"):
        load_config([path])


def test_batch_sizes_fill_in_and_must_multiply_out():
    args = load_config([], ["--train_batch_size", "32", "--train_micro_batch_size_per_gpu", "4"],
                       data_parallel_size=2)
    assert args.gradient_accumulation_steps == 4
    with pytest.raises(ConfigError, match="train_batch_size 30 != .* 4 x .* 4 x data-parallel size 2"):
        load_config([], ["--train_batch_size", "30", "--train_micro_batch_size_per_gpu", "4",
                         "--gradient_accumulation_steps", "4"], data_parallel_size=2)


def test_impossible_combinations():
    with pytest.raises(ConfigError, match="hidden_size 770 is not divisible by num_attention_heads 12"):
        load_config([], ["--hidden_size", "770", "--num_attention_heads", "12"])
    with pytest.raises(ConfigError, match="moe_top_k 3 must be between 1 and moe_num_experts 2"):
        load_config([], ["--moe_num_experts", "2", "--moe_top_k", "3"])
    with pytest.raises(ConfigError, match=r"command line: lore_num_experts: 4 cannot act in this model: it needs an "
                       r"MoE model \(moe_num_experts > 1\)"):
        load_config([], ["--lore_num_experts", "4", "--lore_rank", "2"])


def test_real_neox_config_loads_with_ignored_keys_reported(caplog):
    args = load_config(NEOX_125M)
    assert (args.num_layers, args.hidden_size, args.num_attention_heads, args.seq_length) == (12, 768, 12, 2048)
    assert args.precision == "fp16"  # from the fp16 {enabled: true} section, not dropped
    assert args.init_method == "small_init" and args.output_layer_init_method == "wang_init"
    assert args.lr == 0.0006 and args.min_lr == 0.00006 and args.no_weight_tying
    assert args.data_path == "data/enwik8/enwik8_text_document" and args.save == "checkpoints"
    assert args.tokenizer_type == "GPT2BPETokenizer"  # NeoX's default, with local_setup's vocab and merges files
    assert args.zero_stage == 1  # zero_optimization.stage maps onto FSDP2; its bucket settings do not
    assert {"zero_optimization.allgather_bucket_size", "bias_gelu_fusion", "model_parallel_size", "hostfile",
            "fp16.loss_scale", "checkpoint_validation_with_forward_pass"} <= set(args.ignored_keys)
    assert "bias_gelu_fusion" in caplog.text and "hostfile" in caplog.text


@pytest.mark.parametrize("text, world, message", [
    ("moe_num_experts: 4\nmoe_expert_parallel_size: 3\n", 4, "must divide the number of ranks 4"),
    ("moe_num_experts: 2\nmoe_expert_parallel_size: 4\n", 4, "every EP rank must hold at least one expert"),
    ("moe_expert_parallel_size: 2\n", 2, "needs an MoE model"),
    ("zero_optimization: {stage: 4}\n", 1, "zero_stage: input should be less than or equal to 3"),
    ("zero_optimization: {stage: 1}\nzero_stage: 3\n", 1, "zero_optimization.stage contradicts zero_stage"),
    ("lsh_compression: true\n", 1, "lsh_compression: True cannot act in this model: it needs an MoE model"),
    ("moe_num_experts: 4\nlsh_compression: true\nlsh_num_hashes: 9\n", 1, "do not fit a 40-bit key"),
    ("moe_num_experts: 4\nmoe_expert_interval: 2\nlsh_compression: true\nlsh_layers: [1]\n", 1,
     r"lsh_layers: 1 is not an MoE layer \(MoE layers: \[0\]\)"),
    ("moe_num_experts: 4\nmoe_expert_interval: 2\nmoe_first_layer: 1\nlsh_compression: true\nlsh_layers: [0]\n",
     1, r"lsh_layers: 0 is not an MoE layer \(MoE layers: \[1\]\)"),
    ("moe_num_experts: 4\nmoe_first_layer: 2\n", 1, r"moe_first_layer 2 leaves no MoE layer in num_layers 2"),
])
def test_layout_errors_name_the_key(tmp_path, text, world, message):
    with pytest.raises(ConfigError, match=message):
        load_config([write(tmp_path, "p.yml", text)], data_parallel_size=world)


def test_uneven_expert_parallelism_is_accepted():
    args = load_config([], ["--moe_num_experts", "21", "--moe_expert_parallel_size", "8"], data_parallel_size=16)
    assert args.moe_expert_parallel_size == 8 and args.zero_stage == 0


def test_unsupported_parallelism_and_contradicting_precision(tmp_path):
    with pytest.raises(ConfigError, match="model_parallel_size: 2 is not supported"):
        load_config([write(tmp_path, "g.yml", "model_parallel_size: 2\n")])
    path = write(tmp_path, "h.yml", "precision: bfloat16\nfp16: {enabled: true}\n")
    with pytest.raises(ConfigError, match="fp16.enabled contradicts precision"):
        load_config([path])


def test_resolved_config_round_trips(tmp_path):
    args = load_config(NEOX_125M, ["--moe_num_experts", "8", "--lore_num_experts", "4", "--lore_rank", "2"])
    assert args.max_position_embeddings == 2048 and args.intermediate_size == 3072
    assert args.moe_ffn_hidden_size == 3072 and args.lr_decay_iters == 320000
    import yaml

    assert NeoXArgs.from_dict(yaml.safe_load(args.to_yaml())) == args


def test_check_data_files_names_the_missing_prefix(tmp_path):
    args = load_config([], ["--data_path", str(tmp_path / "nothing"), "--tokenizer_type", "CharLevelTokenizer"])
    with pytest.raises(ConfigError, match=r"data_path: .*nothing\.bin does not exist"):
        check_data_files(args)
    vocab = tmp_path / "tok.json"
    args = load_config([], ["--data_path", "x", "--vocab_file", str(vocab)])
    with pytest.raises(ConfigError, match=r"vocab_file: .*tok\.json does not exist"):
        check_data_files(args)


def test_command_line_split_and_yaml_errors(tmp_path):
    assert parse_command_line(["a.yml", "b.yaml", "--x", "1"]) == (["a.yml", "b.yaml"], ["--x", "1"])
    with pytest.raises(ConfigError, match="missing.yml: config file does not exist"):
        load_config([str(tmp_path / "missing.yml")])
    bad = write(tmp_path, "bad.yml", "a: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yml: line \d+: invalid YAML"):
        load_config([bad])
