//! The outbox: one row per change, written in the same transaction as the
//! change itself, so nothing the CLI does while the daemon is stopped is lost.
//!
//! Several components act on changes (bus notifications, and next the
//! inventory dispatcher), each at its own pace: every *consumer* has a cursor
//! (`outbox_cursors`), the id of the last entry it is done with. A consumer
//! [subscribes](super::Store::outbox_subscribe) once, reads what is past its
//! cursor ([`Store::outbox_pending`](super::Store::outbox_pending)), acts,
//! then [acknowledges](super::Store::outbox_ack) the entry. Delivery is
//! at-least-once: a crash between acting and acknowledging acts again on
//! restart; acknowledging is idempotent.
//!
//! A row a consumer cannot read (unknown kind, payload not JSON) or cannot act
//! on is [quarantined](super::Store::outbox_quarantine) for that consumer:
//! copied with its reason to `outbox_quarantine` and passed, so it does not
//! block every row after it. Rows every consumer has passed are
//! [pruned](super::Store::outbox_prune).
//!
//! Ids are committed in increasing order (a cursor never skips a row that
//! commits late): SQLite has one writer at a time, and on PostgreSQL a write
//! takes [`PG_ORDER_LOCK`] before it draws its outbox id.
//!
//! The SQL lives here and is run by both backends in `store.rs`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::Error;

/// What changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OutboxKind {
    /// `server.created`; payload: the server.
    #[serde(rename = "server.created")]
    ServerCreated,
    /// `server.updated`; payload: the server after the change.
    #[serde(rename = "server.updated")]
    ServerUpdated,
    /// `server.deleted`; payload: the server as it was.
    #[serde(rename = "server.deleted")]
    ServerDeleted,
    /// `model.created`; payload: the model.
    #[serde(rename = "model.created")]
    ModelCreated,
    /// `model.updated`; payload: the model after the change.
    #[serde(rename = "model.updated")]
    ModelUpdated,
    /// `model.deleted`; payload: the model as it was.
    #[serde(rename = "model.deleted")]
    ModelDeleted,
    /// `forward.port.created`; payload: `inventory::ForwardChange` of the forward.
    #[serde(rename = "forward.port.created")]
    PortForwardCreated,
    /// `forward.port.updated`; payload: the change, after.
    #[serde(rename = "forward.port.updated")]
    PortForwardUpdated,
    /// `forward.port.deleted`; payload: the change, the forward as it was.
    #[serde(rename = "forward.port.deleted")]
    PortForwardDeleted,
    /// `forward.hostname.created`; payload: the change.
    #[serde(rename = "forward.hostname.created")]
    HostnameForwardCreated,
    /// `forward.hostname.updated`; payload: the change, after (targets: old and new proxy).
    #[serde(rename = "forward.hostname.updated")]
    HostnameForwardUpdated,
    /// `forward.hostname.deleted`; payload: the change, the forward as it was.
    #[serde(rename = "forward.hostname.deleted")]
    HostnameForwardDeleted,
    /// `share.created`; payload: `shares::ShareChange` (never the hash).
    #[serde(rename = "share.created")]
    ShareCreated,
    /// `share.updated` (a new password); payload: the change.
    #[serde(rename = "share.updated")]
    ShareUpdated,
    /// `share.deleted`; payload: the change, the share as it was.
    #[serde(rename = "share.deleted")]
    ShareDeleted,
    /// `backup.created`; payload: `backup::BackupChange` (targets: the
    /// destination's `backup`, the source's `backup_source`).
    #[serde(rename = "backup.created")]
    BackupCreated,
    /// `backup.deleted`; payload: the change, the backup as it was.
    #[serde(rename = "backup.deleted")]
    BackupDeleted,
    /// `backup.keys`; payload: `backup::KeysChange` (a key learnt from a
    /// state's report, and the targets to apply again with it).
    #[serde(rename = "backup.keys")]
    BackupKeys,
}

impl OutboxKind {
    const ALL: [OutboxKind; 18] = [
        OutboxKind::ServerCreated,
        OutboxKind::ServerUpdated,
        OutboxKind::ServerDeleted,
        OutboxKind::ModelCreated,
        OutboxKind::ModelUpdated,
        OutboxKind::ModelDeleted,
        OutboxKind::PortForwardCreated,
        OutboxKind::PortForwardUpdated,
        OutboxKind::PortForwardDeleted,
        OutboxKind::HostnameForwardCreated,
        OutboxKind::HostnameForwardUpdated,
        OutboxKind::HostnameForwardDeleted,
        OutboxKind::ShareCreated,
        OutboxKind::ShareUpdated,
        OutboxKind::ShareDeleted,
        OutboxKind::BackupCreated,
        OutboxKind::BackupDeleted,
        OutboxKind::BackupKeys,
    ];

    /// The name stored in the `kind` column.
    pub fn as_str(self) -> &'static str {
        match self {
            OutboxKind::ServerCreated => "server.created",
            OutboxKind::ServerUpdated => "server.updated",
            OutboxKind::ServerDeleted => "server.deleted",
            OutboxKind::ModelCreated => "model.created",
            OutboxKind::ModelUpdated => "model.updated",
            OutboxKind::ModelDeleted => "model.deleted",
            OutboxKind::PortForwardCreated => "forward.port.created",
            OutboxKind::PortForwardUpdated => "forward.port.updated",
            OutboxKind::PortForwardDeleted => "forward.port.deleted",
            OutboxKind::HostnameForwardCreated => "forward.hostname.created",
            OutboxKind::HostnameForwardUpdated => "forward.hostname.updated",
            OutboxKind::HostnameForwardDeleted => "forward.hostname.deleted",
            OutboxKind::ShareCreated => "share.created",
            OutboxKind::ShareUpdated => "share.updated",
            OutboxKind::ShareDeleted => "share.deleted",
            OutboxKind::BackupCreated => "backup.created",
            OutboxKind::BackupDeleted => "backup.deleted",
            OutboxKind::BackupKeys => "backup.keys",
        }
    }
}

impl fmt::Display for OutboxKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for OutboxKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        OutboxKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| Error::invalid("outbox kind", format!("unknown kind {s:?}")))
    }
}

/// One recorded change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxEntry {
    /// Increasing: changes are processed in this order.
    pub id: i64,
    /// What changed.
    pub kind: OutboxKind,
    /// The server concerned (none for model changes). Not a foreign key: it
    /// outlives a deleted server.
    pub server_id: Option<i64>,
    /// The record (see [`OutboxKind`]).
    pub payload: serde_json::Value,
    /// When the change was made, Unix milliseconds.
    pub created_at: i64,
}

/// One row past a consumer's cursor: an entry, or a row that cannot be read
/// (the consumer quarantines it and goes on).
#[derive(Debug, Clone, PartialEq)]
pub enum OutboxRow {
    /// A readable change.
    Entry(OutboxEntry),
    /// A row whose kind or payload cannot be read, with why.
    Unreadable {
        /// The row's id.
        id: i64,
        /// What is wrong with it.
        reason: String,
    },
}

impl OutboxRow {
    /// The row's id, readable or not.
    pub fn id(&self) -> i64 {
        match self {
            OutboxRow::Entry(e) => e.id,
            OutboxRow::Unreadable { id, .. } => *id,
        }
    }
}

/// Where a consumer is, for operators (`salt-steward outbox`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConsumerStatus {
    /// The consumer's name.
    pub consumer: String,
    /// The last entry it is done with.
    pub position: i64,
    /// Entries past its cursor.
    pub pending: i64,
    /// Rows it quarantined.
    pub quarantined: i64,
}

/// A row a consumer quarantined, kept after the outbox row is pruned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Quarantined {
    /// The consumer that could not act on it.
    pub consumer: String,
    /// The outbox row's id.
    pub outbox_id: i64,
    /// The row's kind column, as stored.
    pub kind: String,
    /// The row's payload column, as stored.
    pub payload: String,
    /// Why it was quarantined.
    pub reason: String,
    /// When, Unix milliseconds.
    pub at: i64,
}

/// The longest consumer name.
const MAX_CONSUMER_LEN: usize = 64;

/// Checks a consumer name: 1–64 of `a-z 0-9 _ -`.
pub(crate) fn check_consumer(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= MAX_CONSUMER_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "outbox consumer",
            format!("{name:?}: 1-{MAX_CONSUMER_LEN} characters of a-z, 0-9, _ and -"),
        ))
    }
}

/// The PostgreSQL advisory lock a write holds from its outbox insert to its
/// commit, so outbox ids commit in order (a sequence hands out ids at insert
/// time, and without it a later id could commit first and a cursor pass the
/// earlier one before it is visible). The key is "steward" in ASCII.
pub(crate) const PG_ORDER_LOCK: &str = "SELECT pg_advisory_xact_lock(32497601465119332)";

/// Adds one change; run inside the transaction of the change.
pub(crate) const APPEND: &str =
    "INSERT INTO outbox (kind, server_id, payload, created_at) VALUES ($1, $2, $3, $4)";

/// Adds consumer `$1` at the start of the outbox unless it exists.
pub(crate) const SUBSCRIBE: &str = "INSERT INTO outbox_cursors (consumer, position, updated_at) \
     VALUES ($1, 0, $2) ON CONFLICT (consumer) DO NOTHING";

/// Consumer `$1`'s position.
pub(crate) const POSITION: &str = "SELECT position FROM outbox_cursors WHERE consumer = $1";

/// The oldest rows past position `$1`, `$2` at most.
pub(crate) const PENDING: &str = "SELECT id, kind, server_id, payload, created_at \
     FROM outbox WHERE id > $1 ORDER BY id LIMIT $2";

/// Moves consumer `$1` to `$2` unless it is there or past it.
pub(crate) const ACK: &str = "UPDATE outbox_cursors SET position = $2, updated_at = $3 \
     WHERE consumer = $1 AND position < $2";

/// Copies row `$2` to consumer `$1`'s quarantine with reason `$3` at `$4`.
pub(crate) const QUARANTINE: &str =
    "INSERT INTO outbox_quarantine (consumer, outbox_id, kind, payload, reason, at) \
     SELECT $1, id, kind, payload, $3, $4 FROM outbox WHERE id = $2 \
     ON CONFLICT (consumer, outbox_id) DO NOTHING";

/// Every consumer with its position, pending and quarantined counts.
pub(crate) const STATUS: &str = "SELECT c.consumer, c.position, \
     (SELECT COUNT(*) FROM outbox o WHERE o.id > c.position) AS pending, \
     (SELECT COUNT(*) FROM outbox_quarantine q WHERE q.consumer = c.consumer) AS quarantined \
     FROM outbox_cursors c ORDER BY c.consumer";

/// Every quarantined row, oldest first.
pub(crate) const QUARANTINED: &str =
    "SELECT consumer, outbox_id, kind, payload, reason, at FROM outbox_quarantine \
     ORDER BY outbox_id, consumer";

/// Deletes the rows every consumer has passed (none while there is none).
pub(crate) const PRUNE: &str =
    "DELETE FROM outbox WHERE id <= (SELECT MIN(position) FROM outbox_cursors)";

/// The JSON text of a record for the `payload` column.
pub(crate) fn payload<T: Serialize>(record: &T) -> Result<String, Error> {
    serde_json::to_string(record)
        .map_err(|e| Error::invalid("outbox payload", format!("cannot encode: {e}")))
}

/// Builds a row from its columns: an entry, or why it cannot be read.
pub(crate) fn row(
    id: i64,
    kind: &str,
    server_id: Option<i64>,
    payload: &str,
    created_at: i64,
) -> OutboxRow {
    let kind = match kind.parse::<OutboxKind>() {
        Ok(k) => k,
        Err(_) => {
            return OutboxRow::Unreadable {
                id,
                reason: format!("unknown kind {kind:?}"),
            }
        }
    };
    match serde_json::from_str(payload) {
        Ok(payload) => OutboxRow::Entry(OutboxEntry {
            id,
            kind,
            server_id,
            payload,
            created_at,
        }),
        Err(e) => OutboxRow::Unreadable {
            id,
            reason: format!("payload is not JSON: {e}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_that_cannot_be_read_say_why() {
        assert!(matches!(
            row(1, "server.created", Some(2), "{}", 3),
            OutboxRow::Entry(_)
        ));
        let OutboxRow::Unreadable { id, reason } = row(4, "server.exploded", None, "{}", 5) else {
            panic!("an unknown kind is unreadable");
        };
        assert_eq!(
            (id, reason.as_str()),
            (4, "unknown kind \"server.exploded\"")
        );
        let OutboxRow::Unreadable { reason, .. } = row(6, "model.created", None, "{", 7) else {
            panic!("a payload that is not JSON is unreadable");
        };
        assert!(reason.starts_with("payload is not JSON"), "{reason}");
    }

    #[test]
    fn consumer_names_are_checked() {
        for good in ["notify", "inventory-dispatch", "a_1"] {
            check_consumer(good).unwrap();
        }
        for bad in ["", "Notify", "a b", "x;DROP", &"a".repeat(65)] {
            assert!(check_consumer(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn kinds_round_trip_and_match_serde() {
        for k in OutboxKind::ALL {
            assert_eq!(k.as_str().parse::<OutboxKind>().unwrap(), k);
            assert_eq!(
                serde_json::to_value(k).unwrap(),
                serde_json::Value::String(k.as_str().to_owned())
            );
        }
    }
}
