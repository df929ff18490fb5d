"""The run's Prometheus metrics over real HTTP, and the Grafana dashboard naming only metrics the code exports."""

import json
import re
import threading
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tasks.config import MetricsConfig
from tasks.engines.loop import EngineCounts
from tasks.engines.vllm import ENGINE_STATES, engine_status
from tasks.inference.job import ShardOutput
from tasks.report.metrics import METRICS, collector, serving_metrics, writing_progress
from tasks.report.progress import RunProgress

REPO = Path(__file__).resolve().parents[3]
DASHBOARD = REPO / "deploy" / "grafana" / "vbf-dashboard.json"

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}


def exported_names() -> set[str]:
    """The series names a scrape can hold: counters as `<name>_total`, the process's own metrics included."""
    from tasks.report.metrics import registry

    names = set()
    for family in registry.collect():
        names.update(sample.name for sample in family.samples)
    for family in collector.describe():
        names.add(f"{family.name}_total" if family.type == "counter" else family.name)
    return names


def metric_names(expression: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are no function, keyword, label or string."""
    expression = re.sub(r'"[^"]*"', "", expression)  # strings (label values)
    expression = re.sub(r"\{[^}]*\}", "", expression)  # label matchers
    expression = re.sub(r"\[[^\]]*\]", "", expression)  # range selectors
    expression = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expression)  # grouping labels
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expression):
        following = expression[match.end() :].lstrip()
        if following.startswith("(") or match.group() in PROMQL_WORDS:
            continue
        names.add(match.group())
    return names


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    variables = [variable["definition"] for variable in dashboard["templating"]["list"] if variable["type"] == "query"]
    # Grafana's label_values(metric, label): the metric is the PromQL part
    return expressions + [re.sub(r"label_values\(([^,]+),[^)]*\)", r"\1", definition) for definition in variables]


def test_the_dashboard_reads_only_metrics_the_code_exports():
    assert metric_names('sum by (state) (rate(vbf_requests_total{run_id=~"$run_id"}[1m])) / vbf_run_requests') == {
        "vbf_requests_total",
        "vbf_run_requests",
    }
    used = set().union(*(metric_names(e) for e in dashboard_expressions()))
    assert "vbf_run_info" in used
    assert used - exported_names() == set()
    # every panel the issue asks for, and every run metric shown somewhere
    titles = {panel["title"] for panel in json.loads(DASHBOARD.read_text())["panels"]}
    assert {"Progress", "ETA", "Errors", "Engine state"} <= titles and any("Throughput" in t for t in titles)
    assert set(METRICS) - used == {"vbf_run_ended"}


def test_every_metric_is_documented():
    page = (REPO / "docs" / "monitoring.md").read_text()
    assert [name for name in METRICS if f"`{name}`" not in page] == []


def scrape(port: int) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_a_run_is_served_while_it_goes_and_until_a_scrape_read_its_final_counts(tmp_path):
    engine = {"counts": EngineCounts()}
    progress = RunProgress(total=50, shards=2, reused=5, live=lambda: engine["counts"], clock=time.monotonic)
    labels = {"dataset": "d", "model": "m", "engine": "vllm"}
    with serving_metrics(MetricsConfig(port=0, final_scrape_seconds=10), "run-1", progress, labels, engine_here=True) as port:
        first = scrape(port)
        engine["counts"] = EngineCounts(answered=20, failed=1, prompt_tokens=200, generated_tokens=640, running=4)
        time.sleep(0.05)
        second = scrape(port)
        final_scrape: dict = {}
        prometheus = threading.Timer(0.5, lambda: final_scrape.update(scrape(port)))  # Prometheus's next scrape
        prometheus.start()
        ended_at = time.monotonic()
    waited = time.monotonic() - ended_at
    prometheus.join()

    run = (("run_id", "run-1"),)
    assert first[("vbf_requests_total", (*run, ("state", "cached")))] == 5
    assert first[("vbf_run_requests", run)] == 50
    # the process's engine as it is (the session's shared engine may be up): one state is 1, that one
    states = {state: first[("vbf_engine_state", (*run, ("state", state)))] for state in ENGINE_STATES}
    assert states == {state: float(state == engine_status().state) for state in ENGINE_STATES}
    assert second[("vbf_requests_total", (*run, ("state", "done")))] == 20
    assert second[("vbf_requests_pending", (("run_id", "run-1"), ("state", "running")))] == 4
    assert second[("vbf_requests_pending", (("run_id", "run-1"), ("state", "queued")))] == 50 - 5 - 21 - 4
    assert second[("vbf_generated_tokens_total", run)] == 640
    assert ("vbf_eta_seconds", run) in second
    assert 0.3 < waited < 5  # it waited for the next scrape, not for final_scrape_seconds
    # the shards never reported (none finished here): the final counts are the shards' own, and ended
    assert final_scrape[("vbf_run_ended", run)] == 1
    assert final_scrape[("vbf_requests_total", (*run, ("state", "done")))] == 0
    assert "run-1" not in collector.runs


def test_the_progress_file_follows_the_engine_every_second_and_ends_with_the_shards_counts(tmp_path):
    """What `vbf serve`'s page reads between commits: rewritten whole while the run goes, final at its end."""
    engine = {"counts": EngineCounts()}
    progress = RunProgress(total=100, shards=2, live=lambda: engine["counts"])
    path = tmp_path / "batch" / "progress.json"
    seen = []
    with writing_progress(str(path), progress, every_seconds=0.05):
        for answered in (10, 40, 70):
            engine["counts"] = EngineCounts(answered=answered, generated_tokens=answered * 3)
            deadline = time.monotonic() + 10
            while (live := json.loads(path.read_text()))["finished"] != answered:
                assert time.monotonic() < deadline, live
                time.sleep(0.01)
            seen.append((live["done"], live["generated_tokens"], live["ended"]))
        shard = ShardOutput(
            shard_key="s",
            output_key="o",
            path="p",
            requests=60,
            outputs=60,
            errors=2,
            prompt_tokens=600,
            completion_tokens=174,
            generate_seconds=1.0,
            batch_size=60,
            max_num_seqs=8,
            engine_load_seconds=0.0,
            engine_requests=58,
        )
        progress.shard_finished(shard, cached=False)
    final = json.loads(path.read_text())
    assert seen == [(10, 30, False), (40, 120, False), (70, 210, False)]
    assert (final["done"], final["failed"], final["ended"], final["total"]) == (58, 2, True, 100)
    assert not list(path.parent.glob("*.partial"))  # every write replaced the file whole
