"""A throwaway PostgreSQL server run from Debian's server binaries.

Used by the test suite and the benchmark: a real server (fsync on, as in
production) on a free loopback port with a temporary data dir, password
authentication, stopped by the PID it started. PostgreSQL refuses to run as
root, so as root the server runs as the `postgres` user.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from dworkers.common.zkserver import free_port

SUPERUSER = "dworkers"


class PostgreSQLNotInstalled(RuntimeError):
    pass


def server_bin_dir() -> Path:
    """The newest installed server's bin dir (Debian keeps them per version)."""
    override = os.environ.get("DWORKERS_POSTGRESQL_BIN")
    candidates = [override] if override else sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name))
    for path in reversed(candidates):
        if (Path(path) / "initdb").exists():
            return Path(path)
    raise PostgreSQLNotInstalled("PostgreSQL server binaries not found; install Debian's postgresql package "
                                 "(scripts/ensure-postgresql.sh) or set DWORKERS_POSTGRESQL_BIN")


class PostgreSQLServer:
    """One server: start(), stop() (kill -9 or clean), start again on the same
    data dir; `url` for clients (with the password)."""

    def __init__(self, workdir: str | Path, port: int | None = None, password: str | None = None,
                 tls_dir: Path | None = None):
        """`tls_dir`: certificates from `dworkers dev-certs`; the server then
        offers TLS with server.pem (clients choose with sslmode)."""
        self._user = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
        self.tls_dir = tls_dir
        self.workdir = Path(workdir)
        if self._user is not None and not self._reachable(self.workdir):
            # e.g. under pytest's 0700 temp root: the server user could not reach it
            self.workdir = Path(tempfile.mkdtemp(prefix="dworkers-postgresql-"))
        self.data = self.workdir / "pgdata"
        self.sockets = self.workdir / "sockets"
        self.port = port or free_port()
        self.password = password or secrets.token_urlsafe(16)
        self.bin = server_bin_dir()
        self.process: subprocess.Popen | None = None

    @staticmethod
    def _reachable(path: Path) -> bool:
        """Whether every existing parent lets others through."""
        for parent in [path, *path.parents]:
            if parent.exists() and not parent.stat().st_mode & 0o001:
                return False
        return True

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def _as_server_user(self, command: list[str]) -> list[str]:
        """The command run as the server user. setpriv switches user after exec:
        Popen's own user= forks (not vfork) and a forked copy of a process with
        gRPC threads can crash before it execs."""
        if self._user is None:
            return command
        return ["setpriv", f"--reuid={self._user.pw_uid}", f"--regid={self._user.pw_gid}", "--clear-groups",
                "--", *command]

    def _own(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        if self._user is not None:
            os.chown(path, self._user.pw_uid, self._user.pw_gid)

    def _initdb(self) -> None:
        self._own(self.workdir)
        self._own(self.sockets)
        password_file = self.workdir / "password"
        password_file.write_text(self.password)
        if self._user is not None:
            os.chown(password_file, self._user.pw_uid, self._user.pw_gid)
        password_file.chmod(0o600)
        subprocess.run(self._as_server_user([str(self.bin / "initdb"), "-D", str(self.data), "-U", SUPERUSER,
                                             "--auth=scram-sha-256", f"--pwfile={password_file}", "-E", "UTF8",
                                             "--locale=C.UTF-8"]),
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        password_file.unlink()

    def start(self, timeout: float = 60.0) -> PostgreSQLServer:
        """Starts the server; a start right after a crash that fails is tried
        once more (as a supervisor would)."""
        try:
            return self._start(timeout)
        except RuntimeError:
            time.sleep(1.0)
            return self._start(timeout)

    def _start(self, timeout: float) -> PostgreSQLServer:
        if not (self.data / "PG_VERSION").exists():
            self._initdb()
        log = open(self.workdir / "postgresql.log", "ab")
        if self._user is not None:
            os.chown(self.workdir / "postgresql.log", self._user.pw_uid, self._user.pw_gid)
        self.process = subprocess.Popen(
            self._as_server_user([str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
                                  "-h", "127.0.0.1", "-k", str(self.sockets), "-c", "max_connections=200",
                                  "-c", "shared_buffers=128MB", "-c", "log_min_messages=warning",
                                  *self._tls_options()]),
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"PostgreSQL exited with {self.process.returncode}; its log ends:\n"
                                   + self._log_tail())
            if self._ready():
                return self
            time.sleep(0.1)
        self.stop(kill=True)
        raise TimeoutError(f"PostgreSQL did not start within {timeout:.0f} s")

    def _tls_options(self) -> list[str]:
        if self.tls_dir is None:
            return []
        # The server reads its key only if the server user owns it, unreadable by others.
        for name in ("server.pem", "server-key.pem"):
            copy = self.workdir / name
            copy.write_bytes((self.tls_dir / name).read_bytes())
            copy.chmod(0o600)
            if self._user is not None:
                os.chown(copy, self._user.pw_uid, self._user.pw_gid)
        return ["-c", "ssl=on", "-c", f"ssl_cert_file={self.workdir / 'server.pem'}",
                "-c", f"ssl_key_file={self.workdir / 'server-key.pem'}"]

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join((self.workdir / "postgresql.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError as error:
            return f"(no log: {error})"

    def _ready(self) -> bool:
        pg_isready = self.bin / "pg_isready"
        if not pg_isready.exists():
            pg_isready = Path(shutil.which("pg_isready") or "pg_isready")
        result = subprocess.run([str(pg_isready), "-q", "-h", "127.0.0.1", "-p", str(self.port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return result.returncode == 0

    def stop(self, kill: bool = False) -> None:
        """A fast shutdown (SIGINT), or kill -9 (crash recovery on next start)."""
        if self.process is None or self.process.poll() is not None:
            return
        group = self.process.pid
        if kill:
            os.killpg(group, 9)  # the postmaster and its backends, as a crash would
        else:
            self.process.send_signal(2)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(group, 9)
            self.process.wait(timeout=10)
        deadline = time.monotonic() + 10  # its backends too: a new server must not meet them
        while time.monotonic() < deadline:
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)

    def remove(self) -> None:
        """Stops the server and deletes its data."""
        self.stop(kill=True)
        shutil.rmtree(self.workdir, ignore_errors=True)
