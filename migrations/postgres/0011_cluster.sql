-- Several daemons on one registry (issue #16): who runs, and leases.
-- Times are milliseconds since the epoch, read from the database's clock
-- (never a daemon's), so daemons with skewed clocks agree on expiry.

-- Each daemon, with its heartbeat; seen dead after a few missed beats.
CREATE TABLE daemons (
    id TEXT PRIMARY KEY NOT NULL,
    master TEXT NOT NULL,
    version TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL
);

-- A lease: one holder at a time until expires_at; epoch grows at every new
-- tenure (the fencing token a holder's writes carry).
CREATE TABLE leases (
    name TEXT PRIMARY KEY NOT NULL,
    holder TEXT NOT NULL,
    epoch BIGINT NOT NULL CHECK (epoch > 0),
    acquired_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);

-- Where each minion is: the master whose bus last saw it (its start event,
-- an accepted auth, a job return), through which daemon, and when.
CREATE TABLE minion_presence (
    minion_id TEXT PRIMARY KEY NOT NULL,
    master TEXT NOT NULL,
    daemon_id TEXT NOT NULL,
    seen_by TEXT NOT NULL,
    seen_at BIGINT NOT NULL
);

-- A run's lease: the daemon running it, until when (its end is due by then:
-- the job's timeout and a margin), and the epoch that fences its result
-- (one more at every claim). A run whose lease lapsed (its daemon died) is
-- due again with its jid kept in orphan_jid: the next holder looks that job
-- up first and, if the minion never returned, publishes it again under the
-- same jid (a minion drops a jid it already ran).
ALTER TABLE dispatch_targets ADD COLUMN lease_holder TEXT;
ALTER TABLE dispatch_targets ADD COLUMN lease_until BIGINT;
ALTER TABLE dispatch_targets ADD COLUMN lease_epoch BIGINT NOT NULL DEFAULT 0;
ALTER TABLE dispatch_targets ADD COLUMN orphan_jid TEXT;
