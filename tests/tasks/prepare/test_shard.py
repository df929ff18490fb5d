import pyarrow as pa

from tasks.keys import shard_key
from tasks.prepare.shard import cut_shards, order_by_prefix


def table(keys: list[str]) -> pa.Table:
    return pa.table(
        {"request_key": keys, "prompt": keys, "messages": [None] * len(keys), "overrides": [None] * len(keys), "custom_id": keys}
    )


def test_shards_have_the_configured_size_across_input_batches():
    batches = [table([f"k{i}" for i in range(0, 5)]), table([f"k{i}" for i in range(5, 12)])]
    shards = list(cut_shards(batches, shard_size=4))
    assert [s.num_rows for s in shards] == [4, 4, 4]
    assert sum((s["request_key"].to_pylist() for s in shards), []) == [f"k{i}" for i in range(12)]
    assert shards[0].column_names == ["request_key", "prompt", "messages", "overrides"]  # nothing dataset-specific


def test_shard_key_is_content_addressed():
    assert shard_key(["a", "b"]) == shard_key(["a", "b"])
    assert shard_key(["a", "b"]) != shard_key(["b", "a"])
    assert shard_key(["a"]) != shard_key(["a", "b"])


def test_appending_rows_keeps_the_earlier_full_shards():
    before = [s["request_key"].to_pylist() for s in cut_shards([table(list("abcdefg"))], 3)]
    after = [s["request_key"].to_pylist() for s in cut_shards([table(list("abcdefgh"))], 3)]
    assert before[:2] == after[:2]


def test_a_token_budget_closes_shards_early_and_an_oversized_request_gets_its_own():
    def costed(keys, tokens):
        return table(keys).append_column("approx_tokens", pa.array(tokens, pa.int64()))

    shards = list(cut_shards([costed(list("abcde"), [5, 5, 20, 1, 1]), costed(list("fg"), [3, 3])], 3, max_shard_tokens=10))
    assert [s["request_key"].to_pylist() for s in shards] == [["a", "b"], ["c"], ["d", "e", "f"], ["g"]]


def test_prompts_sharing_a_prefix_are_ordered_side_by_side(tmp_path):
    head = "You are a careful assistant. " * 10  # longer than the prefix the buckets look at
    texts = [f"{head}question {i}" if i % 2 else f"unrelated prompt {i}" for i in range(40)]
    rows = table([f"k{i:02d}" for i in range(40)]).append_column("dedupe_text", pa.array(texts))
    ordered = pa.concat_tables(order_by_prefix([rows.slice(0, 20), rows.slice(20)], str(tmp_path / "scratch"), buckets=4))
    assert sorted(ordered["request_key"].to_pylist()) == rows["request_key"].to_pylist()  # the same rows
    shared = [text.startswith(head) for text in ordered["dedupe_text"].to_pylist()]
    assert shared.count(True) == 20 and "".join("x" if s else "." for s in shared).count("x" * 20) == 1  # contiguous
    again = pa.concat_tables(order_by_prefix([rows], str(tmp_path / "again"), buckets=4))
    assert again["request_key"].to_pylist() == ordered["request_key"].to_pylist()  # deterministic
