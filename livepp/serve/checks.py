"""Checks every client string goes through, whatever route carries it."""

from __future__ import annotations

from typing import Any

__all__ = ["has_lone_surrogate", "surrogate_path"]


def has_lone_surrogate(text: str) -> bool:
    """Whether ``text`` holds a UTF-16 surrogate on its own (JSON's
    ``"\\ud800"`` parses to one): such a string cannot be encoded as UTF-8,
    so it could reach neither a tokenizer nor a reply."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def surrogate_path(value: Any, path: str = "") -> str | None:
    """Where in a parsed JSON value the first string (or object key) with a
    lone surrogate is, as ``messages[0].content``; None if there is none."""
    if isinstance(value, str):
        return (path or "(value)") if has_lone_surrogate(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            here = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and has_lone_surrogate(key):
                return path or "(key)"
            found = surrogate_path(item, here)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = surrogate_path(item, f"{path}[{i}]")
            if found is not None:
                return found
    return None
