"""ray_cluster.yaml: valid for Ray's cluster launcher (its own schema and default filling)."""

from __future__ import annotations

import copy

import yaml

from conftest import REPO


def load():
    return yaml.safe_load((REPO / "ray_cluster.yaml").read_text())


def test_ray_cluster_yaml_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(load()))
    validate_config(config)  # raises on any schema violation
    assert config["provider"]["type"] == "aws"


def test_cpu_head_and_autoscaling_gpu_workers_that_install_the_project():
    config = load()
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # no generation on the head
    gpu = config["available_node_types"]["gpu"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p"))
    assert config["file_mounts"]["~/sdgen"] == "."
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    assert any("ray start --address" in c for c in config["worker_start_ray_commands"])


def test_each_node_type_installs_the_project_with_its_torch_build():
    """The head runs only the driver: CPU torch. GPU workers: PyPI's default (CUDA) torch. Both
    install this checkout (file_mounts) with Ray pinned to the version the project installs."""
    import ray

    config = load()
    head, gpu = " ".join(config["head_setup_commands"]), " ".join(config["worker_setup_commands"])
    for setup in (head, gpu):
        assert "-e ~/sdgen" in setup and f"ray[default]=={ray.__version__}" in setup
        assert setup.index("torch") < setup.index("-e ~/sdgen")  # torch first: the project's bare
        # `torch` requirement must not pull a different build
    assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in head
    assert "torch==2.13.0" in gpu and "whl/cpu" not in gpu


def test_token_authentication_on_every_node():
    """Ray 2.60's token auth: every node starts Ray with RAY_AUTH_MODE=token and has the user's
    token (~/.ray/auth_token, copied by file_mounts), so `ray job submit` from the user's machine
    with RAY_AUTH_MODE=token and the same token is let in."""
    config = load()
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in config[key] if "ray start" in c)
        assert "export RAY_AUTH_MODE=token &&" in start, start


def test_a_broken_config_is_rejected():
    import jsonschema
    import pytest
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load()
    config["available_node_types"]["gpu"]["min_workers"] = "zero"
    with pytest.raises(jsonschema.ValidationError, match="zero"):
        validate_config(prepare_config(config))
