"""Shards: which master group owns a work (pure: the map and its slots;
routing.py keeps it in ZooKeeper).

The work-id space is split into SLOTS hash slots (CRC-32 of the id's UTF-8
bytes, modulo SLOTS: any language computes it the same way). A versioned
shard map, stored in ZooKeeper at <root>/shardmap, names the shard that owns
each slot. A cluster without a map has one shard, 0, owning every slot: it
is laid out and behaves as a cluster before shards existed.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass

from dworkers.common.errors import ConfigError, InvalidInput

SLOTS = 4096
MAX_SHARDS = 256
MAX_MAP_BYTES = 64 * 1024  # the JSON of the most fragmented map is ~60 KiB


def slot_of(work_id: str) -> int:
    return zlib.crc32(work_id.encode()) % SLOTS


class BadShardMap(ConfigError):
    """A stored map that cannot be read, or a change that would break one."""


@dataclass(frozen=True)
class Move:
    """Slots on their way from one shard to another: `source` still owns them
    (the map's owners say so) but takes no new work for them; its master
    copies their works to `target`'s and then hands the slots over."""

    first: int
    last: int
    source: int
    target: int
    since: int  # the map version that started it: with the rest, names the move

    @property
    def key(self) -> str:
        return f"{self.since}:{self.first}-{self.last}:{self.source}>{self.target}"

    def covers(self, slot: int) -> bool:
        return self.first <= slot <= self.last

    def __str__(self) -> str:
        return f"slots {self.first}-{self.last} from shard {self.source} to shard {self.target}"


@dataclass(frozen=True)
class ShardMap:
    version: int
    shards: int  # shards 0 .. shards-1 exist (some may own no slot)
    owners: bytes  # owners[slot] = its shard
    moving: Move | None = None  # at most one move at a time

    @classmethod
    def single(cls) -> ShardMap:
        """The map of a cluster that never stored one."""
        return cls(0, 1, bytes(SLOTS))

    @classmethod
    def even(cls, shards: int, version: int = 1) -> ShardMap:
        """`shards` shards owning equal runs of consecutive slots."""
        _check_count(shards)
        return cls(version, shards, bytes(slot * shards // SLOTS for slot in range(SLOTS)))

    def shard_of(self, work_id: str) -> int:
        return self.owners[slot_of(work_id)]

    def owns(self, shard: int, work_id: str) -> bool:
        return self.owners[slot_of(work_id)] == shard

    def takes(self, shard: int, work_id: str) -> bool:
        """Whether `shard` takes new work (and changes) for this id: it owns
        its slot, and the slot is not on its way to another shard."""
        slot = slot_of(work_id)
        return self.owners[slot] == shard and not (self.moving is not None and self.moving.covers(slot))

    def slot_count(self, shard: int) -> int:
        return self.owners.count(shard)

    def ranges(self) -> list[tuple[int, int, int]]:
        """(first slot, last slot, shard) of each run of slots one shard owns."""
        runs: list[tuple[int, int, int]] = []
        start = 0
        for slot in range(1, SLOTS + 1):
            if slot == SLOTS or self.owners[slot] != self.owners[start]:
                runs.append((start, slot - 1, self.owners[start]))
                start = slot
        return runs

    def ranges_of(self, shard: int) -> list[tuple[int, int]]:
        return [(first, last) for first, last, owner in self.ranges() if owner == shard]

    def with_shard_added(self) -> ShardMap:
        """One more shard, owning no slot yet (slots are moved to it)."""
        _check_count(self.shards + 1)
        return ShardMap(self.version + 1, self.shards + 1, self.owners, self.moving)

    def with_slots_moved(self, first: int, last: int, to: int) -> ShardMap:
        """The slots owned by `to` at once (a new cluster's layout; a live
        cluster moves slots with `with_move_started`, which carries their works)."""
        self._check_slots(first, last, to)
        owners = bytearray(self.owners)
        owners[first:last + 1] = bytes([to]) * (last - first + 1)
        return ShardMap(self.version + 1, self.shards, bytes(owners), self.moving)

    def with_move_started(self, first: int, last: int, to: int) -> ShardMap:
        """Slots `first`-`last`, all of one shard's, on their way to shard `to`."""
        self._check_slots(first, last, to)
        if self.moving is not None:
            raise BadShardMap(f"{self.moving} are moving already: one move at a time")
        sources = set(self.owners[first:last + 1])
        if len(sources) != 1:
            raise BadShardMap(f"slots {first}-{last} belong to shards {', '.join(map(str, sorted(sources)))}: "
                              "move the slots of one shard at a time")
        source = sources.pop()
        if source == to:
            raise BadShardMap(f"slots {first}-{last} are shard {to}'s already")
        return ShardMap(self.version + 1, self.shards, self.owners, Move(first, last, source, to, self.version + 1))

    def with_move_finished(self, move: Move) -> ShardMap:
        """The moving slots owned by their target: the move is over."""
        if self.moving != move:
            raise BadShardMap(f"{move} is not the move under way")
        owners = bytearray(self.owners)
        owners[move.first:move.last + 1] = bytes([move.target]) * (move.last - move.first + 1)
        return ShardMap(self.version + 1, self.shards, bytes(owners))

    def _check_slots(self, first: int, last: int, to: int) -> None:
        if not 0 <= first <= last < SLOTS:
            raise BadShardMap(f"slots {first}-{last}: slots are 0-{SLOTS - 1}")
        if not 0 <= to < self.shards:
            raise BadShardMap(f"no shard {to}: the cluster has shards 0-{self.shards - 1}")

    def encode(self) -> bytes:
        raw: dict = {"version": self.version, "shards": self.shards, "slots": [list(run) for run in self.ranges()]}
        if self.moving is not None:
            m = self.moving
            raw["moving"] = {"first": m.first, "last": m.last, "from": m.source, "to": m.target, "since": m.since}
        return json.dumps(raw, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> ShardMap:
        if len(data) > MAX_MAP_BYTES:
            raise BadShardMap(f"the stored shard map holds {len(data):,} bytes (at most {MAX_MAP_BYTES:,})")
        try:
            raw = json.loads(data.decode())
            version, shards, runs = int(raw["version"]), int(raw["shards"]), raw["slots"]
            owners = bytearray(SLOTS)
            covered = 0
            for first, last, shard in runs:
                if not (covered == first <= last < SLOTS and 0 <= shard < shards):
                    raise ValueError(f"run {first}-{last} -> {shard}")
                owners[first:last + 1] = bytes([shard]) * (last - first + 1)
                covered = last + 1
            if covered != SLOTS:
                raise ValueError(f"slots {covered}-{SLOTS - 1} have no shard")
            _check_count(shards)
            moving = None
            if raw.get("moving") is not None:
                m = raw["moving"]
                moving = Move(int(m["first"]), int(m["last"]), int(m["from"]), int(m["to"]), int(m["since"]))
                if not (0 <= moving.first <= moving.last < SLOTS and moving.source != moving.target
                        and 0 <= moving.target < shards
                        and set(owners[moving.first:moving.last + 1]) == {moving.source}):
                    raise ValueError(f"moving {moving}")
        except (ValueError, TypeError, KeyError, UnicodeDecodeError, AttributeError) as exc:
            raise BadShardMap(f"the stored shard map is unreadable: {exc}") from None
        return cls(version, shards, bytes(owners), moving)


def parse_slots(text: str) -> tuple[int, int]:
    """`A-B` or `A` (a CLI argument) as (first, last)."""
    first, _, last = text.partition("-")
    try:
        lo, hi = int(first), int(last or first)
    except ValueError:
        raise BadShardMap(f"--slots {text!r}: expected A-B (slot numbers 0-{SLOTS - 1})") from None
    if not 0 <= lo <= hi < SLOTS:
        raise BadShardMap(f"--slots {text!r}: expected A-B with 0 <= A <= B <= {SLOTS - 1}")
    return lo, hi


TOKEN_PREFIX = "r1:"


def encode_cursors(cursors: dict[int, int]) -> str:
    """A result stream's resume token: the last sequence seen per shard."""
    return TOKEN_PREFIX + ",".join(f"{shard}={seq}" for shard, seq in sorted(cursors.items()))


def decode_cursors(token: str) -> dict[int, int]:
    cursors: dict[int, int] = {}
    try:
        if not token.startswith(TOKEN_PREFIX) or len(token) > 32 * MAX_SHARDS:
            raise ValueError(token)
        for part in filter(None, token[len(TOKEN_PREFIX):].split(",")):
            shard, _, seq = part.partition("=")
            cursors[int(shard)] = int(seq)
            if not (0 <= int(shard) < MAX_SHARDS and 0 <= int(seq) < 2**64):
                raise ValueError(part)
    except ValueError:
        raise InvalidInput("resume_token: not a token a result stream gave (pass it back as it came)") from None
    return cursors


def _check_count(shards: int) -> None:
    if not 1 <= shards <= MAX_SHARDS:
        raise BadShardMap(f"{shards} shards: a cluster has 1 to {MAX_SHARDS}")
