import random
from pathlib import Path

import pyarrow as pa

from tasks.config import DedupeConfig
from tasks.prepare.dedupe import ExactDeduper
from tasks.prepare.near_dedupe import NearDuplicateIndex, shingle_hashes


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
    table = requests([(custom_id, text) for custom_id, text in rows])  # exact: the request key stands for the text
    return table.append_column("dedupe_text", pa.array([text for _, text in rows]))


def test_normalized_duplicates_are_found_after_nfkc_and_whitespace_folding_and_optionally_case():
    rows = [("a", "Hello  world"), ("b", " Hello\tworld\n"), ("c", "Ｈｅｌｌｏ world"), ("d", "hello world")]
    marked, _ = ExactDeduper(config=DedupeConfig(match="normalized")).mark(texts(rows))
    assert marked["duplicate_of"].to_pylist() == [None, "a", "a", None]
    marked, _ = ExactDeduper(config=DedupeConfig(match="normalized", case_fold=True)).mark(texts(rows))
    assert marked["duplicate_of"].to_pylist() == [None, "a", "a", "a"]
    marked, _ = ExactDeduper(config=DedupeConfig()).mark(texts(rows))
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
    import unicodedata

    from tasks.prepare.kernels import fold, suspect_rows

    spaces = [chr(c) for c in range(0x3100) if any(x.isspace() for x in unicodedata.normalize("NFKC", chr(c)))]
    alphabet = spaces + list("ab  ｃé\u0301ﬁ") + ["\x00", "\x7f"]
    rng = random.Random(1)
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 9))) for _ in range(20_000)]
    expected = [" ".join(unicodedata.normalize("NFKC", text).split()) for text in texts]
    assert fold(pa.array(texts)).to_pylist() == expected
    assert fold(pa.array(["dropped", " a \u2028 b ", None, "\u3000"]).slice(1)).to_pylist() == ["a b", None, ""]
    # Lengths across 8-byte words, a sliced array, both offset widths: exactly the rows with a byte
    # below 0x20 or from 0x80, two spaces in a row, or a space at an end are suspects.
    mixed = pa.array(["".join(rng.choice("ab  \t\x1f~é") for _ in range(rng.randint(0, 40))) for _ in range(20_000)]).slice(3)
    for texts in (mixed, mixed.cast(pa.large_string())):
        expected = [
            row
            for row, text in enumerate(texts.to_pylist())
            if any(ord(c) < 32 or ord(c) > 127 for c in text) or "  " in text or text[:1] == " " or text[-1:] == " "
        ]
        assert suspect_rows(texts).tolist() == expected


def test_text_hashes_are_xxh64_under_two_seeds_for_every_length_and_offset():
    import xxhash

    from tasks.prepare.kernels import CHECK_SEED, text_hashes

    rng = random.Random(2)
    texts = ["".join(rng.choice("abcdé€😀 ") for _ in range(length)) for length in range(0, 100) for _ in range(3)]
    for array in (pa.array(texts).slice(1), pa.array(texts, pa.large_string()), pa.array(["tiny"])):
        hashes, checks = text_hashes(array)
        strings = [text.encode() for text in array.to_pylist()]
        assert hashes.tolist() == [xxhash.xxh64_intdigest(text) for text in strings]
        assert checks.tolist() == [xxhash.xxh64_intdigest(text, CHECK_SEED) for text in strings]


def test_hash_index_grows_and_keeps_the_first_value_of_each_key():
    import numpy as np

    from tasks.prepare.kernels import HashIndex

    index = HashIndex()
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, 100_000, dtype=np.uint64)
    # The first two share a slot in every table this test grows through (2^17, then 2^19 slots);
    # the third is the first's hash with another check.
    hashes[:3] = [1, 1 + 2**19, 1]
    checks = rng.integers(0, 2**63, len(hashes), dtype=np.uint64)
    half = len(hashes) // 2
    first = index.setdefault(hashes[:half], checks[:half], np.arange(half))
    assert (first == np.arange(half)).all()  # every key new, including the one whose hash alone repeats
    again = index.setdefault(hashes, checks, np.arange(len(hashes)) + 10**6)  # grows past the first table
    assert (again[:half] == np.arange(half)).all() and (again[half:] == np.arange(half, len(hashes)) + 10**6).all()
    repeated = index.setdefault(hashes[[5, 5]], checks[[5, 5]], np.array([7, 8]))
    assert repeated.tolist() == [5, 5] and index.size == len(hashes)


def test_importing_the_flows_loads_no_numba():
    """vLLM's spawned CPU worker imports a flow script again and fails to start beside numba (see tasks/prepare/dedupe.py)."""
    import subprocess
    import sys

    code = "import sys, flows.batch_inference; assert 'numba' not in sys.modules, 'numba was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[3])
