-- Users, API tokens, browser sessions and the audit log of the HTTP API
-- (issue #15). Secrets are never stored: a password as its argon2id PHC
-- string, a token and a session cookie as the sha256 (hex) of their random
-- value. 0009 belongs to the backups branch. Keep in step with
-- migrations/postgres/0010_users.sql.

CREATE TABLE users (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    name          TEXT    NOT NULL CONSTRAINT users_name_check
        CHECK (length(name) BETWEEN 1 AND 64),
    role          TEXT    NOT NULL CONSTRAINT users_role_check
        CHECK (role IN ('viewer', 'operator', 'admin')),
    password_hash TEXT    NOT NULL CONSTRAINT users_password_hash_check
        CHECK (password_hash LIKE '$argon2id$%'),
    disabled      INTEGER NOT NULL DEFAULT 0 CHECK (disabled IN (0, 1)),
    created_at    INTEGER NOT NULL,
    CONSTRAINT users_name_key UNIQUE (name)
);

CREATE TABLE api_tokens (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    name         TEXT    NOT NULL CONSTRAINT api_tokens_name_check
        CHECK (length(name) BETWEEN 1 AND 64),
    user_id      INTEGER REFERENCES users (id),
    secret_hash  TEXT    NOT NULL CONSTRAINT api_tokens_secret_hash_check
        CHECK (length(secret_hash) = 64 AND secret_hash NOT GLOB '*[^0-9a-f]*'),
    scopes       TEXT    NOT NULL,
    expires_at   INTEGER,
    created_at   INTEGER NOT NULL,
    last_used_at INTEGER,
    CONSTRAINT api_tokens_name_key UNIQUE (name),
    CONSTRAINT api_tokens_secret_hash_key UNIQUE (secret_hash)
);

CREATE TABLE sessions (
    id_hash      TEXT    PRIMARY KEY CONSTRAINT sessions_id_hash_check
        CHECK (length(id_hash) = 64 AND id_hash NOT GLOB '*[^0-9a-f]*'),
    user_id      INTEGER NOT NULL REFERENCES users (id),
    created_at   INTEGER NOT NULL,
    last_seen_at INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL
);
CREATE INDEX sessions_user_idx ON sessions (user_id);

CREATE TABLE audit (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    actor  TEXT    NOT NULL,
    action TEXT    NOT NULL,
    target TEXT    NOT NULL,
    detail TEXT    NOT NULL DEFAULT '{}',
    at     INTEGER NOT NULL
);
