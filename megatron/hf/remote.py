"""Our model's own source, shipped into a Hugging Face folder as `trust_remote_code` modules.

transformers' dynamic-module loader copies the modeling file and, recursively, every file it imports as
`from .name import ...` (a regex over the text, so only that form counts), into one flat package. So the
import closure of megatron/model/gpt.py is computed from the source (every `from megatron... import`,
inside functions and TYPE_CHECKING blocks too), each module is written as one flat file
(`megatron.model.moe.layer` -> `model_moe_layer.py`, a package's `__init__` -> `model_moe.py`) and its
`megatron` imports are rewritten to those names. Nothing is hard-coded: a module gpt.py starts importing
is shipped the next time. A package import of a submodule (`from megatron.model.moe import kernels`)
becomes `from . import model_moe_kernels as kernels`, which the loader's regex does not see, so a manifest
module imports every shipped file in the `from .x import` form and the modeling file imports it.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import megatron
from megatron.runtime import optional_import

ROOT = Path(megatron.__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
CONFIG_FILE, MODELING_FILE, MANIFEST = "configuration_megatron_gpt", "modeling_megatron_gpt", "megatron_modules"
AUTO_MAP = {"AutoConfig": f"{CONFIG_FILE}.MegatronGPTConfig",
            "AutoModelForCausalLM": f"{MODELING_FILE}.MegatronGPTForCausalLM"}


def flat_name(module: str) -> str:
    return module.removeprefix("megatron.").replace(".", "_")


def source_file(module: str) -> Path | None:
    base = ROOT / Path(*module.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return base / "__init__.py" if (base / "__init__.py").is_file() else None


def _megatron_imports(module: str, path: Path) -> list[tuple[ast.ImportFrom, list[str]]]:
    """Each `from megatron... import` in the file with the modules it needs (submodules of a package
    when the names imported are submodules, else the module itself)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "megatron" for a in node.names):
            raise ValueError(f"{path}:{node.lineno}: `import megatron...` cannot be shipped as remote code "
                             "(expected `from megatron.x import y`)")
        if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith("megatron"):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                raise ValueError(f"{path}:{node.lineno}: relative imports cannot be shipped (expected absolute)")
            continue
        if source_file(node.module) is None:
            raise ValueError(f"{path}:{node.lineno}: {node.module} is not a module of this repository")
        subs = [f"{node.module}.{a.name}" for a in node.names if source_file(f"{node.module}.{a.name}")]
        if subs and len(subs) != len(node.names):
            raise ValueError(f"{path}:{node.lineno}: mixes submodules and names in one import; split it")
        found.append((node, subs or [node.module]))
    return found


def import_closure(start: str = "megatron.model.gpt") -> dict[str, Path]:
    """Every repository module `start` needs, by dotted name."""
    closure: dict[str, Path] = {}
    todo = [start]
    while todo:
        module = todo.pop()
        if module in closure:
            continue
        closure[module] = source_file(module)
        for _, needed in _megatron_imports(module, closure[module]):
            todo.extend(needed)
    flats = [flat_name(m) for m in closure]
    if len(set(flats)) != len(flats):
        raise ValueError(f"two modules flatten to one file name: {sorted(flats)}")
    return closure


def flatten_source(module: str, path: Path) -> str:
    """The module's text with its `megatron` imports made relative to the flat package."""
    lines = path.read_text().splitlines(keepends=True)
    for node, needed in sorted(_megatron_imports(module, path), key=lambda item: -item[0].lineno):
        start = node.lineno - 1
        if needed != [node.module]:  # submodules of a package, imported as modules
            indent = lines[start][:len(lines[start]) - len(lines[start].lstrip())]
            new = "".join(f"{indent}from . import {flat_name(m)} as {a.asname or a.name}\n"
                          for m, a in zip(needed, node.names, strict=True))
            lines[start:node.end_lineno] = [new]
            continue
        pattern = r"\bfrom\s+" + re.escape(node.module) + r"\s+import\b"
        lines[start], count = re.subn(pattern, f"from .{flat_name(node.module)} import", lines[start], count=1)
        if count != 1:
            raise ValueError(f"{path}:{node.lineno}: could not rewrite the import of {node.module}")
    header = f"# Shipped from megatron-moe {path.relative_to(ROOT)}, imports made relative (megatron/hf/remote.py).\n"
    return header + "".join(lines)


def encode(value: Any) -> Any:
    """A config (nested dataclasses) as JSON, each dataclass tagged with its flat module and class name."""
    if dataclasses.is_dataclass(value):
        tag = f"{flat_name(type(value).__module__)}.{type(value).__qualname__}"
        return {"__dataclass__": tag, **{f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"config value {value!r} ({type(value).__name__}) cannot be written to config.json")


def _replace_existing(obj: Any, **changes: Any) -> Any:
    names = {f.name for f in dataclasses.fields(obj)}
    return dataclasses.replace(obj, **{k: v for k, v in changes.items() if k in names})


def portable_config(cfg: Any) -> Any:
    """The model's config for inference anywhere: no activation checkpointing, torch's attention. The MoE
    runtime (expert parallelism, LSH, kernels) is not part of a config: the remote model builds with its own
    (modeling_megatron_gpt.py)."""
    return _replace_existing(cfg, checkpoint_activations=False, attention_impl="sdpa")


def write_remote_folder(out: Path, model: nn.Module, extra_config: dict[str, Any]) -> dict[str, Any]:
    """config.json, model.safetensors and the modules: `AutoModelForCausalLM.from_pretrained(out,
    trust_remote_code=True)` builds our GPT with these weights. The weights are the whole state dict, buffers
    included (the loss-free balancing biases `expert_bias_E`, `lore_bias_EM`), so routing is ours too.
    Returns config.json's contents."""
    save_file = optional_import("safetensors.torch", "hf", "convert_to_hf").save_file

    out.mkdir(parents=True, exist_ok=True)
    closure = import_closure()
    for module, path in closure.items():
        (out / f"{flat_name(module)}.py").write_text(flatten_source(module, path))
    manifest = ['"""Every shipped module, imported so that transformers copies them all."""\n\n']
    manifest += [f"from .{flat_name(m)} import __name__ as {flat_name(m)}  # noqa: F401\n" for m in sorted(closure)]
    (out / f"{MANIFEST}.py").write_text("".join(manifest))
    for name in (CONFIG_FILE, MODELING_FILE):
        (out / f"{name}.py").write_text((HERE / f"{name}.py").read_text())
    cfg = portable_config(model.cfg)
    config = {
        "architectures": ["MegatronGPTForCausalLM"], "model_type": "megatron_gpt", "auto_map": AUTO_MAP,
        "gpt": encode(cfg), "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_attention_heads,
        "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": False,
        "dtype": "float32", **extra_config,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {f"model.{k}": v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return config
