"""Errors a person can read: each error record's message reduced to its *reason* (the message
without the row's own values), a histogram of reasons over an output, and the rows behind them.

`summary.json` holds the histogram (`errors`: reason -> rows, most frequent first), a run's last
lines name the top reasons, `sdgen status OUTPUT --errors` lists every error row with its reason,
and the HTML report shows the same table.

A record's `error` joins its row's problems with "; "; its reason is each problem reduced (quoted
values — removed first, with repr's escapes, since a value may hold "; " — paths, URIs and
numbers replaced by `…` and `N`, explanations in parentheses and ", got …" tails dropped; a
generation failure, whatever its exception's text holds, keeps only its exception type) and
joined the same way, so every error row counts under exactly one reason and the counts add up
to the error total. `status --errors` shows ids and messages escaped where they hold a character
that does not print (`_shown`)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from typing import Any

import pyarrow.compute as pc

from .output import Output

_PARENS = re.compile(r"\s*\([^()]*\)")
_GOT = re.compile(r",? got .*$")
# A value as Python's repr quotes it: in '…' (a ' inside escaped as \'), or in "…" when it holds a
# ' and no "; a backslash inside is escaped too. Never opened right after a letter or digit, so
# the apostrophe of "can't" starts no value.
_QUOTED = re.compile(r"""(?<!\w)(?:'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")""")
_PATHLIKE = re.compile(r"\S*[/\\]\S*")
_SIZE = re.compile(r"(?<![\w.])\d+x\d+(?![\w.])")  # 8000x8000 -> NxN
# A number standing alone: not a part of a word (`UTF-8`, `sha256`, `x8000`) or of another number.
_NUMBER = re.compile(r"(?<!\w)(?<!\w-)-?\d+(?:\.\d+)?(?:e-?\d+)?")


def _reduce(problem: str) -> str:
    problem = problem.strip()
    if problem.startswith("generation failed:"):
        kind = problem[len("generation failed:") :].strip().split(":", 1)[0]
        return f"generation failed: {kind}"
    text = _PARENS.sub("", problem)
    text = _GOT.sub("", text)
    text = _PATHLIKE.sub("…", text)
    text = _SIZE.sub("NxN", text)
    text = _NUMBER.sub("N", text)
    return re.sub(r"\s+", " ", text).strip(" :;")


def error_reason(message: str | None) -> str:
    """The reason of an error message: `duplicate id 'b' (first used by manifest row 3)` ->
    `duplicate id …`; `init_image not found: s3://b/x.png` -> `init_image not found: …`."""
    if not message:
        return "unknown error"
    if message.startswith("generation failed:"):  # one problem: the exception's text may hold "; "
        return _reduce(message)
    # Quoted values first: a value (an id, a path) may itself hold "; ", the problems' separator.
    message = _QUOTED.sub("…", message)
    return "; ".join(dict.fromkeys(_reduce(p) for p in message.split("; ") if p.strip()))


def error_rows(output: Output, shards: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Every error record of the committed shards: row, id, shard, reason, error; by row. The
    record files are streamed, so memory holds the error rows, not every row."""
    shards = output.committed_shards() if shards is None else shards
    rows = []
    columns = ["row", "id", "shard", "status", "error"]
    for _, table in output.iter_records(shards, columns=columns):
        errors = table.filter(pc.not_equal(table.column("status"), "ok"))
        for record in errors.to_pylist():
            rows.append({**{k: record[k] for k in ("row", "id", "shard", "error")}})
    for row in rows:
        row["reason"] = error_reason(row["error"])
    return sorted(rows, key=lambda r: r["row"])


def histogram(rows: Iterable[dict[str, Any]]) -> dict[str, int]:
    """reason -> rows, most frequent first (ties by reason)."""
    return _ordered(Counter(r["reason"] for r in rows))


def _ordered(counts: Counter[str]) -> dict[str, int]:
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def error_histogram(output: Output, shards: Iterable[str] | None = None) -> dict[str, int]:
    """reason -> rows over the committed shards, keeping only the counts (memory flat in rows)."""
    shards = output.committed_shards() if shards is None else shards
    counts: Counter[str] = Counter()
    for _, table in output.iter_records(shards, columns=["status", "error"]):
        errors = table.filter(pc.not_equal(table.column("status"), "ok")).column("error").to_pylist()
        counts.update(error_reason(e) for e in errors)
    return _ordered(counts)


def _shown(value: Any) -> str:
    """`value` for a terminal: as it is when every character prints, else as repr escapes it, so a
    newline cannot forge a line and an escape sequence cannot clear or recolour the screen."""
    text = str(value)
    return text if text.isprintable() else repr(text)


def error_lines(errors: dict[str, int], top: int = 5) -> list[str]:
    """The log lines naming the top reasons (the end of a run)."""
    if not errors:
        return []
    lines = [
        f"[sdgen] top error reasons ({sum(errors.values())} error rows; `sdgen status OUTPUT --errors` lists them):"
    ]
    for reason, count in list(errors.items())[:top]:
        lines.append(f"[sdgen]   {count:>6}  {_shown(reason)}")
    if len(errors) > top:
        lines.append(f"[sdgen]   ... {len(errors) - top} more reason(s) in summary.json")
    return lines


def format_error_rows(rows: list[dict[str, Any]], limit: int | None = None) -> str:
    """`sdgen status --errors`: the rows grouped by reason, most frequent reason first."""
    if not rows:
        return "no error rows"
    by_reason: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_reason.setdefault(row["reason"], []).append(row)
    lines = []
    for reason, count in histogram(rows).items():
        lines.append(f"{count} row(s): {_shown(reason)}")
        shown = by_reason[reason] if limit is None else by_reason[reason][:limit]
        for row in shown:
            lines.append(f"  row {row['row']:<8} id {_shown(row['id']):<20} {row['shard']}  {_shown(row['error'])}")
        if len(shown) < count:
            lines.append(f"  ... {count - len(shown)} more")
    return "\n".join(lines)


__all__ = ["error_histogram", "error_lines", "error_reason", "error_rows", "format_error_rows", "histogram"]
