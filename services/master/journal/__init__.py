"""The master's event journal: the contract, its ZooKeeper implementation and
the group committer that feeds it."""

from dworkers.master.journal.committer import MAX_BATCH_BYTES, GroupCommitter
from dworkers.master.journal.contract import FencedError, Journal, JournalError
from dworkers.master.journal.postgresql import PostgreSQLJournal
from dworkers.master.journal.zookeeper import ZooKeeperJournal

__all__ = ["MAX_BATCH_BYTES", "FencedError", "GroupCommitter", "Journal", "JournalError", "PostgreSQLJournal",
           "ZooKeeperJournal"]
