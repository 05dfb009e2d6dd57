"""`CheckpointError`, the one error every conversion problem is reported as, and its message.

A message names the keys at fault: missing, unexpected, or with a wrong shape (the lists are
also kept on the error, for callers and tests).
"""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that does not match the SD 1.x layout; the message names keys and shapes."""

    def __init__(
        self,
        message: str,
        *,
        missing: list[str] | None = None,
        unexpected: list[str] | None = None,
        mismatched: list[str] | None = None,
    ) -> None:
        super().__init__(message)
        self.missing = missing or []
        self.unexpected = unexpected or []
        self.mismatched = mismatched or []


def _listing(title: str, items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    more = f", ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{title} ({len(items)}): {shown}{more}"


def raise_if_problems(what: str, missing: list[str], unexpected: list[str], mismatched: list[str]) -> None:
    """A `CheckpointError` "{what}: missing keys (n): ...; unexpected keys ...; wrong shapes ..."
    listing the first few of each kind, if there is any problem at all."""
    if not (missing or unexpected or mismatched):
        return
    sections = [
        _listing(title, items)
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", mismatched))
        if items
    ]
    message = f"{what}: " + "; ".join(sections)
    raise CheckpointError(message, missing=missing, unexpected=unexpected, mismatched=mismatched)
