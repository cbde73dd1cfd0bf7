"""The source side of a slot move, run by the active master of the shard the
map says slots move away from (steps in domain/moves.py). It resumes from
what the journal and the target say: the next master after a crash, or this
one after a target's failover, goes on where the move stopped."""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
import time

from dworkers.common import routing
from dworkers.common.shards import BadShardMap, Move
from dworkers.master.domain.moves import PART_ITEMS, export_part, ids_to_move, running_in
from dworkers.v1 import master_pb2

log = logging.getLogger(__name__)

RETRY_SECONDS = 1.0  # after a failed step (the target failing over, its map behind)
CALL_TIMEOUT = 60.0
MAX_PART_BYTES = 4 * 1024 * 1024  # a part with its payloads and results (gRPC's limit is 16 MiB)
# Seconds to wait after each step: lets fault-injection tests stop a master
# between two steps. Never set in production.
STEP_PAUSE = float(os.environ.get("DWORKERS_MOVE_STEP_PAUSE", "0") or 0)


class SlotMover:
    def __init__(self, shell, follower, shard: int, zk_client, map_path: str, proxy_for):
        self.shell = shell
        self.follower = follower
        self.shard = shard
        self.zk_client = zk_client
        self.map_path = map_path
        self.proxy_for = proxy_for  # shard -> MasterProxy of that shard's master group

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()

        def listener(_new) -> None:
            loop.call_soon_threadsafe(changed.set)

        self.follower.on_change(listener)
        try:
            while self.shell.closed is None:
                move = self.follower.current.moving
                if move is not None and move.source == self.shard:
                    try:
                        await self._move(move)
                    except Exception as exc:  # noqa: BLE001 - a step failed: again, later
                        if self.shell.closed is not None:
                            return  # this master stopped acting: the next one resumes
                        # paused (ZooKeeper out of reach for a moment), a read that failed, the map's write...
                        log.warning("moving %s: %s; trying again", move, exc)
                        await asyncio.sleep(RETRY_SECONDS)
                    continue
                changed.clear()
                try:
                    await asyncio.wait_for(changed.wait(), 5.0)
                except asyncio.TimeoutError:
                    pass
        finally:
            self.follower.remove_listener(listener)

    async def _move(self, move: Move) -> None:
        shell, state = self.shell, self.shell.state
        started = time.monotonic()
        if await shell.start_move(move):
            log.info("moving %s: started; new works for them wait for the move", move)
            await _pause()
            waited = False
            while count := running_in(state, move.first, move.last, shell.master.scheduler.running):
                if not waited:
                    log.info("moving %s: waiting for %d running works to finish", move, count)
                    waited = True
                await asyncio.sleep(0.05)
                shell.check_serving()
            shell.master.exporting = True  # from here on, late reports about held works do not count
            ids = ids_to_move(state, move.first, move.last)
            copied = await self._copy(move, ids)
            await shell.release_move(ids)
            log.info("moving %s: released %d works, the target holds them (%d sent from here)", move, len(ids),
                     copied)
            await _pause()
        if await asyncio.get_running_loop().run_in_executor(None, self._hand_over, move):
            log.info("moved %s in %.2f s", move, time.monotonic() - started)
        while self.follower.current.moving == move and self.shell.closed is None:  # until this backend reads
            await asyncio.sleep(0.05)  # the new map (else it would take the same move up again)

    async def _copy(self, move: Move, ids: list[str]) -> int:
        """Sends the works after what the target holds, part by part; returns how many were sent."""
        proxy = self.proxy_for(move.target)
        reply = await self._call(proxy, master_pb2.ImportWorksRequest(move_key=move.key, source_shard=self.shard))
        start = bisect.bisect_right(ids, reply.imported_up_to) if reply.imported_up_to else 0
        sent = 0
        paused = False
        limit = PART_ITEMS
        while start < len(ids):
            while True:  # payloads and results the journal keeps apart are counted once read
                request, after = export_part(self.shell.state, ids, start, move.key, self.shard, limit)
                await self.shell.fill_apart(request)
                size = request.ByteSize()
                if size <= MAX_PART_BYTES or limit == 1:
                    break
                limit = max(1, limit // 4)
            if size < MAX_PART_BYTES // 4:
                limit = min(PART_ITEMS, limit * 2)
            reply = await self._call(proxy, request)
            sent += after - start
            start = max(after, bisect.bisect_right(ids, reply.imported_up_to))
            if not paused:
                log.info("moving %s: copied %d of %d works", move, start, len(ids))
                await _pause()
                paused = True
        return sent

    async def _call(self, proxy, request: master_pb2.ImportWorksRequest) -> master_pb2.ImportWorksResponse:
        loop = asyncio.get_running_loop()
        logged = 0.0
        while True:
            self.shell.check_serving()
            try:
                return await loop.run_in_executor(
                    None, lambda: proxy.call("ImportWorks", request, timeout=CALL_TIMEOUT))
            except Exception as exc:  # noqa: BLE001 - the target fails over, or its map is behind
                if time.monotonic() - logged > 30:
                    logged = time.monotonic()
                    log.warning("move %s: the target did not take a part: %s; trying again every %g s",
                                request.move_key, _short(exc), RETRY_SECONDS)
                await asyncio.sleep(RETRY_SECONDS)

    def _hand_over(self, move: Move) -> bool:
        """The map's last step: the target owns the slots (compare-and-set: a
        map changed meanwhile is read again). False if it was done already."""
        while True:
            current, version = routing.load(self.zk_client, self.map_path)
            if current.moving != move:
                return False
            try:
                routing.store(self.zk_client, self.map_path, current.with_move_finished(move), version)
                return True
            except BadShardMap:
                continue


async def _pause() -> None:
    if STEP_PAUSE:
        await asyncio.sleep(STEP_PAUSE)


def _short(exc: Exception) -> str:
    details = getattr(exc, "details", None)
    return (details() if callable(details) else str(exc)) or type(exc).__name__
