-- Registry schema, SQLite flavour. Keep in step with migrations/postgres/0001_registry.sql:
-- same tables, columns, constraints and names; only the types differ.
-- Never edit this file once shipped: add a new numbered migration instead.
-- Timestamps are Unix milliseconds; lists are JSON arrays stored as TEXT.
-- Room is left for the inventory of a later issue (port forwards, hostname
-- forwards, backups, samba shares): each gets its own table in 0002_*, with a
-- foreign key to servers(id).

CREATE TABLE models (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT    NOT NULL CONSTRAINT models_name_key UNIQUE,
    description TEXT    NOT NULL DEFAULT '',
    states      TEXT    NOT NULL DEFAULT '[]',
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);

-- Foreign keys are NO ACTION (not RESTRICT): the same refusal here, and SQLite
-- then reports it as a foreign-key error rather than a trigger error.
CREATE TABLE servers (
    id                 INTEGER PRIMARY KEY AUTOINCREMENT,
    name               TEXT    NOT NULL CONSTRAINT servers_name_key UNIQUE,
    model_id           INTEGER NOT NULL REFERENCES models (id),
    minion_id          TEXT    NOT NULL CONSTRAINT servers_minion_id_key UNIQUE,
    key_fingerprint    TEXT,
    status             TEXT    NOT NULL DEFAULT 'created'
        CONSTRAINT servers_status_check
        CHECK (status IN ('created', 'keys-issued', 'pending', 'registered', 'online', 'offline')),
    is_vm              INTEGER NOT NULL DEFAULT 0 CHECK (is_vm IN (0, 1)),
    vm_host            INTEGER REFERENCES servers (id),
    external_ip        TEXT,
    internal_ip        TEXT,
    is_proxmox_host    INTEGER NOT NULL DEFAULT 0 CHECK (is_proxmox_host IN (0, 1)),
    proxmox_node       TEXT,
    external_interface TEXT,
    nginx_proxy        INTEGER REFERENCES servers (id),
    samba_managed      INTEGER NOT NULL DEFAULT 0 CHECK (samba_managed IN (0, 1)),
    samba_base_folder  TEXT,
    users              TEXT    NOT NULL DEFAULT '[]',
    created_at         INTEGER NOT NULL,
    updated_at         INTEGER NOT NULL,
    CONSTRAINT servers_vm_host_check CHECK (vm_host IS NULL OR (is_vm = 1 AND vm_host <> id)),
    CONSTRAINT servers_nginx_proxy_check CHECK (nginx_proxy IS NULL OR nginx_proxy <> id)
);

-- Foreign-key checks on delete look these up.
CREATE INDEX servers_model_id_idx ON servers (model_id);
CREATE INDEX servers_vm_host_idx ON servers (vm_host);
CREATE INDEX servers_nginx_proxy_idx ON servers (nginx_proxy);

-- server_id is not a foreign key: the row announcing a deletion outlives the server.
CREATE TABLE outbox (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    kind         TEXT    NOT NULL,
    server_id    INTEGER,
    payload      TEXT    NOT NULL,
    created_at   INTEGER NOT NULL,
    processed_at INTEGER
);

CREATE INDEX outbox_pending_idx ON outbox (id) WHERE processed_at IS NULL;
