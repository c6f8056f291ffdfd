"""The core component's schema of the libSQL structured-data store, version by version.

Never edit a version that was released: add a new one (the registry reports drift).
Times are ISO-8601 UTC text with milliseconds (``2025-11-07T18:00:00.000Z``), so they sort.
Message and fact tables keep an ``INTEGER PRIMARY KEY`` (the rowid) because their FTS5
indexes point at it and a VACUUM may renumber implicit rowids.
"""

from __future__ import annotations

from schemas.registry import REGISTRY, SchemaVersion

V1_BUS_AND_CONVERSATIONS = SchemaVersion(
    version=1,
    name="bus tracking, users, conversations, logs, tasks, sessions",
    statements=(
        # The worker's log position and its outbox, written in the same transaction as the data.
        """CREATE TABLE worker_position (
            worker TEXT PRIMARY KEY,
            seq INTEGER NOT NULL)""",
        """CREATE TABLE outbox (
            seq INTEGER PRIMARY KEY,
            items BLOB NOT NULL)""",
        """CREATE TABLE users (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            nickname TEXT NOT NULL DEFAULT '',
            user_type TEXT NOT NULL DEFAULT 'person',
            metadata TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(metadata)),
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL)""",
        """CREATE TABLE conversations (
            id TEXT PRIMARY KEY,
            user_id TEXT NOT NULL,
            title TEXT NOT NULL DEFAULT '',
            metadata TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(metadata)),
            started_at TEXT NOT NULL)""",
        "CREATE INDEX idx_conversations_user ON conversations(user_id, started_at)",
        """CREATE TABLE messages (
            seq INTEGER PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            user_id TEXT NOT NULL,
            role TEXT NOT NULL,
            text TEXT NOT NULL,
            timestamp TEXT NOT NULL,
            sentiment REAL,
            metadata TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(metadata)))""",
        "CREATE INDEX idx_messages_conversation ON messages(conversation_id, timestamp, seq)",
        "CREATE INDEX idx_messages_user ON messages(user_id, timestamp)",
        """CREATE TABLE logs (
            id TEXT PRIMARY KEY,
            timestamp TEXT NOT NULL,
            level TEXT NOT NULL,
            module TEXT NOT NULL DEFAULT '',
            message TEXT NOT NULL,
            user_id TEXT NOT NULL DEFAULT '',
            session_id TEXT NOT NULL DEFAULT '',
            trace_id TEXT NOT NULL DEFAULT '',
            extra TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(extra)))""",
        "CREATE INDEX idx_logs_timestamp ON logs(timestamp)",
        "CREATE INDEX idx_logs_level ON logs(level, timestamp)",
        """CREATE TABLE tasks (
            id TEXT PRIMARY KEY,
            user_id TEXT NOT NULL DEFAULT '',
            name TEXT NOT NULL,
            task_type TEXT NOT NULL DEFAULT '',
            schedule TEXT NOT NULL DEFAULT '',
            config TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(config)),
            status TEXT NOT NULL,
            enabled INTEGER NOT NULL DEFAULT 1,
            result TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(result)),
            error TEXT NOT NULL DEFAULT '',
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL)""",
        "CREATE INDEX idx_tasks_status ON tasks(status, updated_at)",
        """CREATE TABLE session_metadata (
            id TEXT PRIMARY KEY,
            user_id TEXT NOT NULL,
            conversation_id TEXT NOT NULL DEFAULT '',
            status TEXT NOT NULL,
            started_at TEXT NOT NULL,
            ended_at TEXT,
            summary TEXT NOT NULL DEFAULT '',
            metadata TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(metadata)))""",
        "CREATE INDEX idx_sessions_user ON session_metadata(user_id, started_at)",
    ),
    rollback=(
        "DROP TABLE session_metadata",
        "DROP TABLE tasks",
        "DROP TABLE logs",
        "DROP TABLE messages",
        "DROP TABLE conversations",
        "DROP TABLE users",
        "DROP TABLE outbox",
        "DROP TABLE worker_position",
    ),
)

V2_FACTS_FEEDBACK_CONSOLIDATION = SchemaVersion(
    version=2,
    name="semantic facts with temporal metadata, feedback events, consolidation state",
    statements=(
        # temporal_metadata (JSON, as in AICO's AMS): created_at, last_updated, last_accessed,
        # access_count, confidence, version, superseded_by, supersedes.
        """CREATE TABLE semantic_facts (
            seq INTEGER PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            user_id TEXT NOT NULL,
            text TEXT NOT NULL,
            fact_type TEXT NOT NULL DEFAULT '',
            category TEXT NOT NULL DEFAULT '',
            metadata TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(metadata)),
            temporal_metadata TEXT NOT NULL CHECK (json_valid(temporal_metadata)))""",
        """CREATE INDEX idx_semantic_facts_current ON semantic_facts(
            user_id, json_extract(temporal_metadata, '$.superseded_by'))""",
        """CREATE INDEX idx_semantic_facts_temporal ON semantic_facts(
            json_extract(temporal_metadata, '$.last_accessed'),
            json_extract(temporal_metadata, '$.confidence'))""",
        """CREATE INDEX idx_semantic_facts_superseded ON semantic_facts(
            json_extract(temporal_metadata, '$.superseded_by'))""",
        """CREATE TABLE feedback_events (
            id TEXT PRIMARY KEY,
            user_id TEXT NOT NULL,
            event_type TEXT NOT NULL,
            message_id TEXT NOT NULL DEFAULT '',
            skill_id TEXT NOT NULL DEFAULT '',
            reward INTEGER NOT NULL DEFAULT 0 CHECK (reward IN (-1, 0, 1)),
            reason TEXT NOT NULL DEFAULT '',
            free_text TEXT NOT NULL DEFAULT '',
            classified_categories TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(classified_categories)),
            metadata TEXT NOT NULL DEFAULT '{}' CHECK (json_valid(metadata)),
            timestamp TEXT NOT NULL,
            processed INTEGER NOT NULL DEFAULT 0)""",
        "CREATE INDEX idx_feedback_user ON feedback_events(user_id, timestamp)",
        "CREATE INDEX idx_feedback_processed ON feedback_events(processed)",
        """CREATE TABLE consolidation_state (
            id TEXT PRIMARY KEY,
            state_json TEXT NOT NULL CHECK (json_valid(state_json)),
            updated_at TEXT NOT NULL)""",
        "CREATE INDEX idx_consolidation_state_updated ON consolidation_state(updated_at DESC)",
    ),
    rollback=(
        "DROP TABLE consolidation_state",
        "DROP TABLE feedback_events",
        "DROP TABLE semantic_facts",
    ),
)

_FTS_OPTIONS = "tokenize = 'unicode61 remove_diacritics 2'"

V3_FULL_TEXT = SchemaVersion(
    version=3,
    name="FTS5 full-text indexes over messages and facts",
    statements=(
        f"CREATE VIRTUAL TABLE messages_fts USING fts5(text, content='messages', content_rowid='seq', "
        f"{_FTS_OPTIONS})",
        """CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN
            INSERT INTO messages_fts(rowid, text) VALUES (new.seq, new.text);
        END""",
        """CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN
            INSERT INTO messages_fts(messages_fts, rowid, text) VALUES ('delete', old.seq, old.text);
        END""",
        """CREATE TRIGGER messages_fts_update AFTER UPDATE OF text ON messages BEGIN
            INSERT INTO messages_fts(messages_fts, rowid, text) VALUES ('delete', old.seq, old.text);
            INSERT INTO messages_fts(rowid, text) VALUES (new.seq, new.text);
        END""",
        "INSERT INTO messages_fts(messages_fts) VALUES ('rebuild')",
        f"CREATE VIRTUAL TABLE facts_fts USING fts5(text, content='semantic_facts', content_rowid='seq', "
        f"{_FTS_OPTIONS})",
        """CREATE TRIGGER facts_fts_insert AFTER INSERT ON semantic_facts BEGIN
            INSERT INTO facts_fts(rowid, text) VALUES (new.seq, new.text);
        END""",
        """CREATE TRIGGER facts_fts_delete AFTER DELETE ON semantic_facts BEGIN
            INSERT INTO facts_fts(facts_fts, rowid, text) VALUES ('delete', old.seq, old.text);
        END""",
        """CREATE TRIGGER facts_fts_update AFTER UPDATE OF text ON semantic_facts BEGIN
            INSERT INTO facts_fts(facts_fts, rowid, text) VALUES ('delete', old.seq, old.text);
            INSERT INTO facts_fts(rowid, text) VALUES (new.seq, new.text);
        END""",
        "INSERT INTO facts_fts(facts_fts) VALUES ('rebuild')",
    ),
    rollback=(
        "DROP TRIGGER facts_fts_update",
        "DROP TRIGGER facts_fts_delete",
        "DROP TRIGGER facts_fts_insert",
        "DROP TABLE facts_fts",
        "DROP TRIGGER messages_fts_update",
        "DROP TRIGGER messages_fts_delete",
        "DROP TRIGGER messages_fts_insert",
        "DROP TABLE messages_fts",
    ),
)

CORE = REGISTRY.register(
    "core", [V1_BUS_AND_CONVERSATIONS, V2_FACTS_FEEDBACK_CONSOLIDATION, V3_FULL_TEXT], kind="core", priority=1
)
