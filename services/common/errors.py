"""One error tree. Every failure a caller is told about is a DworkersError
whose class names its gRPC status (one table, `STATUS`); servers turn them
into statuses in one place (services/common/server.py), clients turn
statuses back into them (`from_rpc_error`). The message is for a person.
"""

from __future__ import annotations

import grpc

# Trailing metadata keys of the statuses below (machine-readable hints).
MASTER_KEY = "dworkers-master"  # a standby's hint: the active master's address
UNREACHABLE_KEY = "dworkers-zookeeper-unreachable"  # retrying elsewhere cannot help: fail fast


class DworkersError(Exception):
    """The root. `status` is the name of the gRPC status code it maps to."""

    status = "UNKNOWN"

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message

    def trailers(self) -> tuple[tuple[str, str], ...]:
        """Trailing metadata that goes with the status (machine-readable hints)."""
        return ()

    def details(self) -> list:
        """Protobuf messages sent as the status's structured details."""
        return []


class InvalidInput(DworkersError):
    """The request is malformed: nothing was changed."""

    status = "INVALID_ARGUMENT"


class ProtocolError(InvalidInput):
    """A worker broke the worker protocol: its stream is closed."""


class Conflict(DworkersError):
    """A known work id was submitted again with a different kind or payload."""

    status = "ALREADY_EXISTS"


class NotFound(DworkersError):
    status = "NOT_FOUND"


class WrongState(DworkersError):
    """The work is not in a state the call can act on (the message names it)."""

    status = "FAILED_PRECONDITION"


class Forgotten(DworkersError):
    """What was asked for left the retention window."""

    status = "OUT_OF_RANGE"


class Overloaded(DworkersError):
    """A bound was reached: retry later (the message says which bound)."""

    status = "RESOURCE_EXHAUSTED"


class Unauthenticated(DworkersError):
    """No credentials, or none this server knows."""

    status = "UNAUTHENTICATED"


class PermissionDenied(DworkersError):
    """Known credentials without the role the call needs."""

    status = "PERMISSION_DENIED"


class NotServing(DworkersError):
    """This backend cannot act now (electing, recovering, stepped down):
    another one, or this one a little later, can."""

    status = "UNAVAILABLE"


class CutOff(NotServing):
    """Cut off from ZooKeeper: no backend can be sure it leads, so callers
    should fail fast rather than retry elsewhere until their deadline."""

    def trailers(self) -> tuple[tuple[str, str], ...]:
        return ((UNREACHABLE_KEY, "1"),)


class NotTheMaster(DworkersError):
    """A standby was asked: the active master is elsewhere. The address (and
    its epoch) also travel as structured details (dworkers.v1.ActiveMaster in
    google.rpc.Status) and, for simple clients, in `dworkers-master` metadata."""

    status = "FAILED_PRECONDITION"

    def __init__(self, address: str, epoch: int = 0) -> None:
        super().__init__(f"this backend is a standby; the active master is at {address}")
        self.address = address
        self.epoch = epoch

    def trailers(self) -> tuple[tuple[str, str], ...]:
        return ((MASTER_KEY, self.address),)

    def details(self) -> list:
        from dworkers.v1 import master_pb2

        return [master_pb2.ActiveMaster(address=self.address, epoch=self.epoch)]


class WrongShard(DworkersError):
    """The work belongs to another shard (the caller routed with an older
    shard map): route it again with the current map."""

    status = "ABORTED"


class NoMaster(NotServing):
    """No master answered within the caller's deadline."""


class TimedOut(DworkersError):
    """The answer did not come within the caller's deadline."""

    status = "DEADLINE_EXCEEDED"


class ConfigError(DworkersError):
    """A setting or command line that cannot work: said in one line."""

    status = "INVALID_ARGUMENT"



# The status table, the other way: a status (from another process) as the
# error a caller here would have raised.
BY_STATUS = {cls.status: cls for cls in (InvalidInput, Conflict, NotFound, Forgotten, Overloaded, NotServing,
                                        TimedOut, WrongState, Unauthenticated, PermissionDenied, WrongShard)}


def status_name(code: int) -> str:
    """A google.rpc.Code number's name (e.g. 6 -> ALREADY_EXISTS)."""
    return _STATUS_NAMES.get(code, "UNKNOWN")


_STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def from_status(status: str, message: str) -> DworkersError:
    """The error for a status name (e.g. a refused work in SubmitWorksResponse)."""
    cls = BY_STATUS.get(status)
    if cls is not None:
        return cls(message)
    error = DworkersError(message)
    error.status = status
    return error
