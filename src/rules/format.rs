//! The rule file as written (YAML), before it is compiled.
//!
//! Every struct denies unknown fields, so a misspelt key is an error naming
//! the key, the file, the line and the column. The field docs are the user
//! documentation of the format (see also `reactors/README.md`).
//!
//! ```yaml
//! rules:
//!   - name: deploy-on-request
//!     on: ["myapp/deploy"]
//!     from: "web*"
//!     when:
//!       - { field: payload.version, present: true }
//!     do:
//!       - state.apply: { target: "{{ sender }}", mods: myapp, pillar: { version: "{{ payload.version }}" } }
//! ```

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value as Json};

/// One rule file: a list under `rules:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFile {
    /// The rules, in order. An empty file is no rules.
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
}

/// One rule.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Unique across all files; letters, digits, `-`, `_`, `.`. Used in the
    /// result tags `steward/v1/rule/<name>/done|failed` and in logs.
    pub name: String,
    /// One tag glob or a list of them (Salt's fnmatch: `*` matches any
    /// characters, `/` included; `?` one character; `[abc]`, `[!abc]`).
    pub on: StringOrList,
    /// Who must have produced the event: `master` (only what salt-steward
    /// itself fires: its notifications, alerts and rule results, handed over
    /// in memory; their bus copies are never acted on), `unverified` (also
    /// unwrapped events off the bus — Salt's own, `salt-run event.send` —
    /// which any minion can forge; `rules check` warns), or a glob on the
    /// (claimed) minion id of a minion-fired event. None: any origin.
    #[serde(default)]
    pub from: Option<String>,
    /// Conditions on the event; all must hold.
    #[serde(default)]
    pub when: Vec<ConditionSpec>,
    /// The actions, run in order for each matching event.
    /// (Each is a one-key map `{kind: {…}}`, as Salt users write them.)
    #[serde(rename = "do", with = "serde_yaml_ng::with::singleton_map_recursive")]
    pub actions: Vec<ActionSpec>,
    /// `false` keeps the rule in the file but never matches it. Default true.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// At most `max` runs of each action per `per`, per target; the rest are
    /// dropped, counted and logged.
    #[serde(default)]
    pub rate_limit: Option<RateLimitSpec>,
    /// Coalesce a burst: an action runs once per target, `debounce` after
    /// the last matching event, with that last event's values.
    #[serde(default)]
    pub debounce: Option<DurationSpec>,
    /// How long a job's returns are waited for. Default: `rules.job_timeout`
    /// of the daemon's config.
    #[serde(default)]
    pub timeout: Option<DurationSpec>,
}

fn yes() -> bool {
    true
}

/// A condition on one field of the event. Exactly one of `equals`, `in`,
/// `glob`, `present` is given.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConditionSpec {
    /// A dotted path from `tag`, `sender`, `data` or `payload`, e.g.
    /// `payload.env`, `data.id`.
    pub field: String,
    /// The field equals this value (YAML types: `1` is not `"1"`).
    #[serde(default)]
    pub equals: Option<Json>,
    /// The field equals one of these values.
    #[serde(default, rename = "in")]
    pub one_of: Option<Vec<Json>>,
    /// The field is a string matching this glob.
    #[serde(default)]
    pub glob: Option<String>,
    /// `true`: the field exists (and is not null); `false`: it does not.
    #[serde(default)]
    pub present: Option<bool>,
}

/// An action: a one-key map naming its kind.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum ActionSpec {
    /// `state.apply` on a target, with mods and pillar.
    #[serde(rename = "state.apply")]
    StateApply(StateApplySpec),
    /// Any execution function on a target.
    #[serde(rename = "local")]
    Local(LocalSpec),
    /// A wheel function on the master (`key.accept` …).
    #[serde(rename = "wheel")]
    Wheel(CallSpec),
    /// A runner function on the master.
    #[serde(rename = "runner")]
    Runner(CallSpec),
    /// Fire an event on the master's bus.
    #[serde(rename = "fire")]
    Fire(FireSpec),
}

/// `state.apply:` fields.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateApplySpec {
    /// Target expression (a template).
    pub target: String,
    /// `glob` (default), `list`, `compound`, `grain`, `pcre`.
    #[serde(default)]
    pub tgt_type: Option<String>,
    /// SLS names (one or a list; templates). None: the highstate.
    #[serde(default)]
    pub mods: Option<StringOrList>,
    /// Pillar data for the run (values are templates).
    #[serde(default)]
    pub pillar: Option<Json>,
    /// Other keyword arguments of `state.apply` (`test`, `saltenv` …).
    #[serde(default)]
    pub kwarg: Map<String, Json>,
}

/// `local:` fields.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalSpec {
    /// Target expression (a template).
    pub target: String,
    /// `glob` (default), `list`, `compound`, `grain`, `pcre`.
    #[serde(default)]
    pub tgt_type: Option<String>,
    /// The execution function, e.g. `cmd.run` (not a template).
    pub fun: String,
    /// Positional arguments (templates).
    #[serde(default)]
    pub arg: Vec<Json>,
    /// Keyword arguments (templates).
    #[serde(default)]
    pub kwarg: Map<String, Json>,
}

/// `wheel:` and `runner:` fields.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallSpec {
    /// The function, e.g. `key.accept`, `jobs.list_jobs` (not a template).
    pub fun: String,
    /// Positional arguments (templates).
    #[serde(default)]
    pub arg: Vec<Json>,
    /// Keyword arguments (templates).
    #[serde(default)]
    pub kwarg: Map<String, Json>,
}

/// `fire:` fields.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FireSpec {
    /// The tag (a template).
    pub tag: String,
    /// The data (values are templates). Default `{}`.
    #[serde(default)]
    pub data: Option<Json>,
}

/// `rate_limit:` fields.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSpec {
    /// Runs allowed per window (at least 1).
    pub max: u32,
    /// The window, e.g. `10s`, `500ms`, `5m`, `1h`.
    pub per: DurationSpec,
}

/// One string or a list of strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StringOrList(pub Vec<String>);

impl<'de> Deserialize<'de> for StringOrList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StringOrList;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
                Ok(StringOrList(vec![s.to_owned()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    out.push(s);
                }
                Ok(StringOrList(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// A duration written `250ms`, `10s`, `5m`, `1h`, or a number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationSpec(pub Duration);

impl<'de> Deserialize<'de> for DurationSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = DurationSpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as 500ms, 10s, 5m, 1h")
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Self::Value, E> {
                Ok(DurationSpec(Duration::from_secs(n)))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Self::Value, E> {
                u64::try_from(n)
                    .map(|n| DurationSpec(Duration::from_secs(n)))
                    .map_err(|_| E::custom(format!("negative duration {n}")))
            }
            fn visit_f64<E: de::Error>(self, n: f64) -> Result<Self::Value, E> {
                Duration::try_from_secs_f64(n)
                    .map(DurationSpec)
                    .map_err(|_| E::custom(format!("invalid duration {n} (negative or too long)")))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
                parse_duration(s).map(DurationSpec).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// Parses `250ms`, `10s`, `1.5s`, `5m`, `1h`, `2d`, or bare seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (use e.g. 500ms, 10s, 5m, 1h)"))?;
    let factor = match unit.trim() {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86_400.0,
        other => {
            return Err(format!(
                "invalid duration unit {other:?} in {s:?} (use ms, s, m, h or d)"
            ))
        }
    };
    Duration::try_from_secs_f64(n * factor)
        .map_err(|_| format!("invalid duration {s:?} (too long)"))
}

/// Parses a rule file's text. An empty or all-comment file is no rules.
pub fn parse(text: &str) -> Result<RuleFile, serde_yaml_ng::Error> {
    if text
        .lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
    {
        return Ok(RuleFile::default());
    }
    serde_yaml_ng::from_str(text)
}

/// The rule of issue #6, as written there (tests of several modules use it).
#[cfg(test)]
pub(crate) const ISSUE_EXAMPLE: &str = r#"rules:
  - name: deploy-on-request
    on: ["myapp/deploy"]
    from: "web*"
    when:
      - { field: payload.version, present: true }
      - { field: payload.env, in: [prod, staging] }
    do:
      - state.apply: { target: "{{ sender }}", mods: myapp, pillar: { version: "{{ payload.version }}" } }
      - local: { target: "web*", fun: cmd.run, arg: ["systemctl reload nginx"] }
      - fire: { tag: "myapp/deployed", data: { minion: "{{ sender }}" } }
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn the_issue_example_parses() {
        let f = parse(ISSUE_EXAMPLE).unwrap();
        let r = &f.rules[0];
        assert_eq!(r.on.0, ["myapp/deploy"]);
        assert_eq!(r.when.len(), 2);
        assert_eq!(r.actions.len(), 3);
        assert!(r.enabled);
        assert!(matches!(r.actions[0], ActionSpec::StateApply(_)));
    }
}
