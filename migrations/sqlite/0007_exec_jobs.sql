-- Exec translation (issue #14): every request to run an execution function
-- on a server named in the registry, run or refused, with who asked. Keep in
-- step with migrations/postgres/0007_exec_jobs.sql.
CREATE TABLE exec_jobs (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    requested_by TEXT    NOT NULL,
    server_id    INTEGER REFERENCES servers (id) ON DELETE SET NULL,
    server       TEXT    NOT NULL,
    minion_id    TEXT,
    fun          TEXT    NOT NULL,
    args         TEXT    NOT NULL,
    jid          TEXT,
    outcome      TEXT    NOT NULL CONSTRAINT exec_jobs_outcome_check
        CHECK (outcome IN ('running', 'ok', 'failed', 'refused', 'interrupted')),
    error_code   TEXT,
    error        TEXT,
    summary      TEXT,
    created_at   INTEGER NOT NULL,
    finished_at  INTEGER
);
CREATE INDEX exec_jobs_server_idx ON exec_jobs (server_id, id);
