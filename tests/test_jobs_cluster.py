"""jobs/cluster.py: the path rules, without Ray (the real `ray job submit` and multi-node runs are
in test_jobs_e2e_cluster.py, test_jobs_e2e_cluster_nodes.py and test_jobs_cluster_readme.py)."""

from __future__ import annotations

import json

import pytest

from jobs.cluster import (
    ClusterLayout,
    ClusterPathError,
    check_output_shared,
    check_paths_where_submitted,
    job_working_dir,
    temporary_path_problems,
    unshared_output_problem,
    workers_elsewhere,
)
from jobs.spec import SpecError, parse_spec

from conftest import spec_dict


def spec_in(base, **overrides):
    data = spec_dict("manifests/m.parquet", "outputs/x", **overrides)
    return parse_spec(data, base_dir=base)


@pytest.fixture
def submitted(tmp_path, monkeypatch):
    """The driver's situation under `ray job submit --working-dir .`: its current directory is
    Ray's copy of the working dir, and Ray's job manager says so in the environment."""
    copy = tmp_path / "session" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg"}}))
    return copy


def test_not_submitted_nothing_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert job_working_dir() is None
    check_paths_where_submitted(spec_in(tmp_path))  # relative paths are fine outside a job submission


def test_relative_paths_under_ray_job_submit_are_refused_saying_why_and_what_instead(submitted):
    assert job_working_dir() == submitted
    spec = spec_in(submitted, model={"weights": "models/m.safetensors"})
    problems = temporary_path_problems(spec, submitted)
    assert [p.split(":")[0] for p in problems] == ["manifest", "output", "model.weights"]
    assert "'outputs/x' resolves inside Ray's temporary copy of the working dir" in problems[1]
    assert "the images would vanish" in problems[1]
    with pytest.raises(ClusterPathError) as caught:
        check_paths_where_submitted(spec)
    message = str(caught.value)
    assert "ray job submit" in message and "s3://bucket/prefix" in message and "absolute path" in message
    assert "--base-dir" in message
    assert isinstance(caught.value, SpecError)  # exit 2, refused before any work


def test_absolute_s3_and_builtin_paths_under_ray_job_submit_are_fine(submitted, tmp_path):
    shared = tmp_path / "shared"
    spec = parse_spec(
        spec_dict(str(shared / "m.parquet"), "s3://bucket/out", model={"weights": "builtin:tiny"}), base_dir=submitted
    )
    assert temporary_path_problems(spec, submitted) == []
    # --base-dir: relative paths mean the user's checkout, not the temporary copy
    assert temporary_path_problems(spec_in(shared), submitted) == []


def test_the_working_dir_copy_is_recognised_by_its_path_too(tmp_path, monkeypatch):
    copy = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_1"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert job_working_dir() == copy


HEAD, OTHER = "head" * 7, "node" * 7


def test_a_local_output_on_one_node_is_fine():
    layout = ClusterLayout(HEAD, {HEAD: {"CPU": 2.0}})
    assert workers_elsewhere(layout, "cpu") == []
    assert unshared_output_problem(spec_in("/data"), layout, "auto") is None


def test_a_local_output_with_workers_on_other_nodes_is_refused_unless_declared_shared():
    layout = ClusterLayout(HEAD, {HEAD: {"CPU": 1.0}, OTHER: {"CPU": 1.0}})
    problem = unshared_output_problem(spec_in("/data"), layout, "cpu")
    assert "'/data/outputs/x' is a local folder" in problem and "1 other node(s)" in problem
    assert "s3://" in problem and "execution.shared_output: true" in problem
    with pytest.raises(ClusterPathError):
        check_output_shared(spec_in("/data"), layout, "cpu")
    shared = spec_in("/data", execution={"shared_output": True})
    assert shared.execution.shared_output is True
    check_output_shared(shared, layout, "cpu")
    check_output_shared(parse_spec(spec_dict("/m.parquet", "s3://b/out")), layout, "cpu")


def test_a_head_that_takes_no_work_means_workers_elsewhere():
    """An autoscaling cluster: a CPU:0 head, no GPU node up yet; every worker will be elsewhere."""
    layout = ClusterLayout(HEAD, {HEAD: {"CPU": 0.0}})
    assert workers_elsewhere(layout, "cuda") == ["(nodes not up yet)"]
    assert unshared_output_problem(spec_in("/data"), layout, "cuda") is not None


def test_gpu_workers_go_where_the_gpus_are():
    layout = ClusterLayout(HEAD, {HEAD: {"CPU": 4.0}, OTHER: {"CPU": 8.0, "GPU": 2.0}})
    assert workers_elsewhere(layout, "auto") == [OTHER, "(nodes not up yet)"]
    layout = ClusterLayout(HEAD, {HEAD: {"CPU": 4.0, "GPU": 1.0}, OTHER: {"CPU": 8.0}})
    assert workers_elsewhere(layout, "cuda") == []  # the CPU-only node takes no GPU worker


def test_shared_output_is_a_boolean():
    with pytest.raises(SpecError, match="execution.shared_output: expected true or false"):
        spec_in("/data", execution={"shared_output": "yes"})
