import base64
import re

from tasks.report.charts import histogram_png
from tasks.report.markdown import comparison_markdown, format_report
from tasks.report.summary import RunSummary
from tasks.scoring.compare import Comparison


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


def difference(scorer: str, direction: str, mean_a: float, mean_b: float, p_value: float, **extra) -> dict:
    diff = mean_b - mean_a
    return dict(
        comparison_id="c1",
        variant_a="greedy",
        variant_b="sampled",
        scorer=scorer,
        scorer_version="1",
        direction=direction,
        pairs=40,
        mean_a=mean_a,
        mean_b=mean_b,
        mean_diff=diff,
        diff_ci95_low=diff - 0.1,
        diff_ci95_high=diff + 0.1,
        b_higher=30,
        a_higher=5,
        p_value=p_value,
        resamples=2000,
        seed=0,
        **extra,
    )


def test_the_ab_report_names_sizes_directions_intervals_and_what_is_significant():
    comparison = Comparison(
        comparison_id="c1",
        runs={"greedy": "ra", "sampled": "rb"},
        scores=[
            dict(
                variant=v,
                scorer="refusal",
                scorer_version="1",
                direction="lower",
                n=40,
                unscored=0,
                mean=m,
                ci95_low=m - 0.05,
                ci95_high=m + 0.05,
            )
            for v, m in (("greedy", 0.3), ("sampled", 0.1))
        ],
        win_rates=[
            dict(
                variant_a="greedy",
                variant_b="sampled",
                scorer="refusal",
                scorer_version="1",
                direction="lower",
                pairs=40,
                wins=2,
                losses=10,
                ties=28,
                win_rate=0.4,
                win_rate_ci95_low=0.26,
                win_rate_ci95_high=0.56,
            ),
            dict(
                variant_a="sampled",
                variant_b="greedy",
                scorer="refusal",
                scorer_version="1",
                direction="lower",
                pairs=40,
                wins=10,
                losses=2,
                ties=28,
                win_rate=0.6,
                win_rate_ci95_low=0.44,
                win_rate_ci95_high=0.74,
            ),
        ],
        differences=[
            difference("refusal", "lower", 0.3, 0.1, 0.004),
            difference("completion_tokens", "none", 8.0, 7.5, 0.03),
            difference("valid_json", "higher", 0.5, 0.52, 0.7),
        ],
        significance_level=0.05,
    )
    report = comparison_markdown(comparison, [("mean scores", histogram_png({"refusal": [0.0, 1.0]}))])
    assert "| greedy | `ra` | 40 |" in report  # sample sizes
    # lower refusal is better: sampled wins; p 0.004 passes Holm at 0.05/3, p 0.03 only uncorrected (0.05/2)
    assert "- **sampled** is better on `refusal` (greedy 0.3 vs sampled 0.1; sampled − greedy = -0.2" in report
    assert "p = 0.004, n = 40)" in report
    assert "- `completion_tokens` differs" in report and "not significant after Holm correction" in report
    assert "valid_json` (" not in report  # p 0.7: no finding
    assert (
        "| refusal@1 | lower | greedy | sampled | 40 | 0.3 | 0.1 | -0.2 | [-0.3, -0.1] | 0.004 | yes | yes | sampled |" in report
    )
    assert (
        "| completion_tokens@1 | – (no winner) | greedy | sampled | 40 | 8 | 7.5 | -0.5 | [-0.6, -0.4] | 0.03 | yes | no | – |"
        in report
    )
    # each pair of variants once, in the order given, with the Wilson interval
    assert "| refusal@1 | lower | greedy | sampled | 40 | 2 | 10 | 28 | 0.4 | [0.26, 0.56] |" in report
    assert "| sampled | greedy | 40 | 10 |" not in report
    assert "| refusal@1 | lower | sampled | 40 | 0 | 0.1 | [0.05, 0.15] |" in report
    assert report.count("data:image/png;base64,") == 1


def test_a_report_without_a_significant_difference_says_so():
    comparison = Comparison(
        comparison_id="c1",
        runs={"greedy": "ra", "sampled": "rb"},
        scores=[],
        win_rates=[],
        differences=[difference("refusal", "lower", 0.3, 0.29, 0.9)],
        significance_level=0.01,
    )
    assert "- No difference is significant at α = 0.01." in comparison_markdown(comparison, [])
