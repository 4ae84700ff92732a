//! `salt-steward rules check|test`: the reactor rules, offline.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use clap::Subcommand;
use serde_json::{json, Value as Json};

use super::Context;
use crate::bus::event::from_json;
use crate::bus::{is_own_tag, Event, Origin};
use crate::rules::{compile, load_dir, EventView, RuleError, RuleSet, Scratch};

/// `rules` subcommands.
#[derive(Debug, Subcommand)]
pub enum RulesCommand {
    /// Validate rule files as the daemon would; exit 1 with every problem
    /// (file:line:column: rule NAME: message).
    Check {
        /// A rules directory or one rule file. Default: `rules_dir` from the config.
        path: Option<PathBuf>,
    },
    /// Show which rules an event would trigger and their actions filled in
    /// from it, without running anything (debounce and rate limits are not applied).
    Test {
        /// The event's tag.
        tag: String,
        /// The event's data, as JSON (for a minion-fired event: the user's map). Default `{}`.
        #[arg(value_name = "JSON")]
        data: Option<String>,
        /// Who fired it: a minion id (`salt-call event.send`, wrapped as the
        /// master does); `master` (salt-steward's own event, delivered in
        /// memory); `unverified` (an unwrapped event off the bus: Salt's own,
        /// `salt-run event.send`, or a forged one). Default `unverified`.
        #[arg(long, value_name = "MINION|master|unverified")]
        from: Option<String>,
        /// A rules directory or one rule file. Default: `rules_dir` from the config.
        #[arg(long, value_name = "PATH")]
        rules: Option<PathBuf>,
        /// Print one JSON document.
        #[arg(long = "json")]
        json_output: bool,
    },
}

pub(crate) async fn run(ctx: &Context, cmd: RulesCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        RulesCommand::Check { path } => {
            let path = path.unwrap_or_else(|| ctx.settings.rules_dir.clone());
            match load(&path) {
                Ok(set) => {
                    for w in set.warnings() {
                        eprintln!("warning: {w}");
                    }
                    let enabled = set.rules().iter().filter(|r| r.enabled).count();
                    println!(
                        "ok: {} rules ({enabled} enabled) in {} files ({})",
                        set.rules().len(),
                        set.files().len(),
                        path.display()
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(errors) => {
                    for e in &errors {
                        eprintln!("{e}");
                    }
                    eprintln!("{} problem(s); the rules were not accepted", errors.len());
                    Ok(ExitCode::from(1))
                }
            }
        }
        RulesCommand::Test {
            tag,
            data,
            from,
            rules,
            json_output,
        } => {
            let path = rules.unwrap_or_else(|| ctx.settings.rules_dir.clone());
            let set = match load(&path) {
                Ok(set) => set,
                Err(errors) => {
                    for e in &errors {
                        eprintln!("{e}");
                    }
                    bail!(
                        "{} problem(s) in the rules at {}",
                        errors.len(),
                        path.display()
                    );
                }
            };
            let payload: Json = match data.as_deref() {
                None => json!({}),
                Some(s) => serde_json::from_str(s)
                    .with_context(|| format!("event data {s:?} is not JSON"))?,
            };
            test(&set, &tag, payload, from.as_deref(), json_output)
        }
    }
}

/// A directory, or a single file.
fn load(path: &Path) -> Result<RuleSet, Vec<RuleError>> {
    if path.is_file() {
        let text = std::fs::read_to_string(path).map_err(|e| {
            vec![RuleError {
                file: path.to_owned(),
                line: None,
                column: None,
                rule: None,
                message: format!("cannot read: {e}"),
            }]
        })?;
        compile(&[(path.to_owned(), text)])
    } else {
        load_dir(path)
    }
}

fn test(
    set: &RuleSet,
    tag: &str,
    payload: Json,
    from: Option<&str>,
    json_output: bool,
) -> anyhow::Result<ExitCode> {
    // A minion's event.send reaches the master's bus wrapped like this.
    let data = match from {
        None | Some("master" | "unverified") => payload,
        Some(id) => json!({"cmd": "_minion_event", "id": id, "tag": tag, "data": payload}),
    };
    let event = Event::new(tag.to_owned(), from_json(&data));
    let origin = match from {
        Some("master") => Origin::Master,
        _ => Origin::of_bus(&event),
    };
    if origin != Origin::Master && is_own_tag(tag) {
        println!("{tag} is salt-steward's own tag: its bus copies are never acted on (test it --from master)");
        return Ok(ExitCode::SUCCESS);
    }
    let view = EventView::of(&event, &origin);
    let mut hits = Vec::new();
    set.matching(&view, &mut Scratch::default(), &mut hits);
    let mut failed = false;
    let mut report = Vec::new();
    for &i in &hits {
        let Some(rule) = set.rules().get(i) else {
            continue;
        };
        let mut entry = json!({
            "rule": &*rule.name,
            "file": rule.file.display().to_string(),
            "line": rule.line,
            "debounce": rule.debounce.map(|d| d.as_secs_f64()),
            "rate_limit": rule.rate_limit.map(|r| json!({"max": r.max, "per": r.per.as_secs_f64()})),
        });
        match set.render(rule, &view) {
            Ok(actions) => {
                entry["actions"] = Json::Array(actions.iter().map(|a| a.to_json()).collect());
            }
            Err(error) => {
                failed = true;
                entry["error"] = json!(error);
            }
        }
        report.push(entry);
    }
    if json_output {
        println!("{}", serde_json::to_string_pretty(&Json::Array(report))?);
    } else if report.is_empty() {
        println!("no rule matches {tag}");
    } else {
        for entry in &report {
            println!(
                "rule {} ({}:{})",
                entry["rule"].as_str().unwrap_or_default(),
                entry["file"].as_str().unwrap_or_default(),
                entry["line"]
            );
            if let Some(error) = entry["error"].as_str() {
                println!("  error: {error}");
            }
            for a in entry["actions"].as_array().into_iter().flatten() {
                println!("  {a}");
            }
        }
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
