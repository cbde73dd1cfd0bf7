"""Names shared on the wire between the services (gRPC metadata keys, limits)."""

from dworkers.common.errors import MASTER_KEY as MASTER_KEY  # the error statuses' keys, named here too
from dworkers.common.errors import UNREACHABLE_KEY as UNREACHABLE_KEY
from dworkers.common.errors import ConfigError

EPOCH_KEY = "dworkers-epoch"  # the master's epoch, on every reply
CLUSTER_KEY = "dworkers-cluster"  # the cluster id its epoch belongs to
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # a batch of works fits in one message

SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),  # a second server on a busy address must fail, not share it
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_concurrent_streams", 1000),
]
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1_000),
]


class AddressInUse(ConfigError):
    """A server could not listen on its address."""


def listen(server, address: str, credentials=None) -> int:
    """Binds a gRPC server (sync or asyncio) to `address` (TLS with
    `credentials`); returns the port."""
    try:
        if credentials is not None:
            return server.add_secure_port(address, credentials)
        return server.add_insecure_port(address)
    except RuntimeError:
        raise AddressInUse(f"cannot listen on {address}: the address is in use or not available") from None


def metadata_value(metadata, key: str) -> str | None:
    for k, v in metadata or ():
        if k == key:
            return v if isinstance(v, str) else v.decode()
    return None
