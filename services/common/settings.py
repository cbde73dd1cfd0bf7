"""Settings from flags and environment variables: every flag `--some-thing`
also reads DWORKERS_SOME_THING; the flag wins. Printed at start."""

from __future__ import annotations

import argparse
import logging
import os

log = logging.getLogger(__name__)

SECRET_WORDS = ("password", "secret", "token")


def env_name(flag: str) -> str:
    return "DWORKERS_" + flag.lstrip("-").replace("-", "_").upper()


def in_range(kind, low=None, high=None, above=None):
    """An argparse type: a number of `kind` within [low, high] (or > above)."""
    def parse(text: str):
        value = kind(text)  # a ValueError is argparse's "invalid <kind> value"
        if value != value:  # NaN
            raise argparse.ArgumentTypeError("must be a number")
        if above is not None and not value > above:
            raise argparse.ArgumentTypeError(f"must be above {above:,}")
        if low is not None and value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low:,}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high:,}")
        return value
    parse.__name__ = kind.__name__
    return parse


def add(parser: argparse.ArgumentParser, flag: str, default=None, type=str, help: str = "", **kw) -> None:
    """Adds a flag whose default comes from its environment variable."""
    env = env_name(flag)
    raw = os.environ.get(env)
    if raw is not None:
        try:
            default = type(raw)
        except ValueError:
            parser.error(f"{env}={raw!r} is not a valid {type.__name__}")
        except argparse.ArgumentTypeError as exc:
            parser.error(f"{env}={raw!r}: {exc}")
    parser.add_argument(flag, default=default, type=type, help=f"{help} [env {env}; default {default}]", **kw)


def add_common(parser: argparse.ArgumentParser) -> None:
    add(parser, "--zk", "127.0.0.1:2181", help="ZooKeeper connect string")
    add(parser, "--root", "/dworkers", help="ZooKeeper root of this cluster")
    add(parser, "--log-format", "text", help="text or json", choices=("text", "json"))
    add(parser, "--log-level", "INFO", help="logging level")


def describe(args: argparse.Namespace) -> str:
    items = []
    for key, value in sorted(vars(args).items()):
        if key in ("func", "command") or callable(value):
            continue
        if any(word in key for word in SECRET_WORDS):
            value = "***"
        items.append(f"{key}={value}")
    return " ".join(items)
