//! The record of exec translation: every request to run an execution
//! function on a server named in the registry (run, or refused with its
//! code), who asked, and how it ended. The SQL is in `store/exec.rs`; the
//! translation itself in `crate::exec`.

use serde::{Deserialize, Serialize};

/// One exec request as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRecord {
    /// Assigned by the registry.
    pub id: i64,
    /// Who asked: `cli`, `master` (salt-run event.send) or `minion:<id>`.
    pub requested_by: String,
    /// The server, when the name resolved (none once it is deleted).
    pub server_id: Option<i64>,
    /// The server as the request named it.
    pub server: String,
    /// Where it ran (none when refused before).
    pub minion_id: Option<String>,
    /// The execution function.
    pub fun: String,
    /// Its arguments as JSON, secrets redacted.
    pub args: String,
    /// The job's jid (none when nothing was published).
    pub jid: Option<String>,
    /// `running`, `ok`, `failed`, `refused`, `interrupted`.
    pub outcome: String,
    /// The error code of a refusal or failure.
    pub error_code: Option<String>,
    /// The error text.
    pub error: Option<String>,
    /// A short summary of the return (JSON text).
    pub summary: Option<String>,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms; none while running.
    pub finished_at: Option<i64>,
}

/// A new exec record (`outcome` running or refused).
#[derive(Debug, Clone)]
pub struct NewExec {
    /// Who asked.
    pub requested_by: String,
    /// The server, when resolved.
    pub server_id: Option<i64>,
    /// The server as named.
    pub server: String,
    /// Where it runs.
    pub minion_id: Option<String>,
    /// The function.
    pub fun: String,
    /// Arguments JSON, redacted.
    pub args: String,
    /// The jid chosen before publishing.
    pub jid: Option<String>,
    /// `running` or `refused`.
    pub outcome: String,
    /// A refusal's code.
    pub error_code: Option<String>,
    /// A refusal's text.
    pub error: Option<String>,
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct ExecEnd {
    /// `ok` or `failed`.
    pub outcome: String,
    /// A failure's code.
    pub error_code: Option<String>,
    /// A failure's text.
    pub error: Option<String>,
    /// Summary (JSON text).
    pub summary: Option<String>,
}
