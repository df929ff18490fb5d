import pyarrow as pa

from tasks.engine import OUTPUT_SCHEMA
from tasks.score import DEFAULT_SCORERS, score_outputs


def test_basic_scores_per_output_and_none_for_errors():
    outputs = pa.Table.from_pylist(
        [
            {"request_key": "a", "sample_index": 0, "text": "hi there", "finish_reason": "stop",
             "prompt_tokens": 5, "completion_tokens": 2, "error_code": None, "error": None},
            {"request_key": "b", "sample_index": 0, "text": "  ", "finish_reason": "length",
             "prompt_tokens": 5, "completion_tokens": 16, "error_code": None, "error": None},
            {"request_key": "c", "sample_index": 0, "text": None, "finish_reason": None,
             "prompt_tokens": 900, "completion_tokens": None, "error_code": "context_length_exceeded", "error": "x"},
        ],
        schema=OUTPUT_SCHEMA,
    )
    scores = {(r["request_key"], r["scorer"]): (r["value"], r["label"]) for r in score_outputs(outputs, DEFAULT_SCORERS).to_pylist()}
    assert scores == {
        ("a", "completion_tokens"): (2.0, None),
        ("a", "finish_reason"): (0.0, "stop"),
        ("a", "empty_output"): (0.0, None),
        ("b", "completion_tokens"): (16.0, None),
        ("b", "finish_reason"): (1.0, "length"),
        ("b", "empty_output"): (1.0, None),
    }
