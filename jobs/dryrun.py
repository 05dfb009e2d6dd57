"""`sdgen run SPEC --dry-run`: what the job would do, checked on this machine, before Ray starts.

It prints and returns:

- the resolved settings (size, steps, sampler, guidance, dtype, device, workers, batch and shard
  size, threads), resolved as they would be on *this* machine (a cluster's GPUs resolve `auto`
  there);
- the weights: found and readable (the model is loaded here, as each worker would), with their
  fingerprint; missing or unreadable weights refuse the job (exit 2, like any bad spec);
- every manifest row checked exactly as the worker checks it (`parse_row`), plus the existence of
  every distinct init image; the rows that would become error records, counted by reason with an
  example each;
- a warning for the rows whose prompt or negative prompt is longer than CLIP's 75 tokens and will
  be cut (counted apart, with a few example rows): the job still runs them, as diffusers would;
- a time estimate from a short calibration: one row generated at the job's size (after a warm-up
  call) with 1 and with 3 steps gives the fixed and the per-step cost, times the rows' steps
  (img2img: the steps its strength leaves), divided by the workers.

`--limit N` (`trial_job`) runs only the first N rows into a separate output, `OUTPUT-limitN`, for
a trial that never mixes with the real job's output; when OUTPUT is a bucket's root
(`s3://bucket`), which has nothing beside it but other buckets, into `s3://bucket/limitN`
(`trial_output`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

from sdcore import rules

from .errors import error_reason
from .manifest import Manifest, parse_row
from .progress import duration
from .rows import table_rows
from .spec import JobSpec, SpecError
from .storage import TransientStorageError, is_s3, local_path, redact_uri, split_s3, uri_exists


def trial_output(output: str, limit: int) -> str:
    """Where `--limit N` writes: `OUTPUT-limitN`, beside the output; for a bucket's root
    (`s3://bucket`, `s3://bucket/`), the prefix `s3://bucket/limitN` inside that bucket, never
    another bucket (`s3://bucket-limitN` may be someone else's, or not exist)."""
    if limit < 1:  # here, so that a run refuses it before taking a lease on the trial output
        raise SpecError(f"--limit: expected a positive number of rows, got {limit}")
    if is_s3(output) and not split_s3(output)[1].strip("/"):
        return f"{output.rstrip('/')}/limit{limit}"
    return f"{output.rstrip('/')}-limit{limit}"


def trial_job(spec: JobSpec, manifest: Manifest, limit: int) -> tuple[JobSpec, Manifest]:
    """The job on the manifest's first `limit` rows, writing to `trial_output` (`OUTPUT-limitN`)."""
    output = trial_output(spec.output, limit)
    n = min(limit, manifest.num_rows)
    table = manifest.table.slice(0, n)
    trial = dataclasses.replace(
        manifest,
        table=table,
        ids=manifest.ids[:n],
        duplicates={r: f for r, f in manifest.duplicates.items() if r < n},
        cell_problems={r: p for r, p in manifest.cell_problems.items() if r < n},
        fingerprint=hashlib.sha256(f"{manifest.fingerprint}:first:{n}".encode()).hexdigest(),
    )
    return dataclasses.replace(spec, output=output), trial


def check_weights(weights: str) -> str | None:
    """A problem with the weights' location, found without loading them (None: found)."""
    if weights.startswith("builtin:"):
        return None
    if is_s3(weights):
        try:
            found = uri_exists(weights) or uri_exists(weights.rstrip("/") + "/unet/config.json")
        except TransientStorageError:
            raise  # the store is unreachable, not the weights missing: exit 3
        except Exception as exc:  # noqa: BLE001 - any storage failure is a finding here
            return f"model.weights: {redact_uri(weights)}: cannot be checked ({exc})"
        return None if found else f"model.weights: not found: {redact_uri(weights)}"
    path = local_path(weights)
    if not os.path.exists(path):
        return f"model.weights: not found: {path}"
    if not os.access(path, os.R_OK):
        return f"model.weights: not readable: {path}"
    return None


def check_rows(spec: JobSpec, manifest: Manifest, to_run: Sequence[tuple[int, int]] | None = None) -> dict[str, Any]:
    """Every row through `parse_row`, and every distinct init image looked up. `to_run`: the
    (start, stop) row ranges of the shards a run would run (None: all), which the estimate
    counts (`ok_to_run`, `steps_to_run`): committed shards are not made again."""
    reasons: Counter[str] = Counter()
    examples: dict[str, str] = {}
    steps_total = ok = 0
    running = bytearray(manifest.num_rows) if to_run is not None else bytearray(b"\1" * manifest.num_rows)
    for start, stop in to_run or ():
        running[start:stop] = b"\1" * (stop - start)
    to_run_rows: dict[int, int] = {}  # row -> its denoising steps, for the ok rows a run would make
    inits: dict[str, list[int]] = {}
    cut = TokenCounter(manifest.num_rows)
    offset = 0
    for batch in manifest.table.to_batches(max_chunksize=65536):
        for i, raw in enumerate(table_rows(pa.Table.from_batches([batch]))):  # as the worker reads them
            row = offset + i
            request, problem, _ = parse_row(
                row,
                raw,
                row_id=manifest.ids[row],
                sampler=spec.sampler,
                duplicate_of=manifest.duplicates.get(row),
                bad_columns=manifest.bad_columns,
                cell_problems=manifest.cell_problems.get(row),
            )
            if problem is not None:
                reason = error_reason(problem)
                reasons[reason] += 1
                examples.setdefault(reason, f"row {row}: {problem}")
                continue
            if request.init_image_uri:
                inits.setdefault(request.init_image_uri, []).append(row)
            ok += 1
            steps = request.steps if request.strength is None else max(1, int(request.steps * request.strength))
            steps_total += steps
            if running[row]:
                to_run_rows[row] = steps
            cut.add(row, request.prompt, request.negative if rules.guided(request.guidance_scale) else "")
        cut.count()  # this batch's prompts, a batch at a time
        offset += batch.num_rows

    def missing(uri: str) -> bool:
        try:
            return not uri_exists(uri)
        except Exception:  # noqa: BLE001 - unreadable counts as missing here
            return True

    with ThreadPoolExecutor(max_workers=16) as pool:
        absent = [uri for uri, gone in zip(inits, pool.map(missing, list(inits))) if gone]
    for uri in absent:
        reason = error_reason(f"init_image not found: {redact_uri(uri)}")
        reasons[reason] += len(inits[uri])
        examples.setdefault(reason, f"row {inits[uri][0]}: init_image not found: {redact_uri(uri)}")
        ok -= len(inits[uri])
        for row in inits[uri]:
            to_run_rows.pop(row, None)
        cut.forget(inits[uri])  # error records: never encoded
    return {
        "rows": manifest.num_rows,
        "ok": ok,
        "bad": sum(reasons.values()),
        "reasons": dict(reasons.most_common()),
        "examples": examples,
        "steps_total": steps_total,
        "ok_to_run": len(to_run_rows),
        "steps_to_run": sum(to_run_rows.values()),
        "init_images": len(inits),
        "init_images_missing": len(absent),
        "truncated": cut.findings(manifest.ids),
    }


TRUNCATION_EXAMPLES = 3  # example rows the dry run names per kind of truncated text


class TokenCounter:
    """The tokens CLIP will drop from each ok row's prompt and negative prompt
    (`sdcore.tokenizer.dropped_tokens`: the pipeline's tokenizer and cleaning, fast over a long
    list), found a manifest batch at a time: `add` a batch's rows, then `count` them, each
    distinct text of the batch once. Holds two int32 per manifest row (8 MB at 1M rows)."""

    def __init__(self, rows: int):
        self.dropped = {"prompt": np.zeros(rows, np.int32), "negative": np.zeros(rows, np.int32)}
        self.pending: dict[str, dict[str, list[int]]] = {"prompt": {}, "negative": {}}  # text -> its rows

    def add(self, row: int, prompt: str, negative: str) -> None:
        """One ok row; `negative` "" when the row is not guided (its negative is not encoded)."""
        self.pending["prompt"].setdefault(prompt, []).append(row)
        if negative:
            self.pending["negative"].setdefault(negative, []).append(row)

    def count(self) -> None:
        from sdcore.tokenizer import dropped_tokens

        for kind, texts in self.pending.items():
            for rows, n in zip(texts.values(), dropped_tokens(list(texts))):
                if n:
                    self.dropped[kind][rows] = n
            texts.clear()

    def forget(self, rows: Sequence[int]) -> None:
        for dropped in self.dropped.values():
            dropped[list(rows)] = 0

    def findings(self, ids: Sequence[str | None]) -> dict[str, Any]:
        """Per kind: the rows cut, and the first few (row, id, tokens dropped)."""
        found = {}
        for kind, dropped in self.dropped.items():
            rows = np.flatnonzero(dropped)
            examples = [
                {"row": int(r), "id": ids[r], "tokens_dropped": int(dropped[r])} for r in rows[:TRUNCATION_EXAMPLES]
            ]
            found[kind] = {"rows": len(rows), "examples": examples}
        return found


def truncation_lines(truncated: dict[str, Any]) -> list[str]:
    """The dry run's warnings for rows whose texts CLIP will cut (none when every text fits)."""
    lines = []
    for kind, what in (("prompt", "prompt"), ("negative", "negative prompt")):
        found = truncated[kind]
        if not found["rows"]:
            continue
        examples = ", ".join(
            f"row {e['row']} (id {_short(e['id'])}: {e['tokens_dropped']} dropped)" for e in found["examples"]
        )
        lines.append(
            f"[sdgen] warning: {found['rows']} row(s) have a {what} longer than CLIP's 75 tokens; the tokens "
            f"past the 75th are dropped (the rows still run), e.g. {examples}"
        )
    return lines


def _short(value: str | None, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _resolved(spec: JobSpec) -> dict[str, Any]:
    import torch

    ex = spec.execution
    gpus = torch.cuda.device_count()
    device = ex.device if ex.device != "auto" else ("cuda" if gpus else "cpu")
    workers = ex.workers if ex.workers != "auto" else (max(1, gpus) if device == "cuda" else 1)
    threads = None
    if device == "cpu":
        threads = ex.cpu_threads if ex.cpu_threads != "auto" else os.cpu_count()
    return {"device": device, "workers": workers, "threads": threads}


UNET_MODES = {  # sdcore.kernels.compile_unet's modes, as the dry run says them
    "cuda-graphs": "replayed from CUDA graphs",
    "default": "compiled (torch.compile)",
    "reduce-overhead": "compiled, replayed from CUDA graphs",
}


def calibrate(spec: JobSpec, device: str, threads: int | None) -> dict[str, Any]:
    """Load the model here and time one row at the job's size with 1 and 2 steps."""
    import torch

    import sdcore

    from .weights import resolve_weights

    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    pipe = sdcore.load_pipeline(resolve_weights(spec.model.weights), device=device, dtype=spec.model.dtype)
    sdcore.set_conv_algorithm(pipe, spec.execution.conv)
    load_s = time.perf_counter() - t0
    s = spec.sampler
    times = []
    for steps in (1, 1, 3):  # a warm-up call, then 1 and 3 steps
        t0 = time.perf_counter()
        pipe.generate(
            [sdcore.GenerationRequest("calibration", seed=0)],
            sampler=s.name,
            karras=s.karras,
            steps=steps,
            guidance_scale=s.guidance_scale,
            width=s.width,
            height=s.height,
        )
        times.append(time.perf_counter() - t0)
    per_step = max((times[2] - times[1]) / 2, 0.0)
    fixed = max(times[1] - per_step, 0.0)
    return {
        "fingerprint": pipe.fingerprint,
        "dtype": str(pipe.dtype).replace("torch.", ""),
        "load_s": round(load_s, 3),
        "fixed_s": round(fixed, 4),
        "per_step_s": round(per_step, 4),
    }


def dry_run(
    spec: JobSpec,
    manifest: Manifest,
    plan_counts: dict[str, Any],
    log: Callable[[str], None],
    to_run: Sequence[tuple[int, int]] | None = None,
) -> dict:
    """The dry run's findings (printed as it goes). Raises SpecError for missing weights.
    `to_run`: the row ranges of the shards not yet committed (None: all), which the estimate is for."""
    problem = check_weights(spec.model.weights)
    if problem:
        raise SpecError(problem)
    resolved = _resolved(spec)
    s, ex = spec.sampler, spec.execution
    mode = ex.compile_mode(resolved["device"])
    log(
        f"[sdgen] dry run: {s.width}x{s.height}, {s.steps} steps, sampler {s.name}"
        f"{' (karras)' if s.karras else ''}, guidance {s.guidance_scale}, dtype {spec.model.dtype}, "
        f"device {resolved['device']} (this machine), {resolved['workers']} worker(s), batch {ex.batch_size}, "
        f"shard {ex.shard_size}"
        + (f", {resolved['threads']} CPU threads" if resolved["threads"] else "")
        + (f", UNet {UNET_MODES[mode]}" if mode != "none" else "")
    )
    rows = check_rows(spec, manifest, to_run)
    log(
        f"[sdgen] rows: {rows['rows']} checked, {rows['ok']} ok, {rows['bad']} would be error records"
        + (
            f"; {rows['init_images'] - rows['init_images_missing']} of {rows['init_images']} distinct init "
            "image(s) found"
            if rows["init_images"]
            else ""
        )
    )
    for reason, count in rows["reasons"].items():
        log(f"[sdgen]   {count:>6}  {reason}   e.g. {rows['examples'][reason]}")
    for line in truncation_lines(rows["truncated"]):
        log(line)
    try:
        cal = calibrate(spec, resolved["device"], resolved["threads"])
    except TransientStorageError:
        raise
    except Exception as exc:  # noqa: BLE001 - unreadable weights are a refusal, named
        raise SpecError(f"model.weights: {redact_uri(spec.model.weights)}: cannot be loaded ({exc})") from None
    log(
        f"[sdgen] weights {redact_uri(spec.model.weights)}: readable, fingerprint {cal['fingerprint'][:12]}, "
        f"{cal['dtype']}, loaded in {cal['load_s']:.1f}s"
    )
    images = rows["ok_to_run"]
    seconds = (images * cal["fixed_s"] + rows["steps_to_run"] * cal["per_step_s"]) / resolved["workers"]
    left = "" if images == rows["ok"] else f" (the shards not yet committed; {rows['ok']} in all)"
    log(
        f"[sdgen] estimate: {duration(seconds)} for {images} image(s){left} on {resolved['workers']} "
        f"{resolved['device']} worker(s) like this machine ({cal['fixed_s']:.3f}s + {cal['per_step_s']:.3f}s/step "
        "per image, calibrated here; model loading and Ray start-up not included)"
    )
    return {
        **plan_counts,
        "settings": {
            **dataclasses.asdict(s),
            "dtype": cal["dtype"],
            **resolved,
            "batch_size": ex.batch_size,
            "compile": mode,
            "conv": ex.conv,
        },
        "weights": {"uri": redact_uri(spec.model.weights), "fingerprint": cal["fingerprint"]},
        "rows": rows,
        "calibration": cal,
        "estimate_s": round(seconds, 1),
    }


__all__ = ["TokenCounter", "calibrate", "check_rows", "check_weights", "dry_run", "trial_job", "truncation_lines"]
