"""A standalone ZooKeeper server run from Debian's package jar.

Used by `dworkers demo` (an embedded local ZooKeeper) and by the test suite
(a real server on a free port with a temporary data dir).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

ZOOKEEPER_JAR = "/usr/share/java/zookeeper.jar"
SLF4J_BINDING = "/usr/share/java/slf4j-simple.jar"
# The TLS port's Netty needs its codec, which Debian's zookeeper.jar leaves
# off its manifest's class path.
NETTY_CODEC = "/usr/share/java/netty-codec.jar"


class ZooKeeperNotInstalled(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def four_letter_word(port: int, word: str, timeout: float = 1.0, host: str = "127.0.0.1") -> str:
    """Sends a ZooKeeper four-letter command; returns its answer ('' if none)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(word.encode())
            chunks = []
            while True:
                data = s.recv(4096)
                if not data:
                    break
                chunks.append(data)
            return b"".join(chunks).decode(errors="replace")
    except OSError:
        return ""


class ZooKeeperServer:
    """One standalone server: start(), stop() (kill -9 or clean), start again
    on the same data dir, and hosts for clients."""

    def __init__(self, workdir: str | Path, port: int | None = None, tick_ms: int = 500,
                 address: str = "127.0.0.1", heap_mb: int = 512, tls_dir: Path | None = None):
        """`tls_dir`: certificates from `dworkers dev-certs`; the server then
        also serves TLS on `secure_port` (`secure_hosts`), with server.pem."""
        self.workdir = Path(workdir)
        self.address = address
        self.port = port or free_port()
        self.tls_dir = tls_dir
        self.secure_port = free_port() if tls_dir is not None else 0
        self.tick_ms = tick_ms
        self.heap_mb = heap_mb  # as deploy/ gives ZooKeeper
        self.process: subprocess.Popen | None = None

    @property
    def hosts(self) -> str:
        return f"{self.address}:{self.port}"

    @property
    def secure_hosts(self) -> str:
        return f"localhost:{self.secure_port}"  # a name its certificate carries

    def _write_config(self) -> Path:
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "zoo.cfg"
        cfg.write_text(
            f"tickTime={self.tick_ms}\n"
            f"dataDir={data}\n"
            f"clientPortAddress={self.address}\n"
            f"clientPort={self.port}\n"
            # sessions from 2 ticks up to 60 s
            f"maxSessionTimeout=60000\n"
            "admin.enableServer=false\n"
            "4lw.commands.whitelist=ruok,srvr,stat,mntr\n"
            # Old snapshots and transaction logs are deleted: the disk stays bounded.
            "autopurge.snapRetainCount=3\n"
            "autopurge.purgeInterval=1\n"
            # Journal batches are kept well below the default 1 MB limit.
            "jute.maxbuffer=1048575\n"
            + (self._tls_config() if self.tls_dir is not None else "")
        )
        return cfg

    def _tls_config(self) -> str:
        assert self.tls_dir is not None
        keystore = self.workdir / "keystore.pem"  # the key and its certificate, as ZooKeeper reads PEM
        keystore.write_bytes((self.tls_dir / "server-key.pem").read_bytes()
                             + (self.tls_dir / "server.pem").read_bytes())
        keystore.chmod(0o600)
        return (
            f"secureClientPort={self.secure_port}\n"
            f"secureClientPortAddress={self.address}\n"
            "serverCnxnFactory=org.apache.zookeeper.server.NettyServerCnxnFactory\n"
            f"ssl.keyStore.location={keystore}\n"
            "ssl.keyStore.type=PEM\n"
            f"ssl.trustStore.location={self.tls_dir / 'ca.pem'}\n"
            "ssl.trustStore.type=PEM\n"
            "ssl.clientAuth=want\n"
        )

    def start(self, timeout: float = 60.0) -> ZooKeeperServer:
        jar = os.environ.get("DWORKERS_ZOOKEEPER_JAR", ZOOKEEPER_JAR)
        java = shutil.which("java")
        if not os.path.exists(jar) or not java:
            raise ZooKeeperNotInstalled(
                f"ZooKeeper not found ({jar}); install Debian's zookeeper package "
                "(scripts/ensure-zookeeper.sh) or set DWORKERS_ZOOKEEPER_JAR"
            )
        cfg = self._write_config()
        classpath = ":".join([jar, *(p for p in (SLF4J_BINDING, NETTY_CODEC) if os.path.exists(p))])
        log = open(self.workdir / "zookeeper.log", "ab")
        self.process = subprocess.Popen(
            [java, f"-Xmx{self.heap_mb}m", "-XX:+UseSerialGC", "-cp", classpath,
             "org.apache.zookeeper.server.quorum.QuorumPeerMain", str(cfg)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"ZooKeeper exited with {self.process.returncode}; see {self.workdir / 'zookeeper.log'}"
                )
            if "Mode: standalone" in four_letter_word(self.port, "srvr", host=self.address):
                return self
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"ZooKeeper did not start within {timeout:.0f} s")

    def stop(self, kill: bool = False) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        if kill:
            self.process.kill()
        else:
            self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
