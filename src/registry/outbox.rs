//! The outbox: one row per change, written in the same transaction as the
//! change itself, so nothing the CLI does while the daemon is stopped is lost.
//!
//! Whoever acts on changes (bus notifications now, Salt states later) reads
//! [`Store::outbox_pending`](super::Store::outbox_pending), acts, then calls
//! [`Store::outbox_mark_processed`](super::Store::outbox_mark_processed).
//! Delivery is at-least-once: a crash between acting and marking acts again on
//! restart. Marking is idempotent: marking twice changes nothing the second
//! time and says so.
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
}

impl OutboxKind {
    const ALL: [OutboxKind; 6] = [
        OutboxKind::ServerCreated,
        OutboxKind::ServerUpdated,
        OutboxKind::ServerDeleted,
        OutboxKind::ModelCreated,
        OutboxKind::ModelUpdated,
        OutboxKind::ModelDeleted,
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
    /// When it was processed, if it was.
    pub processed_at: Option<i64>,
}

/// Adds one change; run inside the transaction of the change.
pub(crate) const APPEND: &str =
    "INSERT INTO outbox (kind, server_id, payload, created_at) VALUES ($1, $2, $3, $4)";

/// The oldest unprocessed changes, `$1` at most.
pub(crate) const PENDING: &str = "SELECT id, kind, server_id, payload, created_at, processed_at \
     FROM outbox WHERE processed_at IS NULL ORDER BY id LIMIT $1";

/// Marks `$1` processed at `$2`, unless it already is (affects 0 rows then).
pub(crate) const MARK_PROCESSED: &str =
    "UPDATE outbox SET processed_at = $2 WHERE id = $1 AND processed_at IS NULL";

/// Whether `$1` exists.
pub(crate) const EXISTS: &str = "SELECT COUNT(*) FROM outbox WHERE id = $1";

/// The JSON text of a record for the `payload` column.
pub(crate) fn payload<T: Serialize>(record: &T) -> Result<String, Error> {
    serde_json::to_string(record)
        .map_err(|e| Error::invalid("outbox payload", format!("cannot encode: {e}")))
}

/// Builds an entry from its columns.
pub(crate) fn entry(
    id: i64,
    kind: &str,
    server_id: Option<i64>,
    payload: &str,
    created_at: i64,
    processed_at: Option<i64>,
) -> Result<OutboxEntry, Error> {
    Ok(OutboxEntry {
        id,
        kind: kind.parse()?,
        server_id,
        payload: serde_json::from_str(payload).map_err(|e| {
            Error::invalid("outbox payload", format!("entry {id} is not JSON: {e}"))
        })?,
        created_at,
        processed_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
