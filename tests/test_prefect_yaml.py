"""prefect.yaml: what `prefect deploy` reads. Entry points load, parameters validate, anchors resolve, schedules hold."""

import importlib
import inspect
from pathlib import Path

import yaml
from prefect.cli.deploy._models import PrefectYamlModel

REPO = Path(__file__).resolve().parents[1]


def test_every_deployment_with_its_flow_file_validates_its_parameters():
    config = PrefectYamlModel.model_validate(yaml.safe_load((REPO / "prefect.yaml").read_text()))
    by_name = {d.name: d for d in config.deployments}
    expected = {"sample", "generate-shards", "judge-runs", "compare-runs", "rescore", "push-for-review", "pull-reviews"}
    assert expected | {"export-curated"} <= set(by_name)
    assert by_name["sample"].work_pool.name == by_name["generate-shards"].work_pool.name == "gpu"
    assert by_name["pull-reviews"].work_pool.name == "cpu"
    assert by_name["generate-shards"].work_pool.job_variables == {"stream_output": False}
    (nightly,) = by_name["sample"].schedules
    assert nightly.cron == "0 2 * * *" and nightly.active is False
    for deployment in config.deployments:
        path, name = deployment.entrypoint.split(":")
        assert (REPO / path).is_file(), deployment.entrypoint
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)
        assert set(deployment.parameters or {}) <= set(inspect.signature(flow.fn).parameters), deployment.name
        if deployment.name == "sample":
            flow.validate_parameters(deployment.parameters)  # every value parses into its typed config


def test_the_curation_flows_run_on_the_cpu_pool_and_pull_every_15_minutes():
    config = PrefectYamlModel.model_validate(yaml.safe_load((REPO / "prefect.yaml").read_text()))
    by_name = {d.name: d for d in config.deployments}
    assert {by_name[name].work_pool.name for name in ("push-for-review", "pull-reviews", "export-curated")} == {"cpu"}
    assert by_name["pull-reviews"].schedules[0].interval.total_seconds() == 900


def test_the_judge_runs_on_the_gpu_pool_over_the_default_results_file_given_the_runs_when_started():
    config = PrefectYamlModel.model_validate(yaml.safe_load((REPO / "prefect.yaml").read_text()))
    (judge,) = [d for d in config.deployments if d.name == "judge-runs"]
    assert judge.work_pool.name == "gpu" and judge.parameters == {"store": "local-results"}
    from flows.judge_runs import judge_runs

    # the runs come with each start; with them, the parameters validate into the flow's typed configs
    judge_runs.validate_parameters({**judge.parameters, "run_a": "r1", "run_b": "r2", "judge": {"kind": "absolute"}})
    judge_runs.validate_parameters({**judge.parameters, "run_a": "r1", "reference": True, "judge": {"model": "tiny-cpu"}})


def test_compare_runs_starts_as_it_is_on_the_gpu_pool_and_rescore_on_the_cpu_pool_over_the_default_blocks():
    config = PrefectYamlModel.model_validate(yaml.safe_load((REPO / "prefect.yaml").read_text()))
    by_name = {d.name: d for d in config.deployments}
    compare, again = by_name["compare-runs"], by_name["rescore"]
    assert (compare.work_pool.name, again.work_pool.name) == ("gpu", "cpu")
    assert (compare.parameters["model"], compare.parameters["store"]) == ("tiny-cpu", "local-results")
    assert again.parameters == {"store": "local-results"}
    from flows.compare_runs import compare_runs
    from flows.rescore import rescore

    # compare-runs needs nothing more: two variants of the bundled sample; rescore is given the run and scorers
    variants = compare_runs.validate_parameters(compare.parameters)["variants"]
    assert [(v.name, v.sampling and v.sampling.temperature) for v in variants] == [("greedy", None), ("sampled", 0.8)]
    rescore.validate_parameters(
        {**again.parameters, "run_id": "r1", "scorers": ["valid_json", {"name": "regex", "options": {"pattern": "x"}}]}
    )


def test_the_sample_deployment_points_at_the_bundled_sample_and_the_default_blocks():
    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (sample,) = [d for d in config["deployments"] if d["name"] == "sample"]
    assert (REPO / sample["parameters"]["dataset"]["source"]).is_file()
    assert (sample["parameters"]["model"], sample["parameters"]["store"]) == ("tiny-cpu", "local-results")
    assert config["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $PWD }}"}}]
