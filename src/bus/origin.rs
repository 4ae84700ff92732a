//! Where an event came from, decided once, from how it reached us — never
//! from its tag or from the shape of its data.
//!
//! Salt's bus says nothing about who fired an event. A minion can make the
//! master fire an *unwrapped* event with any tag that is not on Salt's
//! `MINION_EVENT_BLACKLIST` (`event.fire_master` with a `preload` "events"
//! batch), and with the batch's `pretag` even blacklisted ones such as
//! `salt/run/<jid>/new`; the batch's data is free, so it can also imitate
//! the master's minion wrapping (`cmd: _minion_event`, `id`) with another
//! minion's id. Hence:
//!
//! - [`Origin::Master`] is only given to events produced inside this process
//!   and handed over in memory through [`LocalEvents`] — never to anything
//!   read back from the bus;
//! - [`Origin::Minion`] is a wrapped minion event: the id is what the
//!   wrapping *claims*;
//! - [`Origin::Unverified`] is everything else off the bus: Salt's own events
//!   (`salt/auth`, `salt/job/…`, `salt/presence/…`), `salt-run event.send`,
//!   and whatever a minion made the master fire.
//!
//! The daemon's own tags ([`is_own_tag`]: `steward/v1/…` except the registry
//! requests it serves) are delivered to its consumers in memory; their bus
//! copies prove nothing and are not acted on.

use std::sync::Arc;

use tokio::sync::broadcast;

use super::event::{Event, EventKind};

/// The prefix of every tag salt-steward serves or fires.
pub const STEWARD_PREFIX: &str = "steward/v1/";

/// The entities of registry requests (`steward/v1/<entity>/<op>`; a
/// forward's entity has two segments).
pub const REQUEST_ENTITIES: [&str; 6] = [
    "server",
    "model",
    "forward/port",
    "forward/hostname",
    "share",
    "backup",
];

/// The operations of registry requests (`steward/v1/<entity>/<op>`);
/// `result`: a backup server's run result (`steward/v1/backup/result`,
/// sent by its wrapper with `salt-call event.send`).
pub const REQUEST_OPS: [&str; 7] = [
    "create", "find", "update", "delete", "exec", "passwd", "result",
];

/// How many in-process events wait for a slow consumer before the oldest are
/// dropped for it (counted by that consumer, as for the bus).
pub const LOCAL_QUEUE: usize = 4096;

/// Who produced an event, as far as can be known.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Origin {
    /// Produced inside this process (proved).
    Master,
    /// A minion-wrapped event off the bus; the id is the one claimed.
    Minion(String),
    /// Anything else off the bus: the master's or a minion's, unknowable.
    Unverified,
}

impl Origin {
    /// The origin of an event read from the bus: never [`Origin::Master`].
    pub fn of_bus(event: &Event) -> Self {
        match event.kind() {
            EventKind::MinionFired(m) => Self::Minion(m.id.to_owned()),
            EventKind::MinionStart { id } => Self::Minion(id.to_owned()),
            _ => Self::Unverified,
        }
    }

    /// The claimed minion id of a minion-wrapped event.
    pub fn minion(&self) -> Option<&str> {
        match self {
            Self::Minion(id) => Some(id),
            _ => None,
        }
    }

    /// `master`, `minion` or `unverified`, for logs and result events.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Master => "master",
            Self::Minion(_) => "minion",
            Self::Unverified => "unverified",
        }
    }
}

/// Whether `tag` is a registry request
/// (`steward/v1/<server|model|forward/port|forward/hostname>/<create|find|update|delete>`).
pub fn is_request_tag(tag: &str) -> bool {
    tag.strip_prefix(STEWARD_PREFIX)
        .and_then(|rest| rest.rsplit_once('/'))
        .is_some_and(|(entity, op)| REQUEST_ENTITIES.contains(&entity) && REQUEST_OPS.contains(&op))
}

/// Whether `tag` is one salt-steward fires itself (notifications, replies,
/// alerts, rule results …): under `steward/v1/` and not a request. Their bus
/// copies prove nothing (anyone can fire them); the daemon's consumers get
/// the real ones in memory.
pub fn is_own_tag(tag: &str) -> bool {
    tag.starts_with(STEWARD_PREFIX) && !is_request_tag(tag)
}

/// The in-process channel for events this process produced: the proof
/// behind [`Origin::Master`]. Cloning gives another handle on the same channel.
#[derive(Debug, Clone)]
pub struct LocalEvents {
    tx: broadcast::Sender<Arc<Event>>,
}

impl Default for LocalEvents {
    fn default() -> Self {
        Self::new()
    }
}

impl LocalEvents {
    /// A channel holding up to [`LOCAL_QUEUE`] events per consumer.
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(LOCAL_QUEUE);
        Self { tx }
    }

    /// Hands `event` to every current consumer; never waits (a consumer that
    /// fell behind loses the oldest and is told how many).
    pub fn deliver(&self, event: Event) {
        // No consumer is not an error: nothing listens for it.
        let _ = self.tx.send(Arc::new(event));
    }

    /// A consumer of the events delivered from now on.
    pub fn subscribe(&self) -> LocalSubscription {
        LocalSubscription {
            rx: self.tx.subscribe(),
        }
    }
}

/// One consumer's end of [`LocalEvents`].
#[derive(Debug)]
pub struct LocalSubscription {
    rx: broadcast::Receiver<Arc<Event>>,
}

/// What a [`LocalSubscription`] yields.
#[derive(Debug)]
pub enum LocalItem {
    /// An event this process produced.
    Event(Arc<Event>),
    /// This consumer fell behind; `n` events were dropped for it.
    Lagged(u64),
}

impl LocalSubscription {
    /// The next event; `None` once every [`LocalEvents`] handle is gone.
    pub async fn recv(&mut self) -> Option<LocalItem> {
        match self.rx.recv().await {
            Ok(e) => Some(LocalItem::Event(e)),
            Err(broadcast::error::RecvError::Lagged(n)) => Some(LocalItem::Lagged(n)),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::event::from_json;
    use serde_json::json;

    fn ev(tag: &str, data: serde_json::Value) -> Event {
        Event::new(tag.into(), from_json(&data))
    }

    #[test]
    fn nothing_off_the_bus_is_the_master() {
        // Salt's own event, a salt-run event.send, a forged one: all alike.
        for e in [
            ev(
                "salt/auth",
                json!({"id": "m1", "act": "accept", "result": true}),
            ),
            ev("steward/v1/server/deleted", json!({"minion_id": "*"})),
            ev(
                "salt/run/20261123000000000001/new",
                json!({"fun": "runner.event.send"}),
            ),
        ] {
            assert_eq!(Origin::of_bus(&e), Origin::Unverified, "{}", e.tag);
        }
        let wrapped = ev(
            "myapp/x",
            json!({"cmd": "_minion_event", "id": "web1", "data": {}}),
        );
        assert_eq!(Origin::of_bus(&wrapped), Origin::Minion("web1".into()));
        assert_eq!(Origin::of_bus(&wrapped).minion(), Some("web1"));
    }

    #[test]
    fn own_tags_are_everything_under_steward_but_requests() {
        for own in [
            "steward/v1/server/deleted",
            "steward/v1/server/created",
            "steward/v1/model/updated",
            "steward/v1/reply/r1",
            "steward/v1/minion/registered",
            "steward/v1/alert/key-mismatch",
            "steward/v1/rule/x/done",
            "steward/v1/server/create/extra",
            "steward/v1/forward/port/created",
            "steward/v1/forward/hostname/deleted",
            "steward/v1/forward/create",
            "steward/v1/forward/port/create/extra",
        ] {
            assert!(is_own_tag(own), "{own}");
        }
        for not_own in [
            "steward/v1/server/create",
            "steward/v1/server/find",
            "steward/v1/model/delete",
            "steward/v1/forward/port/create",
            "steward/v1/forward/port/find",
            "steward/v1/forward/hostname/update",
            "steward/v1/forward/hostname/delete",
            "salt/auth",
            "myapp/deploy",
            "steward/v2/x",
        ] {
            assert!(!is_own_tag(not_own), "{not_own}");
        }
        assert!(!is_request_tag("steward/v1/server/create/extra"));
    }

    #[tokio::test]
    async fn local_events_reach_every_consumer_and_say_when_lost() {
        let local = LocalEvents::new();
        let mut a = local.subscribe();
        let mut b = local.subscribe();
        local.deliver(ev("steward/v1/server/deleted", json!({"minion_id": "m1"})));
        for s in [&mut a, &mut b] {
            match s.recv().await {
                Some(LocalItem::Event(e)) => assert_eq!(e.tag, "steward/v1/server/deleted"),
                other => panic!("{other:?}"),
            }
        }
        for i in 0..LOCAL_QUEUE + 5 {
            local.deliver(ev("steward/v1/x", json!({ "i": i })));
        }
        assert!(matches!(a.recv().await, Some(LocalItem::Lagged(5))));
    }
}
