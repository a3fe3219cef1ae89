"""pydantic's validation errors as one line per problem: the key, what is wrong, and for an unknown key the
valid keys of its section. Pure (no torch)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel


def fields_at(model: type[BaseModel], location: Iterable[str | int]) -> list[str]:
    """The valid keys of the section of `model` that `location` (a pydantic error location) points into."""
    for part in list(location)[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        candidates = getattr(annotation, "__args__", (annotation,))
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return []
        model = nested[0]
    return sorted(model.model_fields)


def describe(model: type[BaseModel], error: Mapping[str, Any]) -> str:
    """One line for one of `model`'s validation errors."""
    location = [str(part) for part in error["loc"]]
    key = ".".join(location) or "<recipe>"
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key; valid keys here: {', '.join(fields_at(model, location))}"
    if error["type"] == "missing":
        return f"{key}: required key is missing"
    message = str(error["msg"]).removeprefix("Value error, ")
    if isinstance(error.get("input"), Mapping):  # a whole section's rule: its message names the keys
        return f"{key}: {message}"
    return f"{key}: {message} (got {error.get('input')!r})"
