-- The inventory dispatcher's outbox cursor exists from the start, so rows
-- written before the daemon first ran it (CLI changes) are never pruned
-- unread: pruning waits for every cursor.
INSERT INTO outbox_cursors (consumer, position, updated_at)
VALUES ('dispatch', 0, 0)
ON CONFLICT (consumer) DO NOTHING;
