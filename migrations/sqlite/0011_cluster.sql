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
