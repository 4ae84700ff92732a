//! The registry's Server service on the event bus (capability 4).
//!
//! Requests are events `steward/v1/<server|model>/<create|find|update|delete>`
//! whose data is a map with a `request_id` beside the arguments; the reply is
//! fired as `steward/v1/reply/<request_id>`: `{ok: true, result}` or
//! `{ok: false, error: {code, message}}`. A server `update` may carry the
//! `revision` it was made from: refused with `conflict` if the server moved
//! on; without it the patch is applied to the server as it is (never a
//! stale write-back, see [`registry::Service::update_server`]).
//!
//! Who may change the registry. Salt's bus carries no sender identity, and a
//! minion can make the master fire an event with any non-blacklisted tag and
//! data *without* the `_minion_event` wrapper (`event.fire_master` with a
//! `preload` "events" batch; pinned by the test
//! `bus_salt::a_minion_can_fire_an_unwrapped_event_but_not_a_blacklisted_tag`).
//! So the shape of an event proves nothing. The rules:
//! - a wrapped minion event (`cmd: _minion_event`, `id`) comes from that
//!   minion: allowed when the id is in `trusted_minions`;
//! - an unwrapped request is accepted only when corroborated by the
//!   `salt/run/<jid>/new` event that `salt-run event.send` fires just before
//!   it (`fun: runner.event.send`, `fun_args` naming the same tag and
//!   request id). Minions cannot fire a clean `salt/run/*` event: Salt's
//!   `MINION_EVENT_BLACKLIST` drops it from batches, and a plain minion event
//!   on that tag keeps the wrapper's `cmd`/`id` keys, which disqualify it
//!   (pinned by `daemon::registry_requests_on_the_bus_with_trust_rules`);
//! - `find` changes nothing and is answered for anyone.
//!
//! An unwrapped request waits up to [`CORROBORATION_WAIT`] for its runner
//! event (the two may come out of the bus in either order), then is refused.

use std::collections::VecDeque;
use std::time::Duration;

use serde_json::{json, Map, Value as Json};
use tokio::time::Instant;

use crate::bus::event::{to_json, Event, EventKind};
use crate::registry::{self, ServerRef, Store};

/// Tag prefix of requests.
pub const REQUEST_PREFIX: &str = "steward/v1/";

/// How long an unwrapped request waits for its `salt/run/<jid>/new`.
pub const CORROBORATION_WAIT: Duration = Duration::from_secs(3);

/// How long a runner event is remembered for a request that follows it.
const CORROBORATION_TTL: Duration = Duration::from_secs(30);

/// What a request is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entity {
    Server,
    Model,
}

/// What a request asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Create,
    Find,
    Update,
    Delete,
}

/// Who fired a request, as far as the bus tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sender {
    /// A wrapped minion event: the minion's id.
    Minion(String),
    /// No wrapper: the master's user, or a minion forging it (see module docs).
    Unwrapped,
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub entity: Entity,
    pub op: Op,
    pub tag: String,
    pub request_id: String,
    pub sender: Sender,
    /// The arguments, without `request_id` and Salt's own keys.
    pub args: Map<String, Json>,
}

/// A request that cannot be served, with the id to reply to when known.
#[derive(Debug, Clone, PartialEq)]
pub struct Malformed {
    pub request_id: Option<String>,
    pub message: String,
}

/// Parses `event` as a request. `None` when its tag is not a request tag
/// (replies and notifications share the prefix and are not requests).
pub fn parse(event: &Event) -> Option<Result<Request, Malformed>> {
    let rest = event.tag.strip_prefix(REQUEST_PREFIX)?;
    let (entity, op) = rest.split_once('/')?;
    let entity = match entity {
        "server" => Entity::Server,
        "model" => Entity::Model,
        _ => return None,
    };
    let op = match op {
        "create" => Op::Create,
        "find" => Op::Find,
        "update" => Op::Update,
        "delete" => Op::Delete,
        _ => return None,
    };
    let (sender, payload) = match event.kind() {
        EventKind::MinionFired(m) => (Sender::Minion(m.id.to_owned()), to_json(m.payload)),
        _ => (Sender::Unwrapped, event.data_json()),
    };
    let Json::Object(mut args) = payload else {
        return Some(Err(Malformed {
            request_id: None,
            message: format!("{}: data is not a map", event.tag),
        }));
    };
    // Salt's own additions: _stamp, and __pub_* from event.send.
    args.retain(|k, _| k != "_stamp" && !k.starts_with("__pub_"));
    let request_id = match args.remove("request_id") {
        Some(Json::String(id)) if valid_request_id(&id) => id,
        Some(other) => {
            return Some(Err(Malformed {
                request_id: None,
                message: format!(
                    "{}: request_id must be 1-128 characters of [A-Za-z0-9._-], not {other}",
                    event.tag
                ),
            }))
        }
        None => {
            return Some(Err(Malformed {
                request_id: None,
                message: format!("{}: no request_id", event.tag),
            }))
        }
    };
    Some(Ok(Request {
        entity,
        op,
        tag: event.tag.clone(),
        request_id,
        sender,
        args,
    }))
}

fn valid_request_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// The tag a reply to `request_id` is fired on.
pub fn reply_tag(request_id: &str) -> String {
    format!("{REQUEST_PREFIX}reply/{request_id}")
}

/// The reply for a failure.
pub fn error_reply(code: &str, message: &str) -> Json {
    json!({"ok": false, "error": {"code": code, "message": message}})
}

/// Remembers recent `salt-run event.send` invocations, to corroborate the
/// unwrapped requests that follow them.
#[derive(Debug, Default)]
pub struct Corroborations {
    recent: VecDeque<(Instant, String, String)>,
}

impl Corroborations {
    /// Records `event` if it is the `salt/run/<jid>/new` of `event.send` for a
    /// request tag. Returns true when it recorded something.
    pub fn observe(&mut self, event: &Event, now: Instant) -> bool {
        let Some(rest) = event.tag.strip_prefix("salt/run/") else {
            return false;
        };
        if !rest.ends_with("/new") || event.str_field("fun") != Some("runner.event.send") {
            return false;
        }
        // Salt checks its minion blacklist only for batched events: a
        // minion's plain `event.fire_master` can still use a salt/run/ tag,
        // with `preload` keys at the top of the data. Such an event always
        // keeps the wrapper's `cmd` and `id` keys (preload can change their
        // values, not remove them); the master's own runner event has neither.
        if event.field("cmd").is_some() || event.field("id").is_some() {
            return false;
        }
        let args = event.field("fun_args").map(to_json).unwrap_or(Json::Null);
        let Some((tag, request_id)) = runner_send_args(&args) else {
            return false;
        };
        if !tag.starts_with(REQUEST_PREFIX) {
            return false;
        }
        while self
            .recent
            .front()
            .is_some_and(|(t, _, _)| now.duration_since(*t) > CORROBORATION_TTL)
        {
            self.recent.pop_front();
        }
        if self.recent.len() >= 4096 {
            self.recent.pop_front();
        }
        self.recent.push_back((now, tag, request_id));
        true
    }

    /// Takes the corroboration of `req`, if one was seen (each is used once).
    pub fn take(&mut self, req: &Request) -> bool {
        match self
            .recent
            .iter()
            .position(|(_, tag, id)| *tag == req.tag && *id == req.request_id)
        {
            Some(i) => {
                self.recent.remove(i);
                true
            }
            None => false,
        }
    }
}

/// `fun_args` of `runner.event.send`: `[tag, data]` (data a map, or text
/// holding JSON/YAML flow that parses as JSON), possibly as kwargs.
fn runner_send_args(args: &Json) -> Option<(String, String)> {
    let list = args.as_array()?;
    let mut tag = None;
    let mut data = None;
    for (i, a) in list.iter().enumerate() {
        match a {
            Json::String(s) if i == 0 => tag = Some(s.clone()),
            Json::Object(m) if m.get("__kwarg__").is_some() => {
                if let Some(Json::String(t)) = m.get("tag") {
                    tag = Some(t.clone());
                }
                if let Some(d) = m.get("data") {
                    data = Some(d.clone());
                }
            }
            other if i == 1 => data = Some(other.clone()),
            _ => {}
        }
    }
    let data = match data? {
        Json::String(text) => serde_json::from_str(&text).ok()?,
        other => other,
    };
    let id = data.get("request_id")?.as_str()?.to_owned();
    Some((tag?, id))
}

/// Serves one authorised request against the registry; the reply data.
pub async fn serve<S: Store>(service: &registry::Service<S>, req: &Request) -> Json {
    match execute(service, req).await {
        Ok(result) => json!({"ok": true, "result": result}),
        Err(e) => error_reply(e.code(), &e.to_string()),
    }
}

async fn execute<S: Store>(
    service: &registry::Service<S>,
    req: &Request,
) -> Result<Json, registry::Error> {
    let text = |key: &str| -> Result<String, registry::Error> {
        match req.args.get(key) {
            Some(Json::String(s)) => Ok(s.clone()),
            Some(Json::Number(n)) => Ok(n.to_string()),
            Some(other) => Err(registry::Error::invalid(
                key,
                format!("must be text, not {other}"),
            )),
            None => Err(registry::Error::invalid(key, "required".to_owned())),
        }
    };
    let opt_text = |key: &str| req.args.get(key).and_then(Json::as_str).map(str::to_owned);
    let server_ref = || -> Result<ServerRef, registry::Error> {
        let key = text("server")
            .or_else(|_| text("id"))
            .or_else(|_| text("name"))?;
        Ok(key.parse().unwrap_or(ServerRef::Name(key)))
    };
    match (req.entity, req.op) {
        (Entity::Server, Op::Create) => {
            let patch = registry::ServerPatch::from_json(&req.args, &[])?;
            encode(&service.create_server(patch).await?)
        }
        (Entity::Server, Op::Find) => {
            let status = match opt_text("status") {
                Some(s) => Some(s.parse()?),
                None => None,
            };
            let filter = registry::ServerFilter {
                name: opt_text("name"),
                model: opt_text("model"),
                minion_id: opt_text("minion_id"),
                status,
                changed_since: None,
            };
            encode(&service.find_servers(&filter).await?)
        }
        (Entity::Server, Op::Update) => {
            let target = server_ref()?;
            let patch = registry::ServerPatch::from_json(&req.args, &["server", "id"])?;
            encode(&service.update_server(&target, patch).await?)
        }
        (Entity::Server, Op::Delete) => encode(&service.delete_server(&server_ref()?).await?),
        (Entity::Model, Op::Create) => {
            let states = string_list(req.args.get("states"))?;
            let model = service
                .create_model(
                    &text("name")?,
                    &opt_text("description").unwrap_or_default(),
                    &states,
                )
                .await?;
            encode(&model)
        }
        (Entity::Model, Op::Find) => match opt_text("name") {
            Some(name) => encode(&vec![service.get_model(&name).await?]),
            None => encode(&service.list_models().await?),
        },
        (Entity::Model, Op::Update) => {
            let patch = registry::ModelPatch {
                description: opt_text("description"),
                states: match req.args.get("states") {
                    Some(v) => Some(string_list(Some(v))?),
                    None => None,
                },
            };
            encode(&service.update_model(&text("name")?, patch).await?)
        }
        (Entity::Model, Op::Delete) => encode(&service.delete_model(&text("name")?).await?),
    }
}

fn string_list(v: Option<&Json>) -> Result<Vec<String>, registry::Error> {
    match v {
        None | Some(Json::Null) => Ok(Vec::new()),
        Some(Json::Array(items)) => items
            .iter()
            .map(|i| {
                i.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| registry::Error::invalid("states", "must be strings".to_owned()))
            })
            .collect(),
        Some(Json::String(s)) => Ok(s
            .split(',')
            .map(|x| x.trim().to_owned())
            .filter(|x| !x.is_empty())
            .collect()),
        Some(other) => Err(registry::Error::invalid(
            "states",
            format!("must be a list, not {other}"),
        )),
    }
}

/// A result as reply JSON.
fn encode<T: serde::Serialize>(v: &T) -> Result<Json, registry::Error> {
    serde_json::to_value(v)
        .map_err(|e| registry::Error::invalid("result", format!("cannot encode: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::event::from_json;

    fn ev(tag: &str, data: Json) -> Event {
        Event::new(tag.into(), from_json(&data))
    }

    #[test]
    fn requests_are_parsed_with_their_sender() {
        let master = ev(
            "steward/v1/server/create",
            json!({"request_id": "r1", "name": "a.example.org", "model": "web", "_stamp": "x"}),
        );
        let r = parse(&master).unwrap().unwrap();
        assert_eq!(
            (r.entity, r.op, r.sender.clone()),
            (Entity::Server, Op::Create, Sender::Unwrapped)
        );
        assert_eq!(r.request_id, "r1");
        assert_eq!(
            r.args,
            json!({"name": "a.example.org", "model": "web"})
                .as_object()
                .unwrap()
                .clone()
        );

        let minion = ev(
            "steward/v1/model/find",
            json!({"id": "web1", "cmd": "_minion_event", "tag": "steward/v1/model/find",
                   "data": {"request_id": "r2", "__pub_fun": "event.send"}}),
        );
        let r = parse(&minion).unwrap().unwrap();
        assert_eq!(r.sender, Sender::Minion("web1".into()));
        assert!(r.args.is_empty());

        assert!(parse(&ev("steward/v1/reply/r1", json!({"ok": true}))).is_none());
        assert!(parse(&ev("steward/v1/server/created", json!({}))).is_none());
        assert!(parse(&ev("other/tag", json!({}))).is_none());
    }

    #[test]
    fn malformed_requests_say_why() {
        let no_id = parse(&ev("steward/v1/server/create", json!({"name": "a"}))).unwrap();
        assert!(no_id.unwrap_err().message.contains("no request_id"));
        let bad_id = parse(&ev(
            "steward/v1/server/create",
            json!({"request_id": "a/b"}),
        ))
        .unwrap();
        assert!(bad_id.unwrap_err().message.contains("request_id"));
        let list = parse(&ev("steward/v1/server/create", json!([1, 2]))).unwrap();
        assert!(list.unwrap_err().message.contains("not a map"));
    }

    #[test]
    fn salt_run_event_send_corroborates_once() {
        let now = Instant::now();
        let mut c = Corroborations::default();
        let run = ev(
            "salt/run/20261123000000000001/new",
            json!({"fun": "runner.event.send", "jid": "1", "user": "root",
                   "fun_args": ["steward/v1/server/create", {"request_id": "r1", "name": "a"}]}),
        );
        assert!(c.observe(&run, now));
        // data given as text (as salt-run may pass it) works too
        let run_text = ev(
            "salt/run/20261123000000000002/new",
            json!({"fun": "runner.event.send",
                   "fun_args": ["steward/v1/server/delete", "{\"request_id\": \"r2\"}"]}),
        );
        assert!(c.observe(&run_text, now));
        let req = parse(&ev(
            "steward/v1/server/create",
            json!({"request_id": "r1", "name": "a"}),
        ))
        .unwrap()
        .unwrap();
        assert!(c.take(&req));
        assert!(!c.take(&req), "a corroboration is used once");
        let other = parse(&ev("steward/v1/server/create", json!({"request_id": "r9"})))
            .unwrap()
            .unwrap();
        assert!(!c.take(&other));
        let not_send = ev(
            "salt/run/3/new",
            json!({"fun": "runner.jobs.list_jobs", "fun_args": []}),
        );
        assert!(!c.observe(&not_send, now));
    }
}
