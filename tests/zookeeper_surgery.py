"""Snapshot surgery for tests: give a znode an aged child-sequence counter.

ZooKeeper names a sequential child after its parent's `cversion` (`%010d`), an
int32 that only grows. Tests that need the state of a long-lived cluster
(cversion near 2**31) cannot do 2**31 creates, so `set_cversion` rewrites the
counter in the server's newest on-disk snapshot instead. That counter is the
persisted cversion (creates only); clients see `client_cversion()` of it.

The snapshot format handled is that of ZooKeeper 3.8.0 (FileSnap, uncompressed),
in jute encoding (big-endian ints/longs; strings and buffers with an int length,
-1 for null):

    FileHeader      int magic "ZKSN", int version 2, long dbid
    sessions        int count, then (long id, int timeout) * count
    ACL cache       int count, then (long key, int n, (int perms, string scheme,
                    string id) * n) * count
    nodes           (string path, buffer data, long acl, StatPersisted) * ...,
                    ended by the path "/"; the root's path is ""
    seal            long Adler32 of every byte before it, string "/"
    ZxidDigest      long zxid, int digestVersion, long digest   (digest enabled)
    seal            long Adler32 of every byte before it, string "/"

StatPersisted is czxid, mzxid, ctime, mtime (long), version, cversion,
aversion (int), ephemeralOwner, pzxid (long). The digest is the 64-bit sum over
nodes (except those under "/zookeeper/") of CRC32(path, data, czxid, mzxid,
pzxid, ctime, mtime, version, cversion, aversion, ephemeralOwner); ZooKeeper
recomputes it on load and logs an error if it differs, so it is recomputed here.
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kazoo.client import KazooClient

if TYPE_CHECKING:
    from dworkers.common.zkserver import ZooKeeperServer

SNAP_MAGIC = 0x5A4B534E  # "ZKSN"
_STAT = struct.Struct(">qqqqiiiqq")  # StatPersisted, in serialization order
_CVERSION_OFFSET = 4 * 8 + 4  # after czxid, mzxid, ctime, mtime, version


class _Reader:
    """A cursor over jute-encoded bytes."""

    def __init__(self, blob: bytes) -> None:
        self.blob = blob
        self.pos = 0

    def take(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self.blob, self.pos)
        self.pos += struct.calcsize(fmt)
        return values

    def i32(self) -> int:
        return self.take(">i")[0]

    def i64(self) -> int:
        return self.take(">q")[0]

    def buffer(self) -> bytes | None:
        length = self.i32()
        if length < 0:
            return None
        data = self.blob[self.pos:self.pos + length]
        self.pos += length
        return data

    def string(self) -> str | None:
        data = self.buffer()
        return None if data is None else data.decode()


@dataclass
class _Node:
    data: bytes | None
    stat_offset: int  # where its StatPersisted starts in the file
    stat: tuple[int, ...]


@dataclass
class _Snapshot:
    nodes: dict[str, _Node]
    seals: list[int]  # offsets of the Adler32 longs
    digest_offset: int | None  # offset of the ZxidDigest record, if any


def _seal(reader: _Reader) -> int:
    """Checks one seal (Adler32 of everything before it, then "/"); returns its offset."""
    offset = reader.pos
    if reader.i64() != zlib.adler32(reader.blob[:offset]) or reader.string() != "/":
        raise ValueError(f"bad snapshot seal at offset {offset}")
    return offset


def _parse(blob: bytes) -> _Snapshot:
    r = _Reader(blob)
    magic, version, _dbid = r.take(">iiq")
    if magic != SNAP_MAGIC or version != 2:
        raise ValueError(f"not a version-2 ZooKeeper snapshot (magic {magic:#x}, version {version})")
    for _ in range(r.i32()):  # sessions
        r.take(">qi")
    for _ in range(r.i32()):  # ACL cache
        r.i64()
        for _ in range(max(r.i32(), 0)):
            r.i32(), r.string(), r.string()
    nodes: dict[str, _Node] = {}
    while (path := r.string()) != "/":
        assert path is not None
        data = r.buffer()
        r.i64()  # ACL cache key
        nodes[path] = _Node(data, r.pos, r.take(_STAT.format))
    seals = [_seal(r)]
    digest_offset = None
    if r.pos < len(blob):  # 3.6+ appends the tree digest, sealed again
        digest_offset = r.pos
        r.take(">qiq")
        seals.append(_seal(r))
    if r.pos != len(blob):
        raise ValueError(f"unexpected {len(blob) - r.pos} trailing bytes in snapshot")
    return _Snapshot(nodes, seals, digest_offset)


def _tree_digest(nodes: dict[str, _Node]) -> int:
    """DigestCalculator (version 2) summed like NodeHashMapImpl's AdHash, as a signed long."""
    total = 0
    for path, node in nodes.items():
        if path.startswith("/zookeeper/"):
            continue
        czxid, mzxid, ctime, mtime, version, cversion, aversion, owner, pzxid = node.stat
        stat = struct.pack(">qqqqqiiiq", czxid, mzxid, pzxid, ctime, mtime, version, cversion, aversion, owner)
        total += zlib.crc32(path.encode() + (node.data or b"") + stat)
    total %= 1 << 64
    return total - (1 << 64) if total >= 1 << 63 else total


def patch_snapshot(blob: bytes, path: str, cversion: int) -> bytes:
    """The snapshot `blob` with `path`'s cversion replaced, its digest and seals recomputed."""
    snap = _parse(blob)
    zk_path = "" if path == "/" else path  # the root is stored as ""
    if zk_path not in snap.nodes:
        raise KeyError(f"{path} is not in the snapshot")
    out = bytearray(blob)
    node = snap.nodes[zk_path]
    struct.pack_into(">i", out, node.stat_offset + _CVERSION_OFFSET, cversion)

    if snap.digest_offset is not None:
        digest_zxid, _version, digest = struct.unpack_from(">qiq", blob, snap.digest_offset)
        if digest_zxid > 0:  # zxid 0 means "no digest"; ZooKeeper then skips the check
            # Refuse to write a digest from a formula that does not reproduce the stored one.
            if _tree_digest(snap.nodes) != digest:
                raise ValueError("cannot reproduce the snapshot's digest; format not understood")
            stat = list(node.stat)
            stat[5] = cversion
            node.stat = tuple(stat)
            struct.pack_into(">q", out, snap.digest_offset + 12, _tree_digest(snap.nodes))

    # Each seal covers every byte before it, including earlier seals: redo them in order.
    for offset in snap.seals:
        struct.pack_into(">q", out, offset, zlib.adler32(bytes(out[:offset])))
    return bytes(out)


def _zxids(directory: Path, prefix: str) -> dict[int, Path]:
    found: dict[int, Path] = {}
    for file in directory.iterdir():
        if file.name.startswith(prefix + "."):
            if not re.fullmatch(rf"{prefix}\.[0-9a-f]+", file.name):
                raise ValueError(f"unsupported file {file} (compressed snapshots are not handled)")
            found[int(file.name.split(".")[1], 16)] = file
    return found


def set_cversion(server: ZooKeeperServer, path: str, cversion: int) -> None:
    """Stops `server` (a dworkers.common.zkserver.ZooKeeperServer that was started and has `path`),
    rewrites the cversion of `path` in its newest on-disk snapshot, and starts it again.

    `cversion` is the persisted counter: the next sequential child of `path` is
    named `%010d` of it. Clients see it as `client_cversion(cversion, numChildren)`."""
    if not -(2**31) <= cversion < 2**31:
        raise ValueError("cversion is an int32")
    # ZooKeeper snapshots everything it loaded when it starts: a start/stop cycle
    # leaves a newest snapshot holding `path` as it is now.
    server.stop()
    server.start()
    server.stop()

    version_dir = server.workdir / "data" / "version-2"
    snapshots = _zxids(version_dir, "snapshot")
    zxid = max(snapshots)
    snapshot = snapshots[zxid]
    patched = patch_snapshot(snapshot.read_bytes(), path, cversion)
    tmp = version_dir / "surgery.tmp"
    tmp.write_bytes(patched)
    os.replace(tmp, snapshot)

    # Transactions after the snapshot (e.g. sessions opened during the cycle above)
    # would be replayed onto it: a create under `path` would restore the old
    # counter, and any of them would fail ZooKeeper's per-txn digest check.
    for log_zxid, log in _zxids(version_dir, "log").items():
        if log_zxid > zxid:
            log.unlink()

    server.start()
    # An unreadable snapshot is not fatal to ZooKeeper: it would silently load an
    # older one. Check the counter really is what was asked for.
    client = KazooClient(hosts=server.hosts)
    client.start(timeout=30)
    try:
        stat = client.exists(path)
    finally:
        client.stop()
        client.close()
    if stat is None or stat.cversion != client_cversion(cversion, stat.numChildren):
        raise RuntimeError(f"{path} has stat {stat} after surgery, not the persisted cversion {cversion}")


def client_cversion(cversion: int, num_children: int) -> int:
    """The Stat.cversion a client sees for a persisted cversion: ZooKeeper persists
    only child creates (the sequence counter) and reports creates plus deletes,
    2 * cversion - numChildren, in int32 arithmetic (DataNode.copyStat)."""
    value = (2 * cversion - num_children) % 2**32
    return value - 2**32 if value >= 2**31 else value
