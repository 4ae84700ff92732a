-- Backups (issue #13): a backup server pulls a source's folder over SSH
-- (rsnapshot), and the results its wrapper reports. Keep in step with
-- migrations/postgres/0009_backups.sql.

-- Learnt from the states' reports: the backup server's SSH public key
-- (steward.backup) and the source's SSH host keys (steward.backup_source,
-- a JSON list of "type base64").
ALTER TABLE servers ADD COLUMN backup_pubkey TEXT;
ALTER TABLE servers ADD COLUMN ssh_host_keys TEXT;

CREATE TABLE backups (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    source_id        INTEGER NOT NULL REFERENCES servers (id),
    source_folder    TEXT    NOT NULL CONSTRAINT backups_source_folder_check
        CHECK (substr(source_folder, 1, 1) = '/'),
    dest_id          INTEGER NOT NULL REFERENCES servers (id),
    dest_folder      TEXT    NOT NULL CONSTRAINT backups_dest_folder_check
        CHECK (substr(dest_folder, 1, 1) = '/' AND dest_folder <> '/'),
    excludes         TEXT    NOT NULL DEFAULT '[]',
    exclude_proc_sys INTEGER NOT NULL DEFAULT 0 CHECK (exclude_proc_sys IN (0, 1)),
    active           INTEGER NOT NULL DEFAULT 1 CHECK (active IN (0, 1)),
    retain           TEXT,
    ssh_host         TEXT,
    ssh_port         INTEGER NOT NULL DEFAULT 22 CONSTRAINT backups_ssh_port_check
        CHECK (ssh_port BETWEEN 1 AND 65535),
    ssh_user         TEXT    NOT NULL DEFAULT 'root',
    -- Until when a run started by `backup run` may still be going (Unix ms).
    running_until    INTEGER,
    revision         INTEGER NOT NULL DEFAULT 1,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    CONSTRAINT backups_dest_folder_key UNIQUE (dest_id, dest_folder),
    -- One backup per (source, backup server): the backup server has one SSH
    -- key, and sshd applies the first authorized_keys line of a key, so a
    -- second folder granted to that key on one source would be pulled
    -- through the first one's forced command.
    CONSTRAINT backups_source_dest_key UNIQUE (source_id, dest_id)
);
CREATE INDEX backups_source_idx ON backups (source_id);

CREATE TABLE backup_results (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    backup_id   INTEGER NOT NULL REFERENCES backups (id) ON DELETE CASCADE,
    run_id      TEXT    NOT NULL,
    level       TEXT    NOT NULL,
    started_at  INTEGER NOT NULL,
    duration_ms INTEGER NOT NULL,
    outcome     TEXT    NOT NULL CONSTRAINT backup_results_outcome_check
        CHECK (outcome IN ('ok', 'warning', 'attention', 'error', 'insufficient_history')),
    files       INTEGER,
    size        INTEGER,
    transferred INTEGER,
    rsync_exit  INTEGER,
    error       TEXT    NOT NULL DEFAULT '',
    received_at INTEGER NOT NULL,
    CONSTRAINT backup_results_run_key UNIQUE (backup_id, run_id)
);
CREATE INDEX backup_results_started_idx ON backup_results (backup_id, started_at);
