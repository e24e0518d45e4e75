-- keywarden: per-key usage analytics (SQLite): requests per key, hour (unix microseconds,
-- truncated to the hour) and outcome; rejections no key can be blamed for are counted per
-- collection ('' for credentials naming none). Written behind in batches; pruned by retention.
CREATE TABLE IF NOT EXISTS keywarden_usage_hourly (
    key_id  BLOB    NOT NULL CHECK (length(key_id) = 16),
    hour    INTEGER NOT NULL,
    outcome TEXT    NOT NULL,
    count   INTEGER NOT NULL CHECK (count >= 0),
    PRIMARY KEY (key_id, hour, outcome)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS keywarden_usage_hourly_hour_idx ON keywarden_usage_hourly (hour);

CREATE TABLE IF NOT EXISTS keywarden_collection_usage_hourly (
    collection TEXT    NOT NULL,
    hour       INTEGER NOT NULL,
    outcome    TEXT    NOT NULL,
    count      INTEGER NOT NULL CHECK (count >= 0),
    PRIMARY KEY (collection, hour, outcome)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS keywarden_collection_usage_hourly_hour_idx
    ON keywarden_collection_usage_hourly (hour);
