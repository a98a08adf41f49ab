"""cluster.yaml: a valid Ray cluster-launcher config (checked offline by Ray's own validator), with
authentication on and the dashboard on loopback."""
from __future__ import annotations

import jsonschema
import pytest
import yaml

from tests.helpers import ROOT


def test_cluster_yaml_is_a_valid_ray_cluster_config():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(config))
    assert "RAY_AUTH_MODE=token" in " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])
    with pytest.raises(jsonschema.ValidationError, match="no_such_key"):
        validate_config({**prepare_config(config), "no_such_key": 1})
