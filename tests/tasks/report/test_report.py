import base64
import re

from tasks.report.charts import histogram_png
from tasks.report.markdown import format_report
from tasks.report.summary import RunSummary


def summary(**overrides) -> RunSummary:
    values = dict(
        run_id="r1",
        dataset_name="ds",
        dataset_version="v" * 32,
        model="m",
        engine="vllm",
        model_fingerprint="f",
        rows_read=10,
        rejected=0,
        requests=10,
        unique_requests=8,
        duplicates=2,
        shards=2,
        cached_shards=1,
        engine_requests=4,
        outputs=8,
        errors=2,
        prompt_tokens=80,
        completion_tokens=40,
        generated_tokens=20,
        tokens_per_second=10.0,
        wall_seconds=2.0,
        stage_seconds={"infer": 1.5},
        duckdb_path="r.duckdb",
    )
    return RunSummary(**{**values, **overrides})


def test_report_states_throughput_error_rate_and_score_distributions_with_a_chart():
    scores = {"completion_tokens": [4.0, 4.0, 2.0], "empty_output": [0.0, 1.0, 0.0]}
    text = format_report(summary(), scores, histogram_png(scores))
    assert "10.0 generated tokens/s, 2.00 requests/s" in text
    assert "25.00% (2 of 8)" in text and "1 of 2 shards" in text
    assert "| completion_tokens | 3 | 3.33 | 2 | 4 |" in text
    (png,) = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)\)", text)
    assert base64.b64decode(png).startswith(b"\x89PNG")


def test_report_of_a_run_without_scores_has_no_chart():
    text = format_report(summary(outputs=0, errors=0), {}, None)
    assert "0.00% (0 of 0)" in text and "data:image" not in text
