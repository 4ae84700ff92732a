-- Samba shares (issue #13): a share of a samba-managed server (its
-- `samba_managed` and absolute `samba_base_folder`, migration 0001), a folder
-- relative to that base, one system user per share and the NT hash of its
-- password (MD4 of UTF-16LE: password-equivalent for SMB, a secret: never in
-- the outbox, events or replies). Keep in step with
-- migrations/postgres/0008_shares.sql.

CREATE TABLE shares (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    server_id   INTEGER NOT NULL REFERENCES servers (id),
    name        TEXT    NOT NULL CONSTRAINT shares_name_check
        CHECK (length(name) BETWEEN 1 AND 80 AND lower(name) NOT IN ('global', 'homes', 'printers', 'print$', 'ipc$')),
    folder      TEXT    NOT NULL CONSTRAINT shares_folder_check
        CHECK (length(folder) BETWEEN 1 AND 4096 AND substr(folder, 1, 1) <> '/'
               AND folder <> '..' AND folder NOT LIKE '../%' AND folder NOT LIKE '%/..' AND folder NOT LIKE '%/../%'),
    user_name   TEXT    NOT NULL CONSTRAINT shares_user_name_check
        CHECK (length(user_name) BETWEEN 1 AND 32 AND user_name = lower(user_name)),
    nt_hash     TEXT    NOT NULL CONSTRAINT shares_nt_hash_check
        CHECK (length(nt_hash) = 32 AND nt_hash NOT GLOB '*[^0-9a-f]*'),
    revision    INTEGER NOT NULL DEFAULT 1,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    CONSTRAINT shares_server_folder_key UNIQUE (server_id, folder),
    CONSTRAINT shares_server_user_key UNIQUE (server_id, user_name)
);
-- Share names are case-insensitive for samba.
CREATE UNIQUE INDEX shares_server_name_key ON shares (server_id, lower(name));
