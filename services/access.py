"""`dworkers token NAME --roles ...`: a new bearer token for an access file
(services/common/auth.py). The token is printed once, on stdout; the access
file keeps only its SHA-256."""

from __future__ import annotations

import os
import sys

from dworkers.common.auth import LINE, ROLES, hash_token, new_token
from dworkers.common.errors import ConfigError


def add_parser(sub) -> None:
    p = sub.add_parser("token", help="make a bearer token and its access-file line",
                       description="Print a new token on stdout, and the access-file line that grants it ROLES "
                                   "(appended to --append FILE, else printed on stderr).")
    p.add_argument("name", help="who the token is for (shown in refusals and logs)")
    p.add_argument("--roles", required=True, help=f"comma-separated, among {', '.join(ROLES)}")
    p.add_argument("--append", metavar="FILE", help="append the line to this access file (created owner-only)")
    p.set_defaults(func=main, log_format="text", log_level="WARNING")


def main(args) -> None:
    token = new_token()
    line = f"{args.name} {args.roles} {hash_token(token)}"
    match = LINE.match(line)
    if match is None:
        raise ConfigError(f"name {args.name!r}: letters, digits, '.', '_', '@' or '-' (up to 128)")
    unknown = set(args.roles.split(",")) - set(ROLES)
    if unknown:
        raise ConfigError(f"unknown role {', '.join(sorted(unknown))} (roles: {', '.join(ROLES)})")
    if args.append:
        fd = os.open(args.append, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a") as f:
            f.write(line + "\n")
    else:
        print(line, file=sys.stderr)
    print(token)
