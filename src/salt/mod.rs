//! Driving the salt-master natively (capability 2): publish jobs, call wheel
//! and runner functions, follow results on the bus. No Python process per
//! action.
//!
//! - [`request`]: the ZeroMQ request channel to `ret_port`, authenticated
//!   with the master's key file.
//! - [`jobs`]: jids, the job tracker that routes returns from the bus, and
//!   `state.apply` summaries.

pub mod jobs;
pub mod request;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rmpv::Value;

use serde::Serialize;
use serde_json::{Map, Value as Json};

use crate::bus::event::{as_str, from_json, map_get, to_json};
pub use jobs::{JobOutcome, JobStats, JobTracker, JobWatch, MinionReturn, StateSummary};
pub use request::{ReqClient, RequestError};

/// How a publish target is matched (Salt's `tgt_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetType {
    #[default]
    Glob,
    List,
    Compound,
    Grain,
    Pcre,
}

impl TargetType {
    /// Every target type, in the order they are listed to users.
    pub const ALL: [TargetType; 5] = [
        Self::Glob,
        Self::List,
        Self::Compound,
        Self::Grain,
        Self::Pcre,
    ];

    /// The names Salt uses on the wire, as [`Self::ALL`].
    pub const NAMES: [&'static str; 5] = ["glob", "list", "compound", "grain", "pcre"];

    /// The name Salt uses on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Glob => "glob",
            Self::List => "list",
            Self::Compound => "compound",
            Self::Grain => "grain",
            Self::Pcre => "pcre",
        }
    }
}

impl std::str::FromStr for TargetType {
    type Err = String;

    /// A wire name (`glob`, `list` …); the error lists the valid ones.
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| format!("tgt_type {s:?} is not one of {}", Self::NAMES.join(", ")))
    }
}

/// A job to publish.
#[derive(Debug, Clone, Default)]
pub struct Publish {
    pub target: String,
    pub tgt_type: TargetType,
    pub fun: String,
    /// Positional arguments (strings are parsed by the minion, as from the CLI).
    pub arg: Vec<Json>,
    /// Keyword arguments (`pillar` for `state.apply` among them).
    pub kwarg: Map<String, Json>,
    /// Put in the job's `metadata` as `steward_correlation`, and returned by
    /// each minion with its return: ties a return to the action behind it.
    pub correlation: Option<String>,
}

/// The master's answer to a publish.
#[derive(Debug, Clone, Serialize)]
pub struct Published {
    pub jid: String,
    /// Minions the master expects to answer.
    pub minions: Vec<String>,
    /// Minions of a list target that the master does not know.
    pub missing: Vec<String>,
}

/// The master client: requests plus job tracking.
#[derive(Clone)]
pub struct SaltClient {
    req: ReqClient,
    tracker: JobTracker,
    /// The tracker's reconnect count when the request pool was last reset.
    reset_at: Arc<AtomicU64>,
    /// Jobs followed to their end, by outcome (shared by every clone).
    job_stats: Arc<JobStats>,
}

/// A wheel call's result.
#[derive(Debug, Clone, Serialize)]
pub struct WheelResult {
    pub success: bool,
    #[serde(rename = "return")]
    pub ret: Json,
    /// The job id the master gave the call (reported by rules, not printed).
    #[serde(skip)]
    pub jid: Option<String>,
}

impl SaltClient {
    /// Combines a request client and a job tracker on the same master.
    pub fn new(req: ReqClient, tracker: JobTracker) -> Self {
        Self {
            req,
            tracker,
            reset_at: Arc::default(),
            job_stats: Arc::default(),
        }
    }

    /// Jobs followed through this client (and its clones), by outcome.
    pub fn job_stats(&self) -> &Arc<JobStats> {
        &self.job_stats
    }

    /// The request client. After a bus reconnect (the master may have
    /// restarted) its pooled connections are reset first, so no request
    /// waits out its timeout on a connection to the old process.
    pub fn req(&self) -> &ReqClient {
        let now = self.tracker.reconnects();
        if self.reset_at.swap(now, Ordering::AcqRel) != now {
            self.req.reset();
        }
        &self.req
    }

    /// Publishes a job under a jid chosen here, registered with the tracker
    /// before the request goes out.
    pub async fn publish(&self, p: &Publish) -> Result<(Published, JobWatch), RequestError> {
        self.publish_as(p, &jobs::new_jid()).await
    }

    /// Publishes a job under `jid`, chosen (and recorded) by the caller
    /// beforehand with [`jobs::new_jid`], so a record made before the job
    /// went out names it.
    pub async fn publish_as(
        &self,
        p: &Publish,
        jid: &str,
    ) -> Result<(Published, JobWatch), RequestError> {
        let jid = jid.to_owned();
        let watch = self.tracker.watch(&jid).with_lookup(self.clone());
        let mut arg: Vec<Value> = p.arg.iter().map(from_json).collect();
        if !p.kwarg.is_empty() {
            // kwargs travel as a trailing map flagged __kwarg__, as the salt CLI sends them.
            let mut kw: Vec<(Value, Value)> = p
                .kwarg
                .iter()
                .map(|(k, v)| (Value::from(k.as_str()), from_json(v)))
                .collect();
            kw.push((Value::from("__kwarg__"), Value::Boolean(true)));
            arg.push(Value::Map(kw));
        }
        let mut kwargs = vec![(Value::from("delimiter"), Value::from(":"))];
        if let Some(c) = &p.correlation {
            kwargs.push((
                Value::from("metadata"),
                Value::Map(vec![(
                    Value::from(jobs::CORRELATION_KEY),
                    Value::from(c.as_str()),
                )]),
            ));
        }
        let load = vec![
            (Value::from("cmd"), Value::from("publish")),
            (Value::from("tgt"), Value::from(p.target.as_str())),
            (Value::from("fun"), Value::from(p.fun.as_str())),
            (Value::from("arg"), Value::Array(arg)),
            (Value::from("tgt_type"), Value::from(p.tgt_type.as_str())),
            (Value::from("ret"), Value::from("")),
            (Value::from("jid"), Value::from(jid.as_str())),
            (Value::from("kwargs"), Value::Map(kwargs)),
        ];
        let reply = self.req().request(load, true).await?;
        let list = |key: &str| -> Vec<String> {
            map_get(&reply, key)
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(as_str).map(str::to_owned).collect())
                .unwrap_or_default()
        };
        let got_jid = map_get(&reply, "jid").and_then(as_str).unwrap_or_default();
        if got_jid.is_empty() {
            return Err(RequestError::BadReply(format!(
                "publish of {} to {:?} returned no jid: {}",
                p.fun,
                p.target,
                to_json(&reply)
            )));
        }
        if got_jid != jid {
            return Err(RequestError::BadReply(format!(
                "the master replaced our jid {jid} with {got_jid}"
            )));
        }
        Ok((
            Published {
                jid,
                minions: list("minions"),
                missing: list("missing"),
            },
            watch,
        ))
    }

    /// Publishes and waits for the returns of every expected minion, or `timeout`.
    pub async fn run_job(
        &self,
        p: &Publish,
        timeout: Duration,
    ) -> Result<(Published, JobOutcome), RequestError> {
        self.run_job_as(p, &jobs::new_jid(), timeout).await
    }

    /// [`run_job`](Self::run_job) under `jid`, chosen (and recorded) by the
    /// caller beforehand.
    pub async fn run_job_as(
        &self,
        p: &Publish,
        jid: &str,
        timeout: Duration,
    ) -> Result<(Published, JobOutcome), RequestError> {
        let (published, watch) = self.publish_as(p, jid).await?;
        let outcome = watch.collect(&published.minions, timeout).await;
        Ok((published, outcome))
    }

    /// The return of job `jid` as `minion` itself kept it
    /// (`saltutil.find_cached_job`, asked through this master; the minion
    /// keeps returns only with `cache_jobs`): how a run published through
    /// another master is found after the minion failed over, since the
    /// minion drops a return meant for a master it left. `None`: not kept
    /// (not run, not finished, or no `cache_jobs`), or no answer.
    pub async fn minion_cached_return(
        &self,
        minion: &str,
        jid: &str,
        timeout: Duration,
    ) -> Result<Option<MinionReturn>, RequestError> {
        let ask = Publish {
            target: minion.to_owned(),
            tgt_type: TargetType::List,
            fun: "saltutil.find_cached_job".into(),
            arg: vec![Json::from(jid)],
            correlation: Some(format!("find_cached_job/{jid}")),
            ..Publish::default()
        };
        let (_, outcome) = self.run_job(&ask, timeout).await?;
        Ok(outcome
            .returns
            .get(minion)
            .and_then(|r| cached_return(&r.ret, jid)))
    }

    /// What the master's job cache holds for `jid` (`jobs.list_job`, the
    /// cache named by `master_job_cache`): `Function`, `Arguments`, and the
    /// returns by minion id under `Result`. The whole lookup ends within
    /// `timeout`, the request to the master included (whose own connect and
    /// request timeouts are longer): its callers work to deadlines.
    pub async fn job_cache_lookup(
        &self,
        jid: &str,
        timeout: Duration,
    ) -> Result<Json, RequestError> {
        let mut kwarg = Map::new();
        kwarg.insert("jid".into(), Json::from(jid));
        let lookup = self.runner("jobs.list_job", Vec::new(), kwarg, timeout);
        match tokio::time::timeout(timeout, lookup).await {
            Ok(r) => Ok(r?.ret),
            Err(_) => Err(RequestError::Timeout {
                uri: format!("{} (jobs.list_job of job {jid})", self.req().uri()),
                timeout,
            }),
        }
    }

    /// The returns the master's job cache holds for `jid`, by minion.
    pub async fn job_cache_returns(
        &self,
        jid: &str,
        timeout: Duration,
    ) -> Result<BTreeMap<String, MinionReturn>, RequestError> {
        let job = self.job_cache_lookup(jid, timeout).await?;
        let mut out = BTreeMap::new();
        if let Some(Json::Object(result)) = job.get("Result") {
            for (minion, entry) in result {
                let retcode = entry.get("retcode").and_then(Json::as_i64);
                // Stored as the minion sent them (`return`, `retcode`, `success`).
                let success = entry.get("success").and_then(Json::as_bool).unwrap_or(true);
                out.insert(
                    minion.clone(),
                    MinionReturn {
                        success: success && retcode.unwrap_or(0) == 0,
                        correlation: None,
                        retcode,
                        ret: entry.get("return").cloned().unwrap_or(Json::Null),
                    },
                );
            }
        }
        Ok(out)
    }

    /// Calls a wheel function (see [`wheel`]).
    pub async fn wheel(
        &self,
        fun: &str,
        arg: Vec<Json>,
        kwarg: Map<String, Json>,
    ) -> Result<WheelResult, RequestError> {
        wheel(self.req(), fun, arg, kwarg).await
    }

    /// Calls a runner function and waits for its result on the bus.
    pub async fn runner(
        &self,
        fun: &str,
        arg: Vec<Json>,
        kwarg: Map<String, Json>,
        timeout: Duration,
    ) -> Result<WheelResult, RequestError> {
        // The master passes only `kwarg` on as the runner's low data, so the
        // arguments go under kwarg.arg / kwarg.kwarg (salt-protocol.md §3.5).
        let low = serde_json::json!({ "arg": arg, "kwarg": kwarg });
        let load = vec![
            (Value::from("cmd"), Value::from("runner")),
            (Value::from("fun"), Value::from(fun)),
            (Value::from("kwarg"), from_json(&low)),
        ];
        let reply = self.req().request(load, true).await?;
        let jid = map_get(&reply, "jid").and_then(as_str).ok_or_else(|| {
            RequestError::BadReply(format!("runner {fun}: no jid in {}", to_json(&reply)))
        })?;
        let data = self
            .tracker
            .watch(jid)
            .runner_result(timeout)
            .await
            .ok_or_else(|| RequestError::Timeout {
                uri: format!("runner {fun} (jid {jid}) result on the event bus"),
                timeout,
            })?;
        Ok(WheelResult {
            success: data.get("success").and_then(Json::as_bool).unwrap_or(false),
            ret: data.get("return").cloned().unwrap_or(Json::Null),
            jid: Some(jid.to_owned()),
        })
    }
}

/// Calls a wheel function. It runs synchronously on the master and its
/// result is in the reply, so no bus is needed.
pub async fn wheel(
    req: &ReqClient,
    fun: &str,
    arg: Vec<Json>,
    kwarg: Map<String, Json>,
) -> Result<WheelResult, RequestError> {
    let load = vec![
        (Value::from("cmd"), Value::from("wheel")),
        (Value::from("fun"), Value::from(fun)),
        (
            Value::from("arg"),
            Value::Array(arg.iter().map(from_json).collect()),
        ),
        (Value::from("kwarg"), from_json(&Json::Object(kwarg))),
    ];
    let reply = req.request(load, true).await?;
    let data = map_get(&reply, "data").ok_or_else(|| {
        RequestError::BadReply(format!("wheel {fun}: no data in {}", to_json(&reply)))
    })?;
    Ok(WheelResult {
        success: map_get(data, "success")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        ret: map_get(data, "return").map(to_json).unwrap_or(Json::Null),
        jid: map_get(data, "jid").and_then(as_str).map(str::to_owned),
    })
}

/// Calls one of the wheel's `key.*_dict` functions (`key.accept_dict`,
/// `key.reject_dict`, `key.delete_dict`): `matches` maps key directories
/// (`minions`, `minions_pre`, `minions_rejected`, `minions_denied`) to exact
/// minion ids, so no id is ever taken as a glob.
pub async fn key_dict(
    req: &ReqClient,
    fun: &str,
    matches: Json,
) -> Result<WheelResult, RequestError> {
    let mut kwarg = Map::new();
    kwarg.insert("match".into(), matches);
    wheel(req, fun, Vec::new(), kwarg).await
}

/// Splits command-line arguments as Salt's CLI does for wheel and runner
/// calls: `key=value` is a keyword argument (value parsed as JSON when it is
/// JSON, else kept as text); anything else is positional.
pub fn split_cli_args(items: &[String]) -> (Vec<Json>, Map<String, Json>) {
    let mut arg = Vec::new();
    let mut kwarg = Map::new();
    for item in items {
        match item.split_once('=') {
            Some((k, v))
                if !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') =>
            {
                kwarg.insert(k.to_owned(), parse_value(v));
            }
            _ => arg.push(Json::String(item.clone())),
        }
    }
    (arg, kwarg)
}

/// A minion id usable as a file name in the master's key directories
/// (`pki_dir/minions/<id>` …): not empty, no leading dot, no path separator
/// or NUL — what Salt's own `valid_id` refuses too.
pub fn is_key_file_name(id: &str) -> bool {
    !id.is_empty() && !id.starts_with('.') && !id.contains(['/', '\\', '\0'])
}

/// A command-line value: JSON when it parses as JSON, else the text itself.
pub fn parse_value(v: &str) -> Json {
    serde_json::from_str(v).unwrap_or_else(|_| Json::String(v.to_owned()))
}

/// A minion's cached return of `jid` (`saltutil.find_cached_job`'s answer:
/// the return as the minion would have sent it), if it is one.
fn cached_return(kept: &Json, jid: &str) -> Option<MinionReturn> {
    let kept = kept.as_object()?;
    if kept.get("jid").and_then(Json::as_str) != Some(jid) {
        return None;
    }
    let ret = kept.get("return")?.clone();
    let retcode = kept.get("retcode").and_then(Json::as_i64);
    let success = kept.get("success").and_then(Json::as_bool).unwrap_or(true);
    Some(MinionReturn {
        success: success && retcode.unwrap_or(0) == 0,
        correlation: kept
            .get("metadata")
            .and_then(|m| m.get(jobs::CORRELATION_KEY))
            .and_then(Json::as_str)
            .map(str::to_owned),
        retcode,
        ret,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minions_cached_return_is_read_for_its_jid_only() {
        let kept = serde_json::json!({
            "jid": "20261204031500123456", "fun": "state.apply", "id": "web1",
            "return": {"file_|-x_|-x_|-managed": {"result": true}},
            "retcode": 0, "success": true,
            "metadata": {jobs::CORRELATION_KEY: "dispatch/1/backup_source/7"}
        });
        let r = cached_return(&kept, "20261204031500123456").unwrap();
        assert!(r.success);
        assert_eq!(r.correlation.as_deref(), Some("dispatch/1/backup_source/7"));
        assert!(r.ret.get("file_|-x_|-x_|-managed").is_some());
        // Another job's, or what a minion without cache_jobs says.
        assert!(cached_return(&kept, "20261204031500999999").is_none());
        let none = Json::from("Local jobs cache directory not found; you may need to enable cache_jobs on this minion");
        assert!(cached_return(&none, "20261204031500123456").is_none());
        let failed = serde_json::json!({"jid": "1", "return": {}, "retcode": 2, "success": true});
        assert!(!cached_return(&failed, "1").unwrap().success);
    }

    #[test]
    fn cli_args_split_like_salts() {
        let items: Vec<String> = [
            "web1",
            "match=db*",
            "n=5",
            "pillar={\"a\":1}",
            "a=b=c",
            "-x=1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (arg, kwarg) = split_cli_args(&items);
        assert_eq!(arg, vec![Json::from("web1"), Json::from("-x=1")]);
        assert_eq!(kwarg["match"], "db*");
        assert_eq!(kwarg["n"], 5);
        assert_eq!(kwarg["pillar"], serde_json::json!({"a": 1}));
        assert_eq!(kwarg["a"], "b=c");
    }
}
