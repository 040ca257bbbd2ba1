"""The remote code of an export folder IS the project's PyTorch runtime: these modules are
copied into the folder as flat files, only their imports of each other rewritten to relative
ones (``from data_pipelines.render import X`` -> ``from .render import X``), so
``trust_remote_code`` loads the same code the project tests, with no package of this project
installed. The training package's path layer and config errors are replaced by
``local_files.py`` (an export folder is local). A project import outside the bundle is an
error, and ``flatten`` changes import lines only (a test checks both)."""

from __future__ import annotations

import re
from importlib import util
from pathlib import Path

# project module -> file name in the export folder (imports of each other become relative)
RUNTIME = {
    "vist2_jax.row_contract": "row_contract.py",
    "vist2_jax.export.local_files": "local_files.py",
    "data_pipelines.fonts": "fonts.py",
    "data_pipelines.glyph_atlas": "glyph_atlas.py",
    "data_pipelines.render_stats": "render_stats.py",
    "data_pipelines.render": "render.py",
    "data_pipelines.tokenizer": "tokenizer.py",
    "vist2_jax.export.torch_mask": "torch_mask.py",
    "vist2_jax.export.configuration_vist2": "configuration_vist2.py",
    "vist2_jax.export.modeling_vist2": "modeling_vist2.py",
    "vist2_jax.export.tokenization_vist2": "tokenization_vist2.py",
}
# what stands in for the training package where the runtime imports it
SUBSTITUTES = {"vist2_jax.storage": "vist2_jax.export.local_files",
               "vist2_jax.config.schema": "vist2_jax.export.local_files"}
AUTO_MAP = {"AutoConfig": "configuration_vist2.Vist2Config",
            "AutoModelForCausalLM": "modeling_vist2.Vist2ForCausalLM"}
TOKENIZER_AUTO_MAP = {"AutoTokenizer": ["tokenization_vist2.Vist2Tokenizer", None]}
PROJECT = ("vist2_jax", "data_pipelines")
_IMPORT = re.compile(r"^(\s*)from\s+((?:vist2_jax|data_pipelines)(?:\.[\w.]+)?)\s+import\s+(.+)$")


def source_file(module: str) -> Path:
    return Path(util.find_spec(module).origin)


def flatten(text: str, module: str) -> str:
    """``text`` (the source of ``module``) with its project imports made relative to the folder."""
    lines = []
    for number, line in enumerate(text.splitlines(keepends=True), start=1):
        match = _IMPORT.match(line.rstrip("\n"))
        if match:
            indent, target, names = match.groups()
            if target in PROJECT:  # ``from vist2_jax import storage``: the module is the name
                target = f"{target}.{names.strip()}"
            target = SUBSTITUTES.get(target, target)
            if target not in RUNTIME:
                raise ValueError(f"{module}:{number}: imports {match.group(2)}, which the export bundle lacks")
            line = f"{indent}from .{Path(RUNTIME[target]).stem} import {names}\n"
        lines.append(line)
    return "".join(lines)


def write_runtime(out: Path) -> list[str]:
    """Copy the runtime into the export folder ``out``; returns the file names."""
    for module, name in RUNTIME.items():
        (out / name).write_text(flatten(source_file(module).read_text(), module))
    return sorted(RUNTIME.values())
