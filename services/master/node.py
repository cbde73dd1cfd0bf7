"""A backend process: joins the election, serves the Master gRPC service, and
becomes the active master (replaying the journal) when it is the oldest live
backend. It stops acting the moment it may no longer be master."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import socket
import time
from dataclasses import dataclass

from google.protobuf import json_format
from grpc_health.v1 import health_pb2
from kazoo.protocol.states import KazooState

from dworkers import credentials
from dworkers.common import auth, server, tls, validation, zk
from dworkers.common.auth import AuthSettings
from dworkers.common.errors import ConfigError, WrongShard
from dworkers.common.lifecycle import StopRequest
from dworkers.common.memory import freeze_survivors
from dworkers.common.metrics import MasterMetrics, ServerMetrics, process_registry, serve_metrics
from dworkers.common.proxy import MasterProxy, ZooKeeperLocator
from dworkers.common.routing import ShardMapFollower
from dworkers.common.settings import Cluster, Logging, group, setting
from dworkers.common.shards import MAX_SHARDS, slot_of
from dworkers.common.tls import ServingTlsSettings
from dworkers.common.wire import AddressInUse
from dworkers.master.domain.master import CoreSettings
from dworkers.master.election import Election, ElectionView
from dworkers.master.journal import FencedError, Journal, JournalError, PostgreSQLJournal, ZooKeeperJournal
from dworkers.master.journal.postgresql import redact
from dworkers.master.journal.schema import LATEST
from dworkers.master.leadership import LeadershipCheck
from dworkers.master.mover import SlotMover
from dworkers.master.service import MasterService
from dworkers.master.shell import MasterShell
from dworkers.v1 import master_pb2, master_pb2_grpc, work_pb2

log = logging.getLogger(__name__)

SERVICE_NAME = "dworkers.v1.Master"
MAX_LISTED_WORKERS = 1000  # ClusterInfo lists this many slots at most (its reply stays small)


@dataclass(frozen=True)
class MasterSettings:
    cluster: Cluster = group(Cluster)
    logging: Logging = group(Logging)
    tls: ServingTlsSettings = group(ServingTlsSettings)
    auth: AuthSettings = group(AuthSettings)
    shard: int = setting(0, "the shard whose master group this backend joins (see `dworkers shards`)",
                         low=0, high=MAX_SHARDS - 1)
    shards: str = setting("", "join several shards' master groups, a process each: 0,2,... or all (every shard "
                              "of the map, those added later too); shard K listens on --listen's port + K and "
                              "serves metrics on --metrics-port + K")
    listen: str = setting("0.0.0.0:7100", "gRPC address to listen on")
    advertise: str = setting("", "address others use to reach this backend (default: hostname:port)")
    metrics_port: int = setting(9100, "Prometheus /metrics port (0: off)", low=0, high=65535)
    session_timeout: float = setting(4.0, "ZooKeeper session timeout in seconds (bounds failover after a crash)",
                                     low=1, high=60)
    shutdown_grace: float = setting(5.0, "seconds in-flight calls may take to finish on SIGTERM", low=0, high=3600)
    subscriber_timeout: float = setting(30.0, "a result subscriber that reads nothing this long is dropped", above=0)
    reflection: bool = setting(False, "serve gRPC server reflection (lists the API to anyone who asks)")
    journal: str = setting("", "where the journal lives: empty for ZooKeeper (under --root), or a PostgreSQL URL "
                           "(postgresql://user@host:port/database; the password in the URL, PGPASSWORD or "
                           "--journal-password-file)")
    journal_password_file: str = setting("", "a file holding the PostgreSQL journal's password")
    token_file: str = setting("", "a file holding the token presented to other shards' masters when moving slots "
                                  "to them (an identity with the frontend role, when they check an access file)")
    zk_readers_file: str = setting("", "a file holding user:password of the read-only ZooKeeper user that workers "
                                       "and frontends log in as (their --zk-auth-file): what masters create there "
                                       "is readable by it (with --zk-auth-file)")

    def __post_init__(self) -> None:
        if self.zk_readers_file and not self.cluster.zk_auth_file:
            raise ConfigError("--zk-readers-file needs --zk-auth-file: without it znodes get no ACL at all")
        if self.journal and not self.journal.startswith(("postgresql://", "postgres://")):
            raise ConfigError(f"--journal {redact(self.journal)!r}: expected empty (ZooKeeper) or a "
                              "postgresql:// URL")

    def journal_password(self) -> str | None:
        if not self.journal_password_file:
            return None
        try:
            with open(self.journal_password_file) as f:
                return f.read().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read --journal-password-file: {exc.strerror}: "
                              f"{self.journal_password_file}") from None
    core: CoreSettings = group(CoreSettings)


class KindCatalog:
    """Every job kind some worker ever declared, kept under <root>/kinds.
    Submissions of other kinds are refused, so that a typo fails at once;
    work of a declared kind that no live worker runs waits for one.

    A kind's znode holds its defaults (the job's @job options, as its workers
    last declared them; JSON): a submission that leaves max_attempts or the
    timeout unset gets them, whoever submits it. It also holds the rate limit
    an admin set (SetRateLimit), which overrides the job's."""

    ADMIN_RATE_LIMIT = "admin_rate_limit"  # the znode's JSON key

    MAX_KINDS = 10_000

    def __init__(self, client, paths: zk.Paths):
        self.client = client
        self.path = paths.kinds
        self._stored: frozenset[str] = frozenset()
        self._declared: set[str] = set()  # declared here, maybe not stored yet
        self.kinds: frozenset[str] = frozenset()  # both
        self._defaults: dict[str, master_pb2.KindDefaults] = {}
        self._admin_limits: dict[str, float] = {}
        self.rate_limits: dict[str, float] = {}  # in force, per kind: the admin's, else the job's (0: none)
        self._read: set[str] = set()  # kinds whose stored defaults were read (or written) here
        zk.ChildrenFollower(client, self.path, self._update)

    def _update(self, children) -> None:
        self._stored = frozenset(children)
        self.kinds = self._stored | self._declared
        for kind in sorted(self._stored - self._read):
            self._read_defaults(kind)

    def refresh(self) -> None:
        """Reads every kind's stored defaults again: a backend about to lead
        may hold what workers declared to an earlier master."""
        self._declared.clear()
        for kind in sorted(self._stored):
            self._read_defaults(kind)

    def _read_defaults(self, kind: str) -> None:
        self._read.add(kind)
        reading = self.client.get_async(f"{self.path}/{kind}")
        reading.rawlink(lambda got, kind=kind: self._stored_defaults(kind, got))

    def _stored_defaults(self, kind: str, got) -> None:
        try:
            data, _stat = got.get()
            fields = json.loads(data) if data else {}
            admin = fields.pop(self.ADMIN_RATE_LIMIT, None)
            stored = json_format.ParseDict(fields, master_pb2.KindDefaults(kind=kind))
            # what a worker could declare, and only that
            validation.check_worker_message(master_pb2.WorkerMessage(register=master_pb2.RegisterWorker(
                worker_ids=["catalog"], kinds=[kind], defaults=[stored])), registered=True)
            if kind not in self._declared:  # a declaration here is newer
                self._defaults[kind] = stored
            if admin is None:
                self._admin_limits.pop(kind, None)
            elif 0 <= float(admin) <= validation.MAX_RATE_LIMIT:
                self._admin_limits[kind] = float(admin)
            self._limit_in_force(kind)
        except Exception as exc:  # gone meanwhile, or written by hand: no defaults
            log.debug("no defaults for kind %r: %r", kind, exc)

    def defaults(self, kind: str) -> master_pb2.KindDefaults:
        """The options of works of `kind` that set none (0 and unset: the cluster's)."""
        return self._defaults.get(kind, validation.NO_DEFAULTS)

    def declare(self, kinds: frozenset[str], defaults=()) -> None:
        """Records kinds a worker declared, and their defaults (without waiting for ZooKeeper)."""
        given = {d.kind: d for d in defaults}
        for kind in sorted(kinds):
            value = given.get(kind) or master_pb2.KindDefaults(kind=kind)
            if kind in self.kinds and self._defaults.get(kind, master_pb2.KindDefaults(kind=kind)) == value:
                continue
            if kind not in self.kinds and len(self.kinds) >= self.MAX_KINDS:
                log.warning("kind %r not recorded: %d kinds are known already", kind, self.MAX_KINDS)
                break
            self._declared.add(kind)
            self._read.add(kind)
            self._defaults[kind] = value
            self._limit_in_force(kind)
            self._store(kind)
        self.kinds = self._stored | self._declared

    def _store(self, kind: str) -> None:
        fields = json_format.MessageToDict(self._defaults.get(kind, master_pb2.KindDefaults(kind=kind)),
                                           preserving_proto_field_name=True)
        if kind in self._admin_limits:
            fields[self.ADMIN_RATE_LIMIT] = self._admin_limits[kind]
        data = json.dumps(fields).encode()
        path = f"{self.path}/{kind}"
        creating = self.client.create_async(path, data)
        creating.rawlink(lambda created, path=path, data=data: created.exception is None
                         or self.client.set_async(path, data))  # there already: its defaults change

    def _limit_in_force(self, kind: str) -> None:
        limit = self._admin_limits.get(kind)
        if limit is None:
            limit = self._defaults[kind].rate_limit if kind in self._defaults else 0.0
        if limit:
            self.rate_limits[kind] = limit
        else:
            self.rate_limits.pop(kind, None)

    def set_rate_limit(self, kind: str, per_second: float | None) -> None:
        """An admin's limit for a kind (None: the job's applies again)."""
        self.check({kind})
        if per_second is None:
            self._admin_limits.pop(kind, None)
        else:
            self._admin_limits[kind] = per_second
        self._read.add(kind)
        self._limit_in_force(kind)
        self._store(kind)

    def kind_info(self, kind: str) -> work_pb2.KindInfo:
        return work_pb2.KindInfo(kind=kind, rate_limit=self.rate_limits.get(kind, 0.0),
                                 rate_limit_set_by_admin=kind in self._admin_limits)

    def check(self, kinds: set[str]) -> None:
        unknown = sorted(kinds - self.kinds)
        if unknown:
            known = ", ".join(sorted(self.kinds)[:20]) or "none yet"
            raise validation.InvalidWork(
                f"unknown kind {unknown[0]!r}: no worker ever declared it (known kinds: {known})")


class MasterNode:
    def __init__(self, settings: MasterSettings):
        self.settings = settings
        self._journal_password = settings.journal_password()
        self.paths = zk.Paths(settings.cluster.root, settings.shard)
        self.shard_map: ShardMapFollower  # once connected to ZooKeeper
        self.shell: MasterShell | None = None  # while this backend is the active master
        self.authorizer: auth.Authorizer | None = None  # who may call, when an access file is given
        self.view: ElectionView | None = None
        self.registry = process_registry()
        self.metrics = MasterMetrics(self.registry)
        self.address = ""
        self._recovering: asyncio.Task | None = None
        self._suspend_deadline: asyncio.TimerHandle | None = None
        self._stop = asyncio.Event()
        self._peers: dict[int, MasterProxy] = {}
        self._mover: asyncio.Task | None = None

    # --- what the service asks -------------------------------------------

    def is_leader(self) -> bool:
        return self.view is not None and self.view.leader

    def in_contact_with_zookeeper(self) -> bool:
        client = getattr(self, "client", None)
        return client is not None and client.state == KazooState.CONNECTED

    def master_address(self) -> str:
        return self.view.master_address if self.view else ""

    def owns(self, work_id: str) -> bool:
        """Whether the work's hash slot is this shard's in the current map."""
        return self.shard_map.current.owns(self.settings.shard, work_id)

    def takes(self, work_id: str) -> bool:
        """Whether this shard takes new work and changes for the id: its slot
        is this shard's and not moving away."""
        return self.shard_map.current.takes(self.settings.shard, work_id)

    def wrong_shard(self, work_id: str) -> WrongShard:
        current = self.shard_map.current
        slot = slot_of(work_id)
        if current.moving is not None and current.moving.covers(slot) and current.moving.source == self.settings.shard:
            return WrongShard(f"work {work_id!r} is in slot {slot}, moving to shard {current.moving.target}: "
                              f"asked again when the move ends (shard map version {current.version})")
        return WrongShard(f"work {work_id!r} belongs to shard {current.shard_of(work_id)} (slot "
                          f"{slot}, shard map version {current.version}), not to shard "
                          f"{self.settings.shard}")

    def _peer(self, shard: int) -> MasterProxy:
        """A proxy to another shard's master group (moving slots to it)."""
        proxy = self._peers.get(shard)
        if proxy is None:
            s = self.settings
            token = credentials.read_token(s.token_file) if s.token_file else None
            locator = ZooKeeperLocator(self.client, zk.Paths(s.cluster.root, shard), owns_client=False)
            proxy = self._peers[shard] = MasterProxy(locator, timeout=60.0, tls=tls.files(s.tls), token=token)
        return proxy

    def master_epoch(self) -> int:
        return self.view.master_epoch if self.view else 0

    def check_kinds(self, kinds: set[str]) -> None:
        self.kinds.check(kinds)

    async def cluster_info(self, shell: MasterShell) -> work_pb2.ClusterInfoResponse:
        counts = await shell.cluster_counts()
        scheduler = shell.master.scheduler
        members = self.view.members if self.view else ()
        info = work_pb2.ClusterInfoResponse(
            pending=counts["pending"], in_progress=counts["in_progress"], done=counts["done"],
            failed=counts["failed"], last_sequence=counts["last_sequence"],
            scheduled=counts["scheduled"], cancelled=counts["cancelled"],
            pending_without_worker=counts["pending_without_worker"], worker_slots=len(scheduler),
            unfinished_bytes=counts["unfinished_bytes"], retained_result_bytes=counts["result_bytes"],
            oldest_pending_seconds=round(shell.master.oldest_pending_age(time.monotonic()), 3),
        )
        shard = self.settings.shard
        current = self.shard_map.current
        info.shard.CopyFrom(work_pb2.ShardInfo(
            shard=shard, map_version=current.version, slots=current.slot_count(shard),
            pending=info.pending, in_progress=info.in_progress, done=info.done, failed=info.failed,
            last_sequence=info.last_sequence, moving=counts["moving"],
            move=str(current.moving) if current.moving is not None else ""))
        idle = scheduler.idle_per_kind()
        pending, slots = counts["pending_by_kind"], counts["slots_by_kind"]
        for kind in sorted(set(pending) | set(slots)):
            known = info.kinds.add()
            known.CopyFrom(self.kinds.kind_info(kind))
            known.slots, known.idle_slots, known.pending = slots.get(kind, 0), idle[kind], pending.get(kind, 0)
        for i, (name, epoch, address) in enumerate(members):
            backend = work_pb2.BackendInfo(address=address, epoch=epoch, node=name)
            if i == 0:
                info.master.CopyFrom(backend)
                info.shard.master.CopyFrom(backend)
            else:
                info.standbys.append(backend)
        now = time.monotonic()
        for slot in itertools.islice(scheduler.slots.values(), MAX_LISTED_WORKERS):
            worker = info.workers.add(worker_id=slot.worker_id, status="busy" if slot.busy else "idle",
                                      work_id=slot.work_id, host=slot.host,
                                      seconds_since_seen=round(now - slot.last_seen, 3), kinds=sorted(slot.kinds),
                                      identity=slot.owner)
            if slot.held and slot.held[0].progress is not None:
                worker.progress = slot.held[0].progress
        return info

    # --- life ------------------------------------------------------------

    def request_stop(self) -> None:
        """Asks `run` to shut down (safe from any thread, before `run` too)."""
        loop = getattr(self, "loop", None)
        if loop is None:
            self._stop_early = True
        else:
            loop.call_soon_threadsafe(self._stop.set)

    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        if getattr(self, "_stop_early", False):
            return
        s = self.settings
        serve_metrics(s.metrics_port, self.registry)
        if s.journal:
            await self.loop.run_in_executor(None, self._migrate_journal)
        readers = zk.read_auth(s.zk_readers_file, "--zk-readers-file") if s.zk_readers_file else None
        connecting = self.loop.run_in_executor(None, zk.connect, s.cluster.zk, s.session_timeout, 10.0,
                                               s.cluster.zk_auth(), s.cluster.zk_tls(), readers)
        stopping = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait([connecting, stopping], return_when=asyncio.FIRST_COMPLETED)
        if self._stop.is_set():
            log.info("stopped while connecting to ZooKeeper")
            return
        stopping.cancel()
        self.client = connecting.result()
        await self.loop.run_in_executor(None, zk.check_access, self.client, s.cluster.root)
        self.client.add_listener(lambda state: self.loop.call_soon_threadsafe(self._on_zk_state, state))
        self.kinds = await self.loop.run_in_executor(None, KindCatalog, self.client, self.paths)
        self.shard_map = await self.loop.run_in_executor(None, ShardMapFollower, self.client, self.paths.shard_map)
        self.leadership = LeadershipCheck(self.client)

        self.authorizer = auth.authorizer(s.auth, auth.MASTER_METHODS, default_role="frontend")
        self.server, self.health, port = server.build(
            [(MasterService(self), master_pb2_grpc.add_MasterServicer_to_server, SERVICE_NAME)],
            s.listen, ServerMetrics(self.registry), reflection_on=s.reflection, aio=True,
            tls=tls.serving_files(s.tls, "a master"),
            authorizer=self.authorizer)
        host = s.listen.rsplit(":", 1)[0]
        if host in ("0.0.0.0", "[::]", ""):
            host = socket.gethostname()
        self.address = s.advertise or f"{host}:{port}"
        await self.server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)

        member = zk.encode_member(self.address, pid=os.getpid(), host=socket.gethostname())
        self.election = Election(self.client, self.paths, member,
                                 lambda view: self.loop.call_soon_threadsafe(self._on_view, view))
        await self.loop.run_in_executor(None, self.election.start)
        log.info("backend listening on %s (advertised as %s)", s.listen, self.address)
        freeze_survivors()
        metrics_task = asyncio.create_task(self._update_metrics())
        await self._stop.wait()
        metrics_task.cancel()
        await self.shutdown()

    async def shutdown(self) -> None:
        """Resigns first (a standby takes over at once), then lets calls finish."""
        log.info("shutting down: resigning leadership")
        await self.health.enter_graceful_shutdown()
        if self.shell is not None:
            shell, self.shell = self.shell, None
            try:  # let what is on its way become durable (and be acked)
                if shell.committer is not None:
                    await asyncio.wait_for(asyncio.shield(shell.committer.barrier()), 5)
            except Exception as exc:
                log.warning("journal not flushed at shutdown: %r", exc)
            shell.close("master is shutting down")
        await self.loop.run_in_executor(None, self.election.resign)
        await self.server.stop(self.settings.shutdown_grace)
        await self.loop.run_in_executor(None, zk.stop, self.client)

    async def _update_metrics(self) -> None:
        while True:
            shell = self.shell
            active = shell is not None and shell.closed is None and shell.committer is not None
            counts = shell.counts() if shell is not None and active else None
            self.metrics.update(counts, active, self.view.epoch if self.view else 0)
            self.metrics.shard.labels(shard=str(self.settings.shard)).set(1)
            self.metrics.shard_slots.set(self.shard_map.current.slot_count(self.settings.shard))
            await asyncio.sleep(1.0)

    # --- leadership ------------------------------------------------------

    def _on_view(self, view: ElectionView) -> None:
        self.view = view
        shell = self.shell
        if shell is not None and (not view.leader or view.node != shell.node):
            self._step_down("no longer the oldest live backend")
            shell = None
        if view.leader and shell is None and self._recovering is None:
            self._recovering = asyncio.create_task(self._become_master(view))
        elif shell is not None and view.leader and view.node == shell.node and self._in_contact():
            shell.resume()  # back in contact with our election znode intact

    async def _become_master(self, view: ElectionView) -> None:
        log.info("elected master; replaying the journal", extra={"epoch": view.epoch})
        self.kinds.refresh()
        node = view.node or ""
        shell = None
        try:
            journal, cluster_id = await self.loop.run_in_executor(None, self._open_journal, node)
            shell = MasterShell(journal, view.epoch, self.settings.core, on_failure=self._journal_failed,
                                metrics=self.metrics, confirm_leadership=lambda: self.leadership.confirm(node),
                                on_kinds=self.kinds.declare, cluster_id=cluster_id, rate_limits=self.kinds.rate_limits)
            shell.node = node
            await shell.recover()
        except Exception as exc:
            if shell is not None:
                shell.close(f"recovery failed: {exc}")
            self._recovering = None
            if len(view.members) > 1:
                # Maybe only this backend cannot reach the journal: let the
                # next one try, and queue up behind it.
                log.error("recovery failed: %s; yielding to a standby", exc, extra={"epoch": view.epoch})
                await asyncio.sleep(0.5)
                self.election.rejoin()
            else:
                log.error("recovery failed: %s; retrying", exc, extra={"epoch": view.epoch})
                await asyncio.sleep(0.5)
                self.election.refresh()
            return
        self._recovering = None
        if self.view is None or self.view.node != node or not self.view.leader:
            shell.close("lost the election while recovering")
            return
        self.shell = shell
        mover = SlotMover(shell, self.shard_map, self.settings.shard, self.client, self.paths.shard_map, self._peer)
        self._mover = asyncio.create_task(mover.run())
        if not self._in_contact():
            shell.pause()  # cut off while recovering: wait to know, as on SUSPENDED
            self._on_zk_state(KazooState.SUSPENDED)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        log.info("active master at %s", self.address, extra={"epoch": view.epoch})

    def _migrate_journal(self) -> None:
        """Brings the PostgreSQL schema up to date before joining the election;
        a schema newer than this code ends the process. Unreachable now, the
        database is tried again when this backend is elected."""
        try:
            found = PostgreSQLJournal.prepare(self.settings.journal, self._journal_password)
        except JournalError as exc:
            log.warning("PostgreSQL journal not reachable yet: %s", exc)
            return
        if found < LATEST:
            log.info("PostgreSQL journal schema migrated from version %d to %d", found, LATEST)

    def _open_journal(self, node: str) -> tuple[Journal, str]:
        """The journal, fenced for this master; and the cluster's id."""
        cluster_id = zk.cluster_id(self.client, self.paths)
        s = self.settings
        if not s.journal:
            return ZooKeeperJournal(self.client, self.paths.journal, fence_path=node), cluster_id
        journal = PostgreSQLJournal(s.journal, name=self.paths.shard_root, holder=node, password=self._journal_password)
        try:
            fence = journal.take_over()
        except Exception:
            journal.close()
            raise
        log.info("took over the PostgreSQL journal at %s (fence %d)", redact(s.journal), fence)
        return journal, cluster_id

    def _journal_failed(self, exc: Exception) -> None:
        self.loop.call_soon(self._step_down, f"journal append failed: {exc}")
        if isinstance(exc, FencedError):
            self.election.rejoin()

    def _step_down(self, reason: str) -> None:
        shell, self.shell = self.shell, None
        if shell is not None:
            log.warning("stepping down: %s", reason, extra={"epoch": shell.epoch})
            shell.close(reason)
            asyncio.ensure_future(self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING))
        self.election.refresh()  # if still the oldest, recover afresh

    def _on_zk_state(self, state: str) -> None:
        if state == KazooState.SUSPENDED:
            # Maybe still master, maybe not: stop acting until we know, and
            # give up before a standby could have taken over.
            if self.shell is not None:
                self.shell.pause()
            if self._suspend_deadline is None:
                self._suspend_deadline = self.loop.call_later(
                    self.settings.session_timeout * 2 / 3, self._suspended_too_long)
        else:
            if self._suspend_deadline is not None:
                self._suspend_deadline.cancel()
                self._suspend_deadline = None
            if state == KazooState.LOST:
                self._step_down("ZooKeeper session expired")
            else:
                self.election.refresh()  # confirms our znode before resuming

    def _in_contact(self) -> bool:
        return self.client.state == KazooState.CONNECTED and self._suspend_deadline is None

    def _suspended_too_long(self) -> None:
        self._suspend_deadline = None
        self._step_down("cut off from ZooKeeper for 2/3 of the session timeout")


def main(settings: MasterSettings, stop: StopRequest) -> None:
    """Runs a backend until a stop request."""
    from kazoo.handlers.threading import KazooTimeoutError

    if settings.shards:
        from dworkers.master import group

        group.main(settings, stop)
        return
    node = MasterNode(settings)
    stop.on_stop(node.request_stop)
    try:
        asyncio.run(node.run())
    except KazooTimeoutError:
        raise ConfigError(f"cannot reach ZooKeeper at {settings.cluster.zk}") from None
    except AddressInUse as exc:
        raise ConfigError(str(exc)) from None
