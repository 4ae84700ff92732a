//! Rule files → one [`RuleSet`]: every file parsed, every glob and template
//! compiled, every problem collected with its file, line, column and rule.
//!
//! The daemon's reload and `salt-steward rules check` call the same
//! [`load_dir`], so what `check` accepts is exactly what the daemon runs.
//! serde gives the position of a YAML or schema error (unknown field,
//! unknown action, wrong type); for problems found after parsing (a bad
//! glob, a template syntax error, a duplicate name) the offending text is
//! looked up in the file to give its line and column.

use std::collections::HashMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value as Json};

use super::format::{self, ActionSpec, ConditionSpec, RuleSpec};
use super::matcher::{salt_glob, CondOp, Condition, EventView, FieldPath, FromMatcher, TagMatcher};
use super::template::{context, Templates, Tmpl};
use crate::bus::event::to_json;
use crate::bus::origin::STEWARD_PREFIX;
use crate::bus::Origin;
use crate::salt::TargetType;

/// Tags of rule results start with this; `<rule>/done|failed` follows.
pub const RESULT_PREFIX: &str = "steward/v1/rule/";

/// One problem in a rule file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError {
    /// The file.
    pub file: PathBuf,
    /// 1-based line and column, when known.
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// The rule's name, when known.
    pub rule: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}:{}", self.column.unwrap_or(1))?;
        }
        if let Some(rule) = &self.rule {
            write!(f, ": rule {rule}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for RuleError {}

/// A rate limit: at most `max` runs per `per`, per action and target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub max: u32,
    pub per: Duration,
}

/// The inclusive range a duration of a rule file must lie in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationLimit {
    /// The key, as written (`debounce`, `rate_limit.per`).
    pub key: &'static str,
    /// Shortest allowed.
    pub min: Duration,
    /// Longest allowed.
    pub max: Duration,
}

impl DurationLimit {
    /// Whether `d` is inside the range.
    pub fn contains(&self, d: Duration) -> bool {
        (self.min..=self.max).contains(&d)
    }

    /// The message refusing `d`: key, value and range.
    pub fn refusal(&self, d: Duration) -> String {
        format!(
            "{}: {} is out of range (allowed {} to {})",
            self.key,
            show_duration(d),
            show_duration(self.min),
            show_duration(self.max)
        )
    }
}

const DAY: Duration = Duration::from_secs(86_400);

/// `debounce`: 1 ms to a day (the action waits in memory that long).
pub const DEBOUNCE: DurationLimit = DurationLimit {
    key: "debounce",
    min: Duration::from_millis(1),
    max: DAY,
};
/// `timeout`: 1 s to a day, as the config's `rules.job_timeout`.
pub const TIMEOUT: DurationLimit = DurationLimit {
    key: "timeout",
    min: Duration::from_secs(1),
    max: DAY,
};
/// `rate_limit.per`: 1 ms to 30 days.
pub const RATE_LIMIT_PER: DurationLimit = DurationLimit {
    key: "rate_limit.per",
    min: Duration::from_millis(1),
    max: Duration::from_secs(30 * 86_400),
};
/// `rate_limit.max`, inclusive: each window remembers up to this many runs.
pub const RATE_LIMIT_MAX: (u32, u32) = (1, 10_000);

/// A duration as a rule file would write it: `1d`, `5m`, `250ms`, `1.5s`.
pub fn show_duration(d: Duration) -> String {
    let (secs, nanos) = (d.as_secs(), d.subsec_nanos());
    if nanos == 0 {
        for (unit, n) in [("d", 86_400), ("h", 3600), ("m", 60)] {
            if secs >= n && secs.is_multiple_of(n) {
                return format!("{}{unit}", secs / n);
            }
        }
        return format!("{secs}s");
    }
    if secs == 0 && nanos.is_multiple_of(1_000_000) {
        return format!("{}ms", nanos / 1_000_000);
    }
    format!("{}s", d.as_secs_f64())
}

/// The kind of an action, as written in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActionKind {
    StateApply,
    Local,
    Wheel,
    Runner,
    Fire,
}

impl ActionKind {
    /// The name used in files, logs and result events.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::StateApply => "state.apply",
            Self::Local => "local",
            Self::Wheel => "wheel",
            Self::Runner => "runner",
            Self::Fire => "fire",
        }
    }
}

/// A compiled action.
#[derive(Debug, Clone)]
pub enum Action {
    /// A job published to minions (`state.apply` or `local`).
    Publish {
        kind: ActionKind,
        target: Tmpl,
        tgt_type: TargetType,
        fun: String,
        /// `state.apply`'s mods (a string or a list).
        mods: Option<Tmpl>,
        arg: Tmpl,
        kwarg: Tmpl,
        pillar: Option<Tmpl>,
    },
    /// A wheel or runner call on the master.
    Master {
        kind: ActionKind,
        fun: String,
        arg: Tmpl,
        kwarg: Tmpl,
    },
    /// An event fired on the master's bus.
    Fire { tag: Tmpl, data: Tmpl },
}

impl Action {
    /// The kind, as written in the file.
    pub fn kind(&self) -> ActionKind {
        match self {
            Self::Publish { kind, .. } | Self::Master { kind, .. } => *kind,
            Self::Fire { .. } => ActionKind::Fire,
        }
    }
}

/// An action filled in from one event, ready to run.
#[derive(Debug, Clone, PartialEq)]
pub enum Rendered {
    /// Publish `fun` to `target`.
    Publish {
        kind: ActionKind,
        target: String,
        tgt_type: TargetType,
        fun: String,
        arg: Vec<Json>,
        kwarg: Map<String, Json>,
    },
    /// A wheel call.
    Wheel {
        fun: String,
        arg: Vec<Json>,
        kwarg: Map<String, Json>,
    },
    /// A runner call.
    Runner {
        fun: String,
        arg: Vec<Json>,
        kwarg: Map<String, Json>,
    },
    /// Fire `tag` with `data`.
    Fire { tag: String, data: Json },
}

/// The target of wheel, runner and fire actions, for rate limits and debounce.
pub const MASTER_TARGET: &str = "master";

impl Rendered {
    /// The kind, as written in the file.
    pub fn kind(&self) -> ActionKind {
        match self {
            Self::Publish { kind, .. } => *kind,
            Self::Wheel { .. } => ActionKind::Wheel,
            Self::Runner { .. } => ActionKind::Runner,
            Self::Fire { .. } => ActionKind::Fire,
        }
    }

    /// The minion target, or `master` for actions on the master.
    pub fn target(&self) -> &str {
        match self {
            Self::Publish { target, .. } => target,
            _ => MASTER_TARGET,
        }
    }

    /// A JSON description, for `rules test` and logs.
    pub fn to_json(&self) -> Json {
        match self {
            Self::Publish {
                kind,
                target,
                tgt_type,
                fun,
                arg,
                kwarg,
            } => serde_json::json!({"action": kind.as_str(), "target": target,
                "tgt_type": tgt_type.as_str(), "fun": fun, "arg": arg, "kwarg": kwarg}),
            Self::Wheel { fun, arg, kwarg } => {
                serde_json::json!({"action": "wheel", "fun": fun, "arg": arg, "kwarg": kwarg})
            }
            Self::Runner { fun, arg, kwarg } => {
                serde_json::json!({"action": "runner", "fun": fun, "arg": arg, "kwarg": kwarg})
            }
            Self::Fire { tag, data } => {
                serde_json::json!({"action": "fire", "tag": tag, "data": data})
            }
        }
    }
}

/// A compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: Arc<str>,
    pub file: PathBuf,
    /// The line of the rule's `name:` in its file.
    pub line: usize,
    pub enabled: bool,
    pub on: Vec<String>,
    pub from: Option<FromMatcher>,
    pub when: Vec<Condition>,
    pub actions: Vec<Action>,
    pub rate_limit: Option<RateLimit>,
    pub debounce: Option<Duration>,
    pub timeout: Option<Duration>,
}

/// Reusable buffers for [`RuleSet::matching`].
#[derive(Debug, Default)]
pub struct Scratch {
    globs: Vec<usize>,
    candidates: Vec<usize>,
}

/// Every rule of a rules directory, compiled; swapped whole on reload.
#[derive(Debug, Default)]
pub struct RuleSet {
    rules: Vec<Rule>,
    matcher: TagMatcher,
    templates: Templates,
    files: Vec<PathBuf>,
    fingerprint: u64,
    warnings: Vec<RuleError>,
}

impl RuleSet {
    /// No rules.
    pub fn empty() -> Self {
        Self::default()
    }

    /// All rules, enabled or not, in file then position order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The files the rules came from.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// A hash of the files' names and contents: equal sets, equal hashes.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// What the rules mean that their author may not expect (a rule any
    /// minion can trigger with a forged event; a rule that can never
    /// match): `rules check` prints them, the daemon logs them at each load.
    pub fn warnings(&self) -> &[RuleError] {
        &self.warnings
    }

    /// The rules an event triggers (indices into [`rules`](Self::rules), in
    /// order): a tag glob matches, the sender is allowed, every condition
    /// holds. Result events (`steward/v1/rule/…`) only trigger rules with a
    /// glob written for them (starting with that prefix), and never the rule
    /// they report on, so a catch-all rule cannot feed on results.
    pub fn matching(&self, ev: &EventView<'_>, scratch: &mut Scratch, out: &mut Vec<usize>) {
        out.clear();
        self.matcher
            .candidates(ev.tag, &mut scratch.globs, &mut scratch.candidates);
        for &i in &scratch.candidates {
            let Some(rule) = self.rules.get(i) else {
                continue;
            };
            if rule.from.as_ref().is_some_and(|f| !f.allows(ev.origin)) {
                continue;
            }
            if !rule.when.iter().all(|c| c.holds(ev)) {
                continue;
            }
            if let Some(rest) = ev.tag.strip_prefix(RESULT_PREFIX) {
                if !rule.on.iter().any(|g| g.starts_with(RESULT_PREFIX))
                    || rest
                        .strip_prefix(&*rule.name)
                        .is_some_and(|r| r.starts_with('/'))
                {
                    continue;
                }
            }
            out.push(i);
        }
    }

    /// Fills in every action of `rule` from the event; the first error stops
    /// (no action of the rule runs for that event).
    pub fn render(&self, rule: &Rule, ev: &EventView<'_>) -> Result<Vec<Rendered>, String> {
        let ctx = Self::context(ev);
        (0..rule.actions.len())
            .map(|i| self.render_action(rule, i, &ctx))
            .collect()
    }

    /// The template context of an event (build it once per event).
    pub fn context(ev: &EventView<'_>) -> minijinja::Value {
        context(ev.tag, &to_json(ev.data), ev.sender, &to_json(ev.payload))
    }

    /// The target of action `idx` (0-based) of `rule` alone: what debounce
    /// and rate limits count by, cheaper than the whole action.
    pub fn render_target(
        &self,
        rule: &Rule,
        idx: usize,
        ctx: &minijinja::Value,
    ) -> Result<String, String> {
        match rule.actions.get(idx) {
            Some(Action::Publish { target, kind, .. }) => {
                match self.templates.render(target, ctx) {
                    Ok(Json::String(s)) if !s.trim().is_empty() => Ok(s),
                    Ok(other) => Err(format!("target rendered to {other}, not a target")),
                    Err(e) => Err(e),
                }
                .map_err(|e| format!("action {} ({}): {e}", idx + 1, kind.as_str()))
            }
            Some(_) => Ok(MASTER_TARGET.to_owned()),
            None => Err(format!("no action {}", idx + 1)),
        }
    }

    /// Fills in action `idx` (0-based) of `rule`.
    pub fn render_action(
        &self,
        rule: &Rule,
        idx: usize,
        ctx: &minijinja::Value,
    ) -> Result<Rendered, String> {
        let a = rule
            .actions
            .get(idx)
            .ok_or_else(|| format!("no action {}", idx + 1))?;
        self.fill(a, ctx)
            .map_err(|e| format!("action {} ({}): {e}", idx + 1, a.kind().as_str()))
    }

    fn fill(&self, a: &Action, ctx: &minijinja::Value) -> Result<Rendered, String> {
        let t = &self.templates;
        let list = |v: Json, what: &str| match v {
            Json::Array(a) => Ok(a),
            other => Err(format!("{what} rendered to {other}, not a list")),
        };
        let map = |v: Json, what: &str| match v {
            Json::Object(m) => Ok(m),
            other => Err(format!("{what} rendered to {other}, not a map")),
        };
        Ok(match a {
            Action::Publish {
                kind,
                target,
                tgt_type,
                fun,
                mods,
                arg,
                kwarg,
                pillar,
            } => {
                let target = match t.render(target, ctx)? {
                    Json::String(s) if !s.trim().is_empty() => s,
                    other => return Err(format!("target rendered to {other}, not a target")),
                };
                let mut arg = list(t.render(arg, ctx)?, "arg")?;
                let mut kwarg = map(t.render(kwarg, ctx)?, "kwarg")?;
                if let Some(mods) = mods {
                    let mods = match t.render(mods, ctx)? {
                        Json::String(s) => s,
                        Json::Array(items) => items
                            .iter()
                            .map(|m| match m {
                                Json::String(s) => Ok(s.clone()),
                                other => Err(format!("mods: {other} is not an SLS name")),
                            })
                            .collect::<Result<Vec<_>, _>>()?
                            .join(","),
                        other => return Err(format!("mods rendered to {other}")),
                    };
                    if !mods.is_empty() {
                        arg.insert(0, Json::String(mods));
                    }
                }
                if let Some(p) = pillar {
                    kwarg.insert("pillar".to_owned(), t.render(p, ctx)?);
                }
                Rendered::Publish {
                    kind: *kind,
                    target,
                    tgt_type: *tgt_type,
                    fun: fun.clone(),
                    arg,
                    kwarg,
                }
            }
            Action::Master {
                kind,
                fun,
                arg,
                kwarg,
            } => {
                let arg = list(t.render(arg, ctx)?, "arg")?;
                let kwarg = map(t.render(kwarg, ctx)?, "kwarg")?;
                let fun = fun.clone();
                if *kind == ActionKind::Wheel {
                    Rendered::Wheel { fun, arg, kwarg }
                } else {
                    Rendered::Runner { fun, arg, kwarg }
                }
            }
            Action::Fire { tag, data } => {
                let tag = match t.render(tag, ctx)? {
                    Json::String(s) => s,
                    other => return Err(format!("tag rendered to {other}, not a string")),
                };
                crate::bus::publisher::check_tag(&tag).map_err(|e| e.to_string())?;
                if let Some(why) = reserved_tag(&tag) {
                    return Err(format!("tag {tag:?} refused: {why}"));
                }
                Rendered::Fire {
                    tag,
                    data: t.render(data, ctx)?,
                }
            }
        })
    }
}

/// The rule files of `dir`: `*.yaml` and `*.yml`, not hidden, sorted by name.
pub fn rule_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if !name.starts_with('.') && matches!(ext, "yaml" | "yml") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Reads and compiles every rule file of `dir`; all problems or the set.
pub fn load_dir(dir: &Path) -> Result<RuleSet, Vec<RuleError>> {
    let files = rule_files(dir).map_err(|e| {
        vec![RuleError {
            file: dir.to_owned(),
            line: None,
            column: None,
            rule: None,
            message: format!("cannot read the rules directory: {e}"),
        }]
    })?;
    let mut sources = Vec::with_capacity(files.len());
    let mut errors = Vec::new();
    for f in files {
        match std::fs::read_to_string(&f) {
            Ok(text) => sources.push((f, text)),
            Err(e) => errors.push(RuleError {
                file: f,
                line: None,
                column: None,
                rule: None,
                message: format!("cannot read: {e}"),
            }),
        }
    }
    match compile(&sources) {
        Ok(set) if errors.is_empty() => Ok(set),
        Ok(_) => Err(errors),
        Err(more) => {
            errors.extend(more);
            Err(errors)
        }
    }
}

/// Compiles `(path, text)` sources into one set; all problems or the set.
pub fn compile(sources: &[(PathBuf, String)]) -> Result<RuleSet, Vec<RuleError>> {
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let mut c = Compiler {
        templates: Templates::new(),
        rules: Vec::new(),
        globs: Vec::new(),
        names: HashMap::new(),
        errors: &mut errors,
        warnings: &mut warnings,
    };
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for (path, text) in sources {
        path.hash(&mut hasher);
        text.hash(&mut hasher);
        c.file(path, text);
    }
    let Compiler {
        templates,
        rules,
        globs,
        ..
    } = c;
    let matcher = match TagMatcher::build(globs) {
        Ok(m) => m,
        Err(e) => {
            errors.push(RuleError {
                file: PathBuf::from("<all rules>"),
                line: None,
                column: None,
                rule: None,
                message: format!("cannot build the tag matcher: {e}"),
            });
            TagMatcher::default()
        }
    };
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(RuleSet {
        rules,
        matcher,
        templates,
        files: sources.iter().map(|(p, _)| p.clone()).collect(),
        fingerprint: hasher.finish(),
        warnings,
    })
}

struct Compiler<'e> {
    templates: Templates,
    rules: Vec<Rule>,
    globs: Vec<(usize, globset::Glob)>,
    /// Rule name → (file, line) of its first definition.
    names: HashMap<String, (PathBuf, usize)>,
    errors: &'e mut Vec<RuleError>,
    warnings: &'e mut Vec<RuleError>,
}

/// Finds rules and values in a file's text, for line and column.
struct Locator<'a> {
    lines: Vec<&'a str>,
    /// 0-based line of each rule's `name:`.
    starts: Vec<usize>,
}

impl<'a> Locator<'a> {
    fn new(text: &'a str, names: &[&str]) -> Self {
        let lines: Vec<&str> = text.lines().collect();
        let mut starts = Vec::with_capacity(names.len());
        let mut from = 0;
        for name in names {
            let found = (from..lines.len()).find(|&i| name_on_line(lines[i]) == Some(name));
            let at = found.unwrap_or(from.min(lines.len().saturating_sub(1)));
            starts.push(at);
            if found.is_some() {
                from = at + 1;
            }
        }
        Self { lines, starts }
    }

    /// 1-based (line, column) of `needle` inside rule `idx`, or of the rule.
    fn find(&self, idx: usize, needle: Option<&str>) -> (usize, usize) {
        let start = self.starts.get(idx).copied().unwrap_or(0);
        let end = self
            .starts
            .get(idx + 1)
            .copied()
            .filter(|&e| e > start)
            .unwrap_or(self.lines.len());
        if let Some(needle) = needle
            .and_then(|n| n.lines().next())
            .filter(|n| !n.is_empty())
        {
            for i in start..end {
                if let Some(col) = self.lines.get(i).and_then(|l| l.find(needle)) {
                    let chars = self.lines[i][..col].chars().count();
                    return (i + 1, chars + 1);
                }
            }
        }
        let line = self.lines.get(start).copied().unwrap_or("");
        let col = line.find("name").unwrap_or(0);
        (start + 1, line[..col].chars().count() + 1)
    }
}

/// The rule name defined on this line (`name: x`, `- name: "x"`, `{ name: x, …`).
fn name_on_line(line: &str) -> Option<&str> {
    let at = line.find("name:")?;
    let before = line[..at].trim_end();
    let before = before.strip_suffix('{').map_or(before, str::trim_end);
    if !(before.is_empty() || before.ends_with('-')) {
        return None;
    }
    let rest = line[at + 5..].trim_start();
    let end = rest.find([',', '}', '#']).unwrap_or(rest.len());
    Some(rest[..end].trim().trim_matches(['"', '\'']))
}

/// A serde_yaml_ng message without its " at line N column M" tail.
fn without_position(msg: &str) -> &str {
    msg.find(" at line ").map_or(msg, |i| &msg[..i])
}

/// The rule name of `rules[N]` in a message, looked up in the loosely parsed text.
fn rule_named_in(msg: &str, text: &str) -> Option<String> {
    let rest = msg.strip_prefix("rules[")?;
    let idx: usize = rest[..rest.find(']')?].parse().ok()?;
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).ok()?;
    doc.get("rules")?
        .get(idx)?
        .get("name")?
        .as_str()
        .map(str::to_owned)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn target_type(s: Option<&str>) -> Result<TargetType, String> {
    s.unwrap_or("glob").parse()
}

impl Compiler<'_> {
    fn file(&mut self, path: &Path, text: &str) {
        let parsed = match format::parse(text) {
            Ok(f) => f,
            Err(e) => {
                let msg = e.to_string();
                let loc = e.location();
                self.errors.push(RuleError {
                    file: path.to_owned(),
                    line: loc.as_ref().map(|l| l.line()),
                    column: loc.as_ref().map(|l| l.column()),
                    rule: rule_named_in(&msg, text).or_else(|| {
                        // A syntax error: the rule whose `name:` comes last before it.
                        let upto = loc.as_ref().map_or(0, |l| l.line());
                        text.lines()
                            .take(upto)
                            .filter_map(name_on_line)
                            .last()
                            .map(str::to_owned)
                    }),
                    message: without_position(&msg).to_owned(),
                });
                return;
            }
        };
        let names: Vec<&str> = parsed.rules.iter().map(|r| r.name.as_str()).collect();
        let loc = Locator::new(text, &names);
        for (idx, spec) in parsed.rules.iter().enumerate() {
            self.rule(path, &loc, idx, spec);
        }
    }

    fn rule(&mut self, path: &Path, loc: &Locator<'_>, idx: usize, spec: &RuleSpec) {
        let before = self.errors.len();
        let name = spec.name.as_str();
        let err = |errors: &mut Vec<RuleError>, needle: Option<&str>, message: String| {
            let (line, column) = loc.find(idx, needle);
            errors.push(RuleError {
                file: path.to_owned(),
                line: Some(line),
                column: Some(column),
                rule: Some(name.to_owned()),
                message,
            });
        };
        let (line, _) = loc.find(idx, None);
        if !valid_name(name) {
            err(
                self.errors,
                None,
                format!("invalid name {name:?}: use letters, digits, '-', '_', '.'"),
            );
        } else if let Some((file, first)) = self.names.get(name) {
            err(
                self.errors,
                None,
                format!(
                    "duplicate rule name (first defined at {}:{first})",
                    file.display()
                ),
            );
        } else {
            self.names.insert(name.to_owned(), (path.to_owned(), line));
        }

        // Tag globs
        let mut globs = Vec::new();
        if spec.on.0.is_empty() {
            err(self.errors, None, "`on` lists no tag".to_owned());
        }
        for pattern in &spec.on.0 {
            if pattern.is_empty() {
                err(self.errors, None, "`on` has an empty tag glob".to_owned());
                continue;
            }
            match salt_glob(pattern) {
                Ok(g) => globs.push(g),
                Err(e) => err(
                    self.errors,
                    Some(pattern),
                    format!("bad tag glob {pattern:?}: {}", e.kind()),
                ),
            }
        }
        let own_tags: Option<globset::GlobSet> = {
            let mut b = globset::GlobSetBuilder::new();
            for g in &globs {
                b.add(g.clone());
            }
            b.build().ok()
        };

        // Sender
        let from = match spec.from.as_deref() {
            None => None,
            Some("master") => Some(FromMatcher::Master),
            Some(FromMatcher::UNVERIFIED) => Some(FromMatcher::Unverified),
            Some(pattern) => match salt_glob(pattern) {
                Ok(g) => Some(FromMatcher::Minion(g.compile_matcher())),
                Err(e) => {
                    err(
                        self.errors,
                        Some(pattern),
                        format!("bad `from` glob {pattern:?}: {}", e.kind()),
                    );
                    None
                }
            },
        };

        // Conditions
        let mut when = Vec::new();
        for c in &spec.when {
            match condition(c) {
                Ok(c) => when.push(c),
                Err(m) => err(self.errors, Some(&c.field), m),
            }
        }

        // Actions
        if spec.actions.is_empty() {
            err(self.errors, None, "`do` lists no action".to_owned());
        }
        let mut actions = Vec::new();
        for (i, a) in spec.actions.iter().enumerate() {
            match self.action(a) {
                Ok(action) => {
                    if let (
                        Action::Fire {
                            tag: Tmpl::Literal(Json::String(tag)),
                            ..
                        },
                        Some(own),
                    ) = (&action, &own_tags)
                    {
                        // What a rule fires comes back to it: in memory as
                        // the master's (an own tag), or off the bus unverified.
                        let comes_back = from.as_ref().is_none_or(|f| {
                            f.allows(&Origin::Master) || f.allows(&Origin::Unverified)
                        });
                        if own.is_match(tag) && comes_back {
                            err(
                                self.errors,
                                Some(tag),
                                format!(
                                    "action {} (fire): tag {tag:?} matches the rule's own `on`: it would trigger itself",
                                    i + 1
                                ),
                            );
                        }
                    }
                    actions.push(action);
                }
                Err((needle, m)) => err(
                    self.errors,
                    needle.as_deref(),
                    format!("action {} ({}): {m}", i + 1, action_name(a)),
                ),
            }
        }

        // Options, each inside its range (a huge one would overflow a deadline).
        let ranged =
            |errors: &mut Vec<RuleError>, needle: &str, d: Duration, limit: DurationLimit| {
                let ok = limit.contains(d);
                if !ok {
                    err(errors, Some(needle), limit.refusal(d));
                }
                ok
            };
        let rate_limit = spec.rate_limit.as_ref().and_then(|r| {
            let per_ok = ranged(self.errors, "per:", r.per.0, RATE_LIMIT_PER);
            let max_ok = (RATE_LIMIT_MAX.0..=RATE_LIMIT_MAX.1).contains(&r.max);
            if !max_ok {
                err(
                    self.errors,
                    Some("max:"),
                    format!(
                        "rate_limit.max: {} is out of range (allowed {} to {})",
                        r.max, RATE_LIMIT_MAX.0, RATE_LIMIT_MAX.1
                    ),
                );
            }
            (per_ok && max_ok).then_some(RateLimit {
                max: r.max,
                per: r.per.0,
            })
        });
        let debounce = spec
            .debounce
            .map(|d| d.0)
            .filter(|d| ranged(self.errors, "debounce:", *d, DEBOUNCE));
        let timeout = spec
            .timeout
            .map(|d| d.0)
            .filter(|d| ranged(self.errors, "timeout:", *d, TIMEOUT));

        if self.errors.len() > before {
            return;
        }
        if spec.enabled {
            let (line, column) = loc.find(idx, Some("from:"));
            let warn = |message: String| RuleError {
                file: path.to_owned(),
                line: Some(line),
                column: Some(column),
                rule: Some(name.to_owned()),
                message,
            };
            match &from {
                Some(FromMatcher::Unverified) => self.warnings.push(warn(UNVERIFIED_WARNING.to_owned())),
                Some(FromMatcher::Master) if !spec.on.0.iter().any(|g| may_match_own_tag(g)) => {
                    self.warnings.push(warn(format!(
                        "`from: master` matches only what salt-steward itself fires ({STEWARD_PREFIX}…): \
                         {} can never match; Salt's own events are `from: unverified` (any minion can forge them)",
                        spec.on.0.join(", ")
                    )))
                }
                _ => {}
            }
        }
        let index = self.rules.len();
        if spec.enabled {
            self.globs.extend(globs.into_iter().map(|g| (index, g)));
        }
        self.rules.push(Rule {
            name: Arc::from(name),
            file: path.to_owned(),
            line,
            enabled: spec.enabled,
            on: spec.on.0.clone(),
            from,
            when,
            actions,
            rate_limit,
            debounce,
            timeout,
        });
    }

    /// Compiles an action; an error carries the text to locate and the message.
    fn action(&mut self, a: &ActionSpec) -> Result<Action, (Option<String>, String)> {
        let mut tmpl = |v: &Json, what: &str| {
            self.templates.compile_value(v).map_err(|e| {
                let at = if e.path.is_empty() {
                    what.to_owned()
                } else {
                    format!("{what}.{}", e.path)
                };
                (
                    Some(e.source.clone()),
                    format!("{at}: template {:?}: {}", e.source, e.message),
                )
            })
        };
        let fun_ok = |fun: &str| {
            let ok = fun.split_once('.').is_some_and(|(m, f)| {
                !m.is_empty()
                    && !f.is_empty()
                    && fun
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.'))
            });
            if ok {
                Ok(())
            } else {
                Err((
                    Some(fun.to_owned()),
                    format!("fun {fun:?} is not a function name like module.function"),
                ))
            }
        };
        Ok(match a {
            ActionSpec::StateApply(s) => {
                if s.target.trim().is_empty() {
                    return Err((None, "empty target".to_owned()));
                }
                let target = tmpl(&Json::String(s.target.clone()), "target")?;
                let tgt_type =
                    target_type(s.tgt_type.as_deref()).map_err(|m| (s.tgt_type.clone(), m))?;
                let mods = match &s.mods {
                    Some(m) => Some(tmpl(
                        &Json::Array(m.0.iter().cloned().map(Json::String).collect()),
                        "mods",
                    )?),
                    None => None,
                };
                let pillar = match &s.pillar {
                    Some(p @ Json::Object(_)) => Some(tmpl(p, "pillar")?),
                    Some(Json::String(p)) => Some(tmpl(&Json::String(p.clone()), "pillar")?),
                    Some(_) => return Err((None, "pillar must be a map".to_owned())),
                    None => None,
                };
                Action::Publish {
                    kind: ActionKind::StateApply,
                    target,
                    tgt_type,
                    fun: "state.apply".to_owned(),
                    mods,
                    arg: Tmpl::Literal(Json::Array(Vec::new())),
                    kwarg: tmpl(&Json::Object(s.kwarg.clone()), "kwarg")?,
                    pillar,
                }
            }
            ActionSpec::Local(s) => {
                if s.target.trim().is_empty() {
                    return Err((None, "empty target".to_owned()));
                }
                fun_ok(&s.fun)?;
                Action::Publish {
                    kind: ActionKind::Local,
                    target: tmpl(&Json::String(s.target.clone()), "target")?,
                    tgt_type: target_type(s.tgt_type.as_deref())
                        .map_err(|m| (s.tgt_type.clone(), m))?,
                    fun: s.fun.clone(),
                    mods: None,
                    arg: tmpl(&Json::Array(s.arg.clone()), "arg")?,
                    kwarg: tmpl(&Json::Object(s.kwarg.clone()), "kwarg")?,
                    pillar: None,
                }
            }
            ActionSpec::Wheel(s) | ActionSpec::Runner(s) => {
                fun_ok(&s.fun)?;
                Action::Master {
                    kind: if matches!(a, ActionSpec::Wheel(_)) {
                        ActionKind::Wheel
                    } else {
                        ActionKind::Runner
                    },
                    fun: s.fun.clone(),
                    arg: tmpl(&Json::Array(s.arg.clone()), "arg")?,
                    kwarg: tmpl(&Json::Object(s.kwarg.clone()), "kwarg")?,
                }
            }
            ActionSpec::Fire(s) => {
                let tag = tmpl(&Json::String(s.tag.clone()), "tag")?;
                if let Tmpl::Literal(Json::String(t)) = &tag {
                    crate::bus::publisher::check_tag(t)
                        .map_err(|e| (Some(s.tag.clone()), e.to_string()))?;
                    if let Some(why) = reserved_tag(t) {
                        return Err((Some(s.tag.clone()), format!("tag {t:?} refused: {why}")));
                    }
                }
                let data = s.data.clone().unwrap_or_else(|| Json::Object(Map::new()));
                Action::Fire {
                    tag,
                    data: tmpl(&data, "data")?,
                }
            }
        })
    }
}

/// What `rules check` and the daemon say of a rule with `from: unverified`.
pub const UNVERIFIED_WARNING: &str = "`from: unverified`: any minion can forge this event \
(Salt's bus does not say who fired an event without a minion's wrapping: `event.fire_master` \
with `preload` fires any tag, Salt's own included); let it run nothing a minion must not trigger";

/// Whether tag glob `glob` may match one of salt-steward's own tags: its
/// literal beginning (up to the first wildcard) is compatible with
/// `steward/v1/`.
fn may_match_own_tag(glob: &str) -> bool {
    let literal = glob.find(['*', '?', '[']).map_or(glob, |i| &glob[..i]);
    STEWARD_PREFIX.starts_with(literal) || literal.starts_with(STEWARD_PREFIX)
}

/// Why a `fire` action may not use `tag`, if it may not. Events the daemon
/// fires look fired on the master, which other consumers trust: Salt's own
/// tags and the tags this daemon acts on or announces are not for rules
/// (a minion could otherwise steer a templated tag into one of them).
pub fn reserved_tag(tag: &str) -> Option<&'static str> {
    const STEWARD: [&str; 5] = ["server/", "model/", "reply/", "rule/", "minion/"];
    if tag.starts_with("salt/") || tag.starts_with("minion/") || tag == "minion_start" {
        Some("Salt's own events are not fired by rules")
    } else if !tag.is_empty() && tag.bytes().all(|b| b.is_ascii_digit()) {
        Some("a bare jid is Salt's own event")
    } else if tag
        .strip_prefix("steward/v1/")
        .is_some_and(|rest| STEWARD.iter().any(|p| rest.starts_with(p)))
    {
        Some("salt-steward's own requests, replies and notifications are not fired by rules")
    } else {
        None
    }
}

fn action_name(a: &ActionSpec) -> &'static str {
    match a {
        ActionSpec::StateApply(_) => "state.apply",
        ActionSpec::Local(_) => "local",
        ActionSpec::Wheel(_) => "wheel",
        ActionSpec::Runner(_) => "runner",
        ActionSpec::Fire(_) => "fire",
    }
}

fn condition(c: &ConditionSpec) -> Result<Condition, String> {
    let field = FieldPath::parse(&c.field)?;
    let given = [
        c.equals.is_some(),
        c.one_of.is_some(),
        c.glob.is_some(),
        c.present.is_some(),
    ]
    .iter()
    .filter(|x| **x)
    .count();
    if given != 1 {
        return Err(format!(
            "condition on {:?} must have exactly one of equals, in, glob, present",
            c.field
        ));
    }
    let op = if let Some(v) = &c.equals {
        CondOp::Equals(v.clone())
    } else if let Some(vs) = &c.one_of {
        CondOp::In(vs.clone())
    } else if let Some(g) = &c.glob {
        CondOp::Glob(
            salt_glob(g)
                .map_err(|e| format!("bad glob {g:?} on {:?}: {}", c.field, e.kind()))?
                .compile_matcher(),
        )
    } else {
        CondOp::Present(c.present.unwrap_or(true))
    };
    Ok(Condition { field, op })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::event::{from_json, Event};
    use serde_json::json;

    fn set(files: &[(&str, &str)]) -> Result<RuleSet, Vec<RuleError>> {
        compile(
            &files
                .iter()
                .map(|(p, t)| (PathBuf::from(p), (*t).to_owned()))
                .collect::<Vec<_>>(),
        )
    }

    fn errors(files: &[(&str, &str)]) -> Vec<String> {
        set(files)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    const DEPLOY: &str = crate::rules::format::ISSUE_EXAMPLE;

    fn minion_event(tag: &str, id: &str, payload: Json) -> Event {
        Event::new(
            tag.into(),
            from_json(&json!({"cmd": "_minion_event", "id": id, "tag": tag, "data": payload})),
        )
    }

    fn matches(s: &RuleSet, e: &Event) -> Vec<String> {
        let mut out = Vec::new();
        s.matching(
            &EventView::of_bus(e, &Origin::of_bus(e)),
            &mut Scratch::default(),
            &mut out,
        );
        out.iter().map(|&i| s.rules()[i].name.to_string()).collect()
    }

    #[test]
    fn the_issue_example_matches_and_renders() {
        let s = set(&[("deploy.yaml", DEPLOY)]).unwrap();
        let e = minion_event(
            "myapp/deploy",
            "web1",
            json!({"version": "1.2", "env": "prod"}),
        );
        assert_eq!(matches(&s, &e), ["deploy-on-request"]);
        let r = s
            .render(&s.rules()[0], &EventView::of_bus(&e, &Origin::of_bus(&e)))
            .unwrap();
        assert_eq!(
            r[0],
            Rendered::Publish {
                kind: ActionKind::StateApply,
                target: "web1".into(),
                tgt_type: TargetType::Glob,
                fun: "state.apply".into(),
                arg: vec![json!("myapp")],
                kwarg: json!({"pillar": {"version": "1.2"}})
                    .as_object()
                    .unwrap()
                    .clone(),
            }
        );
        assert_eq!(r[1].target(), "web*");
        assert_eq!(
            r[2],
            Rendered::Fire {
                tag: "myapp/deployed".into(),
                data: json!({"minion": "web1"})
            }
        );
        // another sender, a failed condition, a master-fired event: no match
        let db = minion_event(
            "myapp/deploy",
            "db1",
            json!({"version": "1.2", "env": "prod"}),
        );
        assert!(matches(&s, &db).is_empty());
        let dev = minion_event(
            "myapp/deploy",
            "web1",
            json!({"version": "1.2", "env": "dev"}),
        );
        assert!(matches(&s, &dev).is_empty());
        let master = Event::new(
            "myapp/deploy".into(),
            from_json(&json!({"version": "1.2", "env": "prod", "id": "web1"})),
        );
        assert!(matches(&s, &master).is_empty());
    }

    #[test]
    fn every_problem_is_reported_with_file_line_column_and_rule() {
        let errs = errors(&[
            ("a.yaml", "rules:\n  - name: x\n    on: [a\n"),
            (
                "b.yaml",
                "rules:\n  - name: b1\n    on: t\n    do:\n      - reboot: {}\n",
            ),
            (
                "c.yaml",
                "rules:\n  - name: c1\n    on: [\"ok/*\", \"bad/[x\"]\n    do:\n      - fire: {tag: t}\n",
            ),
            (
                "d.yaml",
                "rules:\n  - name: d1\n    on: t\n    do:\n      - fire: {tag: out, data: {v: \"{{ payload.v \"}}\n",
            ),
            (
                "e.yaml",
                "rules:\n  - name: e1\n    on: t\n    tags: [x]\n    do:\n      - fire: {tag: t2}\n",
            ),
        ]);
        assert_eq!(errs.len(), 5, "{errs:#?}");
        assert!(errs[0].starts_with("a.yaml:4:1: rule x: "), "{}", errs[0]);
        assert!(
            errs[1].starts_with("b.yaml:5:9: rule b1: rules[0].do[0]: unknown variant `reboot`"),
            "{}",
            errs[1]
        );
        assert!(
            errs[2].starts_with("c.yaml:3:19: rule c1: bad tag glob \"bad/[x\""),
            "{}",
            errs[2]
        );
        assert!(
            errs[3].starts_with("d.yaml:5:37: rule d1: action 1 (fire): data.v: template"),
            "{}",
            errs[3]
        );
        assert!(errs[3].contains("syntax error"), "{}", errs[3]);
        assert!(
            errs[4].starts_with("e.yaml:4:5: rule e1: rules[0]: unknown field `tags`"),
            "{}",
            errs[4]
        );
    }

    #[test]
    fn semantic_checks() {
        let errs = errors(&[(
            "x.yaml",
            r#"rules:
  - name: dup
    on: a
    do: [{ fire: { tag: b } }]
  - name: dup
    on: a
    do: [{ fire: { tag: b } }]
  - name: "bad name"
    on: a
    do: [{ local: { target: "*", fun: reboot } }]
  - name: loop
    on: "loop/*"
    do: [{ fire: { tag: loop/again } }]
  - name: cond
    on: a
    when: [{ field: payload.x, equals: 1, present: true }, { field: nope }]
    do: [{ state.apply: { target: "*", tgt_type: nodegroup } }]
  - name: limits
    on: a
    rate_limit: { max: 0, per: 10s }
    debounce: 0s
    do: [{ fire: { tag: b } }]
"#,
        )]);
        let all = errs.join("\n");
        for want in [
            "x.yaml:5:5: rule dup: duplicate rule name (first defined at x.yaml:2)",
            "x.yaml:8:5: rule bad name: invalid name",
            "rule bad name: action 1 (local): fun \"reboot\"",
            "x.yaml:13:25: rule loop: action 1 (fire): tag \"loop/again\" matches the rule's own `on`",
            "rule cond: condition on \"payload.x\" must have exactly one",
            "rule cond: field \"nope\" must start with",
            "rule cond: action 1 (state.apply): tgt_type \"nodegroup\"",
            "x.yaml:20:19: rule limits: rate_limit.max: 0 is out of range (allowed 1 to 10000)",
            "x.yaml:21:5: rule limits: debounce: 0s is out of range (allowed 1ms to 1d)",
        ] {
            assert!(all.contains(want), "missing {want:?} in\n{all}");
        }
    }

    #[test]
    fn durations_and_counts_are_range_checked() {
        let errs = errors(&[(
            "r.yaml",
            r#"rules:
  - name: huge
    on: a
    debounce: 10000000000000000000s
    do: [{ fire: { tag: b } }]
  - name: timeouts
    on: a
    timeout: 500ms
    do: [{ fire: { tag: b } }]
  - name: long
    on: a
    timeout: 2d
    rate_limit:
      max: 10001
      per: 31d
    do: [{ fire: { tag: b } }]
"#,
        )]);
        for want in [
            "r.yaml:4:5: rule huge: debounce: 10000000000000000000s is out of range (allowed 1ms to 1d)",
            "r.yaml:8:5: rule timeouts: timeout: 500ms is out of range (allowed 1s to 1d)",
            "r.yaml:12:5: rule long: timeout: 2d is out of range (allowed 1s to 1d)",
            "r.yaml:15:7: rule long: rate_limit.per: 31d is out of range (allowed 1ms to 30d)",
            "r.yaml:14:7: rule long: rate_limit.max: 10001 is out of range (allowed 1 to 10000)",
        ] {
            assert!(errs.iter().any(|e| e == want), "missing {want:?} in {errs:#?}");
        }
        assert_eq!(errs.len(), 5, "{errs:#?}");
        // The edges are allowed.
        set(&[(
            "ok.yaml",
            "rules:\n  - name: edges\n    on: a\n    debounce: 1d\n    timeout: 1s\n    rate_limit: {max: 10000, per: 30d}\n    do: [{fire: {tag: b}}]\n",
        )])
        .unwrap();
    }

    #[test]
    fn durations_are_shown_as_written() {
        assert_eq!(show_duration(Duration::from_secs(86_400)), "1d");
        assert_eq!(show_duration(Duration::from_secs(7200)), "2h");
        assert_eq!(show_duration(Duration::from_secs(300)), "5m");
        assert_eq!(show_duration(Duration::from_secs(90)), "90s");
        assert_eq!(show_duration(Duration::ZERO), "0s");
        assert_eq!(show_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(show_duration(Duration::from_millis(1500)), "1.5s");
    }

    #[test]
    fn disabled_rules_and_own_results_never_match() {
        let s = set(&[(
            "x.yaml",
            "rules:\n  - name: off\n    enabled: false\n    on: '*'\n    from: web1\n    do: [{fire: {tag: x}}]\n  - name: all\n    on: '*'\n    from: web1\n    do: [{fire: {tag: y}}]\n",
        )])
        .unwrap();
        assert_eq!(s.rules().len(), 2);
        let e = minion_event("anything", "web1", json!({}));
        assert_eq!(matches(&s, &e), ["all"]);
        // a catch-all rule does not see results
        let res = minion_event("steward/v1/rule/other/done", "web1", json!({}));
        assert!(matches(&s, &res).is_empty());
        // a rule written for results sees other rules' results, not its own
        let s = set(&[(
            "x.yaml",
            "rules:\n  - name: watcher\n    on: 'steward/v1/rule/*/failed'\n    do: [{fire: {tag: ops/rule-failed}}]\n",
        )])
        .unwrap();
        let other = Event::new(
            "steward/v1/rule/deploy/failed".into(),
            from_json(&json!({})),
        );
        assert_eq!(matches(&s, &other), ["watcher"]);
        let own = Event::new(
            "steward/v1/rule/watcher/failed".into(),
            from_json(&json!({})),
        );
        assert!(matches(&s, &own).is_empty());
    }

    #[test]
    fn fire_may_not_use_salts_or_stewards_own_tags() {
        for tag in [
            "salt/auth",
            "salt/run/20261123000000000001/new",
            "20261123000000000001",
            "minion_start",
            "steward/v1/server/create",
            "steward/v1/reply/r1",
            "steward/v1/rule/x/done",
        ] {
            assert!(reserved_tag(tag).is_some(), "{tag}");
        }
        for tag in ["myapp/deployed", "steward/v1/alert/key-denied", "ops/x"] {
            assert!(reserved_tag(tag).is_none(), "{tag}");
        }
        let errs = errors(&[(
            "f.yaml",
            "rules:\n  - name: f\n    on: a\n    do: [{fire: {tag: salt/auth}}]\n",
        )]);
        assert!(
            errs[0].contains("rule f: action 1 (fire): tag \"salt/auth\" refused"),
            "{errs:?}"
        );
        // a templated tag is checked when filled in
        let s = set(&[(
            "t.yaml",
            "rules:\n  - name: t\n    on: a\n    do: [{fire: {tag: \"{{ payload.t }}\"}}]\n",
        )])
        .unwrap();
        let e = minion_event("a", "evil", json!({"t": "salt/run/1/new"}));
        let err = s
            .render(&s.rules()[0], &EventView::of_bus(&e, &Origin::of_bus(&e)))
            .unwrap_err();
        assert!(err.contains("refused"), "{err}");
    }

    #[test]
    fn a_missing_field_fails_the_event_not_the_load() {
        let s = set(&[(
            "x.yaml",
            "rules:\n  - name: r\n    on: t\n    do:\n      - local: {target: \"{{ payload.host }}\", fun: test.ping}\n",
        )])
        .unwrap();
        let e = minion_event("t", "m1", json!({"other": 1}));
        let err = s
            .render(&s.rules()[0], &EventView::of_bus(&e, &Origin::of_bus(&e)))
            .unwrap_err();
        assert!(err.starts_with("action 1 (local): "), "{err}");
        assert!(err.contains("undefined"), "{err}");
        // master event: sender is none, so "{{ sender }}" is no target
        let s = set(&[(
            "x.yaml",
            "rules:\n  - name: r\n    on: t\n    do:\n      - local: {target: \"{{ sender }}\", fun: test.ping}\n",
        )])
        .unwrap();
        let e = Event::new("t".into(), from_json(&json!({})));
        assert!(s
            .render(&s.rules()[0], &EventView::of_bus(&e, &Origin::of_bus(&e)))
            .is_err());
    }

    #[test]
    fn from_master_is_only_what_this_process_produced() {
        let s = set(&[(
            "k.yaml",
            "rules:\n  - name: del\n    on: steward/v1/server/deleted\n    from: master\n    do: [{wheel: {fun: key.delete_dict, kwarg: {match: {minions: [\"{{ payload.minion_id }}\"]}}}}]\n  - name: auth\n    on: salt/auth\n    from: unverified\n    do: [{fire: {tag: ops/auth}}]\n",
        )])
        .unwrap();
        let deleted = Event::new(
            "steward/v1/server/deleted".into(),
            from_json(&json!({"minion_id": "web1-0a1b2c3d"})),
        );
        // The same event: delivered in memory, or read back off the bus.
        let mut out = Vec::new();
        s.matching(
            &EventView::of_local(&deleted),
            &mut Scratch::default(),
            &mut out,
        );
        assert_eq!(out, [0]);
        assert!(
            matches(&s, &deleted).is_empty(),
            "a bus copy proves nothing"
        );
        let r = s
            .render(&s.rules()[0], &EventView::of_local(&deleted))
            .unwrap();
        assert_eq!(
            r[0],
            Rendered::Wheel {
                fun: "key.delete_dict".into(),
                arg: vec![],
                kwarg: json!({"match": {"minions": ["web1-0a1b2c3d"]}})
                    .as_object()
                    .unwrap()
                    .clone(),
            }
        );
        // Salt's own event off the bus: only with the opt-in; never a minion's.
        let auth = Event::new(
            "salt/auth".into(),
            from_json(&json!({"id": "m1", "act": "denied", "result": false})),
        );
        assert_eq!(matches(&s, &auth), ["auth"]);
        let wrapped = minion_event("salt/auth", "m1", json!({"act": "denied"}));
        assert!(matches(&s, &wrapped).is_empty());
    }

    #[test]
    fn rules_any_minion_can_trigger_or_that_never_match_are_warned_about() {
        let s = set(&[(
            "w.yaml",
            "rules:\n  - name: auth\n    on: salt/auth\n    from: unverified\n    do: [{fire: {tag: ops/a}}]\n  - name: never\n    on: [salt/presence/change]\n    from: master\n    do: [{fire: {tag: ops/b}}]\n  - name: ours\n    on: [\"steward/v1/server/*\", \"*/deleted\"]\n    from: master\n    do: [{fire: {tag: ops/c}}]\n  - name: off\n    enabled: false\n    on: salt/auth\n    from: unverified\n    do: [{fire: {tag: ops/d}}]\n",
        )])
        .unwrap();
        let w: Vec<String> = s.warnings().iter().map(ToString::to_string).collect();
        assert_eq!(w.len(), 2, "{w:#?}");
        assert!(
            w[0].starts_with(
                "w.yaml:4:5: rule auth: `from: unverified`: any minion can forge this event"
            ),
            "{}",
            w[0]
        );
        assert!(
            w[1].starts_with("w.yaml:8:5: rule never: `from: master` matches only what salt-steward itself fires"),
            "{}",
            w[1]
        );
        assert!(may_match_own_tag("*"));
        assert!(may_match_own_tag("steward/*"));
        assert!(may_match_own_tag("steward/v1/rule/*/failed"));
        assert!(!may_match_own_tag("salt/*"));
        assert!(!may_match_own_tag("steward/v2/x"));
    }

    #[test]
    fn name_lines_are_found() {
        assert_eq!(name_on_line("  - name: x"), Some("x"));
        assert_eq!(name_on_line("  - { name: \"x\", on: y }"), Some("x"));
        assert_eq!(name_on_line("    name: 'x'  # c"), Some("x"));
        assert_eq!(name_on_line("    data: { name: x }"), None);
    }
}
