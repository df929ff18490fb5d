"""A shard's answers as they finish, kept in parts beside the shard's output, so a run killed halfway
through a shard loses only the requests that were in the engine, not the shard.

The shard's requests go to the engine in parts, two at a time (one finishing while the next is
tokenized and queued); each finished part is written at once. The shard's next attempt, in this run
or the next, sends the engine only the requests no part holds. Once the shard's output file is
written, its journal is removed.
"""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

import pyarrow as pa
import pyarrow.compute as pc

from tasks import keys, storage
from tasks.config import SamplingConfig
from tasks.engines.base import OUTPUT_SCHEMA, TRANSIENT, Engine, GenerateResult, conformed

PARTS_IN_FLIGHT = 2


class ShardJournal:
    def __init__(self, folder: str):
        self.folder = folder

    def finished(self) -> pa.Table:
        """Every record the parts hold, each (request, sample) once; never a transient error (asked again)."""
        parts = [conformed(storage.read_parquet(path)) for path in storage.list_files(self.folder, ".parquet")]
        if not parts:
            return OUTPUT_SCHEMA.empty_table()
        records = first_of_each(pa.concat_tables(parts))
        return records.filter(pc.fill_null(pc.not_equal(records["error_kind"], TRANSIENT), True))

    def append(self, records: pa.Table) -> None:
        name = keys.content_hash(sorted(records["request_key"].to_pylist()))
        storage.write_parquet(records, storage.join(self.folder, f"part-{name}.parquet"))

    def remove(self) -> None:
        storage.remove_tree(self.folder)


def first_of_each(records: pa.Table) -> pa.Table:
    """One record per (request_key, sample_index): two attempts of a shard may both have journaled a part."""
    numbered = records.append_column("row", pa.array(range(records.num_rows), pa.int64()))
    first = numbered.group_by(["request_key", "sample_index"], use_threads=False).aggregate([("row", "min")])
    return records.take(pc.sort_indices(first["row_min"]))


def generate_in_parts(
    engine: Engine, requests: pa.Table, sampling: SamplingConfig, key: str, journal: ShardJournal, part_size: int
) -> tuple[GenerateResult, pa.Table]:
    """The shard's outputs, computing only what its journal lacks; and the records computed now."""
    done = journal.finished()
    answered = pc.is_in(requests["request_key"], value_set=done["request_key"].combine_chunks())
    todo = requests.filter(pc.invert(answered))
    results: list[GenerateResult] = []
    with ThreadPoolExecutor(PARTS_IN_FLIGHT, thread_name_prefix="shard-part") as pool:
        running: set[Future] = set()
        for start in range(0, todo.num_rows, part_size):
            if len(running) == PARTS_IN_FLIGHT:
                finished, running = wait(running, return_when=FIRST_COMPLETED)
                results += journal_finished(finished, journal, running)
            running.add(pool.submit(engine.generate, todo.slice(start, part_size), sampling, key))
        results += journal_finished(wait(running).done, journal, set())
    result = merged(done, results, part_size)
    return result, result.outputs.slice(done.num_rows)


def journal_finished(finished: set[Future], journal: ShardJournal, running: set[Future]) -> list[GenerateResult]:
    """Write each finished part; if one failed, let the others finish and be written, then raise its error."""
    results = [future.result() for future in finished if future.exception() is None]
    for result in results:
        journal.append(result.outputs)
    failed = [future for future in finished if future.exception() is not None]
    if failed:
        if running:  # the parts still in the engine are kept too, before the error goes up
            journal_finished(wait(running).done, journal, set())
        raise failed[0].exception()
    return results


def merged(done: pa.Table, results: list[GenerateResult], part_size: int) -> GenerateResult:
    outputs = pa.concat_tables([done.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA), *(r.outputs for r in results)])
    return GenerateResult(
        outputs=outputs,
        seconds=sum(r.seconds for r in results),
        batch_size=min((r.batch_size for r in results), default=part_size),
        max_num_seqs=min((r.max_num_seqs for r in results if r.max_num_seqs is not None), default=None),
        engine_load_seconds=max((r.engine_load_seconds for r in results), default=0.0),
    )
