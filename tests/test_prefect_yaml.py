"""prefect.yaml is what `prefect deploy` reads: it must parse, and every entrypoint and parameter must exist."""

import importlib
import inspect
from pathlib import Path

import yaml
from prefect.cli.deploy._models import PrefectYamlModel

PREFECT_YAML = Path(__file__).resolve().parents[1] / "prefect.yaml"


def test_deployments_point_at_flows_with_the_parameters_they_set():
    config = PrefectYamlModel.model_validate(yaml.safe_load(PREFECT_YAML.read_text()))
    assert {d.name for d in config.deployments} >= {"push-for-review", "pull-reviews", "export-curated"}
    for deployment in config.deployments:
        path, name = deployment.entrypoint.split(":")
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)
        assert set(deployment.parameters) <= set(inspect.signature(flow.fn).parameters), deployment.name
    (pull,) = [d for d in config.deployments if d.name == "pull-reviews"]
    assert pull.schedules and pull.schedules[0].interval.total_seconds() == 900
