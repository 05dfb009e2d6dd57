"""jobs/dryrun.py: where `--limit N` writes its trial (the dry run itself is tested through the
runner, test_jobs_runner.py, and the CLI, test_jobs_cli.py)."""

from __future__ import annotations

import pytest

from jobs import runner
from jobs.dryrun import trial_output
from jobs.runner import plan_job, run_job
from jobs.spec import SpecError, load_spec

from conftest import manifest_schema, small_rows, spec_dict, write_manifest, write_spec


def test_a_trial_goes_beside_the_output_or_inside_a_root_bucket():
    assert trial_output("outputs/x", 8) == "outputs/x-limit8"
    assert trial_output("outputs/x/", 8) == "outputs/x-limit8"
    assert trial_output("s3://bkt2/exp", 1) == "s3://bkt2/exp-limit1"
    assert trial_output("s3://bkt2/exp/", 1) == "s3://bkt2/exp-limit1"
    # A bucket's root has nothing beside it but other buckets (`s3://bkt2-limit1`, someone else's
    # or none): its trial is a prefix inside it.
    for root in ("s3://bkt2", "s3://bkt2/", "s3://bkt2//"):
        assert trial_output(root, 1) == "s3://bkt2/limit1"
    assert trial_output("s3://KEY:SECRET@bkt2", 3) == "s3://KEY:SECRET@bkt2/limit3"  # still usable
    with pytest.raises(SpecError, match="--limit: expected a positive number"):
        trial_output("s3://bkt2", 0)


def test_a_limited_run_on_a_bucket_root_leases_and_plans_inside_that_bucket(s3, tmp_path, monkeypatch):
    bucket, client, _ = s3
    manifest = write_manifest(tmp_path / "m.parquet", small_rows(3), manifest_schema())
    spec = load_spec(str(write_spec(tmp_path / "job.yaml", spec_dict(str(manifest), f"s3://{bucket}"))))

    plan = plan_job(spec, log=lambda line: None, limit=1, read_only=True)  # what --dry-run --limit 1 plans
    assert plan.spec.output == f"s3://{bucket}/limit1" and plan.manifest.num_rows == 1

    # The run takes the trial output's lease (the real one, on the S3 server) before it plans.
    class Planned(Exception):
        pass

    seen = []

    def planned(spec, overwrite, log, limit, **kwargs):
        seen.append(sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])))
        raise Planned

    monkeypatch.setattr(runner, "plan_job", planned)
    with pytest.raises(Planned):
        run_job(spec, limit=1, log=lambda line: None)
    assert seen == [["limit1/lease.json"]]


def test_the_limit_line_shows_the_trial_output_without_credentials(s3, tmp_path):
    bucket, _, _ = s3
    manifest = write_manifest(tmp_path / "m.parquet", small_rows(3), manifest_schema())
    output = f"s3://AKIAEXAMPLE:not-a-real-secret@{bucket}/exp"
    spec = load_spec(str(write_spec(tmp_path / "job.yaml", spec_dict(str(manifest), output))))
    lines = []
    plan_job(spec, log=lines.append, limit=1, read_only=True)
    said = [line for line in lines if "--limit 1" in line]
    assert said and f"into s3://{bucket}/exp-limit1" in said[0], lines
    assert not any("not-a-real-secret" in line for line in lines), lines
