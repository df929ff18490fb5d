import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.config import DatasetSpec, SpecError
from tasks.prepare.dataset import check_dataset, iter_batches
from tasks.prepare.sources import resolve_files


def write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def spec(source, **overrides) -> DatasetSpec:
    return DatasetSpec(**{"name": "t", "source": str(source), "id_column": "id", "prompt_column": "prompt", **overrides})


def test_a_folder_and_a_glob_resolve_to_sorted_parquet_files(tmp_path):
    write(tmp_path / "d" / "b.parquet", [{"id": 1, "prompt": "x"}])
    write(tmp_path / "d" / "a.parquet", [{"id": 2, "prompt": "y"}])
    (tmp_path / "d" / "notes.txt").write_text("ignored")
    assert [f.rsplit("/", 1)[1] for f in resolve_files(str(tmp_path / "d"))] == ["a.parquet", "b.parquet"]
    assert len(resolve_files(str(tmp_path / "d" / "*.parquet"))) == 2


def test_batches_carry_file_and_row_numbers(tmp_path):
    path = write(tmp_path / "x.parquet", [{"id": i, "prompt": f"p{i}", "extra": 1} for i in range(5)])
    batches = list(iter_batches(check_dataset(spec(path)), batch_size=2))
    assert [(b.first_row, b.batch.num_rows) for b in batches] == [(0, 2), (2, 2), (4, 1)]
    assert batches[0].batch.schema.names == ["id", "prompt"]  # only the columns the spec needs


def test_missing_file_names_the_source(tmp_path):
    with pytest.raises(SpecError, match=r"nope\.parquet: no such file"):
        check_dataset(spec(tmp_path / "nope.parquet"))


def test_missing_prompt_column_names_file_and_column(tmp_path):
    path = write(tmp_path / "x.parquet", [{"id": 1, "text": "hello"}])
    with pytest.raises(SpecError, match=r"x\.parquet has no column 'prompt' \(columns: id, text\)"):
        check_dataset(spec(path))


def test_missing_template_column_is_found_before_reading(tmp_path):
    path = write(tmp_path / "x.parquet", [{"id": 1, "title": "t"}])
    with pytest.raises(SpecError, match="no column 'body'"):
        check_dataset(spec(path, prompt_column=None, prompt_template="{{ title }} {{ body }}"))


def test_a_file_that_is_not_parquet_is_named(tmp_path):
    path = tmp_path / "x.parquet"
    path.write_text("id,prompt\n1,hello\n")
    with pytest.raises(SpecError, match=r"x\.parquet: not a readable Parquet file"):
        check_dataset(spec(path))


def test_a_non_text_prompt_column_is_refused(tmp_path):
    path = write(tmp_path / "x.parquet", [{"id": 1, "prompt": 3.5}])
    with pytest.raises(SpecError, match="prompt column 'prompt' is double, not text"):
        check_dataset(spec(path))


def test_spec_file_errors_name_the_file(tmp_path):
    with pytest.raises(SpecError, match="spec.yaml: file not found"):
        DatasetSpec.from_yaml(tmp_path / "spec.yaml")
    (tmp_path / "spec.yaml").write_text("name: t\nsource: x.parquet\nid_column: id\n")
    with pytest.raises(SpecError, match="spec.yaml.*exactly one of prompt_column, prompt_template or messages_column"):
        DatasetSpec.from_yaml(tmp_path / "spec.yaml")
