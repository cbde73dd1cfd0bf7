"""`dworkers shards`: show and change the shard map (ZooKeeper, operators).

    dworkers shards              each shard's slots and active master
    dworkers shards init N       a new cluster of N shards (slots split evenly)
    dworkers shards add          one more shard, owning no slot yet
    dworkers shards move --slots A-B --to K
                                 move slots (and their works) to shard K, online
"""

from __future__ import annotations

import json
import time

from kazoo.exceptions import NoNodeError

from dworkers.common import routing, shards, zk
from dworkers.common.errors import ConfigError
from dworkers.common.settings import Cluster, add, add_flags, from_args, in_range


def add_parser(sub) -> None:
    p = sub.add_parser("shards", help="show or change the shard map (which master group owns which works)",
                       description="Works are spread over shards by hash slot of their id (4,096 slots); each "
                                   "shard is a master group of its own (dworkers master --shard K). Without an "
                                   "action: each shard's slots and active master.")
    add_flags(p, Cluster)
    add(p, "--zk-readers-file", "", help="as the masters' --zk-readers-file: the map stays readable by the user "
                                         "workers and frontends log in as (with --zk-auth-file)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    init = actions.add_parser("init", help="split a new cluster's slots evenly over N shards",
                              description="Only before the cluster holds any work: works already accepted "
                                          "stay where they are, so their ids would route elsewhere.")
    init.add_argument("count", type=in_range(int, low=1, high=shards.MAX_SHARDS))
    actions.add_parser("add", help="add a shard that owns no slot yet (start its masters with --shard K)")
    move = actions.add_parser(
        "move", help="move slots, with their works, to another shard while the cluster runs",
        description="The slots' shard (their source) stops taking new works for them (calls for them wait "
                    "and are retried within their deadline), lets their running works finish, copies their "
                    "pending, scheduled and retained works to the target shard's master, and hands the slots "
                    "over. Both shards need an active master; a move survives either's failover.")
    move.add_argument("--slots", required=True, help="A-B: the slots to move (all of one shard's), 0-4095")
    move.add_argument("--to", type=in_range(int, low=0, high=shards.MAX_SHARDS - 1), required=True,
                      help="the shard that takes them")
    move.add_argument("--wait", type=in_range(float, low=0), default=600.0,
                      help="seconds to wait for the move to end (0: start it and return)")
    p.set_defaults(func=main, log_format="text", log_level="WARNING")


def main(args) -> None:
    cluster = from_args(Cluster, args)
    readers = zk.read_auth(args.zk_readers_file, "--zk-readers-file") if args.zk_readers_file else None
    client = zk.connect(cluster.zk, connect_timeout=10.0, auth=cluster.zk_auth(), tls=cluster.zk_tls(),
                        readers=readers)
    try:
        paths = zk.Paths(cluster.root)
        if args.action == "init":
            init(client, paths, args.count)
        elif args.action == "add":
            current, version = routing.load(client, paths.shard_map)
            new = current.with_shard_added()
            routing.store(client, paths.shard_map, new, version)
            print(f"shard {new.shards - 1} added (map version {new.version}); it owns no slot yet: start its "
                  f"masters with --shard {new.shards - 1}")
        elif args.action == "move":
            first, last = shards.parse_slots(args.slots)
            start_move(client, paths, first, last, args.to, args.wait)
        show(client, paths, args.json)
    finally:
        zk.stop(client)


def init(client, paths: zk.Paths, count: int) -> None:
    current, version = routing.load(client, paths.shard_map)
    if version >= 0:
        raise ConfigError(f"the cluster already has a shard map (version {current.version}, {current.shards} "
                          "shards): add shards to it instead")
    if _children(client, paths.journal):
        raise ConfigError("the cluster already holds works: they would route to other shards than theirs; "
                          "init only a new cluster")
    if _children(client, paths.election):  # it may journal on PostgreSQL, out of sight from here
        raise ConfigError("masters are running: init the shard map before starting them (a running master may "
                          "already hold works, which would route to other shards than theirs)")
    routing.store(client, paths.shard_map, shards.ShardMap.even(count), version)


def start_move(client, paths: zk.Paths, first: int, last: int, to: int, wait: float) -> None:
    """Marks the slots as moving in the map (the source's master does the
    rest); waits until the map names their new shard."""
    current, version = routing.load(client, paths.shard_map)
    new = current.with_move_started(first, last, to)
    routing.store(client, paths.shard_map, new, version)
    move = new.moving
    print(f"moving {move} (map version {new.version})", flush=True)
    deadline = time.monotonic() + wait
    while wait:
        current, _ = routing.load(client, paths.shard_map)
        if current.moving != move:
            print(f"moved {move} (map version {current.version})")
            return
        if time.monotonic() > deadline:
            raise ConfigError(f"{move} still moving after {wait:g} s (shard {move.source}'s master moves them: "
                              "is it running? `dworkers shards` shows the move until it ends)")
        time.sleep(0.2)


def _children(client, path: str) -> list[str]:
    try:
        return client.get_children(path)
    except NoNodeError:
        return []


def show(client, paths: zk.Paths, as_json: bool) -> None:
    current, _ = routing.load(client, paths.shard_map)
    rows = []
    for shard in range(current.shards):
        election = paths.of_shard(shard).election
        try:
            members = sorted(client.get_children(election), key=zk.election_sequence)
        except NoNodeError:
            members = []
        master = ""
        if members:
            try:
                master = zk.decode_member(client.get(f"{election}/{members[0]}")[0]).get("address", "")
            except NoNodeError:
                master = ""
        rows.append({"shard": shard, "slots": current.slot_count(shard),
                     "ranges": [f"{a}-{b}" if a != b else str(a) for a, b in current.ranges_of(shard)],
                     "master": master, "epoch": zk.election_sequence(members[0]) if members else 0,
                     "standbys": max(0, len(members) - 1)})
    if as_json:
        m = current.moving
        moving = None if m is None else {"first": m.first, "last": m.last, "from": m.source, "to": m.target}
        print(json.dumps({"version": current.version, "slots": shards.SLOTS, "shards": rows, "moving": moving},
                         indent=2))
        return
    print(f"shard map version {current.version}: {current.shards} shard{'s' if current.shards != 1 else ''}, "
          f"{shards.SLOTS} slots" + (f"; moving {current.moving}" if current.moving else ""))
    for row in rows:
        ranges = ", ".join(row["ranges"][:8]) + (", ..." if len(row["ranges"]) > 8 else "")
        master = f"{row['master']} (epoch {row['epoch']}, {row['standbys']} standby)" if row["master"] \
            else "no master running"
        print(f"shard {row['shard']:<3} slots {row['slots']:>4} [{ranges or 'none'}]  {master}")
