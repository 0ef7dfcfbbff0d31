"""The embedded log: the log interface (services.runtime.log) on one SQLite file, for a one-machine install.

Everything lives in `<data_dir>/log.sqlite3`, in WAL mode, so readers never block the writer and several
processes (the three stages, an ops command) can share it. The package, along its seams:

    files.py      the data directory and database files, private to their owner
    schema.py     the tables, opening a connection, one transaction, EmbeddedLogError
    worker.py     the thread (one connection each) the blocking SQLite calls run on; in-process wake-ups
    records.py    partitioning, appending and reading records; the producer
    groups.py     consumer groups: membership, assignment, hand-over, committed offsets; the consumer
    retention.py  compaction and expiry
    log.py        EmbeddedLog, which puts them together behind the log interface

Durability: an append is one SQLite transaction, committed before `send` returns. With WAL, COMMIT has
write()n the frames to the -wal file before it returns, so a kill -9 of the process cannot lose them
(the kernel holds those pages): `synchronous=NORMAL` would be enough for that. The default is `FULL`,
which also fsyncs the WAL at every commit, so a power cut cannot lose a record either: on one office
machine there is no replica, and the fetcher deletes the mail from the POP3 server once `send` returned.
Concurrent sends on one producer are committed together (group commit) to share that fsync.

Semantics follow Kafka (records.py, groups.py). Errors: EmbeddedLogError, a LogError (schema.py).
"""

from services.runtime.embedded.files import (
    DATA_DIR_MODE,
    DB_FILE_MODE,
    DB_NAME,
    readable_by_others,
    warn_if_readable_by_others,
)
from services.runtime.embedded.groups import (
    MAX_POLL_INTERVAL,
    MEMBER_TIMEOUT,
    EmbeddedConsumer,
    Member,
    assign,
)
from services.runtime.embedded.log import POLL_INTERVAL, EmbeddedLog
from services.runtime.embedded.records import FETCH_MAX_BYTES, EmbeddedProducer, partition_for_key
from services.runtime.embedded.schema import SCHEMA_VERSION, EmbeddedLogError, Synchronous
from services.runtime.embedded.worker import Clock

__all__ = [
    "DATA_DIR_MODE",
    "DB_FILE_MODE",
    "DB_NAME",
    "FETCH_MAX_BYTES",
    "MAX_POLL_INTERVAL",
    "MEMBER_TIMEOUT",
    "POLL_INTERVAL",
    "SCHEMA_VERSION",
    "Clock",
    "EmbeddedConsumer",
    "EmbeddedLog",
    "EmbeddedLogError",
    "EmbeddedProducer",
    "Member",
    "Synchronous",
    "assign",
    "partition_for_key",
    "readable_by_others",
    "warn_if_readable_by_others",
]
