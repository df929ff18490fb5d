import pyarrow as pa

from tasks.config import DedupeConfig
from tasks.dedupe import ExactDeduper, NearDuplicateIndex, shingle_hashes


def requests(rows: list[tuple[str, str]], first_row: int = 0) -> pa.Table:
    return pa.table(
        {
            "custom_id": [custom_id for custom_id, _ in rows],
            "request_key": [key for _, key in rows],
            "source_file": ["f.parquet"] * len(rows),
            "source_row": list(range(first_row, first_row + len(rows))),
        }
    )


def test_duplicates_point_at_the_first_request_with_the_same_content_across_batches():
    deduper = ExactDeduper()
    first, _ = deduper.mark(requests([("a", "k1"), ("b", "k2"), ("c", "k1")]))
    second, _ = deduper.mark(requests([("d", "k2"), ("e", "k3")], first_row=3))
    assert first["duplicate_of"].to_pylist() == [None, None, "a"]
    assert second["duplicate_of"].to_pylist() == ["b", None]


def test_a_repeated_id_is_rejected_with_its_row():
    deduper = ExactDeduper(id_field="id")
    marked, rejected = deduper.mark(requests([("a", "k1"), ("a", "k2")]))
    assert marked["custom_id"].to_pylist() == ["a"]
    assert rejected.to_pylist() == [
        {"source_file": "f.parquet", "source_row": 1, "custom_id": "a", "field": "id", "reason": "duplicate id 'a'"}
    ]


def texts(rows: list[tuple[str, str]]) -> pa.Table:
    table = requests([(custom_id, "unused") for custom_id, _ in rows])
    return table.append_column("dedupe_text", pa.array([text for _, text in rows]))


def test_exact_duplicates_are_found_after_nfkc_and_whitespace_folding_and_optionally_case():
    rows = [("a", "Hello  world"), ("b", " Hello\tworld\n"), ("c", "Ｈｅｌｌｏ world"), ("d", "hello world")]
    marked, _ = ExactDeduper(config=DedupeConfig()).mark(texts(rows))
    assert marked["duplicate_of"].to_pylist() == [None, "a", "a", None]
    marked, _ = ExactDeduper(config=DedupeConfig(case_fold=True)).mark(texts(rows))
    assert marked["duplicate_of"].to_pylist() == [None, "a", "a", "a"]
    marked, _ = ExactDeduper(config=DedupeConfig(normalize=False)).mark(texts(rows))
    assert marked["duplicate_of"].to_pylist() == [None, None, None, None]


def test_derived_ids_that_repeat_are_numbered_not_rejected():
    marked, rejected = ExactDeduper(id_field=None).mark(texts([("row-1", "x"), ("row-1", "x")]))
    assert marked["custom_id"].to_pylist() == ["row-1", "row-1-2"]
    assert marked["duplicate_of"].to_pylist() == [None, "row-1"] and rejected.num_rows == 0


def test_near_duplicates_point_at_their_earliest_source_and_others_stay_canonical():
    words = [f"w{i}" for i in range(200)]
    source = " ".join(words[:40])
    edited = " ".join(words[:17] + ["CHANGED"] + words[18:40])  # Jaccard of 3-shingles ≈ 0.85
    unrelated = " ".join(words[100:140])
    index = NearDuplicateIndex(DedupeConfig(near_duplicates=True))
    index.add(pa.array([source, unrelated]))
    index.add(pa.array([edited, edited.upper()]))  # across batches; case is folded for near-duplicates
    assert index.canonical().tolist() == [0, 1, 0, 0]


def test_shingles_cover_short_texts_and_respect_text_boundaries():
    shingles, offsets = shingle_hashes(pa.array(["a b c d", "a b", "b c d"]), 3)
    assert offsets.tolist() == [0, 2, 3, 4]
    assert shingles[1] == shingles[3]  # "b c d" in both texts
    assert len(set(shingles.tolist())) == 3


def test_fold_matches_python_nfkc_and_whitespace_split_on_every_unicode_space():
    import random
    import unicodedata

    from tasks.dedupe import fold, needs_folding

    spaces = [chr(c) for c in range(0x3100) if any(x.isspace() for x in unicodedata.normalize("NFKC", chr(c)))]
    alphabet = spaces + list("ab  ｃé\u0301ﬁ") + ["\x00", "\x7f"]
    rng = random.Random(1)
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 9))) for _ in range(20_000)]
    expected = [" ".join(unicodedata.normalize("NFKC", text).split()) for text in texts]
    assert fold(pa.array(texts)).to_pylist() == expected
    ascii_texts = pa.array(["".join(rng.choice("ab  \t") for _ in range(rng.randint(0, 9))) for _ in range(20_000)]).slice(3)
    flagged = set(needs_folding(ascii_texts).tolist())
    changed = {row for row, text in enumerate(ascii_texts.to_pylist()) if " ".join(text.split()) != text}
    assert changed <= flagged


def test_key_index_grows_and_keeps_the_first_value_of_each_key():
    import numpy as np

    from tasks.dedupe import KeyIndex

    index = KeyIndex(capacity=16)
    keys = np.random.default_rng(0).integers(0, 2**63, 5_000, dtype=np.uint64)
    keys[:2] = [1, 17]  # the same slot in a table of 16
    keys = np.unique(keys)
    found = index.setdefault(keys[: len(keys) // 2], np.arange(len(keys) // 2))
    assert (found == -1).all()
    again = index.setdefault(keys, np.arange(len(keys)) + 10_000)
    assert (again[: len(keys) // 2] == np.arange(len(keys) // 2)).all() and (again[len(keys) // 2 :] == -1).all()
    assert (index.get(keys) >= 0).all() and index.get(np.array([12345], np.uint64))[0] == -1
