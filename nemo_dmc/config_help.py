"""Every config key of the command-line tools with its default and meaning, from the schema
dataclasses' docstrings (one place per key): shown by ``--help`` (each tool registers its
schema with :func:`register_help`) and written to ``docs/CONFIG.md`` by
``docs/config_reference.py``.

A field is documented by a line ``name: text`` (continued on more-indented lines) in the
docstring of its dataclass or of a base class, Google's ``Attributes:`` style.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any, Dict, Iterator, List, Optional, Tuple

_ENTRY = re.compile(r"^(\s*)(\w+)(?: \([^)]*\))?: (.*)$")


def field_docs(cls: type) -> Dict[str, str]:
    """``{field: description}`` from the docstrings of ``cls`` and its bases (nearest wins)."""
    names = {f.name for f in dataclasses.fields(cls)}
    docs: Dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        lines = inspect.cleandoc(klass.__dict__.get("__doc__") or "").splitlines()
        entry: Optional[Tuple[str, int]] = None
        for line in lines:
            match = _ENTRY.match(line)
            if match and match.group(2) in names:
                entry = (match.group(2), len(match.group(1)))
                docs[entry[0]] = match.group(3).strip()
            elif entry and line.strip() and len(line) - len(line.lstrip()) > entry[1]:
                docs[entry[0]] += " " + line.strip()
            else:
                entry = None
    return docs


_ROLE = re.compile(r":\w+:`(~?)([\w.]+)`")


def _plain(doc: str) -> str:
    """reST to markdown-ish text: ``x`` -> `x`, :func:`a.b` -> `a.b`, :func:`~a.b.c` -> `c`."""
    doc = _ROLE.sub(lambda m: f"`{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}`",
                    doc)
    return doc.replace("``", "`")


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    return "(required)"


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


def keys(cls: type, prefix: str = "") -> Iterator[Tuple[str, str, str]]:
    """``(dotted key, default, description)`` of every leaf field of the schema ``cls``."""
    docs = field_docs(cls)
    for field in dataclasses.fields(cls):
        if field.name.startswith("_"):
            continue
        default = _default(field)
        key = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(default):
            yield from keys(type(default), key + ".")
        else:
            yield key, _show(default), _plain(docs.get(field.name, ""))


def text_table(cls: type, width: int = 100) -> str:
    """The keys of ``cls`` as plain text for ``--help``: key = default, then the meaning."""
    import textwrap

    out: List[str] = []
    for key, default, doc in keys(cls):
        out.append(f"{key} = {default}")
        if doc:
            out += textwrap.wrap(doc, width, initial_indent="    ", subsequent_indent="    ")
    return "\n".join(out).replace("$", "$$")  # Hydra fills the template with string.Template


def markdown(schemas: Dict[str, type]) -> str:
    """A configuration reference: one table per tool of ``{tool module: schema}``."""
    out = ["# Configuration reference", "",
           "Every key of the command-line tools, its default in the schema (a config file or "
           "group may set another; `--cfg job` prints the composed values) and its meaning. "
           "Generated from the schema dataclasses' docstrings by `python docs/config_reference.py`; "
           "`python -m <tool> --help` prints the same.", ""]
    for tool, cls in schemas.items():
        out += [f"## `python -m {tool}` ({cls.__module__}.{cls.__name__})", "",
                "| key | default | meaning |", "|---|---|---|"]
        for key, default, doc in keys(cls):
            cell = doc.replace("|", "\\|")
            out.append(f"| `{key}` | `{default}` | {cell} |")
        out.append("")
    return "\n".join(out)


_HELP_SCHEMAS: Dict[str, type] = {}


def register_help(tool: str, schema: type) -> None:
    """Let ``${nemo_dmc_keys:<tool>}`` in a tool's Hydra help template list ``schema``'s keys."""
    from omegaconf import OmegaConf

    _HELP_SCHEMAS[tool] = schema
    if not OmegaConf.has_resolver("nemo_dmc_keys"):
        OmegaConf.register_new_resolver("nemo_dmc_keys", lambda name: text_table(_HELP_SCHEMAS[name]))
