"""`sdgen make-manifest`: prompt templates (YAML) or CSV/TSV/JSONL prompt lists -> a Parquet manifest.

A template:

```yaml
prompt: "a {size} {color} {shape} on a white background"   # {name}: a variable below
negative: "blurry"                 # optional, may use variables too
vars:                              # lists: every combination (combine: product) or side by side (zip)
  color: [red, green, blue]
  shape: [circle, square]
  size: {choices: [small, large], weights: [3, 1]}   # weighted: drawn per prompt from base_seed
combine: product                   # product | zip
seeds_per_prompt: 2                # rows per prompt, each with its own derived seed
base_seed: 0
repeat: 1                          # the whole expansion N times (new seeds and draws each time)
settings:                          # per-row settings; a list multiplies the rows (a sweep)
  sampler: [ddim, euler_a]
  steps: 10
init_images:                       # optional img2img: every image x every strength
  source: init/                    # local folder (relative to the template) or s3:// prefix
  strengths: [0.5, 0.8]
columns: {split: train}            # constant label columns
id: "{color}-{shape}-{seed_index}" # optional; default: the manifest row number
row_group_size: 65536
```

Rows come in this order: repeat, prompt (the variables' combinations), settings combination,
init image x strength, seed index. A *prompt* is one (repeat, combination) pair: its seeds and
weighted draws depend only on `base_seed`, the prompt's index and the seed index, so every
setting and init image of a sweep is tried on the same seeds. Seeds are the first 63 bits of
sha256(`base_seed:prompt_index:seed_index`). The variables (weighted ones included) and
`columns` become label columns. The same template gives the same bytes.

Rows are made lazily and written `row_group_size` at a time (pyarrow's ParquetWriter), so
memory stays flat whatever the row count (bench/bench_make_manifest.py measures it).
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
import os
import string
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from sdcore import rules

from .storage import is_s3, open_storage, read_uri, redact_uri
from .tabular import manifest_format, read_table_bytes

SETTINGS = {"sampler": pa.string(), "karras": pa.bool_(), "steps": pa.int32(), "guidance_scale": pa.float64()}
SETTINGS.update(width=pa.int32(), height=pa.int32())
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
TEMPLATE_KEYS = {
    "prompt",
    "negative",
    "vars",
    "combine",
    "seeds_per_prompt",
    "base_seed",
    "repeat",
    "settings",
    "init_images",
    "columns",
    "id",
    "row_group_size",
}


class TemplateError(ValueError):
    """The template cannot be expanded (the message names the key)."""


def derive_seed(base_seed: int, prompt_index: int, seed_index: int) -> int:
    """The seed of a template row: 63 bits of sha256, so a row's seed never depends on others."""
    digest = hashlib.sha256(f"{base_seed}:{prompt_index}:{seed_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & rules.MAX_SEED


def _draw(base_seed: int, prompt_index: int, name: str, cumulative: Sequence[float]) -> int:
    """A weighted choice's index for one prompt, from sha256 (no global RNG, no Python version drift)."""
    digest = hashlib.sha256(f"{base_seed}:{prompt_index}:{name}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64 * cumulative[-1]
    return min(bisect.bisect_right(cumulative, u), len(cumulative) - 1)


def _arrow_type(values: Sequence[Any], key: str) -> pa.DataType:
    if all(isinstance(v, bool) for v in values):
        return pa.bool_()
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return pa.int64()
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return pa.float64()
    if all(isinstance(v, str) for v in values):
        return pa.string()
    raise TemplateError(f"{key}: values must be all strings, all numbers or all booleans, got {list(values)!r}")


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else [value]


@dataclass
class Template:
    prompt: str
    negative: str | None
    lists: dict[str, list[Any]]  # variables with every value used (product or zip)
    weighted: dict[str, tuple[list[Any], list[float]]]  # variable -> (choices, cumulative weights)
    combine: str
    seeds_per_prompt: int
    base_seed: int
    repeat: int
    settings: dict[str, list[Any]]
    init_images: list[str]  # as written into the manifest
    strengths: list[float]
    columns: dict[str, Any]
    id: str | None
    row_group_size: int

    @property
    def combinations(self) -> int:
        if not self.lists:
            return 1
        lengths = [len(v) for v in self.lists.values()]
        return math.prod(lengths) if self.combine == "product" else lengths[0]

    @property
    def num_prompts(self) -> int:
        return self.repeat * self.combinations

    @property
    def rows_per_prompt(self) -> int:
        settings = math.prod(len(v) for v in self.settings.values()) if self.settings else 1
        images = len(self.init_images) * len(self.strengths) if self.init_images else 1
        return settings * images * self.seeds_per_prompt

    @property
    def num_rows(self) -> int:
        return self.num_prompts * self.rows_per_prompt

    def schema(self) -> pa.Schema:
        fields = [("id", pa.string())] if self.id else []
        fields += [("prompt", pa.string())]
        fields += [("negative", pa.string())] if self.negative is not None else []
        fields += [("seed", pa.int64())]
        fields += [(name, SETTINGS[name]) for name in self.settings]
        if self.init_images:
            fields += [("init_image", pa.string()), ("strength", pa.float64())]
        for name, values in self.lists.items():
            fields.append((name, _arrow_type(values, f"vars.{name}")))
        for name, (choices, _) in self.weighted.items():
            fields.append((name, _arrow_type(choices, f"vars.{name}")))
        for name, value in self.columns.items():
            fields.append((name, _arrow_type([value], f"columns.{name}")))
        return pa.schema(fields)

    def _variables(self) -> Iterator[dict[str, Any]]:
        names = list(self.lists)
        if not names:
            yield {}
            return
        combos = itertools.product(*self.lists.values()) if self.combine == "product" else zip(*self.lists.values())
        for values in combos:
            yield dict(zip(names, values))

    def rows(self) -> Iterator[dict[str, Any]]:
        """The manifest rows, lazily, in order."""
        setting_names = list(self.settings)
        setting_combos = list(itertools.product(*self.settings.values())) if self.settings else [()]
        images = [(i, s) for i in self.init_images for s in self.strengths] if self.init_images else [(None, None)]
        prompt_index = row = 0
        for _ in range(self.repeat):
            for variables in self._variables():
                draws = {
                    name: choices[_draw(self.base_seed, prompt_index, name, cumulative)]
                    for name, (choices, cumulative) in self.weighted.items()
                }
                values = {**variables, **draws}
                prompt = self.prompt.format_map(values)
                negative = self.negative.format_map(values) if self.negative is not None else None
                seeds = [derive_seed(self.base_seed, prompt_index, k) for k in range(self.seeds_per_prompt)]
                for combo in setting_combos:
                    for init_image, strength in images:
                        for k, seed in enumerate(seeds):
                            out: dict[str, Any] = {}
                            if self.id:
                                out["id"] = self.id.format_map(
                                    {**values, "row": row, "prompt_index": prompt_index, "seed_index": k}
                                )
                            out["prompt"] = prompt
                            if negative is not None:
                                out["negative"] = negative
                            out["seed"] = seed
                            out.update(zip(setting_names, combo))
                            if self.init_images:
                                out["init_image"], out["strength"] = init_image, strength
                            out.update(values)
                            out.update(self.columns)
                            yield out
                            row += 1
                prompt_index += 1


def _fields(text: str, key: str) -> set[str]:
    try:
        return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError as exc:
        raise TemplateError(f"{key}: {exc}") from None


def parse_template(data: Mapping[str, Any], base_dir: str = ".", manifest_dir: str | None = None) -> Template:
    """Check a template (all problems at once) and resolve its init images. `base_dir`: where
    relative init-image folders are; `manifest_dir`: the output manifest's folder, against which
    local init images are written as relative paths (so the manifest and images move together)."""
    problems: list[str] = []
    if not isinstance(data, Mapping):
        raise TemplateError("a template is a YAML mapping")
    for key in data:
        if key not in TEMPLATE_KEYS:
            problems.append(f"{key}: unknown key (expected one of {', '.join(sorted(TEMPLATE_KEYS))})")
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        problems.append("prompt: expected a non-empty string")
        prompt = ""
    negative = data.get("negative")
    if negative is not None and not isinstance(negative, str):
        problems.append("negative: expected a string")
        negative = None

    lists: dict[str, list[Any]] = {}
    weighted: dict[str, tuple[list[Any], list[float]]] = {}
    variables = data.get("vars") or {}
    if not isinstance(variables, Mapping):
        problems.append("vars: expected a mapping of name -> list of values")
        variables = {}
    for name, value in variables.items():
        key = f"vars.{name}"
        if not str(name).isidentifier():
            problems.append(f"{key}: a variable name must be an identifier")
        elif isinstance(value, Mapping):
            choices, weights = value.get("choices"), value.get("weights")
            if set(value) - {"choices", "weights"} or not isinstance(choices, list) or not choices:
                problems.append(f"{key}: expected {{choices: [...], weights: [...]}}")
                continue
            weights = [1.0] * len(choices) if weights is None else weights
            if (
                not isinstance(weights, list)
                or len(weights) != len(choices)
                or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in weights)
                or sum(weights) <= 0
            ):
                problems.append(f"{key}.weights: expected {len(choices)} numbers >= 0, not all zero")
                continue
            weighted[name] = (choices, list(itertools.accumulate(float(w) for w in weights)))
        elif isinstance(value, list) and value:
            lists[name] = value
        else:
            problems.append(f"{key}: expected a non-empty list or {{choices: [...], weights: [...]}}")

    combine = data.get("combine", "product")
    if combine not in ("product", "zip"):
        problems.append(f"combine: expected product or zip, got {combine!r}")
    elif combine == "zip" and len({len(v) for v in lists.values()}) > 1:
        lengths = ", ".join(f"{k}={len(v)}" for k, v in lists.items())
        problems.append(f"combine: zip needs lists of equal length ({lengths})")

    def integer(key: str, default: int, low: int, high: int = rules.MAX_SEED) -> int:
        value = data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            problems.append(f"{key}: expected an integer in {low}..{high}, got {value!r}")
            return default
        return value

    seeds_per_prompt = integer("seeds_per_prompt", 1, 1, 10**6)
    base_seed = integer("base_seed", 0, 0)
    repeat = integer("repeat", 1, 1, 10**9)
    row_group_size = integer("row_group_size", 65536, 1, 10**7)

    settings: dict[str, list[Any]] = {}
    raw_settings = data.get("settings") or {}
    if not isinstance(raw_settings, Mapping):
        problems.append("settings: expected a mapping")
        raw_settings = {}
    for name, value in raw_settings.items():
        if name not in SETTINGS:
            problems.append(f"settings.{name}: unknown (expected one of {', '.join(SETTINGS)})")
            continue
        values = _as_list(value)
        check = {
            "sampler": rules.sampler_problem,
            "karras": lambda v: None if isinstance(v, bool) else f"expected true or false, got {v!r}",
            "steps": rules.steps_problem,
            "guidance_scale": rules.guidance_problem,
            "width": rules.size_problem,
            "height": rules.size_problem,
        }[name]
        for v in values:
            if check(v):
                problems.append(f"settings.{name}: {check(v)}")
        settings[name] = values

    init_images: list[str] = []
    strengths: list[float] = []
    init = data.get("init_images")
    if init is not None:
        if not isinstance(init, Mapping) or set(init) - {"source", "strengths"} or "source" not in init:
            problems.append("init_images: expected {source: FOLDER or s3://PREFIX, strengths: [...]}")
        else:
            strengths = _as_list(init.get("strengths", []))
            if not strengths or not all(
                isinstance(s, (int, float)) and not isinstance(s, bool) and 0 < s <= 1 for s in strengths
            ):
                problems.append("init_images.strengths: expected numbers in (0, 1]")
            strengths = [float(s) for s in strengths]
            try:
                init_images = _list_images(str(init["source"]), base_dir, manifest_dir)
            except (OSError, RuntimeError) as exc:
                problems.append(f"init_images.source: {exc}")
            else:
                if not init_images:
                    problems.append(f"init_images.source: no {'/'.join(IMAGE_SUFFIXES)} files in {init['source']}")

    columns = data.get("columns") or {}
    if not isinstance(columns, Mapping):
        problems.append("columns: expected a mapping of name -> value")
        columns = {}

    id_template = data.get("id")
    if id_template is not None and not isinstance(id_template, str):
        problems.append("id: expected a string template")
        id_template = None

    names = set(lists) | set(weighted)
    for key, text in (("prompt", prompt), ("negative", negative), ("id", id_template)):
        if text:
            extra = {"row", "prompt_index", "seed_index"} if key == "id" else set()
            for name in sorted(_fields(text, key) - names - extra):
                problems.append(f"{key}: {{{name}}} is not a variable (vars: {', '.join(sorted(names)) or 'none'})")
    reserved = {"id", "prompt", "negative", "seed", "init_image", "strength", *SETTINGS}
    for name in sorted((names | set(columns)) & reserved):
        problems.append(f"vars/columns: {name!r} is a manifest column, not a label; use settings: for settings")
    for name in sorted(names & set(columns)):
        problems.append(f"columns.{name}: also a variable")

    if problems:
        raise TemplateError("template problems:\n  " + "\n  ".join(problems))
    return Template(
        prompt=prompt,
        negative=negative,
        lists=lists,
        weighted=weighted,
        combine=combine,
        seeds_per_prompt=seeds_per_prompt,
        base_seed=base_seed,
        repeat=repeat,
        settings=settings,
        init_images=init_images,
        strengths=strengths,
        columns=dict(columns),
        id=id_template,
        row_group_size=row_group_size,
    )


def _list_images(source: str, base_dir: str, manifest_dir: str | None) -> list[str]:
    """The init images under a folder or s3:// prefix, sorted: s3 URIs, or local paths relative
    to the manifest's folder (absolute when the manifest goes to S3)."""
    if is_s3(source):
        storage = open_storage(source)
        return [storage.url(k) for k in storage.list("") if k.lower().endswith(IMAGE_SUFFIXES)]
    folder = Path(base_dir, source).resolve()
    if not folder.is_dir():
        raise OSError(f"{source}: not a folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if manifest_dir is None:
        return [str(p) for p in files]
    return [os.path.relpath(p, manifest_dir).replace(os.sep, "/") for p in files]


def stream_parquet(rows: Iterator[dict[str, Any]], schema: pa.Schema, sink: Any, row_group_size: int) -> int:
    """Write `rows` to `sink` (a path or file object) as Parquet, `row_group_size` rows per row
    group, holding one group in memory at a time. Returns the row count."""
    count = 0
    with pq.ParquetWriter(sink, schema, compression="zstd") as writer:
        while True:
            chunk = list(itertools.islice(rows, row_group_size))
            if not chunk:
                break
            columns = [pa.array([r.get(name) for r in chunk], type=schema.field(name).type) for name in schema.names]
            writer.write_table(pa.Table.from_arrays(columns, schema=schema), row_group_size=row_group_size)
            count += len(chunk)
    return count


def convert_table(table: pa.Table, base_seed: int | None, seeds_per_prompt: int = 1) -> pa.Table:
    """A CSV/TSV/JSONL prompt list as a manifest: without a seed column, seeds are derived from
    `base_seed` (row i, seed index k), each row repeated `seeds_per_prompt` times."""
    if "prompt" not in table.column_names:
        raise TemplateError(f"no prompt column (columns: {', '.join(table.column_names)})")
    if "seed" in table.column_names:
        if seeds_per_prompt != 1:
            raise TemplateError("--seeds-per-prompt needs a list without a seed column")
        return table
    base = 0 if base_seed is None else base_seed
    indices = pa.array([i for i in range(table.num_rows) for _ in range(seeds_per_prompt)], pa.int64())
    table = table.take(indices)
    seeds = [
        derive_seed(base, i, k) for i in range(table.num_rows // seeds_per_prompt) for k in range(seeds_per_prompt)
    ]
    position = table.column_names.index("prompt") + 1
    return table.add_column(position, "seed", pa.array(seeds, pa.int64()))


def make_manifest(
    source: str, out: str, *, base_seed: int | None = None, seeds_per_prompt: int | None = None
) -> dict[str, Any]:
    """Expand a template (.yaml/.yml) or convert a prompt list (.csv/.tsv/.jsonl/.parquet) into
    the Parquet manifest `out` (a local path or s3:// URI). Returns {"rows", "row_groups", "out"}."""
    kind = "template" if source.lower().endswith((".yaml", ".yml")) else manifest_format(source)
    local_out = not is_s3(out)
    out_dir = os.path.dirname(os.path.abspath(out)) if local_out else None
    if kind == "template":
        try:
            data = yaml.safe_load(read_uri(source))
        except yaml.YAMLError as exc:
            raise TemplateError(f"{redact_uri(source)}: not valid YAML ({exc})") from None
        if isinstance(data, Mapping):
            if base_seed is not None:
                data = {**data, "base_seed": base_seed}
            if seeds_per_prompt is not None:
                data = {**data, "seeds_per_prompt": seeds_per_prompt}
        base_dir = "." if is_s3(source) else os.path.dirname(os.path.abspath(source))
        template = parse_template(data, base_dir, out_dir)
        schema, rows, group = template.schema(), template.rows(), template.row_group_size
    else:
        try:
            table = read_table_bytes(read_uri(source), source)
        except (pa.ArrowException, ValueError) as exc:
            raise TemplateError(f"{redact_uri(source)}: cannot read as {kind} ({exc})") from None
        table = convert_table(table, base_seed, seeds_per_prompt or 1)
        schema, rows, group = table.schema, iter(table.to_pylist()), 65536
    if local_out:
        os.makedirs(out_dir, exist_ok=True)
        temp = f"{out}.tmp-{os.getpid()}"
        try:
            count = stream_parquet(rows, schema, temp, group)
            os.replace(temp, out)
        finally:
            if os.path.exists(temp):
                os.remove(temp)
    else:
        import io

        from .storage import write_uri

        buffer = io.BytesIO()
        count = stream_parquet(rows, schema, buffer, group)
        write_uri(out, buffer.getvalue())
    return {"rows": count, "row_groups": (count + group - 1) // group, "out": redact_uri(out)}


def main(argv: Sequence[str] | None = None, prog: str = "sdgen make-manifest") -> int:
    """Exit status: 0 written, 2 the template or list was refused (nothing written)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog=prog,
        description="Expand a prompt template (YAML) or convert a CSV/TSV/JSONL prompt list into a Parquet "
        "manifest (see jobs/README.md, 'Making manifests').",
    )
    parser.add_argument("source", help="template .yaml, or a prompt list .csv/.tsv/.jsonl")
    parser.add_argument("out", help="the Parquet manifest to write (local path or s3://)")
    parser.add_argument("--base-seed", type=int, default=None, help="override the template's base_seed")
    parser.add_argument(
        "--seeds-per-prompt", type=int, default=None, help="rows per prompt (template: overrides seeds_per_prompt)"
    )
    args = parser.parse_args(argv)
    try:
        result = make_manifest(args.source, args.out, base_seed=args.base_seed, seeds_per_prompt=args.seeds_per_prompt)
    except (TemplateError, FileNotFoundError, OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {result['out']}: {result['rows']} rows in {result['row_groups']} row group(s)")
    return 0


__all__ = ["Template", "TemplateError", "convert_table", "derive_seed", "make_manifest", "parse_template"]


if __name__ == "__main__":
    import sys

    sys.exit(main())
