"""Reading JSON Lines input with errors that name the file and line."""

from __future__ import annotations

import json
from typing import Any, Iterator

from livepp.core.params import LiveppError

__all__ = ["iter_jsonl"]


def iter_jsonl(text: str, name: str) -> Iterator[tuple[str, Any]]:
    """Yield ``(where, object)`` per non-blank line; ``where`` is "name:line"."""
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{name}:{lineno}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as exc:
            raise LiveppError(f"{where}: not valid JSON ({exc.msg})") from exc
