"""Config loading: YAML files merged in order, overrides, GPT-NeoX compatibility, a typed schema."""

from megatron.config.loader import ConfigError, check_data_files, check_machine, load_config, parse_command_line
from megatron.config.schema import NeoXArgs

__all__ = ["ConfigError", "NeoXArgs", "check_data_files", "check_machine", "load_config", "parse_command_line"]
