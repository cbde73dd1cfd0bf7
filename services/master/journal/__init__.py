"""The master's event journal: the contract, its ZooKeeper implementation and
the group committer that feeds it."""

from services.master.journal.committer import MAX_BATCH_BYTES, GroupCommitter
from services.master.journal.contract import FencedError, Journal, JournalError
from services.master.journal.postgresql import PostgreSQLJournal
from services.master.journal.zookeeper import ZooKeeperJournal

__all__ = ["MAX_BATCH_BYTES", "FencedError", "GroupCommitter", "Journal", "JournalError", "PostgreSQLJournal",
           "ZooKeeperJournal"]
