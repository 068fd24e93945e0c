"""The modeling code a DMC Hugging Face export carries, so that ``trust_remote_code=True``
loads it where nemo_dmc is not installed (stock transformers, stock lm-eval).

transformers loads custom code from the checkpoint folder: ``config.json``'s ``auto_map``
names a module file there, and the loader copies that file and every file it imports with
``from .name import ...`` (recursively, one flat folder), after checking that each file's
absolute imports are installed. :func:`write_remote_code` therefore copies the nemo_dmc
modules the transformers model needs (found by following its imports) as flat files
``nemo_dmc_<package>_<module>.py`` and turns their ``from nemo_dmc... import`` lines into
relative ones. The Triton kernels stay out: the bundled
:mod:`~nemo_dmc.kernels.dispatch` then takes the PyTorch references.
"""

from __future__ import annotations

import ast
import importlib.util
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import nemo_dmc

ROOT = "nemo_dmc"
ENTRY = "nemo_dmc.hf.modeling_dmc_llama"
ENTRY_FILE = "modeling_dmc_llama"
AUTO_MAP = {"AutoConfig": f"{ENTRY_FILE}.DMCLlamaHFConfig",
            "AutoModelForCausalLM": f"{ENTRY_FILE}.DMCLlamaForCausalLM"}
"""``config.json``'s ``auto_map`` of a DMC export (classes of :mod:`nemo_dmc.hf`)."""


class BundleError(RuntimeError):
    """A module of the closure uses an import form the bundle cannot rewrite."""


def flat_name(module: str) -> str:
    """The bundle file (without ``.py``) of ``module``."""
    return ENTRY_FILE if module == ENTRY else module.replace(".", "_")


def _spec(module: str):
    try:
        return importlib.util.find_spec(module)
    except ModuleNotFoundError:
        return None


def _is_package(module: str) -> bool:
    spec = _spec(module)
    return spec is not None and spec.submodule_search_locations is not None


@lru_cache(maxsize=None)
def _tree(module: str) -> tuple[str, ast.Module]:
    """``module``'s source and syntax tree (read once per process; the tree is not changed)."""
    spec = _spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise BundleError(f"cannot find the source of {module}")
    source = Path(spec.origin).read_text(encoding="utf-8")
    return source, ast.parse(source)


def _top_level_names(tree: ast.Module, *, imports: bool) -> set[str]:
    """Names bound at a module's top level (by imports too when ``imports``)."""
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif imports and isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def _home(package: str, name: str) -> str:
    """The submodule of ``package`` that defines ``name`` (a name its ``__init__`` exports
    lazily, PEP 562)."""
    spec = _spec(package)
    for path in sorted(Path(p) for p in spec.submodule_search_locations):
        for file in sorted(path.glob("*.py")):
            if file.stem != "__init__":
                module = f"{package}.{file.stem}"
                if name in _top_level_names(_tree(module)[1], imports=False):
                    return module
    raise BundleError(f"{package} exports {name!r}, which none of its modules defines")


@dataclass
class _Rewrite:
    """The relative import lines replacing one ``from nemo_dmc... import`` statement, and
    the modules they need."""

    lines: list[str] = field(default_factory=list)
    needs: list[str] = field(default_factory=list)


def _rewrite(node: ast.ImportFrom, indent: str) -> _Rewrite:
    out = _Rewrite()
    package = _is_package(node.module)
    bound = _top_level_names(_tree(node.module)[1], imports=True) if package else set()
    groups: dict[str, list[str]] = {}
    for alias in node.names:
        if alias.name == "*":
            raise BundleError(f"'from {node.module} import *' cannot be bundled")
        target, local = node.module, alias.asname or alias.name
        if package and alias.name not in bound:
            submodule = f"{node.module}.{alias.name}"
            if _spec(submodule) is not None:  # a module object: `from pkg import module`
                out.lines.append(f"{indent}from . import {flat_name(submodule)} as {local}")
                out.needs.append(submodule)
                continue
            target = _home(node.module, alias.name)
        as_part = f" as {alias.asname}" if alias.asname else ""
        groups.setdefault(target, []).append(f"{alias.name}{as_part}")
    for target, names in groups.items():
        out.lines.append(f"{indent}from .{flat_name(target)} import {', '.join(names)}")
        out.needs.append(target)
    return out


def bundled_source(module: str) -> tuple[str, list[str]]:
    """``module``'s source with its nemo_dmc imports made relative to the bundle folder, and
    the nemo_dmc modules it imports."""
    source, tree = _tree(module)
    lines = source.splitlines()
    needs: list[str] = []
    edits: list[tuple[int, int, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == ROOT for a in node.names):
            raise BundleError(f"{module}:{node.lineno}: write 'from {ROOT}... import' (bundle)")
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "import_module":
            if isinstance(node.args[0], ast.Constant) and ROOT in str(node.args[0].value):
                raise BundleError(f"{module}:{node.lineno}: import_module of a nemo_dmc name")
        if not (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                and node.module.split(".")[0] == ROOT):
            continue
        first, last = node.lineno - 1, node.end_lineno - 1
        indent = lines[first][:node.col_offset]
        if indent.strip() or lines[last][node.end_col_offset:].split("#")[0].strip():
            raise BundleError(f"{module}:{node.lineno}: an import sharing its line")
        rewrite = _rewrite(node, indent)
        edits.append((first, last, rewrite.lines))
        needs += rewrite.needs
    for first, last, new in sorted(edits, reverse=True):
        lines[first:last + 1] = new
    header = (f"# {module} of nemo-dmc {nemo_dmc.__version__}, bundled by export-hf with "
              "relative imports; edit the source, not this copy.\n")
    return header + "\n".join(lines) + "\n", needs


def _file_list(names: list[str]) -> str:
    """The entry file's closing imports of every other bundle file: for a local folder,
    transformers copies only the files the entry file itself imports relatively."""
    lines = ["", "", "# The other files of this bundle, so that transformers copies them all.",
             *(f"from .{name} import __name__ as _bundled" for name in names), "del _bundled"]
    return "\n".join(lines) + "\n"


def remote_code_files() -> dict[str, str]:
    """File name -> source of every bundled module, from the transformers model (the entry
    file named in :data:`AUTO_MAP`) through its imports."""
    files: dict[str, str] = {}
    owners: dict[str, str] = {}
    pending = [ENTRY]
    while pending:
        module = pending.pop()
        name = flat_name(module) + ".py"
        if owners.setdefault(name, module) != module:
            raise BundleError(f"{module} and {owners[name]} flatten to the same file {name}")
        if name in files:
            continue
        files[name], needs = bundled_source(module)
        pending += needs
    entry = f"{ENTRY_FILE}.py"
    files[entry] += _file_list(sorted(name[:-3] for name in files if name != entry))
    return dict(sorted(files.items()))


def write_remote_code(folder: Path) -> list[str]:
    """Write the bundle into ``folder`` (an export being written); returns the file names."""
    files = remote_code_files()
    for name, source in files.items():
        (Path(folder) / name).write_text(source, encoding="utf-8")
    return list(files)

