//! Matching an event against the rules: one automaton for every tag glob of
//! every rule, then each candidate's sender and conditions.
//!
//! All tag globs are compiled into one [`globset::GlobSet`], so the cost of
//! finding the candidate rules for a tag does not grow with the number of
//! rules the way Salt's reactor loop does (one `fnmatch` per reactor entry,
//! `salt/utils/reactor.py: Reactor.list_reactors`). Globs follow Salt's
//! `fnmatch`: `*` matches any characters including `/`, `?` one character,
//! `[…]`/`[!…]` a class, and a backslash is an ordinary character.

use globset::{Glob, GlobBuilder, GlobMatcher, GlobSet, GlobSetBuilder};
use rmpv::Value;
use serde_json::Value as Json;

use crate::bus::event::{as_str, map_get, to_json, Event, EventKind};
use crate::bus::Origin;

/// A glob with Salt's fnmatch semantics.
pub fn salt_glob(pattern: &str) -> Result<Glob, globset::Error> {
    GlobBuilder::new(pattern)
        .literal_separator(false)
        .backslash_escape(false)
        .build()
}

/// The origin, sender and the user's data of an event, as rules see them.
#[derive(Debug, Clone, Copy)]
pub struct EventView<'a> {
    /// The tag.
    pub tag: &'a str,
    /// The data exactly as Salt (or this process) delivered it.
    pub data: &'a Value,
    /// Who produced it ([`Origin`]: decided from how it reached us, never
    /// from the tag).
    pub origin: &'a Origin,
    /// The minion id a minion-wrapped event claims; `None` otherwise.
    pub sender: Option<&'a str>,
    /// The user's map: `data.data` of a minion-fired event, `data` otherwise.
    pub payload: &'a Value,
}

impl<'a> EventView<'a> {
    /// Views an event from the bus, whose origin is [`Origin::of_bus`].
    pub fn of_bus(e: &'a Event, origin: &'a Origin) -> Self {
        let (sender, payload) = match e.kind() {
            EventKind::MinionFired(m) => (Some(m.id), m.payload),
            EventKind::MinionStart { id } => (Some(id), e.field("data").unwrap_or(&Value::Nil)),
            _ => (None, &e.data),
        };
        Self {
            tag: &e.tag,
            data: &e.data,
            origin,
            sender,
            payload,
        }
    }

    /// Views an event this process produced (delivered in memory, unwrapped).
    pub fn of_local(e: &'a Event) -> Self {
        Self {
            tag: &e.tag,
            data: &e.data,
            origin: &Origin::Master,
            sender: None,
            payload: &e.data,
        }
    }

    /// Views an event with its origin: in memory ([`Origin::Master`]) or off the bus.
    pub fn of(e: &'a Event, origin: &'a Origin) -> Self {
        match origin {
            Origin::Master => Self::of_local(e),
            _ => Self::of_bus(e, origin),
        }
    }

    fn lookup(&self, path: &FieldPath) -> Option<Found<'a>> {
        let mut v = match path.root {
            Root::Tag => return path.keys.is_empty().then_some(Found::Str(self.tag)),
            Root::Sender => {
                return match self.sender {
                    Some(s) if path.keys.is_empty() => Some(Found::Str(s)),
                    _ => None,
                }
            }
            Root::Data => self.data,
            Root::Payload => self.payload,
        };
        for key in &path.keys {
            v = match v {
                Value::Map(_) => map_get(v, key)?,
                Value::Array(items) => items.get(key.parse::<usize>().ok()?)?,
                _ => return None,
            };
        }
        Some(Found::Value(v))
    }
}

enum Found<'a> {
    Str(&'a str),
    Value(&'a Value),
}

impl Found<'_> {
    fn as_str(&self) -> Option<&str> {
        match self {
            Self::Str(s) => Some(s),
            Self::Value(v) => as_str(v),
        }
    }
    fn to_json(&self) -> Json {
        match self {
            Self::Str(s) => Json::String((*s).to_owned()),
            Self::Value(v) => to_json(v),
        }
    }
    fn is_nil(&self) -> bool {
        matches!(self, Self::Value(Value::Nil))
    }
}

/// Where a condition's field starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Root {
    Tag,
    Sender,
    Data,
    Payload,
}

/// A dotted field path: `payload.env`, `data.fun_args.0`, `sender`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldPath {
    pub root: Root,
    pub keys: Vec<String>,
}

impl FieldPath {
    /// Parses a path; the first part must be `tag`, `sender`, `data` or `payload`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut parts = s.split('.');
        let root = match parts.next() {
            Some("tag") => Root::Tag,
            Some("sender") => Root::Sender,
            Some("data") => Root::Data,
            Some("payload") => Root::Payload,
            _ => {
                return Err(format!(
                    "field {s:?} must start with tag, sender, data or payload"
                ))
            }
        };
        let keys: Vec<String> = parts.map(str::to_owned).collect();
        if keys.iter().any(String::is_empty) {
            return Err(format!("field {s:?} has an empty part"));
        }
        if matches!(root, Root::Tag | Root::Sender) && !keys.is_empty() {
            return Err(format!("field {s:?}: tag and sender have no sub-fields"));
        }
        Ok(Self { root, keys })
    }
}

/// What a condition checks.
#[derive(Debug, Clone)]
pub enum CondOp {
    Equals(Json),
    In(Vec<Json>),
    Glob(GlobMatcher),
    Present(bool),
}

/// One compiled `when` entry.
#[derive(Debug, Clone)]
pub struct Condition {
    pub field: FieldPath,
    pub op: CondOp,
}

impl Condition {
    /// Whether the event satisfies it.
    pub fn holds(&self, ev: &EventView<'_>) -> bool {
        let found = ev.lookup(&self.field);
        match &self.op {
            CondOp::Present(want) => found.is_some_and(|f| !f.is_nil()) == *want,
            CondOp::Equals(v) => found.is_some_and(|f| json_eq(&f, v)),
            CondOp::In(vs) => found.is_some_and(|f| vs.iter().any(|v| json_eq(&f, v))),
            CondOp::Glob(g) => found.and_then(|f| f.as_str().map(|s| g.is_match(s))) == Some(true),
        }
    }
}

fn json_eq(f: &Found<'_>, v: &Json) -> bool {
    match (f.as_str(), v) {
        (Some(s), Json::String(w)) => s == w,
        (Some(_), _) => false,
        (None, _) => f.to_json() == *v,
    }
}

/// Who may trigger a rule (`from:`).
#[derive(Debug, Clone)]
pub enum FromMatcher {
    /// `master`: only events this process produced ([`Origin::Master`]):
    /// its notifications, alerts and rule results.
    Master,
    /// `unverified`: also events without a minion's wrapping read off the
    /// bus — Salt's own (`salt/auth`, `salt/presence/…`) and `salt-run
    /// event.send` — which any minion can forge. An explicit opt-in.
    Unverified,
    /// A glob: minion-wrapped events whose (claimed) minion id matches.
    Minion(GlobMatcher),
}

impl FromMatcher {
    /// The `from:` keyword of [`FromMatcher::Unverified`].
    pub const UNVERIFIED: &'static str = "unverified";

    /// Whether an event of `origin` may trigger the rule.
    pub fn allows(&self, origin: &Origin) -> bool {
        match (self, origin) {
            (Self::Master, Origin::Master) => true,
            (Self::Unverified, Origin::Master | Origin::Unverified) => true,
            (Self::Minion(g), Origin::Minion(id)) => g.is_match(id),
            _ => false,
        }
    }
}

/// Every rule's tag globs in one automaton.
#[derive(Debug, Clone)]
pub struct TagMatcher {
    set: GlobSet,
    /// The rule owning each glob, by glob index.
    owner: Vec<usize>,
}

impl Default for TagMatcher {
    fn default() -> Self {
        Self {
            set: GlobSet::empty(),
            owner: Vec::new(),
        }
    }
}

impl TagMatcher {
    /// Builds the automaton from `(rule index, glob)` pairs.
    pub fn build(globs: Vec<(usize, Glob)>) -> Result<Self, globset::Error> {
        let mut b = GlobSetBuilder::new();
        let mut owner = Vec::with_capacity(globs.len());
        for (rule, g) in globs {
            b.add(g);
            owner.push(rule);
        }
        Ok(Self {
            set: b.build()?,
            owner,
        })
    }

    /// The rules (indices, ascending, no repeats) with a glob matching `tag`.
    /// `scratch` is reused between calls to avoid allocating.
    pub fn candidates(&self, tag: &str, scratch: &mut Vec<usize>, out: &mut Vec<usize>) {
        out.clear();
        self.set.matches_into(tag, scratch);
        out.extend(scratch.iter().filter_map(|&g| self.owner.get(g).copied()));
        out.sort_unstable();
        out.dedup();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::event::from_json;
    use serde_json::json;

    fn ev(tag: &str, data: Json) -> Event {
        Event::new(tag.into(), from_json(&data))
    }

    #[test]
    fn globs_follow_salts_fnmatch() {
        let m = |p: &str, t: &str| salt_glob(p).unwrap().compile_matcher().is_match(t);
        assert!(m("salt/job/*/ret/*", "salt/job/2026/ret/web1"));
        assert!(m("salt/*", "salt/job/2026/ret/web1"), "* crosses /");
        assert!(m("myapp/deploy", "myapp/deploy"));
        assert!(!m("myapp/deploy", "myapp/deploy/x"));
        assert!(m("web?", "web1"));
        assert!(m("web[!2]", "web1") && !m("web[!2]", "web2"));
        assert!(m("a\\b", "a\\b"), "backslash is literal, as in fnmatch");
        assert!(salt_glob("myapp/[deploy").is_err());
    }

    #[test]
    fn sender_comes_from_the_wrapping_never_the_tag() {
        let e = ev(
            "salt/auth",
            json!({"cmd": "_minion_event", "id": "web1", "data": {"act": "accept"}}),
        );
        let origin = Origin::of_bus(&e);
        let v = EventView::of(&e, &origin);
        assert_eq!(v.sender, Some("web1"));
        assert_eq!(to_json(v.payload), json!({"act": "accept"}));
        let e = ev("myapp/x", json!({"id": "web1", "v": 1}));
        let origin = Origin::of_bus(&e);
        let v = EventView::of(&e, &origin);
        assert_eq!(v.sender, None, "unwrapped: no sender");
        assert_eq!(*v.origin, Origin::Unverified, "unwrapped: not proved");
        assert_eq!(to_json(v.payload), json!({"id": "web1", "v": 1}));
    }

    #[test]
    fn conditions() {
        let e = ev(
            "myapp/deploy",
            json!({"cmd": "_minion_event", "id": "web1",
                   "data": {"version": "1.2", "env": "prod", "n": 3, "l": ["a", "b"], "z": null}}),
        );
        let origin = Origin::of_bus(&e);
        let v = EventView::of(&e, &origin);
        let c = |f: &str, op: CondOp| {
            Condition {
                field: FieldPath::parse(f).unwrap(),
                op,
            }
            .holds(&v)
        };
        assert!(c("payload.version", CondOp::Present(true)));
        assert!(c("payload.nope", CondOp::Present(false)));
        assert!(c("payload.z", CondOp::Present(false)), "null is absent");
        assert!(c(
            "payload.env",
            CondOp::In(vec![json!("prod"), json!("staging")])
        ));
        assert!(!c("payload.env", CondOp::In(vec![json!("dev")])));
        assert!(c("payload.n", CondOp::Equals(json!(3))));
        assert!(!c("payload.n", CondOp::Equals(json!("3"))));
        assert!(c("payload.l.1", CondOp::Equals(json!("b"))));
        assert!(c("data.id", CondOp::Equals(json!("web1"))));
        assert!(c(
            "sender",
            CondOp::Glob(salt_glob("web*").unwrap().compile_matcher())
        ));
        assert!(c(
            "tag",
            CondOp::Glob(salt_glob("myapp/*").unwrap().compile_matcher())
        ));
        assert!(!c(
            "payload.n",
            CondOp::Glob(salt_glob("*").unwrap().compile_matcher())
        ));
        assert!(FieldPath::parse("nope.x").is_err());
        assert!(FieldPath::parse("payload..x").is_err());
        assert!(FieldPath::parse("tag.x").is_err());
    }

    #[test]
    fn from_master_means_produced_here_and_unverified_is_an_opt_in() {
        let web = FromMatcher::Minion(salt_glob("web*").unwrap().compile_matcher());
        let cases = [
            (Origin::Master, [true, true, false]),
            (Origin::Unverified, [false, true, false]),
            (Origin::Minion("web1".into()), [false, false, true]),
            (Origin::Minion("db1".into()), [false, false, false]),
        ];
        for (origin, want) in cases {
            let got = [
                FromMatcher::Master.allows(&origin),
                FromMatcher::Unverified.allows(&origin),
                web.allows(&origin),
            ];
            assert_eq!(got, want, "{origin:?}");
        }
    }

    #[test]
    fn candidates_come_once_in_rule_order() {
        let globs = vec![
            (0, salt_glob("a/*").unwrap()),
            (0, salt_glob("a/b").unwrap()),
            (1, salt_glob("*").unwrap()),
            (2, salt_glob("c/*").unwrap()),
        ];
        let m = TagMatcher::build(globs).unwrap();
        let (mut s, mut out) = (Vec::new(), Vec::new());
        m.candidates("a/b", &mut s, &mut out);
        assert_eq!(out, [0, 1]);
        m.candidates("c/d", &mut s, &mut out);
        assert_eq!(out, [1, 2]);
    }
}
