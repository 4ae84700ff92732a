//! Events as they come off the bus, and typed views of the ones the daemon
//! acts on (salt-protocol.md §2).
//!
//! `data` stays a faithful msgpack value (str vs bin, ext 78/79, non-map data)
//! so nothing is lost; the views borrow from it and [`Event::data_json`] gives
//! the JSON form used for printing, templating and firing.

use base64::Engine as _;
use rmpv::Value;
use serde_json::Value as Json;

/// Salt's ext type for a datetime (`salt/payload.py: dumps`).
pub const EXT_DATETIME: i8 = 78;
/// Salt's ext type for a constant such as `salt.utils.odict` sentinels.
pub const EXT_CONSTANT: i8 = 79;

/// One event: its tag and its data exactly as decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub tag: String,
    pub data: Value,
}

impl Event {
    /// Wraps a decoded tag and data.
    pub fn new(tag: String, data: Value) -> Self {
        Self { tag, data }
    }

    /// The value under `key` when `data` is a map with a string key `key`.
    pub fn field(&self, key: &str) -> Option<&Value> {
        map_get(&self.data, key)
    }

    /// The string under `key` (str, or bin holding UTF-8).
    pub fn str_field(&self, key: &str) -> Option<&str> {
        self.field(key).and_then(as_str)
    }

    /// The data as JSON (see [`to_json`] for how msgpack maps onto it).
    pub fn data_json(&self) -> Json {
        to_json(&self.data)
    }

    /// What kind of event this is, with its fields, for the ones we act on.
    pub fn kind(&self) -> EventKind<'_> {
        let tag = self.tag.as_str();
        // Anything a minion fired is that, whatever its tag: a minion's plain
        // `event.fire_master` may use any tag (salt/auth, salt/job/…/ret/…),
        // but the master always wraps it (`cmd: _minion_event`, the id).
        if self.str_field("cmd") == Some("_minion_event") {
            if let Some(id) = self.str_field("id") {
                let start = tag
                    .strip_prefix("salt/minion/")
                    .and_then(|r| r.strip_suffix("/start"));
                if start == Some(id) {
                    return EventKind::MinionStart { id };
                }
                return EventKind::MinionFired(MinionFired {
                    id,
                    payload: self.field("data").unwrap_or(&Value::Nil),
                });
            }
        }
        if tag == "salt/auth" {
            if let Some(id) = self.str_field("id") {
                let result = self
                    .field("result")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                let act = match self.str_field("act") {
                    // 3008 says `reject` with `result: false` for a key found
                    // in `minions_rejected/` (`reject` with `result: true` is
                    // autoreject_file putting it there).
                    Some("reject") if !result => AuthAct::Rejected,
                    Some(a) => AuthAct::from_str(a),
                    // Before 3008 a rejected key's event carries no `act`
                    // (salt-protocol.md §2).
                    None if !result => AuthAct::Rejected,
                    None => AuthAct::Other(String::new()),
                };
                return EventKind::Auth(AuthEvent {
                    id,
                    act,
                    result,
                    pub_key: self.str_field("pub"),
                });
            }
        } else if tag == "salt/key" {
            if let (Some(id), Some(act)) = (self.str_field("id"), self.str_field("act")) {
                return EventKind::Key(KeyEvent {
                    id,
                    act: KeyAct::from_str(act),
                    result: self
                        .field("result")
                        .and_then(Value::as_bool)
                        .unwrap_or(false),
                });
            }
        } else if let Some(rest) = tag.strip_prefix("salt/job/") {
            let mut parts = rest.splitn(3, '/');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(jid), Some("new"), None) => {
                    return EventKind::JobNew(JobNew {
                        jid,
                        fun: self.str_field("fun").unwrap_or_default(),
                        minions: self
                            .field("minions")
                            .and_then(Value::as_array)
                            .map(|m| m.iter().filter_map(as_str).collect())
                            .unwrap_or_default(),
                        user: self.str_field("user"),
                    })
                }
                (Some(jid), Some("ret"), Some(id)) if !id.is_empty() => {
                    return EventKind::JobReturn(JobReturn {
                        jid,
                        id,
                        fun: self.str_field("fun").unwrap_or_default(),
                        success: self
                            .field("success")
                            .and_then(Value::as_bool)
                            .unwrap_or(false),
                        retcode: self.field("retcode").and_then(Value::as_i64),
                        ret: self.field("return").unwrap_or(&Value::Nil),
                    })
                }
                _ => {}
            }
        }
        EventKind::Other
    }
}

/// Typed views of the events the daemon acts on.
#[derive(Debug, Clone, PartialEq)]
pub enum EventKind<'a> {
    /// `salt/auth`: a minion authenticating (pending, accepted, denied, …).
    Auth(AuthEvent<'a>),
    /// `salt/key`: a key accepted, rejected or deleted on the master.
    Key(KeyEvent<'a>),
    /// `salt/minion/<id>/start`, fired by that minion itself.
    MinionStart { id: &'a str },
    /// `salt/job/<jid>/new`: a job was published.
    JobNew(JobNew<'a>),
    /// `salt/job/<jid>/ret/<id>`: one minion's return.
    JobReturn(JobReturn<'a>),
    /// An event a minion fired (`event.send`), with the minion's id.
    MinionFired(MinionFired<'a>),
    /// Anything else.
    Other,
}

/// `salt/auth` fields.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthEvent<'a> {
    pub id: &'a str,
    pub act: AuthAct,
    pub result: bool,
    /// The minion's public key, clean_key'd (no trailing newline).
    pub pub_key: Option<&'a str>,
}

/// What the master did with an authentication attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthAct {
    Pend,
    Accept,
    /// The key differs from the accepted one; written to `minions_denied/`.
    Denied,
    /// Refused by `autoreject_file`.
    Reject,
    /// The key is in `minions_rejected/` (the event has no `act`).
    Rejected,
    /// `max_minions` reached.
    Full,
    Other(String),
}

impl AuthAct {
    fn from_str(s: &str) -> Self {
        match s {
            "pend" => Self::Pend,
            "accept" => Self::Accept,
            "denied" => Self::Denied,
            "reject" => Self::Reject,
            "full" => Self::Full,
            other => Self::Other(other.to_owned()),
        }
    }
}

/// `salt/key` fields.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyEvent<'a> {
    pub id: &'a str,
    pub act: KeyAct,
    pub result: bool,
}

/// The key operation a `salt/key` event reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyAct {
    Accept,
    Reject,
    Delete,
    Other(String),
}

impl KeyAct {
    /// 3006 and 3007 say `accept`/`reject`; 3008 names the state the key
    /// moved to (`accepted`/`rejected`, `Key.DIR_MAP`).
    fn from_str(s: &str) -> Self {
        match s {
            "accept" | "accepted" => Self::Accept,
            "reject" | "rejected" => Self::Reject,
            "delete" => Self::Delete,
            other => Self::Other(other.to_owned()),
        }
    }
}

/// `salt/job/<jid>/new` fields.
#[derive(Debug, Clone, PartialEq)]
pub struct JobNew<'a> {
    pub jid: &'a str,
    pub fun: &'a str,
    pub minions: Vec<&'a str>,
    pub user: Option<&'a str>,
}

/// `salt/job/<jid>/ret/<id>` fields.
#[derive(Debug, Clone, PartialEq)]
pub struct JobReturn<'a> {
    pub jid: &'a str,
    pub id: &'a str,
    pub fun: &'a str,
    pub success: bool,
    pub retcode: Option<i64>,
    pub ret: &'a Value,
}

/// A minion-fired event: the sender's id and the user's own data.
#[derive(Debug, Clone, PartialEq)]
pub struct MinionFired<'a> {
    pub id: &'a str,
    pub payload: &'a Value,
}

/// Looks up a string key in a msgpack map.
pub fn map_get<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.as_map()?
        .iter()
        .find(|(k, _)| as_str(k) == Some(key))
        .map(|(_, v)| v)
}

/// A str (or a bin holding UTF-8, as replies from the ReqServer carry) as &str.
pub fn as_str(v: &Value) -> Option<&str> {
    match v {
        Value::String(s) => s.as_str(),
        Value::Binary(b) => std::str::from_utf8(b).ok(),
        _ => None,
    }
}

/// msgpack → JSON. Strings and UTF-8 bins become strings; other bins become
/// `{"$binary": base64}`; ext 78 (datetime) becomes its ASCII text; ext 79
/// (Salt constant) its `[name, value]`; other exts `{"$ext": [type, base64]}`;
/// non-string map keys their JSON text.
pub fn to_json(v: &Value) -> Json {
    match v {
        Value::Nil => Json::Null,
        Value::Boolean(b) => Json::Bool(*b),
        Value::Integer(i) => {
            if let Some(n) = i.as_i64() {
                Json::from(n)
            } else if let Some(n) = i.as_u64() {
                Json::from(n)
            } else {
                Json::Null
            }
        }
        Value::F32(f) => {
            serde_json::Number::from_f64(f64::from(*f)).map_or(Json::Null, Json::Number)
        }
        Value::F64(f) => serde_json::Number::from_f64(*f).map_or(Json::Null, Json::Number),
        Value::String(s) => Json::String(match s.as_str() {
            Some(s) => s.to_owned(),
            None => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        }),
        Value::Binary(b) => match std::str::from_utf8(b) {
            Ok(s) => Json::String(s.to_owned()),
            Err(_) => serde_json::json!({ "$binary": b64(b) }),
        },
        Value::Array(a) => Json::Array(a.iter().map(to_json).collect()),
        Value::Map(m) => Json::Object(
            m.iter()
                .map(|(k, v)| {
                    let key = match as_str(k) {
                        Some(s) => s.to_owned(),
                        None => to_json(k).to_string(),
                    };
                    (key, to_json(v))
                })
                .collect(),
        ),
        Value::Ext(EXT_DATETIME, d) => Json::String(String::from_utf8_lossy(d).into_owned()),
        Value::Ext(EXT_CONSTANT, d) => match rmpv::decode::read_value(&mut &d[..]) {
            Ok(inner) => to_json(&inner),
            Err(_) => serde_json::json!({ "$ext": [EXT_CONSTANT, b64(d)] }),
        },
        Value::Ext(t, d) => serde_json::json!({ "$ext": [t, b64(d)] }),
    }
}

/// JSON → msgpack, as Salt packs a Python dict: strings as str.
pub fn from_json(v: &Json) -> Value {
    match v {
        Json::Null => Value::Nil,
        Json::Bool(b) => Value::Boolean(*b),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                Value::F64(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Json::String(s) => Value::from(s.as_str()),
        Json::Array(a) => Value::Array(a.iter().map(from_json).collect()),
        Json::Object(o) => Value::Map(
            o.iter()
                .map(|(k, v)| (Value::from(k.as_str()), from_json(v)))
                .collect(),
        ),
    }
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::codec::{Decoded, FrameDecoder};
    use bytes::BytesMut;

    fn real_events() -> Vec<Event> {
        let mut buf = BytesMut::from(&include_bytes!("../../tests/fixtures/bus-3007.raw")[..]);
        let mut dec = FrameDecoder::default();
        let mut out = Vec::new();
        while let Some(d) = dec.decode(&mut buf) {
            if let Decoded::Event(e) = d {
                out.push(e);
            }
        }
        out
    }

    fn ev(tag: &str, data: Json) -> Event {
        Event::new(tag.into(), from_json(&data))
    }

    #[test]
    fn typed_views_of_a_real_session() {
        let evs = real_events();
        let kinds: Vec<_> = evs.iter().map(Event::kind).collect();
        assert!(kinds.iter().any(|k| matches!(
            k,
            EventKind::Auth(AuthEvent {
                id: "test-minion-1",
                act: AuthAct::Pend,
                result: true,
                pub_key: Some(_)
            })
        )));
        assert!(kinds.iter().any(|k| matches!(
            k,
            EventKind::Key(KeyEvent {
                id: "test-minion-1",
                act: KeyAct::Accept,
                result: true
            })
        )));
        assert!(kinds.iter().any(|k| matches!(
            k,
            EventKind::MinionStart {
                id: "test-minion-1"
            }
        )));
        let ret = kinds
            .iter()
            .find_map(|k| match k {
                EventKind::JobReturn(r) if r.fun == "test.ping" => Some(r.clone()),
                _ => None,
            })
            .expect("a test.ping return in the capture");
        assert!(ret.success);
        assert_eq!(ret.ret, &Value::Boolean(true));
        assert!(kinds
            .iter()
            .any(|k| matches!(k, EventKind::JobNew(j) if j.minions.contains(&"test-minion-1"))));
    }

    #[test]
    fn minion_made_events_on_salt_tags_are_not_taken_for_salts_own() {
        // event.fire_master with preload: runner/return keys at the top level
        let fake_ret = ev(
            "salt/job/20261123000000000001/ret/other-minion",
            serde_json::json!({"cmd": "_minion_event", "id": "evil", "data": {},
                               "success": true, "return": true, "retcode": 0}),
        );
        assert!(matches!(
            fake_ret.kind(),
            EventKind::MinionFired(MinionFired { id: "evil", .. })
        ));
        let fake_auth = ev(
            "salt/auth",
            serde_json::json!({"cmd": "_minion_event", "id": "evil", "act": "pend", "result": true}),
        );
        assert!(matches!(fake_auth.kind(), EventKind::MinionFired(_)));
        // a minion's own start event is still a start event; another's is not
        let start = ev(
            "salt/minion/m1/start",
            serde_json::json!({"cmd": "_minion_event", "id": "m1", "data": "Minion m1 started"}),
        );
        assert_eq!(start.kind(), EventKind::MinionStart { id: "m1" });
        let other = ev(
            "salt/minion/m2/start",
            serde_json::json!({"cmd": "_minion_event", "id": "m1"}),
        );
        assert!(matches!(other.kind(), EventKind::MinionFired(_)));
    }

    #[test]
    fn rejected_auth_has_no_act() {
        let e = ev(
            "salt/auth",
            serde_json::json!({"result": false, "id": "m1", "pub": "x"}),
        );
        assert!(matches!(
            e.kind(),
            EventKind::Auth(AuthEvent {
                act: AuthAct::Rejected,
                ..
            })
        ));
    }

    #[test]
    fn minion_fired_event_carries_the_sender() {
        let e = ev(
            "myapp/deploy",
            serde_json::json!({"id": "web1", "cmd": "_minion_event", "tag": "myapp/deploy",
                               "data": {"version": "1.2"}}),
        );
        match e.kind() {
            EventKind::MinionFired(m) => {
                assert_eq!(m.id, "web1");
                assert_eq!(to_json(m.payload), serde_json::json!({"version": "1.2"}));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn salt_ext_types_and_non_map_data_convert() {
        let mut inner = Vec::new();
        rmpv::encode::write_value(
            &mut inner,
            &Value::Array(vec![Value::from("NOT_SET"), Value::from(1)]),
        )
        .unwrap();
        let v = Value::Map(vec![
            (
                Value::from("when"),
                Value::Ext(EXT_DATETIME, b"20261123T08:30:53.095846".to_vec()),
            ),
            (Value::from("const"), Value::Ext(EXT_CONSTANT, inner)),
            (Value::from("raw"), Value::Binary(vec![0xff, 0x00])),
            (Value::from(7), Value::from("int key")),
        ]);
        assert_eq!(
            to_json(&v),
            serde_json::json!({"when": "20261123T08:30:53.095846", "const": ["NOT_SET", 1],
                               "raw": {"$binary": "/wA="}, "7": "int key"})
        );
        let list = Event::new("t".into(), Value::Array(vec![Value::from(1)]));
        assert_eq!(list.field("x"), None);
        assert_eq!(list.kind(), EventKind::Other);
    }
}
