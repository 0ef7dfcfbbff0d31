"""Retention on the embedded log: compaction (the latest record of each key) and expiry (`retention.ms`),
each run on a worker thread as the topic's `cleanup.policy` says.
"""

from __future__ import annotations

import json
import sqlite3

from services.runtime.embedded.records import load_topic
from services.runtime.embedded.schema import transaction


def compact_topic(conn: sqlite3.Connection, topic: str) -> int:
    load_topic(conn, topic)
    with transaction(conn):
        deleted = conn.execute(
            "DELETE FROM records WHERE topic = ?1 AND key IS NOT NULL AND (part, key, record_offset) NOT IN"
            " (SELECT part, key, max(record_offset) FROM records WHERE topic = ?1 AND key IS NOT NULL"
            " GROUP BY part, key)",
            (topic,),
        ).rowcount
    conn.execute("PRAGMA incremental_vacuum")
    return deleted


def expire_topic(conn: sqlite3.Connection, topic: str, now_ms: int) -> int:
    retention = int(load_topic(conn, topic).config.get("retention.ms", "-1"))
    if retention < 0:
        return 0
    with transaction(conn):
        deleted = conn.execute(
            "DELETE FROM records WHERE topic = ? AND timestamp_ms < ?", (topic, now_ms - retention)
        ).rowcount
        conn.execute(
            "UPDATE partitions SET log_start = coalesce((SELECT min(record_offset) FROM records AS r"
            " WHERE r.topic = partitions.topic AND r.part = partitions.part), log_end) WHERE topic = ?",
            (topic,),
        )
    conn.execute("PRAGMA incremental_vacuum")
    return deleted


def cleanup_policies(conn: sqlite3.Connection) -> list[tuple[str, list[str]]]:
    rows = conn.execute("SELECT name, config FROM topics ORDER BY name").fetchall()
    return [(name, json.loads(config).get("cleanup.policy", "delete").split(",")) for name, config in rows]
