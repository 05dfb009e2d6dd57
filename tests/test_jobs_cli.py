"""The `sdgen` console script (jobs/cli.py) as installed, and the scripts it stands beside:
`python jobs/run.py` (how `ray job submit` runs a job) and `python jobs/status.py`, from another
working directory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from jobs.output import SUMMARY_FILE, Output

from conftest import PYTHON, REPO, run_command, small_rows, spec_dict, write_manifest, write_spec

SDGEN = str(Path(sys.executable).parent / "sdgen")


def sdgen(*args: str, cwd: Path = REPO):
    return run_command([SDGEN, *args], check=False, cwd=cwd, timeout=120)


def test_help_lists_the_commands_and_each_command_its_options():
    top = sdgen("--help")
    assert top.returncode == 0 and all(name in top.stdout for name in ("run", "status", "reproduce"))
    for command, option in [("run", "--progress-every"), ("status", "--json"), ("reproduce", "--min-psnr")]:
        result = sdgen(command, "--help")
        assert result.returncode == 0 and option in result.stdout, result.stdout
    assert "usage: sdgen run" in sdgen("run", "--help").stdout
    assert sdgen().returncode == 2 and sdgen("bogus").returncode == 2
    assert sdgen("run").returncode == 2  # no spec


def make_output(folder: Path) -> Output:
    output = Output(str(folder))
    output.write_job(
        {
            "name": "t",
            "manifest": {"rows": 4},
            "shards": {"size": 2, "count": 2},
            "model": {"weights": "builtin:tiny", "fingerprint": "ab" * 32, "dtype": "float32"},
        }
    )
    output.commit_records("shard-00000", [{"row": 0, "id": "a", "status": "ok"}, {"row": 1, "id": "b", "status": "ok"}])
    output.write_json(SUMMARY_FILE, {"failed_shards": {"shard-00001": "RuntimeError: boom"}})
    return output


def test_status(tmp_path):
    make_output(tmp_path / "out")
    result = sdgen("status", str(tmp_path / "out"))
    assert result.returncode == 1  # incomplete
    assert "shards  2 total: 1 done, 0 running, 0 interrupted, 1 failed, 0 pending" in result.stdout
    data = json.loads(sdgen("status", str(tmp_path / "out"), "--json").stdout)
    assert data["rows"] == {"total": 4, "ok": 2, "error": 0, "not_done": 2}
    # The script does the same, from any working directory.
    script = run_command([PYTHON, str(REPO / "jobs" / "status.py"), "out", "--json"], check=False, cwd=tmp_path)
    assert script.returncode == 1 and json.loads(script.stdout) == data
    missing = sdgen("status", str(tmp_path / "nothing-here"))
    assert missing.returncode == 2 and "no job.json" in missing.stdout  # run_command merges stderr


def test_an_error_no_command_foresaw_is_one_line_not_a_traceback(tmp_path):
    """A job.json without its manifest section (hand-edited): `sdgen report` meets
    an error they do not name; it is one line and exit 3, and --debug shows the traceback."""
    Output(str(tmp_path / "out")).write_job({"name": "t"})
    result = sdgen("report", str(tmp_path / "out"))
    assert result.returncode == 3 and "Traceback" not in result.stdout
    assert "error: KeyError: 'manifest' (rerun with --debug for the traceback)" in result.stdout
    debug = sdgen("report", str(tmp_path / "out"), "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stdout


def write_job(folder: Path) -> Path:
    """A job with relative paths: they are relative to the working directory."""
    write_manifest(folder / "m.parquet", small_rows(5))
    return write_spec(folder / "job.yaml", spec_dict("m.parquet", "out"))


def test_dry_run_validates_and_runs_nothing(tmp_path):
    write_job(tmp_path)
    result = sdgen("run", "job.yaml", "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stdout
    assert f"[sdgen] output {tmp_path / 'out'}: 0 shard(s) already committed, 2 to run" in result.stdout
    assert not (tmp_path / "out").exists()
    assert "UNet" not in result.stdout.split("[sdgen] dry run:")[1].splitlines()[0]  # eager on CPU
    compiled = spec_dict("m.parquet", "out", execution={"compile": True})  # cuda_graphs auto: none on CPU
    write_spec(tmp_path / "compiled.yaml", compiled)
    result = sdgen("run", "compiled.yaml", "--dry-run", cwd=tmp_path)
    assert ", UNet compiled (torch.compile)" in result.stdout.split("[sdgen] dry run:")[1].splitlines()[0]
    (tmp_path / "bad.yaml").write_text(
        "manifest: m.parquet\noutput: out\nmodel: {weights: builtin:tiny}\nsampler: {steps: 0}\n"
    )
    bad = sdgen("run", "bad.yaml", "--dry-run", cwd=tmp_path)
    assert bad.returncode == 2 and "error: " in bad.stdout and "sampler.steps" in bad.stdout


def test_python_jobs_run_py_works_from_another_directory(tmp_path):
    write_job(tmp_path)
    result = run_command([PYTHON, str(REPO / "jobs" / "run.py"), "job.yaml", "--dry-run"], check=False, cwd=tmp_path)
    assert result.returncode == 0, result.stdout
    assert "2 to run" in result.stdout and not (tmp_path / "out").exists()
    assert "usage: jobs/run.py" in run_command([PYTHON, str(REPO / "jobs" / "run.py"), "--help"], cwd=tmp_path).stdout


def test_python_jobs_reproduce_py_still_runs(tmp_path):
    result = run_command([PYTHON, str(REPO / "jobs" / "reproduce.py"), "--help"], cwd=tmp_path)
    assert "--min-psnr" in result.stdout
