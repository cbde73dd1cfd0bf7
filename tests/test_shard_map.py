"""The shard map and result-stream tokens, in one process: slots split and
stored as the frontends and masters read them; hostile maps and tokens
refused with a line a person understands."""

from __future__ import annotations

import json
import zlib

import pytest

from dworkers.common.errors import InvalidInput
from dworkers.common.shards import (
    SLOTS,
    BadShardMap,
    ShardMap,
    decode_cursors,
    encode_cursors,
    parse_slots,
    slot_of,
)

pytestmark = pytest.mark.unit


def test_a_slot_is_the_crc32_of_the_id_so_any_language_computes_it():
    assert slot_of("w-1") == zlib.crc32(b"w-1") % SLOTS
    assert slot_of("ü") == zlib.crc32("ü".encode()) % SLOTS


def test_an_even_map_splits_slots_in_equal_runs_and_survives_storage():
    layout = ShardMap.even(3)
    assert [layout.slot_count(s) for s in range(3)] == [1366, 1365, 1365]
    assert layout.ranges() == [(0, 1365, 0), (1366, 2730, 1), (2731, 4095, 2)]
    assert ShardMap.decode(layout.encode()) == layout
    single = ShardMap.single()
    assert single.shards == 1 and all(single.owns(0, f"w{i}") for i in range(100))


def test_adding_a_shard_and_moving_slots_make_new_versions():
    grown = ShardMap.even(2).with_shard_added()
    assert grown.version == 2 and grown.shards == 3 and grown.slot_count(2) == 0
    moved = grown.with_slots_moved(10, 19, 2)
    assert moved.version == 3 and moved.ranges_of(2) == [(10, 19)] and ShardMap.decode(moved.encode()) == moved
    with pytest.raises(BadShardMap, match="no shard 3"):
        grown.with_slots_moved(0, 1, 3)
    with pytest.raises(BadShardMap, match="slots are 0-4095"):
        grown.with_slots_moved(4000, 4096, 1)


@pytest.mark.parametrize("raw", [
    {"version": 1, "shards": 2, "slots": [[0, 100, 0]]},  # slots without a shard
    {"version": 1, "shards": 2, "slots": [[0, 100, 0], [50, 4095, 1]]},  # overlapping runs
    {"version": 1, "shards": 2, "slots": [[0, 4095, 2]]},  # a shard past the count
    {"version": 1, "shards": 0, "slots": [[0, 4095, 0]]},
    {"version": 1, "shards": 2},
    "not a map",
])
def test_a_broken_stored_map_is_refused_in_one_line(raw):
    with pytest.raises(BadShardMap, match="unreadable|shards: a cluster has"):
        ShardMap.decode(json.dumps(raw).encode())
    with pytest.raises(BadShardMap, match="bytes"):
        ShardMap.decode(b" " * 100_000)


def test_slot_ranges_from_the_command_line():
    assert parse_slots("10-20") == (10, 20) and parse_slots("7") == (7, 7)
    for bad in ("20-10", "a-b", "0-4096", "-1"):
        with pytest.raises(BadShardMap):
            parse_slots(bad)


def test_resume_tokens_round_trip_and_garbage_is_refused():
    assert decode_cursors(encode_cursors({0: 5, 3: 99})) == {0: 5, 3: 99}
    assert decode_cursors(encode_cursors({})) == {}
    for bad in ("", "r2:0=1", "r1:0=x", "r1:999=1", "r1:0=-1", "r1:" + "0=1," * 10_000):
        with pytest.raises(InvalidInput, match="resume_token"):
            decode_cursors(bad)


def test_a_move_names_its_slots_source_and_target_survives_storage_and_ends_with_the_target_owning_them():
    layout = ShardMap.even(3)
    moving = layout.with_move_started(100, 199, 2)
    assert moving.moving is not None and (moving.moving.source, moving.moving.target) == (0, 2)
    assert moving.owners == layout.owners and moving.version == layout.version + 1
    assert ShardMap.decode(moving.encode()) == moving
    work = next(f"w{i}" for i in range(10_000) if 100 <= slot_of(f"w{i}") <= 199)
    assert moving.owns(0, work) and not moving.takes(0, work) and not moving.takes(2, work)
    assert moving.with_shard_added().moving == moving.moving  # other changes keep the move
    done = moving.with_move_finished(moving.moving)
    assert done.moving is None and done.takes(2, work) and done.slot_count(2) == layout.slot_count(2) + 100
    for args, refusal in (((1300, 1400, 2), "belong to shards 0, 1"), ((0, 99, 0), "are shard 0's already"),
                          ((0, 99, 7), "no shard 7"), ((99, 4096, 1), "slots are 0-4095")):
        with pytest.raises(BadShardMap, match=refusal):
            layout.with_move_started(*args)
    with pytest.raises(BadShardMap, match="one move at a time"):
        moving.with_move_started(300, 399, 1)
    with pytest.raises(BadShardMap, match="not the move under way"):
        done.with_move_finished(moving.moving)
    # A stored move that does not fit its map is refused like any broken map.
    raw = json.loads(moving.encode())
    raw["moving"]["from"] = 1
    with pytest.raises(BadShardMap, match="unreadable"):
        ShardMap.decode(json.dumps(raw).encode())
