"""The keys `model.config` and `model.overrides` may name: Wav2Vec2Config's. transformers keeps any other key
as an attribute nothing reads, so a typo (`mask_time_prb`) would train without its setting. The job checks
the keys on the class itself; the launcher, which must not import torch (transformers' config module does,
~5 s), reads the same classes from the installed transformers' source instead, so that a dry run names a
typo before the job waits in a queue to find it."""

from __future__ import annotations

import ast
import difflib
import functools
import importlib.metadata
import importlib.util
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

CONFIG_CLASS = "Wav2Vec2Config"
# (file under transformers/, class): the config and the base class whose attributes every config has. The
# base was `PretrainedConfig` before transformers 5.
CONFIG_SOURCES = (
    ("models/wav2vec2/configuration_wav2vec2.py", CONFIG_CLASS),
    ("configuration_utils.py", "PreTrainedConfig"),
    ("configuration_utils.py", "PretrainedConfig"),
)


def unknown_key_lines(sections: Mapping[str, Mapping[str, Any]], is_key: Callable[[str], bool]) -> list[str]:
    """One line per key that `is_key` refuses, named by its section, with the closest keys the installed
    transformers' source names (the same hints for the job and the dry run)."""
    lines = []
    for name, values in sections.items():
        for key in (key for key in values if not is_key(key)):
            close = difflib.get_close_matches(key, sorted(keys_in_source() or ()), 3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            lines.append(f"{name}.{key}: not a {CONFIG_CLASS} key{hint}")
    return lines


@functools.cache  # a sweep's runs share it: read the source once
def keys_in_source() -> frozenset[str] | None:
    """The names the config's class and its base bind (fields, class attributes, properties, `self.x`
    assigned in a method), without importing transformers: every key a config has (a test holds them to the
    installed config's), and a few that only some configs set (`rope_parameters`), which the job's check on a
    real config still refuses. None when transformers is not installed here, or its source no longer defines
    the config class where it did."""
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    keys: set[str] = set()
    for relative, name in CONFIG_SOURCES:
        path = root / relative
        found = class_names(path.read_text(), name) if path.exists() else None
        if found is None and name == CONFIG_CLASS:
            return None
        keys |= found or set()
    return frozenset(keys)


def class_names(source: str, class_name: str) -> set[str] | None:
    """The names a class of `source` binds in its body and as `self.<name>` in its methods; None when the
    source defines no such class."""
    tree = ast.parse(source)
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name), None)
    if node is None:
        return None
    names: set[str] = set()
    for item in node.body:
        if isinstance(item, ast.AnnAssign | ast.Assign):
            targets = item.targets if isinstance(item, ast.Assign) else [item.target]
            names |= {target.id for target in targets if isinstance(target, ast.Name)}
        elif isinstance(item, ast.FunctionDef):
            # A property with a setter (`num_labels`) is a key; a method, or a getter alone, is not.
            if any(is_setter(decorator) for decorator in item.decorator_list):
                names.add(item.name)
            names |= self_attributes(item)
            if item.name == "__init__":  # the older style: every setting an argument
                names |= {arg.arg for arg in [*item.args.args, *item.args.kwonlyargs][1:]}
    return {name for name in names if not name.startswith("_")}


def is_setter(decorator: ast.expr) -> bool:
    """`@<name>.setter`."""
    return isinstance(decorator, ast.Attribute) and decorator.attr == "setter"


def self_attributes(function: ast.FunctionDef) -> set[str]:
    return {
        node.attr
        for node in ast.walk(function)
        if isinstance(node, ast.Attribute)
        and isinstance(node.ctx, ast.Store)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
    }


def transformers_version() -> str | None:
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return None
