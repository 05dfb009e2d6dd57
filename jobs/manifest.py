"""Parquet manifests: reading, the column check that runs before any work, and row checks.

Two levels of problems, as SPEC.md asks:

- Manifest-level (raise ManifestError before any work, naming the column): unreadable file, no
  rows, a missing required column (`prompt`, `seed`), a required column whose type can never be
  right (`prompt` not a string, `seed` not a number), an `id` column that is neither string nor
  integer.
- Row-level (`parse_row` returns an error message; the row becomes an error record and the job
  goes on): missing or empty prompt, missing or non-integral seed, strength outside (0, 1] or
  missing for an img2img row, a value in an optional column of the wrong type, bad per-row
  overrides, a duplicate id. Init images are read by the worker, which reports those problems.

Relative `init_image` paths are resolved against the folder holding the manifest file (local or
s3://), so a manifest and its images can move together.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Mapping, Sequence

import pyarrow as pa

from sdcore import rules  # the limits shared with the spec check and the pipeline (no torch)

from .rows import UNDECODABLE, column_values
from .spec import SamplerSpec
from .storage import (
    StorageError,
    TransientStorageError,
    expand_uris,
    join_uri,
    local_path,
    parent_uri,
    read_uri,
    redact_uri,
)
from .tabular import EXACT_FLOAT_INTEGERS, CellProblems, manifest_format, read_manifest_table

# column -> expected kind. "id" accepts string or integer.
COLUMNS = {
    "id": "string",
    "prompt": "string",
    "negative": "string",
    "seed": "integer",
    "strength": "float",
    "init_image": "string",
    "steps": "integer",
    "guidance_scale": "float",
    "width": "integer",
    "height": "integer",
    "sampler": "string",
    "karras": "boolean",
}
REQUIRED = ("prompt", "seed")
OVERRIDES = ("steps", "guidance_scale", "width", "height")
# Any other column is a label: kept with the row and written into its record (`labels`, a JSON
# object of column -> value, in manifest column order) and into every export.
MAX_NAME = 96


class ManifestError(ValueError):
    """The manifest cannot be used at all (message names the file or column)."""


def _kind(dtype: pa.DataType) -> str:
    if pa.types.is_dictionary(dtype):
        return _kind(dtype.value_type)
    if pa.types.is_null(dtype):
        return "null"
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype):
        return "string"
    if pa.types.is_boolean(dtype):
        return "boolean"
    if pa.types.is_integer(dtype):
        return "integer"
    if pa.types.is_floating(dtype) or pa.types.is_decimal(dtype):
        return "float"
    return str(dtype)


def _accepts(expected: str, actual: str) -> bool:
    if actual == "null" or actual == expected:
        return True
    return expected == "float" and actual == "integer" or expected == "integer" and actual == "float"


@dataclass
class Manifest:
    """The manifest rows (a pyarrow Table with the known columns plus `init_image_uri`), where they
    came from, a content fingerprint, and what was found while checking the columns."""

    table: pa.Table
    sources: tuple[str, ...]
    fingerprint: str
    ids: list[str | None]  # per row: the id as a string (row number when there is no id column)
    duplicates: dict[int, int]  # row -> earlier row holding the same id
    bad_columns: dict[str, str] = field(default_factory=dict)  # optional column -> problem
    ignored_columns: tuple[str, ...] = ()  # `init_image_uri`, which sdgen derives itself; others are labels
    label_columns: tuple[str, ...] = ()
    cell_problems: CellProblems = field(default_factory=dict)  # text manifests: row -> column -> problem

    @property
    def num_rows(self) -> int:
        return self.table.num_rows


def resolve_init_image(value: str, manifest_uri: str) -> str:
    """The init image's URI: s3:// and absolute paths as they are, `~` expanded, a file:// URI
    as its path (percent-escapes decoded; one naming a host is kept, and refused when read, as
    that row's error), relative paths against the manifest's folder."""
    if value.startswith("file://"):
        try:
            return local_path(value)
        except StorageError:
            return value
    if "://" in value:
        return value
    if value.startswith("~"):
        value = os.path.expanduser(value)
    if os.path.isabs(value):
        return value
    return join_uri(parent_uri(manifest_uri), value)


def _plain_types(table: pa.Table) -> pa.Table:
    """Dictionary-encoded columns (pandas categoricals) decoded, and an integer `id` column as
    strings (ids are strings: `7` and "7" are the same id), so that files which are each valid
    concatenate whatever their writer chose."""
    for index, field_ in enumerate(table.schema):
        kind = field_.type.value_type if pa.types.is_dictionary(field_.type) else field_.type
        if field_.name == "id" and pa.types.is_integer(kind):
            kind = pa.string()
        if kind != field_.type:
            table = table.set_column(index, field_.name, table.column(index).cast(kind))
    return table


def load_manifest(sources: Sequence[str]) -> Manifest:
    """Read, concatenate (in the given order; globs expand sorted) and check the manifest files."""
    uris: list[str] = []
    for source in sources:
        try:
            found = expand_uris(source)
        except TransientStorageError:
            raise  # not the manifest's fault: an infrastructure fault (exit 3), not a refusal
        except (StorageError, OSError) as exc:
            raise ManifestError(f"manifest {redact_uri(source)}: {exc}") from None
        if not found:
            raise ManifestError(f"manifest {redact_uri(source)}: the pattern matches no file")
        uris.extend(found)

    tables, digests, per_row_source = [], [], []
    cell_problems: CellProblems = {}  # manifest row -> column -> why its cell could not be read
    for uri in uris:
        try:
            data = read_uri(uri)
        except FileNotFoundError:
            raise ManifestError(f"manifest {redact_uri(uri)}: file not found") from None
        except TransientStorageError:
            raise
        except (StorageError, OSError) as exc:
            raise ManifestError(f"manifest {redact_uri(uri)}: cannot read ({exc})") from None
        digests.append(hashlib.sha256(data).hexdigest())
        try:
            table, problems = read_manifest_table(data, uri)
        except (pa.ArrowException, OSError, ValueError) as exc:
            kind = "Parquet" if manifest_format(uri) == "parquet" else manifest_format(uri).upper()
            raise ManifestError(f"manifest {redact_uri(uri)}: not a readable {kind} file ({exc})") from None
        offset = sum(count for _, count in per_row_source)
        cell_problems.update({offset + row: columns for row, columns in problems.items()})
        tables.append(_plain_types(table))
        per_row_source.append((uri, table.num_rows))
    try:
        table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    except (pa.ArrowException, ValueError) as exc:
        raise ManifestError(f"manifest files have incompatible columns ({exc})") from None
    fingerprint = digests[0] if len(digests) == 1 else hashlib.sha256("\n".join(digests).encode()).hexdigest()
    where = "manifest " + ", ".join(redact_uri(u) for u in uris)
    if table.num_rows == 0:
        raise ManifestError(f"{where}: has no rows")

    names = table.column_names
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ManifestError(f"{where}: column {sorted(dupes)[0]!r} appears more than once")
    for column in REQUIRED:
        if column not in names:
            raise ManifestError(f"{where}: missing required column {column!r} (columns: {', '.join(names)})")

    bad_columns: dict[str, str] = {}
    for column, expected in COLUMNS.items():
        if column not in names:
            continue
        actual = _kind(table.schema.field(column).type)
        ok = _accepts(expected, actual) or column == "id" and actual == "integer"
        if ok:
            continue
        message = f"column {column!r} has type {table.schema.field(column).type}, expected {expected}"
        if column in REQUIRED or column == "id":
            raise ManifestError(f"{where}: {message}")
        bad_columns[column] = message

    known = [c for c in names if c in COLUMNS]
    labels = tuple(c for c in names if c not in COLUMNS and c != "init_image_uri")
    table = table.select(known + list(labels)).combine_chunks()

    # Ids: the id column as strings, or the row number; duplicates keep their first row.
    if "id" in known:
        ids = [None if v is None or v is UNDECODABLE else str(v) for v in column_values(table.column("id"))]
    else:
        ids = [str(i) for i in range(table.num_rows)]
    first: dict[str, int] = {}
    duplicates: dict[int, int] = {}
    for row, value in enumerate(ids):
        if value is None:
            continue
        if value in first:
            duplicates[row] = first[value]
        else:
            first[value] = row

    # Init images resolved against their own manifest file's folder.
    if "init_image" in known and "init_image" not in bad_columns:
        values = column_values(table.column("init_image"))
        resolved: list[str | None] = []
        offset = 0
        for uri, count in per_row_source:
            for value in values[offset : offset + count]:
                resolved.append(resolve_init_image(value, uri) if isinstance(value, str) and value else None)
            offset += count
        table = table.append_column("init_image_uri", pa.array(resolved, pa.string()))

    return Manifest(
        table=table,
        sources=tuple(redact_uri(u) for u in uris),
        fingerprint=fingerprint,
        ids=ids,
        duplicates=duplicates,
        bad_columns=bad_columns,
        label_columns=labels,
        ignored_columns=tuple(c for c in names if c == "init_image_uri"),
        cell_problems=cell_problems,
    )


# ---------------------------------------------------------------------------------------------
# Rows


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_HASH_HEX = 16  # 64 bits of the id's sha256: no accidental collision among billions of ids
_HASHED = re.compile(rf"-[0-9a-f]{{{_HASH_HEX}}}$")


def safe_name(row_id: str) -> str:
    """A file name for `row_id`, injective: distinct ids never share a name, even on a
    case-insensitive file system. The id itself when it is already safe (lower-case letters,
    digits, `._-`, not starting with a dot, at most 96 chars, not ending like a hashed name),
    else a cleaned prefix plus `-` and 16 hex of the id's sha256 (of its exact UTF-8 bytes, so
    ids differing in case or Unicode normalisation differ)."""
    if (
        row_id
        and _SAFE.search(row_id) is None
        and row_id == row_id.lower()
        and not row_id.startswith(".")
        and len(row_id) <= MAX_NAME
        and _HASHED.search(row_id) is None
    ):
        return row_id
    digest = hashlib.sha256(row_id.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_HEX]
    cleaned = _SAFE.sub("_", row_id).lstrip(".")[: MAX_NAME - _HASH_HEX - 1] or "id"
    return f"{cleaned}-{digest}"


@dataclass(frozen=True)
class RowRequest:
    """One manifest row, checked: everything the worker needs to generate its image."""

    row: int
    id: str
    name: str
    prompt: str
    negative: str
    seed: int
    strength: float | None
    init_image: str | None
    init_image_uri: str | None
    steps: int
    guidance_scale: float
    width: int
    height: int
    sampler: str = "ddim"
    karras: bool = False
    labels: str | None = None  # JSON object of the row's label columns (None: the manifest has none)

    @property
    def mode(self) -> str:
        return "img2img" if self.init_image_uri else "txt2img"

    def forward_key(self) -> tuple:
        """Rows with equal keys can share UNet forwards (`sdcore.Pipeline.generate_stream`): the
        same size, and guided or not (which doubles a forward's rows). Sampler, steps, strength
        and guidance scale may differ: each slot runs its own row's schedule."""
        return (self.width, self.height, rules.guided(self.guidance_scale))


def _integer(value: Any, column: str) -> tuple[int | None, str | None]:
    if isinstance(value, bool):
        return None, f"{column}: expected an integer, got {value!r}"
    if isinstance(value, int):
        return value, None
    if isinstance(value, Decimal):  # a DECIMAL(20, 0) column, as Spark and SQL exports write seeds
        if not value.is_finite() or value != value.to_integral_value():
            return None, f"{column}: expected an integer, got {value}"
        return int(value), None
    if isinstance(value, float):
        if math.isnan(value):
            return None, f"{column} is missing"
        if not value.is_integer():
            return None, f"{column}: expected an integer, got {value!r}"
        if abs(value) > EXACT_FLOAT_INTEGERS:  # e.g. a seed column stored as float64
            return None, f"{column}: {value!r} is a float too large to hold an exact integer; store it as an integer"
        return int(value), None
    return None, f"{column}: expected an integer, got {type(value).__name__} {value!r}"


def _float(value: Any, column: str) -> tuple[float | None, str | None]:
    if isinstance(value, Decimal):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None, f"{column}: expected a number, got {type(value).__name__} {value!r}"
    value = float(value)
    if math.isnan(value):
        return None, None
    if not math.isfinite(value):
        return None, f"{column}: expected a finite number, got {value!r}"
    return value, None


def row_labels(raw: Mapping[str, Any]) -> str | None:
    """The row's label columns (every column the runner does not use) as a JSON object, in
    column order; None when the manifest has no label columns. Values JSON cannot hold (dates,
    bytes) are written as strings."""
    labels = {
        k: None if isinstance(v, float) and not math.isfinite(v) else v
        for k, v in raw.items()
        if k not in COLUMNS and k != "init_image_uri"
    }
    return json.dumps(labels, ensure_ascii=False, default=str) if labels else None


def _sampler(raw: Mapping[str, Any], spec: SamplerSpec, bad: Mapping[str, str]) -> tuple[str, bool, list[str]]:
    """The row's sampler and Karras flag: the manifest's `sampler`/`karras` columns over the
    spec's. A row that names another sampler without `karras` takes the spec's flag only where
    that sampler has Karras sigmas."""
    problems: list[str] = []
    name = raw.get("sampler") if "sampler" not in bad else None
    if name is None:
        name = spec.name
    elif rules.sampler_problem(name):
        problems.append(f"sampler: {rules.sampler_problem(name)}")
        name = name if isinstance(name, str) else spec.name  # the error record shows what the row asked
    karras = raw.get("karras") if "karras" not in bad else None
    if karras is None:
        karras = spec.karras and name in rules.KARRAS_SAMPLERS
    elif rules.karras_problem(karras, name):
        problems.append(f"karras: {rules.karras_problem(karras, name)}")
        karras = karras if isinstance(karras, bool) else False  # the error record shows what the row asked
    return name, karras, problems


def parse_row(
    row: int,
    raw: Mapping[str, Any],
    *,
    row_id: str | None,
    sampler: SamplerSpec,
    duplicate_of: int | None = None,
    bad_columns: Mapping[str, str] | None = None,
    cell_problems: Mapping[str, str] | None = None,
) -> tuple[RowRequest | None, str | None, dict[str, Any]]:
    """Check one manifest row -> (request, None) or (None, error message).

    `cell_problems`: this row's cells of a text manifest that could not be read as their
    column's type (column -> why; those cells are null). The third value holds the fields
    that could be read, for the error record. A value that was not valid UTF-8 (`rows.UNDECODABLE`,
    from `rows.table_rows`) makes the row's error that alone.
    """
    undecodable = [name for name, value in raw.items() if value is UNDECODABLE]
    if undecodable:
        raw = {name: None if name in undecodable else value for name, value in raw.items()}
    known: dict[str, Any] = {"row": row, "id": row_id}
    problems: list[str] = [f"{column}: {problem}" for column, problem in (cell_problems or {}).items()]

    unread = set(cell_problems or ())  # null because unreadable: named above, not "missing"
    if row_id is None and "id" not in unread:
        problems.append("id is missing")
    elif row_id == "":
        problems.append("id is empty")
    if duplicate_of is not None:
        problems.append(f"duplicate id {row_id!r} (first used by manifest row {duplicate_of})")

    for column, message in (bad_columns or {}).items():
        if raw.get(column) is not None:
            problems.append(message)

    prompt = raw.get("prompt")
    if prompt is None:
        if "prompt" not in unread:
            problems.append("prompt is missing")
    elif not isinstance(prompt, str):
        problems.append(f"prompt: expected a string, got {type(prompt).__name__}")
    elif not prompt.strip():
        problems.append("prompt is empty")
    else:
        known["prompt"] = prompt

    negative = raw.get("negative")
    if negative is None or "negative" in (bad_columns or {}):
        negative = ""
    elif not isinstance(negative, str):
        problems.append(f"negative: expected a string, got {type(negative).__name__}")
        negative = ""
    known["negative"] = negative

    seed = raw.get("seed")
    if seed is None:
        if "seed" not in unread:
            problems.append("seed is missing")
    else:
        seed, problem = _integer(seed, "seed")
        if problem:
            problems.append(problem)
        elif rules.seed_problem(seed):
            problems.append(f"seed: {rules.seed_problem(seed)}")
        else:
            known["seed"] = seed

    # `overrides` holds the values the later checks use (the spec's where the row's cannot be
    # used); `known` the row's own, null where its cell is unusable: an error record shows what
    # the row asked, never a spec value the row did not ask for.
    overrides: dict[str, Any] = {}
    for column in OVERRIDES:
        value = raw.get(column)
        if value is None or column in (bad_columns or {}):
            overrides[column] = getattr(sampler, column)
            unusable = column in unread or column in undecodable or (value is not None)
            known[column] = None if unusable else overrides[column]
            continue
        if column == "guidance_scale":
            number, problem = _float(value, column)
            if problem is None and number is not None and rules.guidance_problem(number):
                problem = f"guidance_scale: {rules.guidance_problem(number)}"
            overrides[column] = getattr(sampler, column) if number is None else number
        else:
            number, problem = _integer(value, column)
            if problem == f"{column} is missing":  # NaN in a float column: not overridden
                number, problem = getattr(sampler, column), None
            check = rules.steps_problem if column == "steps" else rules.size_problem
            if problem is None and check(number):
                problem = f"{column}: {check(number)}"
            overrides[column] = number if problem is None else getattr(sampler, column)
        if problem:
            problems.append(problem)
        known[column] = None if problem else overrides[column]
    known["sampler"], known["karras"], problems_sampler = _sampler(raw, sampler, bad_columns or {})
    problems.extend(problems_sampler)
    known["labels"] = row_labels(raw)

    init_image = raw.get("init_image") if "init_image" not in (bad_columns or {}) else None
    init_uri = raw.get("init_image_uri")
    if isinstance(init_image, str) and not init_image.strip():
        problems.append("init_image is an empty string")
        init_image = init_uri = None
    known["init_image"], known["init_image_uri"] = init_image, init_uri

    strength = raw.get("strength") if "strength" not in (bad_columns or {}) else None
    if init_uri:
        if strength is None:
            if "strength" not in unread:  # an unreadable one is named above
                problems.append("strength is required with init_image (img2img), expected a number in (0, 1]")
        else:
            strength, problem = _float(strength, "strength")
            if problem:
                problems.append(problem)
            elif strength is None:
                problems.append("strength is required with init_image (img2img), expected a number in (0, 1]")
            elif rules.strength_problem(strength, overrides["steps"]):
                problems.append(f"strength: {rules.strength_problem(strength, overrides['steps'])}")
            else:
                known["strength"] = strength
    else:
        strength = None  # txt2img: a strength has nothing to act on (as in sdcore)

    if undecodable:
        return None, f"invalid UTF-8 (not readable) in column(s) {', '.join(undecodable)}", known
    if problems:
        return None, "; ".join(problems), known
    assert row_id is not None
    return (
        RowRequest(
            row=row,
            id=row_id,
            name=safe_name(row_id),
            prompt=prompt,
            negative=negative,
            seed=seed,
            strength=strength,
            init_image=init_image,
            init_image_uri=init_uri,
            steps=overrides["steps"],
            guidance_scale=overrides["guidance_scale"],
            width=overrides["width"],
            height=overrides["height"],
            sampler=known["sampler"],
            karras=known["karras"],
            labels=known["labels"],
        ),
        None,
        known,
    )


__all__ = [
    "COLUMNS",
    "Manifest",
    "ManifestError",
    "RowRequest",
    "load_manifest",
    "parse_row",
    "resolve_init_image",
    "row_labels",
    "safe_name",
]
