from tasks.inference.job import split_groups
from tasks.prepare.shard import Shard


def shards(*sizes: int) -> list[Shard]:
    return [Shard(shard_key=f"s{i}", path=f"s{i}.parquet", requests=n) for i, n in enumerate(sizes)]


def test_groups_balance_requests_keep_shard_order_and_cover_every_shard_once():
    groups = split_groups(shards(64, 64, 64, 64, 10), 2)
    assert [[s.shard_key for s in g] for g in groups] == [["s0", "s2", "s4"], ["s1", "s3"]]
    assert sorted(s.shard_key for g in groups for s in g) == [f"s{i}" for i in range(5)]


def test_no_empty_groups_when_there_are_fewer_shards_than_workers():
    assert [len(g) for g in split_groups(shards(8), 3)] == [1]
    assert split_groups([], 2) == []
