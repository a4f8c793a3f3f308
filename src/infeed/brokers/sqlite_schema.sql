-- Schema of the sqlite:// broker. Its version is PRAGMA user_version (SCHEMA_VERSION in sqlite.py).
-- Loaded statement by statement (sqlite3.complete_statement) inside one BEGIN IMMEDIATE transaction.

CREATE TABLE topics (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL
);

-- One row per partition. `id` is the partition's global number: messages.id holds it in its high
-- bits, so a partition's messages are one contiguous rowid range of one B-tree (no second index).
CREATE TABLE partitions (
    id INTEGER PRIMARY KEY,
    topic_id INTEGER NOT NULL,
    part INTEGER NOT NULL,
    low INTEGER NOT NULL DEFAULT 0,   -- smallest offset still held (offsets in [low, high) all exist)
    high INTEGER NOT NULL DEFAULT 0,  -- next offset to write
    UNIQUE (topic_id, part)
);

-- id = (partitions.id << 42) | offset. headers: JSON object text, NULL when empty.
CREATE TABLE messages (
    id INTEGER PRIMARY KEY,
    msg_key BLOB,
    headers TEXT,
    payload BLOB NOT NULL,
    ts REAL NOT NULL
);

-- AUTOINCREMENT: ids of deleted groups are never reused, so a consumer of a deleted topic fails
-- with TopicNotFoundError instead of reading a new topic of the same name.
CREATE TABLE consumer_groups (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic_id INTEGER NOT NULL,
    name TEXT NOT NULL,
    UNIQUE (topic_id, name)
);

-- A group's state on one partition: the delivery cursor (next never-delivered offset) and the
-- committed resume offset, kept apart (committing never acks; acking never commits).
CREATE TABLE group_partitions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    group_id INTEGER NOT NULL,
    pid INTEGER NOT NULL,
    cursor INTEGER NOT NULL,
    committed INTEGER,
    UNIQUE (group_id, pid)
);
CREATE INDEX group_partitions_pid ON group_partitions (pid);

-- Delivered-but-unacked messages as ranges [start, stop) of offsets of one group partition, all
-- below its cursor and disjoint: one row per receive batch, so a batch costs one row to lease and
-- one to ack. A row with an owner is leased until `deadline` (wall clock) to the holder of
-- `token` (the deliveries' receipt); a row with deadline 0 and no owner or token was given back
-- (nack, consumer close) and is due at once. `deliveries` counts deliveries so far. Acking part of
-- a range splits it.
CREATE TABLE leases (
    gp INTEGER NOT NULL,
    start INTEGER NOT NULL,
    stop INTEGER NOT NULL,
    token INTEGER,
    owner INTEGER,
    deadline REAL NOT NULL,
    deliveries INTEGER NOT NULL,
    PRIMARY KEY (gp, start)
) WITHOUT ROWID;
-- The redelivery scan (deadline <= now) and the next-expiry probe (min(deadline)) per partition.
CREATE INDEX leases_due ON leases (gp, deadline);
