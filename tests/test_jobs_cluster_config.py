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
    assert config["file_mounts"] == {"~/sdgen": "."}
    setup = " ".join(config["setup_commands"])
    assert "-e ~/sdgen" in setup and "torch" in setup
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    assert any("ray start --address" in c for c in config["worker_start_ray_commands"])


def test_a_broken_config_is_rejected():
    import jsonschema
    import pytest
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load()
    config["available_node_types"]["gpu"]["min_workers"] = "zero"
    with pytest.raises(jsonschema.ValidationError, match="zero"):
        validate_config(prepare_config(config))
