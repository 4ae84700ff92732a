-- The inventory that drives the infrastructure (issue #12): port forwards on
-- Proxmox hosts, hostname forwards on nginx proxies, and the dispatcher's
-- record of what each target should have and has. Keep in step with
-- migrations/postgres/0005_inventory.sql.

-- What NAT needs of a host besides its external interface: the internal
-- network to masquerade (CIDR text, validated by the service).
ALTER TABLE servers ADD COLUMN internal_network TEXT;

-- Parent keys of the composite foreign keys below: "the destination is a
-- guest of that host" and "the proxy is the destination's host's" hold in the
-- database whatever writes.
CREATE UNIQUE INDEX servers_id_vm_host_key ON servers (id, vm_host);
CREATE UNIQUE INDEX servers_id_nginx_proxy_key ON servers (id, nginx_proxy);

CREATE TABLE port_forwards (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    host_id     INTEGER NOT NULL REFERENCES servers (id),
    dest_id     INTEGER NOT NULL REFERENCES servers (id),
    proto       TEXT    NOT NULL CONSTRAINT port_forwards_proto_check CHECK (proto IN ('tcp', 'udp')),
    source_port INTEGER NOT NULL CONSTRAINT port_forwards_source_port_check CHECK (source_port BETWEEN 1 AND 65535),
    dest_port   INTEGER NOT NULL CONSTRAINT port_forwards_dest_port_check CHECK (dest_port BETWEEN 1 AND 65535),
    revision    INTEGER NOT NULL DEFAULT 1,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    CONSTRAINT port_forwards_host_proto_port_key UNIQUE (host_id, proto, source_port),
    CONSTRAINT port_forwards_guest_fkey FOREIGN KEY (dest_id, host_id) REFERENCES servers (id, vm_host)
);
CREATE INDEX port_forwards_dest_idx ON port_forwards (dest_id);

CREATE TABLE hostname_forwards (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    domain      TEXT    NOT NULL CONSTRAINT hostname_forwards_domain_check
        CHECK (domain = lower(domain) AND length(domain) BETWEEN 1 AND 253),
    dest_id     INTEGER NOT NULL REFERENCES servers (id),
    host_id     INTEGER NOT NULL REFERENCES servers (id),
    proxy_id    INTEGER NOT NULL REFERENCES servers (id),
    listen_port INTEGER NOT NULL DEFAULT 80 CONSTRAINT hostname_forwards_listen_port_check CHECK (listen_port BETWEEN 1 AND 65535),
    dest_port   INTEGER NOT NULL CONSTRAINT hostname_forwards_dest_port_check CHECK (dest_port BETWEEN 1 AND 65535),
    path        TEXT    NOT NULL DEFAULT '/' CONSTRAINT hostname_forwards_path_check CHECK (substr(path, 1, 1) = '/'),
    revision    INTEGER NOT NULL DEFAULT 1,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    CONSTRAINT hostname_forwards_proxy_domain_port_key UNIQUE (proxy_id, domain, listen_port),
    CONSTRAINT hostname_forwards_guest_fkey FOREIGN KEY (dest_id, host_id) REFERENCES servers (id, vm_host),
    CONSTRAINT hostname_forwards_proxy_fkey FOREIGN KEY (host_id, proxy_id) REFERENCES servers (id, nginx_proxy)
);
CREATE INDEX hostname_forwards_dest_idx ON hostname_forwards (dest_id);
CREATE INDEX hostname_forwards_host_idx ON hostname_forwards (host_id);

-- One row per (target server, state): what is wanted (desired, an outbox id),
-- what was applied, and where the worker is with it.
CREATE TABLE dispatch_targets (
    server_id        INTEGER NOT NULL REFERENCES servers (id) ON DELETE CASCADE,
    state            TEXT    NOT NULL,
    desired          INTEGER NOT NULL,
    applied          INTEGER NOT NULL DEFAULT 0,
    applied_hash     TEXT,
    status           TEXT    NOT NULL CONSTRAINT dispatch_targets_status_check
        CHECK (status IN ('pending', 'running', 'done', 'failed', 'waiting')),
    forced           INTEGER NOT NULL DEFAULT 0 CHECK (forced IN (0, 1)),
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  INTEGER NOT NULL,
    pending_since    INTEGER,
    running_revision INTEGER,
    started_at       INTEGER,
    last_jid         TEXT,
    last_summary     TEXT,
    last_error       TEXT,
    last_applied_at  INTEGER,
    updated_at       INTEGER NOT NULL,
    PRIMARY KEY (server_id, state)
);
CREATE INDEX dispatch_targets_due_idx ON dispatch_targets (next_attempt_at) WHERE status IN ('pending', 'failed');

-- Every run, kept for `dispatch show` and for counting.
CREATE TABLE dispatch_runs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    server_id   INTEGER NOT NULL REFERENCES servers (id) ON DELETE CASCADE,
    state       TEXT    NOT NULL,
    revision    INTEGER NOT NULL,
    jid         TEXT    NOT NULL,
    started_at  INTEGER NOT NULL,
    finished_at INTEGER,
    outcome     TEXT    CONSTRAINT dispatch_runs_outcome_check
        CHECK (outcome IS NULL OR outcome IN ('done', 'failed', 'interrupted')),
    summary     TEXT,
    error       TEXT
);
CREATE INDEX dispatch_runs_target_idx ON dispatch_runs (server_id, state, id);
