//! Exec translation (capability 9, seed 000's story E6-3): a request names a
//! **server** of the registry (by id or name), not a minion; it runs on that
//! server's minion if and only if the server is Salt-managed (its minion's
//! key was accepted), through the Salt client. Shared by the CLI, the bus
//! and the HTTP API (`POST /api/v1/exec`): the callers parse and print.
//!
//! Exec from the bus is remote execution, so what may be run is an
//! allow-list of function globs per requester ([`ExecPolicy`]: by default
//! everything from the master and the CLI, nothing from minions; an HTTP
//! operator is held to the master's list). Every
//! request — run, or refused with its code — is recorded (`exec_jobs`): who
//! asked, the server, the function, the arguments with secrets redacted, the
//! jid, a summary of the return, the time.

use std::fmt;
use std::time::Duration;

use globset::{Glob, GlobMatcher};
use serde_json::{json, Map, Value as Json};

use crate::registry::exec::{ExecEnd, ExecRecord, NewExec};
use crate::registry::store::ExecStore as _;
use crate::registry::{self, DbStore, ServerRef, Service, Status};
use crate::salt::jobs::new_jid;
use crate::salt::{Publish, RequestError, SaltClient, TargetType};

/// Who asks for an exec: decides which functions it may run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requester {
    /// The CLI (it holds the master's root key anyway).
    Cli,
    /// A request made on the master (`salt-run event.send`, confirmed).
    Master,
    /// A trusted minion's request (`salt-call event.send`, confirmed).
    Minion(String),
    /// An HTTP API caller with the operator role: its audit actor
    /// (`user:<name>` or `token:<name>`); held to the master's allow-list.
    Http(String),
}

impl fmt::Display for Requester {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Requester::Cli => f.write_str("cli"),
            Requester::Master => f.write_str("master"),
            Requester::Minion(id) => write!(f, "minion:{id}"),
            Requester::Http(actor) => f.write_str(actor),
        }
    }
}

/// Which functions each requester may run (function globs, Salt's fnmatch:
/// `test.*`, `cmd.run`, `*`).
#[derive(Debug, Clone)]
pub struct ExecPolicy {
    master: Vec<GlobMatcher>,
    minions: Vec<(GlobMatcher, Vec<GlobMatcher>)>,
}

impl ExecPolicy {
    /// `master`: globs for the master and the CLI; `minions`: per minion id
    /// glob, the globs that minion may run (the `exec:` settings). A bad glob
    /// is an error naming it.
    pub fn new<'a>(
        master: &[String],
        minions: impl IntoIterator<Item = (&'a String, &'a Vec<String>)>,
    ) -> Result<Self, String> {
        let compile = |g: &String| {
            Glob::new(g)
                .map(|g| g.compile_matcher())
                .map_err(|e| format!("exec allow-list glob {g:?}: {e}"))
        };
        Ok(Self {
            master: master.iter().map(compile).collect::<Result<_, _>>()?,
            minions: minions
                .into_iter()
                .map(|(id, funs)| {
                    Ok((
                        compile(id)?,
                        funs.iter().map(compile).collect::<Result<_, _>>()?,
                    ))
                })
                .collect::<Result<_, String>>()?,
        })
    }

    /// Whether `who` may run `fun`.
    pub fn allows(&self, who: &Requester, fun: &str) -> bool {
        match who {
            Requester::Cli | Requester::Master | Requester::Http(_) => {
                self.master.iter().any(|g| g.is_match(fun))
            }
            Requester::Minion(id) => self
                .minions
                .iter()
                .filter(|(m, _)| m.is_match(id))
                .any(|(_, funs)| funs.iter().any(|g| g.is_match(fun))),
        }
    }
}

/// One exec request.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    /// The server, by id or name.
    pub server: ServerRef,
    /// The execution function (`module.function`).
    pub fun: String,
    /// Positional arguments.
    pub arg: Vec<Json>,
    /// Keyword arguments.
    pub kwarg: Map<String, Json>,
    /// How long the return is waited for.
    pub timeout: Duration,
}

/// The answer of a run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExecReply {
    /// The record's id.
    pub record: i64,
    /// The jid of the job.
    pub jid: String,
    /// The server's name.
    pub server: String,
    /// Where it ran.
    pub minion_id: String,
    /// Whether the minion reported success.
    pub success: bool,
    /// The minion's retcode.
    pub retcode: Option<i64>,
    /// The minion's return, as the master's job cache holds it.
    #[serde(rename = "return")]
    pub ret: Json,
}

/// Why an exec was refused or failed; each has a stable [`ExecError::code`].
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The function is not on the requester's allow-list.
    #[error("{who} may not run {fun} (not on its exec allow-list)")]
    Forbidden {
        /// Who asked.
        who: String,
        /// The function.
        fun: String,
    },
    /// Not `module.function`.
    #[error("{0:?} is not an execution function name (module.function)")]
    BadFunction(String),
    /// No such server.
    #[error("unknown server {0}")]
    UnknownServer(String),
    /// The server has no accepted minion.
    #[error("server {server} is not Salt-managed: no registered minion (status {status})")]
    NotSaltManaged {
        /// The server.
        server: String,
        /// Its status.
        status: Status,
    },
    /// The master did not take the job.
    #[error("publishing {fun} to {minion}: {source}")]
    Publish {
        /// The function.
        fun: String,
        /// The minion.
        minion: String,
        /// Why.
        source: RequestError,
    },
    /// No confirmed return in time.
    #[error("no return from {minion} for job {jid} within {secs} s")]
    NoAnswer {
        /// The minion.
        minion: String,
        /// The job.
        jid: String,
        /// The timeout.
        secs: u64,
    },
    /// The registry failed.
    #[error(transparent)]
    Registry(#[from] registry::Error),
}

impl ExecError {
    /// The stable code replies and records carry.
    pub fn code(&self) -> &'static str {
        match self {
            ExecError::Forbidden { .. } => "forbidden_function",
            ExecError::BadFunction(_) => "invalid_value",
            ExecError::UnknownServer(_) => "unknown_server",
            ExecError::NotSaltManaged { .. } => "not_salt_managed",
            ExecError::Publish { .. } => "publish_failed",
            ExecError::NoAnswer { .. } => "no_answer",
            ExecError::Registry(e) => e.code(),
        }
    }
}

/// Exec requests served by the daemon, by outcome: `ok`, `failed` (the
/// function ran and failed) or the refusal's code ([`ExecError::code`]);
/// read by the metrics endpoint.
#[derive(Debug, Default)]
pub struct ExecStats(crate::telemetry::Counts<&'static str>);

impl ExecStats {
    /// Counts one request by what [`exec`] returned.
    pub fn count(&self, result: &Result<ExecReply, ExecError>) {
        self.0.add(match result {
            Ok(reply) if reply.success => "ok",
            Ok(_) => "failed",
            Err(e) => e.code(),
        });
    }

    /// Every outcome counted so far with its count.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        self.0.snapshot()
    }
}

/// Runs `req` for `who` (see the module docs): refused requests are
/// recorded and nothing is published; a run is recorded with its jid before
/// it is published, and its end after.
pub async fn exec(
    service: &Service<DbStore>,
    salt: &SaltClient,
    policy: &ExecPolicy,
    who: &Requester,
    req: &ExecRequest,
) -> Result<ExecReply, ExecError> {
    let store = service.store();
    let args = redacted_args(&req.arg, &req.kwarg).to_string();
    let refuse = |server_id: Option<i64>, server: String, e: ExecError| {
        let record = NewExec {
            requested_by: who.to_string(),
            server_id,
            server,
            minion_id: None,
            fun: req.fun.clone(),
            args: args.clone(),
            jid: None,
            outcome: "refused".into(),
            error_code: Some(e.code().into()),
            error: Some(e.to_string()),
        };
        async move {
            store.exec_insert(&record).await?;
            Err::<ExecReply, ExecError>(e)
        }
    };
    if !valid_function(&req.fun) {
        return refuse(
            None,
            req.server.to_string(),
            ExecError::BadFunction(req.fun.clone()),
        )
        .await;
    }
    if !policy.allows(who, &req.fun) {
        let e = ExecError::Forbidden {
            who: who.to_string(),
            fun: req.fun.clone(),
        };
        return refuse(None, req.server.to_string(), e).await;
    }
    let server = match service.get_server(&req.server).await {
        Ok(s) => s,
        Err(registry::Error::NotFound { .. }) => {
            let name = req.server.to_string();
            return refuse(None, name.clone(), ExecError::UnknownServer(name)).await;
        }
        Err(e) => return Err(e.into()),
    };
    if !matches!(
        server.status,
        Status::Registered | Status::Online | Status::Offline
    ) {
        let e = ExecError::NotSaltManaged {
            server: server.name.clone(),
            status: server.status,
        };
        return refuse(Some(server.id), server.name.clone(), e).await;
    }
    let jid = new_jid();
    let record = store
        .exec_insert(&NewExec {
            requested_by: who.to_string(),
            server_id: Some(server.id),
            server: server.name.clone(),
            minion_id: Some(server.minion_id.clone()),
            fun: req.fun.clone(),
            args,
            jid: Some(jid.clone()),
            outcome: "running".into(),
            error_code: None,
            error: None,
        })
        .await?;
    let result = run(salt, &server.minion_id, &jid, req).await;
    let end = match &result {
        Ok((success, retcode, ret)) => ExecEnd {
            outcome: if *success { "ok" } else { "failed" }.into(),
            error_code: None,
            error: None,
            summary: Some(summary(*retcode, ret).to_string()),
        },
        Err(e) => ExecEnd {
            outcome: "failed".into(),
            error_code: Some(e.code().into()),
            error: Some(e.to_string()),
            summary: None,
        },
    };
    store.exec_finish(record.id, &end).await?;
    let (success, retcode, ret) = result?;
    Ok(ExecReply {
        record: record.id,
        jid,
        server: server.name,
        minion_id: server.minion_id,
        success,
        retcode,
        ret,
    })
}

/// The last `limit` records (of one server, or all) with an id below
/// `before` (the previous page's last), newest first.
pub async fn history(
    service: &Service<DbStore>,
    server: Option<&ServerRef>,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<ExecRecord>, registry::Error> {
    let server_id = match server {
        Some(s) => Some(service.get_server(s).await?.id),
        None => None,
    };
    service.store().exec_list(server_id, before, limit).await
}

/// Publishes under `jid` to `minion` and waits for its confirmed return.
async fn run(
    salt: &SaltClient,
    minion: &str,
    jid: &str,
    req: &ExecRequest,
) -> Result<(bool, Option<i64>, Json), ExecError> {
    let publish = Publish {
        target: minion.to_owned(),
        tgt_type: TargetType::List,
        fun: req.fun.clone(),
        arg: req.arg.clone(),
        kwarg: req.kwarg.clone(),
        correlation: Some(format!("exec/{jid}")),
    };
    let publish_error = |source| ExecError::Publish {
        fun: req.fun.clone(),
        minion: minion.to_owned(),
        source,
    };
    let (_, outcome) = salt
        .run_job_as(&publish, jid, req.timeout)
        .await
        .map_err(publish_error)?;
    match outcome.returns.get(minion) {
        Some(r) => Ok((r.success, r.retcode, r.ret.clone())),
        None => Err(ExecError::NoAnswer {
            minion: minion.to_owned(),
            jid: jid.to_owned(),
            secs: req.timeout.as_secs(),
        }),
    }
}

/// `module.function` (Salt's names: letters, digits, `_`, dotted).
fn valid_function(fun: &str) -> bool {
    let mut parts = fun.split('.');
    let ok_part =
        |p: &str| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    parts.clone().count() >= 2 && parts.all(ok_part)
}

/// Words in an argument name that mark it secret.
const SECRET_WORDS: [&str; 6] = ["pass", "secret", "token", "key", "pwd", "cred"];

fn is_secret_name(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    SECRET_WORDS.iter().any(|w| n.contains(w))
}

/// The arguments as recorded: keyword arguments whose name looks secret,
/// and positional `name=value` strings likewise, have their value replaced
/// by `***`.
pub fn redacted_args(arg: &[Json], kwarg: &Map<String, Json>) -> Json {
    let arg: Vec<Json> = arg
        .iter()
        .map(|a| match a.as_str().and_then(|s| s.split_once('=')) {
            Some((k, _)) if is_secret_name(k) => Json::String(format!("{k}=***")),
            _ => a.clone(),
        })
        .collect();
    let kwarg: Map<String, Json> = kwarg
        .iter()
        .map(|(k, v)| {
            let v = if is_secret_name(k) {
                Json::String("***".into())
            } else {
                v.clone()
            };
            (k.clone(), v)
        })
        .collect();
    json!({ "arg": arg, "kwarg": kwarg })
}

/// A short summary of a return: its retcode, its type and, for text or a
/// scalar, its first 200 characters.
fn summary(retcode: Option<i64>, ret: &Json) -> Json {
    let text = match ret {
        Json::String(s) => s.clone(),
        other => other.to_string(),
    };
    let short: String = text.chars().take(200).collect();
    json!({ "retcode": retcode, "return": short })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> ExecPolicy {
        let minions: std::collections::BTreeMap<String, Vec<String>> = [
            ("web*".to_owned(), vec!["test.*".to_owned()]),
            (
                "ops01".to_owned(),
                vec!["cmd.run".to_owned(), "service.*".to_owned()],
            ),
        ]
        .into();
        ExecPolicy::new(&["*".into()], &minions).unwrap()
    }

    #[test]
    fn the_allow_list_is_per_requester() {
        let p = policy();
        assert!(p.allows(&Requester::Master, "cmd.run"));
        assert!(p.allows(&Requester::Cli, "state.apply"));
        assert!(p.allows(&Requester::Minion("web1".into()), "test.ping"));
        assert!(!p.allows(&Requester::Minion("web1".into()), "cmd.run"));
        assert!(p.allows(&Requester::Minion("ops01".into()), "service.restart"));
        assert!(!p.allows(&Requester::Minion("db1".into()), "test.ping"));
        let no_minions = std::collections::BTreeMap::new();
        let none = ExecPolicy::new(&[], &no_minions).unwrap();
        assert!(!none.allows(&Requester::Master, "test.ping"));
        // An HTTP operator is held to the master's list.
        assert!(p.allows(&Requester::Http("user:alice".into()), "cmd.run"));
        assert!(!none.allows(&Requester::Http("token:ci".into()), "test.ping"));
        assert_eq!(Requester::Http("token:ci".into()).to_string(), "token:ci");
        assert!(ExecPolicy::new(&["[".into()], &no_minions).is_err());
    }

    #[test]
    fn function_names_are_checked() {
        assert!(valid_function("test.ping"));
        assert!(valid_function("cp.get_file"));
        assert!(!valid_function("test"));
        assert!(!valid_function("test."));
        assert!(!valid_function("a.b;rm"));
        assert!(!valid_function(""));
    }

    #[test]
    fn secrets_are_redacted_in_the_record() {
        let mut kw = Map::new();
        kw.insert("password".into(), json!("hunter2"));
        kw.insert("name".into(), json!("bob"));
        kw.insert("api_token".into(), json!("t"));
        let r = redacted_args(&[json!("user=bob"), json!("db_pass=x"), json!(3)], &kw);
        let text = r.to_string();
        assert!(
            !text.contains("hunter2") && !text.contains("db_pass=x"),
            "{text}"
        );
        assert_eq!(r["arg"], json!(["user=bob", "db_pass=***", 3]));
        assert_eq!(r["kwarg"]["name"], "bob");
        assert_eq!(r["kwarg"]["password"], "***");
    }
}
