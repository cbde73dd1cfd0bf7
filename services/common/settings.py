"""One source for every setting: a frozen dataclass per service whose fields
carry their default, help and bounds (`setting(...)`). From it come the
command-line flags (`--some-thing`), the environment variables
(`DWORKERS_SOME_THING`; the flag wins), the range checks, and the object the
service reads. Nested dataclasses (shared groups such as how to reach the
cluster) add their flags unprefixed.

Why not pydantic-settings: it would bring two dependencies, its own error
format and no argparse flags; these settings are a few dozen scalars, and a
dataclass keeps them typed attributes with no translation step.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
from collections.abc import Callable
from typing import Any

from dworkers.common.errors import ConfigError

log = logging.getLogger(__name__)

SECRET_WORDS = ("password", "secret", "token")
URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")  # scheme://user:password@host


def setting(default: Any, help: str, *, low=None, high=None, above=None, choices=None) -> Any:
    """A dataclass field that is also a flag and an environment variable."""
    return dataclasses.field(default=default, metadata={
        "help": help, "low": low, "high": high, "above": above, "choices": choices})


def group(cls) -> Any:
    """A nested group of settings (its flags are not prefixed)."""
    return dataclasses.field(default_factory=cls, metadata={"group": True})


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


def boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


boolean.__name__ = "boolean"


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


def add_flags(parser: argparse.ArgumentParser, cls) -> None:
    """Adds a flag for every setting of `cls` (and of its groups)."""
    for field in dataclasses.fields(cls):
        if field.metadata.get("group"):
            add_flags(parser, field.default_factory)
            continue
        meta = field.metadata
        if "help" not in meta:
            raise TypeError(f"{cls.__name__}.{field.name} is not a setting(...)")
        kind = type(field.default)
        parse: Callable[[str], Any]
        if kind is bool:
            parse = boolean
        elif kind in (int, float):
            parse = in_range(kind, meta["low"], meta["high"], meta["above"])
        else:
            parse = kind
        add(parser, "--" + field.name.replace("_", "-"), field.default, parse, meta["help"],
            **({"choices": meta["choices"]} if meta["choices"] else {}))


def from_args(cls, args: argparse.Namespace):
    """The settings object of `cls` from parsed flags."""
    values = {}
    for field in dataclasses.fields(cls):
        if field.metadata.get("group"):
            values[field.name] = from_args(field.default_factory, args)
        else:
            values[field.name] = getattr(args, field.name)
    return cls(**values)


def describe(settings) -> str:
    """Every setting as name=value (secrets hidden), for the start-up log line."""
    items = []
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        if field.metadata.get("group"):
            items.append(describe(value))
            continue
        if any(word in field.name for word in SECRET_WORDS):
            value = "***"
        elif isinstance(value, str):
            value = URL_PASSWORD.sub(r"\1***@", value)
        items.append(f"{field.name}={value}")
    return " ".join(item for item in items if item)


# --- groups every service shares ----------------------------------------------

@dataclasses.dataclass(frozen=True)
class Logging:
    log_format: str = setting("text", "log lines as text or json", choices=("text", "json"))
    log_level: str = setting("INFO", "logging level")


@dataclasses.dataclass(frozen=True)
class Cluster:
    zk: str = setting("127.0.0.1:2181", "ZooKeeper connect string")
    root: str = setting("/dworkers", "ZooKeeper root of this cluster")
    zk_auth_file: str = setting("", "a file holding user:password: this process authenticates to ZooKeeper by "
                                    "digest, and what it creates there only that user may read or write")

    zk_tls_ca: str = setting("", "PEM CA bundle of ZooKeeper's secure port: TLS to ZooKeeper, checking its "
                                 "certificate and name (--zk then lists secure ports)")
    zk_tls_cert: str = setting("", "PEM client certificate, for a ZooKeeper that asks for one (with --zk-tls-ca)")
    zk_tls_key: str = setting("", "PEM private key of --zk-tls-cert")

    def zk_auth(self) -> str | None:
        from dworkers.common.zk import read_auth

        return read_auth(self.zk_auth_file) if self.zk_auth_file else None

    def zk_tls(self):
        """A ZkTls, or None for plaintext."""
        from dworkers.common.zk import ZkTls

        if (self.zk_tls_cert or self.zk_tls_key) and not self.zk_tls_ca:
            raise ConfigError("--zk-tls-cert and --zk-tls-key need --zk-tls-ca")
        if bool(self.zk_tls_cert) != bool(self.zk_tls_key):
            raise ConfigError("--zk-tls-cert and --zk-tls-key go together")
        return ZkTls(self.zk_tls_ca, self.zk_tls_cert, self.zk_tls_key) if self.zk_tls_ca else None


@dataclasses.dataclass(frozen=True)
class Contact(Cluster):
    masters: str = setting("", "comma-separated backend addresses instead of ZooKeeper discovery")
    token_file: str = setting("", "a file holding the bearer token this process presents to masters that check "
                                  "access (see --access-file)")
