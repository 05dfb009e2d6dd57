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
  source: init/                    # folder relative to the template (on S3: the prefix beside it) or s3://
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
`columns` become label columns. The same template gives the same bytes. With `sampler` and
`karras` both in `settings`, karras follows the sampler (`Template.setting_combos`): true only
where the sampler has Karras sigmas. What the runner would refuse in every such row is refused
here: a strength leaving no step (`sdcore.rules.strength_problem`), an empty prompt or id.

Rows are made lazily and written `row_group_size` at a time (pyarrow's ParquetWriter), so
memory stays flat whatever the row count (bench/bench_make_manifest.py measures it), also for an
s3:// OUT (written to a temporary file, then uploaded from it). OUT must be a `.parquet` name
other than the source. A template or list that would give more than `max_rows` rows
(MAX_ROWS, `--max-rows`) or none is refused before anything is written; so is a YAML alias bomb
(values must be scalars, and every value quoted in a message is shortened).

A prompt list is converted as it is, except: without a `seed` column each row is repeated
`seeds_per_prompt` times with derived seeds, and its `id` (if any) becomes `ID-sK` (K the seed
index) so ids stay unique; relative `init_image` paths (relative to the list's folder, as in any
manifest) are rewritten to name the same files from OUT's folder.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
import os
import posixpath
import re
import reprlib
import string
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from sdcore import rules

from .exit_codes import one_line
from .storage import is_s3, local_path, open_storage, parent_uri, read_uri, redact_uri, split_s3
from .tabular import TEXT_SUFFIXES, manifest_format, read_table_bytes

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


MAX_ROWS = 100_000_000  # rows a template or list may give unless --max-rows raises it
MAX_SEEDS_PER_PROMPT = 10**6
MAX_PROBLEMS = 50  # problems listed in one message (the rest are counted)
_BIG_NUMBER = re.compile(r"\d{6,}")  # a format width/precision this long would build huge strings
TEMPLATE_SUFFIXES = (".yaml", ".yml")
LIST_SUFFIXES = (*TEXT_SUFFIXES, ".parquet")


class TemplateError(ValueError):
    """The template cannot be expanded (the message names the key)."""


class _BigSpec(TemplateError):
    """A format spec, its nested fields filled in, with a width or precision over 99999."""


class _CappedFormatter(string.Formatter):
    """`str.format_map` that refuses a width or precision over 99999 before formatting with it:
    a nested field (`{c:{w}}`) fills the spec in from a variable, where the check of the
    literal spec cannot see it, and `{c:1000000}` would build a megabyte per row."""

    def format_field(self, value: Any, format_spec: str) -> Any:
        if _BIG_NUMBER.search(format_spec):
            raise _BigSpec(format_spec)
        return super().format_field(value, format_spec)


_CAPPED = _CappedFormatter()


def _formatter(text: str) -> Callable[[Mapping[str, Any]], str]:
    """`text.format_map`, or the capped formatter's (pure Python, slower) when a field's spec
    holds a nested field."""
    nested = any(n is not None and spec and "{" in spec for _, n, spec, _ in string.Formatter().parse(text))
    return (lambda values: _CAPPED.vformat(text, (), values)) if nested else text.format_map


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxset = 3, 8, 8, 8
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 80, 80, 40


def _short(value: Any, limit: int = 200) -> str:
    """`value`'s repr for a message, at most `limit` characters whatever its size (a YAML alias
    bomb expands to gigabytes when printed in full)."""
    return one_line(_REPR.repr(value), limit)


def _name(key: Any) -> str:
    """A mapping key for a message: a string as it is (it is in the file), anything else shortened."""
    return key if isinstance(key, str) else _short(key)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool)) or value is None


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
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if numbers:
        for v in values:
            if isinstance(v, int) and not -(2**63) <= v < 2**63:
                raise TemplateError(f"{key}: integer {_short(v)} does not fit in 64 bits")
        floats = any(isinstance(v, float) for v in values)
        return pa.float64() if floats else pa.int64()
    if all(isinstance(v, str) for v in values):
        return pa.string()
    raise TemplateError(f"{key}: values must be all strings, all numbers or all booleans, got {_short(list(values))}")


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

    def _karras_by_sampler(self) -> bool:
        """Whether both `sampler` and `karras` are swept here, so that karras follows the sampler."""
        return "sampler" in self.settings and "karras" in self.settings

    @property
    def settings_count(self) -> int:
        """Settings combinations per prompt (see `setting_combos`), counted without making them."""
        if not self.settings:
            return 1
        count = math.prod(len(v) for v in self.settings.values())
        if self._karras_by_sampler() and any(v is False for v in self.settings["karras"]):
            others = math.prod(len(v) for k, v in self.settings.items() if k not in ("sampler", "karras"))
            plain = sum(1 for v in self.settings["sampler"] if v not in rules.KARRAS_SAMPLERS)
            count -= plain * sum(1 for v in self.settings["karras"] if v is True) * others
        return count

    def setting_combos(self) -> Iterator[tuple[Any, ...]]:
        """Every combination of the `settings:` lists, in order. Karras sigmas exist only for
        some samplers (rules.KARRAS_SAMPLERS), and the runner refuses a row asking for them on
        another one, so `karras: true` beside a sampler without them is written as false; in a
        sweep over both flags (`karras: [false, true]`) that combination would repeat the false
        one's rows and is left out."""
        if not self.settings:
            yield ()
            return
        names = list(self.settings)
        follow = self._karras_by_sampler()
        s, k = (names.index("sampler"), names.index("karras")) if follow else (0, 0)
        drop = follow and any(v is False for v in self.settings["karras"])
        for combo in itertools.product(*self.settings.values()):
            if follow and combo[k] is True and combo[s] not in rules.KARRAS_SAMPLERS:
                if drop:
                    continue
                combo = (*combo[:k], False, *combo[k + 1 :])
            yield combo

    @property
    def rows_per_prompt(self) -> int:
        images = len(self.init_images) * len(self.strengths) if self.init_images else 1
        return self.settings_count * images * self.seeds_per_prompt

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
        """The manifest rows, lazily, in order. Raises TemplateError at a row the runner would
        refuse for its text alone: an empty prompt or id, or a nested format field giving a
        width or precision over 99999 (checked before that field is formatted)."""
        setting_names = list(self.settings)
        setting_combos = list(self.setting_combos())
        images = [(i, s) for i in self.init_images for s in self.strengths] if self.init_images else [(None, None)]
        texts = {"prompt": self.prompt, "negative": self.negative, "id": self.id}
        fill = {key: _formatter(value) for key, value in texts.items() if value is not None}
        prompt_index = row = 0

        def text(key: str, values: Mapping[str, Any]) -> str:
            try:
                return fill[key](values)
            except _BigSpec as exc:
                raise TemplateError(
                    f"{key}: row {row} ({_values(values)}): a format spec filled in as {_short(str(exc))} has a "
                    "width or precision over 99999, which is refused"
                ) from None

        for _ in range(self.repeat):
            for variables in self._variables():
                draws = {
                    name: choices[_draw(self.base_seed, prompt_index, name, cumulative)]
                    for name, (choices, cumulative) in self.weighted.items()
                }
                values = {**variables, **draws}
                prompt = text("prompt", values)
                if not prompt.strip():
                    raise TemplateError(
                        f"prompt: row {row} ({_values(values)}) gets an empty prompt, which the runner refuses "
                        "(the row would be an error record); give every variable in the prompt a non-empty value "
                        "or keep some text around it"
                    )
                negative = text("negative", values) if self.negative is not None else None
                seeds = [derive_seed(self.base_seed, prompt_index, k) for k in range(self.seeds_per_prompt)]
                for combo in setting_combos:
                    for init_image, strength in images:
                        for k, seed in enumerate(seeds):
                            out: dict[str, Any] = {}
                            if self.id:
                                counters = {"row": row, "prompt_index": prompt_index, "seed_index": k}
                                out["id"] = text("id", {**values, **counters})
                                if not out["id"]:
                                    raise TemplateError(
                                        f"id: row {row} ({_values(values)}) gets an empty id, which the runner "
                                        "refuses (the row would be an error record)"
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


def _values(values: Mapping[str, Any]) -> str:
    """A row's variables for a message: `c=''`, shortened."""
    return one_line(", ".join(f"{name}={_short(value, 60)}" for name, value in values.items()) or "no variables", 300)


def _fields(text: str, key: str) -> set[str]:
    try:
        return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError as exc:
        raise TemplateError(f"{key}: {exc}") from None


def _format_problems(key: str, text: str, samples: Mapping[str, Sequence[Any]]) -> list[str]:
    """Each `{name!conversion:spec}` field of `text` formatted with every value its variable can
    take, so a bad spec or conversion (`{colour:d}` on a string) is named now rather than failing
    mid-write. Fields of names not in `samples` are checked elsewhere (unknown or badly typed).
    A spec's nested fields (`{c:{w}}`) are tried with every value of their variables too (the
    others at their first value), never building a string wider than 99999; a combination of
    nested values the check does not try is caught while the rows are made (`Template.rows`)."""
    problems: list[str] = []
    first = {name: values[0] for name, values in samples.items()}
    fields = {(n, spec, conv) for _, n, spec, conv in string.Formatter().parse(text) if n is not None}
    for name, spec, conversion in sorted(fields, key=lambda f: (f[0], f[1] or "", f[2] or "")):
        if name not in samples:
            continue
        field = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        if spec and _BIG_NUMBER.search(spec):
            problems.append(f"{key}: {field}: a width or precision over 99999 is refused")
            continue
        try:
            nested = [n for _, n, _, _ in string.Formatter().parse(spec or "") if n is not None and n in samples]
        except ValueError:
            nested = []  # the spec's own syntax error is named when the field is formatted below
        problem = None
        for variable in dict.fromkeys([name, *nested]):
            for value in samples[variable]:
                values = {**first, variable: value}
                try:
                    _CAPPED.vformat(field, (), values)
                except KeyError:  # a nested field naming an unknown variable: reported by the name check
                    break
                except _BigSpec as exc:
                    involved = _values({n: values[n] for n in dict.fromkeys(nested)})
                    problem = (
                        f"{key}: {field}: a width or precision over 99999 is refused "
                        f"({involved} makes the spec {_short(str(exc))})"
                    )
                except (ValueError, TypeError, OverflowError, IndexError, AttributeError) as exc:
                    shown = _short(value) if variable == name else f"{variable}={_short(value)}"
                    problem = f"{key}: {field} cannot format {shown}: {exc}"
                if problem:
                    break
            if problem:
                problems.append(problem)
                break
    return problems


def _weight_ok(w: Any) -> bool:
    """A choice's weight: a finite number >= 0 (not inf, nan or negative, which skew or break the draw)."""
    if isinstance(w, bool) or not isinstance(w, (int, float)):
        return False
    try:
        return math.isfinite(w) and w >= 0
    except OverflowError:  # an int beyond a float's range
        return False


def _problem_list(problems: list[str]) -> str:
    shown = problems[:MAX_PROBLEMS]
    more = [f"... and {len(problems) - MAX_PROBLEMS} more"] if len(problems) > MAX_PROBLEMS else []
    return "template problems:\n  " + "\n  ".join(shown + more)


def parse_template(
    data: Mapping[str, Any], base_dir: str = ".", manifest_dir: str | None = None, max_rows: int = MAX_ROWS
) -> Template:
    """Check a template (all problems at once) and resolve its init images. `base_dir`: where
    relative init-image folders are; `manifest_dir`: the output manifest's folder, against which
    local init images are written as relative paths (so the manifest and images move together).
    A template giving more than `max_rows` rows is refused."""
    problems: list[str] = []
    if not isinstance(data, Mapping):
        raise TemplateError("a template is a YAML mapping")
    for key in data:
        if key not in TEMPLATE_KEYS:
            problems.append(f"{_name(key)}: unknown key (expected one of {', '.join(sorted(TEMPLATE_KEYS))})")
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
    samples: dict[str, list[Any]] = {}  # variable -> its values, when they are well typed
    declared: set[str] = set()  # every variable name given, so a bad one is not also "not a variable"
    variables = data.get("vars") or {}
    if not isinstance(variables, Mapping):
        problems.append("vars: expected a mapping of name -> list of values")
        variables = {}
    for name, value in variables.items():
        key = f"vars.{_name(name)}"
        if not isinstance(name, str) or not name.isidentifier():
            problems.append(f"{key}: a variable name must be an identifier")
            continue
        declared.add(name)
        if isinstance(value, Mapping):
            choices, weights = value.get("choices"), value.get("weights")
            if set(value) - {"choices", "weights"} or not isinstance(choices, list) or not choices:
                problems.append(f"{key}: expected {{choices: [...], weights: [...]}}")
                continue
            weights = [1.0] * len(choices) if weights is None else weights
            if (
                not isinstance(weights, list)
                or len(weights) != len(choices)
                or not all(_weight_ok(w) for w in weights)
                or not 0 < math.fsum(weights) < math.inf
            ):
                problems.append(f"{key}.weights: expected {len(choices)} numbers >= 0 and finite, not all zero")
                continue
            weighted[name] = (choices, list(itertools.accumulate(float(w) for w in weights)))
            values = choices
        elif isinstance(value, list) and value:
            lists[name] = values = value
        else:
            problems.append(f"{key}: expected a non-empty list or {{choices: [...], weights: [...]}}")
            continue
        try:
            _arrow_type(values, key)
        except TemplateError as exc:
            problems.append(str(exc))
        else:
            samples[name] = values

    combine = data.get("combine", "product")
    if combine not in ("product", "zip"):
        problems.append(f"combine: expected product or zip, got {_short(combine)}")
    elif combine == "zip" and len({len(v) for v in lists.values()}) > 1:
        lengths = ", ".join(f"{k}={len(v)}" for k, v in lists.items())
        problems.append(f"combine: zip needs lists of equal length ({lengths})")

    def integer(key: str, default: int, low: int, high: int = rules.MAX_SEED) -> int:
        value = data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            problems.append(f"{key}: expected an integer in {low}..{high}, got {_short(value)}")
            return default
        return value

    seeds_per_prompt = integer("seeds_per_prompt", 1, 1, MAX_SEEDS_PER_PROMPT)
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
            problems.append(f"settings.{_name(name)}: unknown (expected one of {', '.join(SETTINGS)})")
            continue
        values = _as_list(value)
        if not values:
            problems.append(f"settings.{name}: expected a value or a non-empty list (an empty list gives no rows)")
            continue
        check = {
            "sampler": rules.sampler_problem,
            "karras": lambda v: None if isinstance(v, bool) else f"expected true or false, got {v!r}",
            "steps": rules.steps_problem,
            "guidance_scale": rules.guidance_problem,
            "width": rules.size_problem,
            "height": rules.size_problem,
        }[name]
        for v in values:
            if not _is_scalar(v):  # never repr a nested value in full (an alias bomb)
                problems.append(f"settings.{name}: expected a value, got a {type(v).__name__}")
                break
            if check(v):
                problems.append(f"settings.{name}: {check(v)}")
        settings[name] = values

    init_images: list[str] = []
    strengths: list[float] = []
    init = data.get("init_images")
    if init is not None:
        if (
            not isinstance(init, Mapping)
            or set(init) - {"source", "strengths"}
            or isinstance(init.get("source"), bool)
            or not isinstance(init.get("source"), (str, int))
        ):
            problems.append("init_images: expected {source: FOLDER or s3://PREFIX, strengths: [...]}")
        else:
            strengths = _as_list(init.get("strengths", []))
            if not strengths or not all(
                isinstance(s, (int, float)) and not isinstance(s, bool) and 0 < s <= 1 for s in strengths
            ):
                problems.append("init_images.strengths: expected numbers in (0, 1]")
                strengths = []
            strengths = [float(s) for s in strengths]
            try:
                init_images = _list_images(str(init["source"]), base_dir, manifest_dir)
            except (OSError, RuntimeError) as exc:
                problems.append(f"init_images.source: {exc}")
            else:
                if not init_images:
                    problems.append(f"init_images.source: no {'/'.join(IMAGE_SUFFIXES)} files in {init['source']}")

    # img2img runs int(steps * strength) steps; none is every such row's error at run time.
    good_steps = [v for v in settings.get("steps", []) if _is_scalar(v) and not rules.steps_problem(v)]
    for strength in strengths:
        if "steps" not in settings:  # the job's sampler.steps decide; none can save a strength this small
            if rules.strength_problem(strength, rules.MAX_STEPS):
                problems.append(
                    f"init_images.strengths: {strength:g} leaves no denoising step at any step count "
                    f"(int(steps * strength) = 0 up to {rules.MAX_STEPS} steps)"
                )
            continue
        for steps in good_steps:
            if rules.strength_problem(strength, steps):
                problems.append(
                    f"init_images.strengths: {strength:g} with settings.steps {steps}: "
                    f"{rules.strength_problem(strength, steps)}"
                )

    columns = data.get("columns") or {}
    if not isinstance(columns, Mapping):
        problems.append("columns: expected a mapping of name -> value")
        columns = {}
    for name, value in columns.items():
        if not isinstance(name, str) or not name:
            problems.append(f"columns: {_short(name)}: a column name must be a non-empty string (quote it)")
            continue
        try:
            _arrow_type([value], f"columns.{name}")
        except TemplateError as exc:
            problems.append(str(exc))

    id_template = data.get("id")
    if id_template is not None and not isinstance(id_template, str):
        problems.append("id: expected a string template")
        id_template = None

    names = declared  # lists and weighted ones, and those whose values were refused above
    for key, text in (("prompt", prompt), ("negative", negative), ("id", id_template)):
        if text:
            extra = {"row", "prompt_index", "seed_index"} if key == "id" else set()
            unknown = sorted(_fields(text, key) - names - extra)
            for name in unknown:
                problems.append(f"{key}: {{{name}}} is not a variable (vars: {', '.join(sorted(names)) or 'none'})")
            if not unknown:
                counters = {name: [0] for name in extra}  # as in rows(): these win over variables
                problems += _format_problems(key, text, {**samples, **counters})
    reserved = {"id", "prompt", "negative", "seed", "init_image", "strength", *SETTINGS}
    for name in sorted(n for n in names | set(columns) if isinstance(n, str) and n in reserved):
        problems.append(f"vars/columns: {name!r} is a manifest column, not a label; use settings: for settings")
    for name in sorted(names & set(columns)):
        problems.append(f"columns.{name}: also a variable")
    for name in sorted(names & {"row", "prompt_index", "seed_index"}):
        problems.append(f"vars.{name}: the name of a counter the id template can use; name the variable otherwise")

    if problems:
        raise TemplateError(_problem_list(problems))
    template = Template(
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
    rows = template.num_rows
    if not 0 < rows <= max_rows:
        factors = [
            f"repeat {repeat}",
            f"{template.combinations} variable combination(s)",
            f"{template.settings_count} settings combination(s)",
            f"{len(init_images) * len(strengths) if init_images else 1} init image x strength pair(s)",
            f"seeds_per_prompt {seeds_per_prompt}",
        ]
        limit = "no rows" if not rows else f"over the limit of {max_rows} (raise it with --max-rows)"
        raise TemplateError(f"template gives {' x '.join(factors)} = {rows} rows: {limit}")
    return template


def _s3_join(base: str, relative: str) -> str:
    """The s3:// prefix `relative` names from the s3:// folder `base` (`..` and `.` resolved)."""
    bucket, key = split_s3(base)
    joined = posixpath.normpath(posixpath.join(key, relative))
    if joined == ".." or joined.startswith("../"):
        raise OSError(f"{relative}: leaves the bucket of the template ({redact_uri(base)})")
    return f"s3://{bucket}/{'' if joined == '.' else joined}"


def _list_images(source: str, base_dir: str, manifest_dir: str | None) -> list[str]:
    """The init images under a folder or s3:// prefix, sorted: s3 URIs, or local paths relative
    to the manifest's folder (absolute when the manifest goes to S3). A relative folder is
    relative to `base_dir`, the template's folder: local, or an s3:// prefix (a template on S3
    names the prefix beside it)."""
    if source.startswith("file://"):
        source = local_path(source)
    elif source.startswith("~"):
        source = os.path.expanduser(source)
    if is_s3(base_dir) and not is_s3(source) and not os.path.isabs(source):
        source = _s3_join(base_dir, source)
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


def convert_table(
    table: pa.Table, base_seed: int | None, seeds_per_prompt: int = 1, max_rows: int = MAX_ROWS
) -> pa.Table:
    """A CSV/TSV/JSONL prompt list as a manifest: without a seed column, seeds are derived from
    `base_seed` (row i, seed index k), each row repeated `seeds_per_prompt` times, its id (if
    any) becoming `ID-sK` so the repeated rows' ids stay unique. Refuses a list with no rows or
    one that would give more than `max_rows` rows."""
    if isinstance(seeds_per_prompt, bool) or not 1 <= seeds_per_prompt <= MAX_SEEDS_PER_PROMPT:
        raise TemplateError(
            f"--seeds-per-prompt: expected an integer in 1..{MAX_SEEDS_PER_PROMPT}, got {seeds_per_prompt}"
        )
    if base_seed is not None and not 0 <= base_seed <= rules.MAX_SEED:
        raise TemplateError(f"--base-seed: expected an integer in 0..{rules.MAX_SEED}, got {base_seed}")
    if "prompt" not in table.column_names:
        raise TemplateError(f"no prompt column (columns: {', '.join(table.column_names)})")
    if table.num_rows == 0:
        raise TemplateError("no rows (a header only?): the manifest would be empty")
    if "seed" in table.column_names:
        if seeds_per_prompt != 1:
            raise TemplateError("--seeds-per-prompt needs a list without a seed column")
        if base_seed is not None:
            raise TemplateError("--base-seed needs a list without a seed column (the list's own seeds are used)")
        rows = table.num_rows
    else:
        rows = table.num_rows * seeds_per_prompt
    if rows > max_rows:
        raise TemplateError(
            f"the list gives {table.num_rows} rows x --seeds-per-prompt {seeds_per_prompt} = {rows} rows: "
            f"over the limit of {max_rows} (raise it with --max-rows)"
        )
    if "seed" in table.column_names:
        return table
    base = 0 if base_seed is None else base_seed
    indices = pa.array([i for i in range(table.num_rows) for _ in range(seeds_per_prompt)], pa.int64())
    ids = table.column("id") if "id" in table.column_names and seeds_per_prompt > 1 else None
    table = table.take(indices)
    if ids is not None and (pa.types.is_string(ids.type) or pa.types.is_integer(ids.type)):
        # A repeated row keeps its id apart: ID-s0, ID-s1, ... (a string column then; the
        # manifest reads integer ids as their decimal text, so "7" and 7 name the same row).
        # Other id types are left for the manifest check to name.
        unique = [None if v is None else f"{v}-s{k}" for v in ids.to_pylist() for k in range(seeds_per_prompt)]
        table = table.set_column(table.column_names.index("id"), "id", pa.array(unique, pa.string()))
    seeds = [
        derive_seed(base, i, k) for i in range(table.num_rows // seeds_per_prompt) for k in range(seeds_per_prompt)
    ]
    position = table.column_names.index("prompt") + 1
    return table.add_column(position, "seed", pa.array(seeds, pa.int64()))


def rebase_init_images(table: pa.Table, source: str, out: str) -> pa.Table:
    """A prompt list's relative `init_image` paths are relative to the list's own folder (as in any
    manifest, see manifest.resolve_init_image); rewrite them to name the same files from OUT:
    relative to OUT's folder when both are local (as a template writes them), else the absolute
    path or s3:// URI. Absolute paths, `~` paths (the runner expands `~` where it runs) and URIs
    are kept as they are."""
    from .manifest import resolve_init_image

    if "init_image" not in table.column_names or parent_uri(source) == parent_uri(out):
        return table
    column = table.column("init_image")
    values = column.to_pylist()
    if not all(v is None or isinstance(v, str) for v in values):
        return table  # not text: the manifest check names the column
    out_dir = None if is_s3(out) else parent_uri(out)

    def rebase(value: str | None) -> str | None:
        if not value or is_s3(value) or "://" in value or value.startswith("~") or os.path.isabs(value):
            return value
        target = resolve_init_image(value, source)
        if out_dir is None or is_s3(target):
            return target
        return os.path.relpath(target, out_dir).replace(os.sep, "/")

    kind = column.type if pa.types.is_string(column.type) or pa.types.is_large_string(column.type) else pa.string()
    rebased = pa.array([rebase(v) for v in values], kind)
    return table.set_column(table.column_names.index("init_image"), "init_image", rebased)


ID_CHECK_ROWS = 1_000_000  # ids checked for repeats in the first this many rows (memory stays bounded)


def _template_repeat(row_id: Any, earlier: int, index: int) -> str:
    return (
        f"id {_short(row_id)} repeats (rows {earlier} and {index}): every row needs its own id; "
        "name in the id what tells the rows apart (e.g. {seed_index} or {row})"
    )


def _unique_ids(
    rows: Iterator[dict[str, Any]], repeated: Callable[[Any, int, int], str] = _template_repeat
) -> Iterator[dict[str, Any]]:
    """The rows, refusing (TemplateError, `repeated(id, earlier_row, row)` its message) an id
    that repeats among the first ID_CHECK_ROWS: at run time every repeat would be an error
    record. An id template that leaves out an axis the rows vary along (e.g. `{color}` with two
    seeds per prompt) repeats within the first rows."""
    first: dict[Any, int] = {}
    for index, row in enumerate(rows):
        if index < ID_CHECK_ROWS and row.get("id") is not None:
            earlier = first.setdefault(row["id"], index)
            if earlier != index:
                raise TemplateError(repeated(row["id"], earlier, index))
        yield row


def _source_kind(source: str) -> str:
    """`template`, or the list's format (`csv`, `tsv`, `jsonl`, `parquet`), by extension;
    TemplateError for any other."""
    name = source.lower().split("?")[0]
    if name.endswith(TEMPLATE_SUFFIXES):
        return "template"
    if name.endswith(LIST_SUFFIXES):
        return manifest_format(source)
    raise TemplateError(
        f"{redact_uri(source)}: unknown kind of file; expected a template ({', '.join(TEMPLATE_SUFFIXES)}) "
        f"or a prompt list ({', '.join(LIST_SUFFIXES)}), by its extension"
    )


def _check_out(source: str, out: str) -> None:
    """Refuse (TemplateError, before anything is read or written) an OUT that is a folder, not a
    `.parquet` name, or SOURCE itself (writing it would replace the source)."""
    if not out.strip():
        raise TemplateError("OUT is empty: name the Parquet manifest to write (e.g. manifest.parquet)")
    shown = redact_uri(out)
    try:  # StorageError (a RuntimeError): a file:// URI naming a host, another scheme, no bucket
        out_path = None if is_s3(out) else Path(local_path(out)).expanduser()
        source_path = None if is_s3(source) else Path(local_path(source)).expanduser()
        if out_path is None:
            split_s3(out)
    except RuntimeError as exc:
        raise TemplateError(str(exc)) from None
    if out_path is not None and out_path.is_dir():
        raise TemplateError(f"OUT {shown}: is a folder; name the Parquet file to write in it (e.g. manifest.parquet)")
    if not out.lower().split("?")[0].endswith(".parquet"):
        kind = manifest_format(out)
        misread = f": {shown} would be read as {kind.upper()}" if kind != "parquet" else ""
        raise TemplateError(
            f"OUT {shown}: make-manifest writes Parquet; name OUT with a .parquet extension "
            f"(the runner reads a manifest by its extension{misread})"
        )
    if out_path is None or source_path is None:
        same = out_path is None and source_path is None and split_s3(out) == split_s3(source)
    else:
        same = out_path.resolve() == source_path.resolve()
        try:  # another name of the same file (a hard link)
            same = same or (out_path.exists() and source_path.exists() and out_path.samefile(source_path))
        except OSError:
            pass
    if same:
        raise TemplateError(f"OUT {shown} is SOURCE itself: writing it would replace the source; name another file")


def _write_local(rows: Iterator[dict[str, Any]], schema: pa.Schema, path: str, out: str, group: int) -> int:
    """Stream the rows to `PATH.tmp-PID`, then rename it to `path` (OUT, as `out` names it):
    OUT appears only when complete. The temp file goes on any exception, Ctrl-C and SIGTERM
    (main turns it into Ctrl-C)."""
    temp = f"{path}.tmp-{os.getpid()}"
    try:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(temp, "wb") as sink:
                count = stream_parquet(rows, schema, sink, group)
            os.replace(temp, path)
        except OSError as exc:
            raise TemplateError(f"cannot write OUT {redact_uri(out)}: {exc.strerror or exc}") from None
    finally:
        if os.path.exists(temp):
            os.remove(temp)
    return count


def _write_s3(rows: Iterator[dict[str, Any]], schema: pa.Schema, out: str, group: int) -> int:
    """Stream the rows to a local temporary file, then upload it (multipart when large, the
    object appearing only when complete): memory stays flat whatever the row count, as for a
    local OUT. The temporary file, in $TMPDIR, is removed in every case."""
    bucket, key = split_s3(out)
    handle, temp = tempfile.mkstemp(prefix="sdgen-manifest-", suffix=".parquet")
    try:
        with os.fdopen(handle, "wb") as sink:
            count = stream_parquet(rows, schema, sink, group)
        open_storage(f"s3://{bucket}").write_file(key, temp)
    finally:
        os.remove(temp)
    return count


def make_manifest(
    source: str,
    out: str,
    *,
    base_seed: int | None = None,
    seeds_per_prompt: int | None = None,
    max_rows: int = MAX_ROWS,
) -> dict[str, Any]:
    """Expand a template (.yaml/.yml) or convert a prompt list (.csv/.tsv/.jsonl/.parquet) into
    the Parquet manifest `out` (a local path or s3:// URI). Returns {"rows", "row_groups", "out"}.
    Refuses (TemplateError, nothing written) a source giving no rows or more than `max_rows`."""
    kind = _source_kind(source)
    _check_out(source, out)
    target = out if is_s3(out) else os.path.abspath(os.path.expanduser(local_path(out)))
    out_dir = None if is_s3(out) else os.path.dirname(target)
    if kind == "template":
        try:
            data = yaml.safe_load(read_uri(source))
        except yaml.YAMLError as exc:
            raise TemplateError(f"{redact_uri(source)}: not valid YAML ({one_line(str(exc), 1000)})") from None
        if isinstance(data, Mapping):
            if base_seed is not None:
                data = {**data, "base_seed": base_seed}
            if seeds_per_prompt is not None:
                data = {**data, "seeds_per_prompt": seeds_per_prompt}
        # Relative init-image folders are relative to the template: its local folder, or the
        # s3:// prefix it sits in.
        base_dir = (
            parent_uri(source)
            if is_s3(source)
            else os.path.dirname(os.path.abspath(os.path.expanduser(local_path(source))))
        )
        template = parse_template(data, base_dir, out_dir, max_rows)
        schema, rows, group = template.schema(), template.rows(), template.row_group_size
        repeated = _template_repeat
    else:
        try:
            table = read_table_bytes(read_uri(source), source)
        except (pa.ArrowException, ValueError) as exc:
            raise TemplateError(f"{redact_uri(source)}: cannot read as {kind} ({exc})") from None
        per_row = 1 if seeds_per_prompt is None else seeds_per_prompt
        try:
            table = convert_table(table, base_seed, per_row, max_rows)
        except TemplateError as exc:
            raise TemplateError(f"{redact_uri(source)}: {exc}") from None
        table = rebase_init_images(table, source, target)
        # Row dicts one record batch at a time: a Python dict per row costs ~10x the row's
        # columnar bytes, so the whole list as dicts would be the conversion's peak memory.
        group = 65536
        schema, rows = table.schema, (row for batch in table.to_batches(group) for row in batch.to_pylist())

        def repeated(row_id: Any, earlier: int, index: int) -> str:
            # Rows repeated per seed got ids ID-sK: a repeat is the list's own; name its rows.
            return (
                f"{redact_uri(source)}: id {_short(row_id)} repeats (rows {earlier // per_row} and "
                f"{index // per_row} of the list): every row needs its own id; make the list's ids unique, "
                "or leave its id column out (rows are then named by their row number)"
            )

    if "id" in schema.names:
        rows = _unique_ids(rows, repeated)
    count = _write_s3(rows, schema, out, group) if is_s3(out) else _write_local(rows, schema, target, out, group)
    return {"rows": count, "row_groups": (count + group - 1) // group, "out": redact_uri(out)}


def main(argv: Sequence[str] | None = None, prog: str = "sdgen make-manifest") -> int:
    """Exit status: 0 written, 2 the template or list was refused (nothing written), 130
    interrupted (Ctrl-C or SIGTERM; nothing written, no temp file left)."""
    import argparse
    import signal
    import sys

    from .exit_codes import INTERRUPTED, REFUSED, TABLE, install_sigterm
    from .redact import redact_text

    parser = argparse.ArgumentParser(
        prog=prog,
        description="Expand a prompt template (YAML) or convert a CSV/TSV/JSONL/Parquet prompt list into a\n"
        "Parquet manifest (see jobs/README.md, 'Making manifests').",
        epilog=TABLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "source", help="template .yaml/.yml, or a prompt list .csv/.tsv/.jsonl/.ndjson/.parquet (local path or s3://)"
    )
    parser.add_argument("out", help="the Parquet manifest to write, OUT.parquet (local path or s3://; not SOURCE)")
    parser.add_argument("--base-seed", type=int, default=None, help="override the template's base_seed")
    parser.add_argument(
        "--seeds-per-prompt",
        type=int,
        default=None,
        help="rows per prompt (template: overrides seeds_per_prompt; list: each row repeated, its id becoming ID-sK)",
    )
    parser.add_argument(
        "--max-rows",
        type=int,
        default=MAX_ROWS,
        help=f"refuse a source giving more rows than this (default {MAX_ROWS})",
    )
    args = parser.parse_args(argv)
    if args.max_rows < 1:
        parser.error(f"--max-rows: expected a positive integer, got {args.max_rows}")
    previous = signal.getsignal(signal.SIGTERM)
    install_sigterm()  # SIGTERM -> KeyboardInterrupt, so the temp file is removed as after Ctrl-C
    try:
        result = make_manifest(
            args.source,
            args.out,
            base_seed=args.base_seed,
            seeds_per_prompt=args.seeds_per_prompt,
            max_rows=args.max_rows,
        )
    except KeyboardInterrupt:
        print("interrupted: nothing written", file=sys.stderr)
        return INTERRUPTED
    except (TemplateError, FileNotFoundError, OSError, RuntimeError) as exc:
        print(f"error: {one_line(redact_text(str(exc)), 8000)}", file=sys.stderr)
        return REFUSED
    except (ValueError, TypeError, OverflowError, pa.ArrowException) as exc:
        # Whatever the checks above missed while building the table: one line, not a traceback.
        message = one_line(redact_text(f"{type(exc).__name__}: {exc}"), 1000)
        print(f"error: cannot build the manifest from {redact_uri(args.source)}: {message}", file=sys.stderr)
        return REFUSED
    finally:
        if previous is not None:
            try:
                signal.signal(signal.SIGTERM, previous)
            except ValueError:  # not the main thread (install_sigterm did nothing either)
                pass
    print(f"wrote {result['out']}: {result['rows']} rows in {result['row_groups']} row group(s)")
    return 0


__all__ = [
    "MAX_ROWS",
    "Template",
    "TemplateError",
    "convert_table",
    "derive_seed",
    "make_manifest",
    "parse_template",
    "rebase_init_images",
]


if __name__ == "__main__":
    import sys

    sys.exit(main())
