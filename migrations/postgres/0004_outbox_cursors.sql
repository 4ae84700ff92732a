-- Several consumers read the outbox (issue #10 §5): one cursor each, the id of
-- the last entry the consumer is done with; rows it cannot read or act on are
-- copied here with the reason and passed; rows every cursor has passed are
-- pruned. `processed_at` (one consumer) is replaced by the `notify` cursor.
CREATE TABLE outbox_cursors (
    consumer   TEXT    PRIMARY KEY,
    position   BIGINT  NOT NULL,
    updated_at BIGINT  NOT NULL
);

CREATE TABLE outbox_quarantine (
    consumer  TEXT    NOT NULL,
    outbox_id BIGINT  NOT NULL,
    kind      TEXT    NOT NULL,
    payload   TEXT    NOT NULL,
    reason    TEXT    NOT NULL,
    at        BIGINT  NOT NULL,
    PRIMARY KEY (consumer, outbox_id)
);

-- The bus notifier goes on where processed_at left off: before the oldest
-- unprocessed entry, or after the last one.
INSERT INTO outbox_cursors (consumer, position, updated_at)
SELECT 'notify',
       COALESCE((SELECT MIN(id) - 1 FROM outbox WHERE processed_at IS NULL),
                (SELECT MAX(id) FROM outbox),
                0),
       0
WHERE EXISTS (SELECT 1 FROM outbox);

DROP INDEX outbox_pending_idx;
ALTER TABLE outbox DROP COLUMN processed_at;
