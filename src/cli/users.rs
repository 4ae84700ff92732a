//! `salt-steward user add|passwd|disable|list` and `salt-steward token
//! add|list|rm`: who may use the HTTP API, through the same
//! `registry::Service` operations as the API itself. Every write is audited
//! with the actor `cli:<unix user>`. A password is prompted without echo on
//! a terminal, else read as one line from standard input (scripts); a token
//! is printed once, on standard output alone, and never stored.

use std::io::{BufRead as _, IsTerminal as _};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;
use serde_json::json;

use super::registry::{open, out, print_json};
use super::Context;
use crate::registry::users::{parse_duration_ms, parse_scopes, Password, Role};

/// `user` subcommands.
#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Add a user of the HTTP API; the password is prompted (or read as one
    /// line from standard input when it is not a terminal).
    Add {
        /// Login name.
        name: String,
        /// viewer (reads), operator (also changes the inventory, exec) or
        /// admin (also users, tokens, audit).
        #[arg(long)]
        role: String,
    },
    /// Set a user's password (same input as `add`); its sessions end.
    Passwd {
        /// Login name.
        name: String,
    },
    /// Disable a user: no login; its sessions and tokens stop working.
    Disable {
        /// Login name.
        name: String,
    },
    /// List the users (never their password hashes).
    List {
        /// One JSON array.
        #[arg(long)]
        json: bool,
    },
}

/// `token` subcommands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Add an API token (`Authorization: Bearer …`), printed once.
    Add {
        /// Unique name, for people.
        name: String,
        /// read, write or admin; repeat (or comma-separate) for several.
        #[arg(long = "scope", required = true, value_name = "SCOPE")]
        scopes: Vec<String>,
        /// Lifetime, like 30d, 12h, 45m; default: no expiry.
        #[arg(long, value_name = "DURATION")]
        expires: Option<String>,
        /// The user it acts for (its role caps the scopes; disabling the
        /// user stops the token).
        #[arg(long, value_name = "NAME")]
        user: Option<String>,
        /// Print the record and the token as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the tokens (never their secrets).
    List {
        /// One JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Remove a token.
    Rm {
        /// Its name.
        name: String,
    },
}

/// The actor of CLI writes in the audit log: `cli:<unix user>`.
fn actor() -> String {
    match std::env::var("USER").or_else(|_| std::env::var("LOGNAME")) {
        Ok(u) if !u.is_empty() => format!("cli:{u}"),
        _ => "cli".to_owned(),
    }
}

/// The new password: prompted twice without echo on a terminal, else one
/// line of standard input (its line ending removed).
fn read_password() -> anyhow::Result<Password> {
    let text = if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password("Password: ").context("reading the password")?;
        let again = rpassword::prompt_password("Again: ").context("reading the password")?;
        if first != again {
            anyhow::bail!("the passwords differ");
        }
        first
    } else {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("reading the password from standard input")?;
        let trimmed = line.trim_end_matches(['\n', '\r']).to_owned();
        zeroize::Zeroize::zeroize(&mut line);
        trimmed
    };
    Ok(Password::new(text)?)
}

/// Runs a `user` subcommand.
pub async fn run_user(ctx: &Context, cmd: UserCommand) -> anyhow::Result<ExitCode> {
    let reg = open(ctx).await?;
    match cmd {
        UserCommand::Add { name, role } => {
            let role: Role = role.parse()?;
            let password = read_password()?;
            let u = reg.add_user(&actor(), &name, role, password).await?;
            out(format_args!("added user {} ({})", u.name, u.role))?;
        }
        UserCommand::Passwd { name } => {
            let password = read_password()?;
            let u = reg.user_passwd(&actor(), &name, password).await?;
            out(format_args!(
                "password of {} set; its sessions ended",
                u.name
            ))?;
        }
        UserCommand::Disable { name } => {
            let u = reg.disable_user(&actor(), &name).await?;
            out(format_args!("disabled {}", u.name))?;
        }
        UserCommand::List { json } => {
            let all = reg.list_users().await?;
            if json {
                print_json(&all)?;
            } else {
                out("id\tname\trole\tdisabled")?;
                for u in &all {
                    out(format_args!(
                        "{}\t{}\t{}\t{}",
                        u.id, u.name, u.role, u.disabled
                    ))?;
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs a `token` subcommand.
pub async fn run_token(ctx: &Context, cmd: TokenCommand) -> anyhow::Result<ExitCode> {
    let reg = open(ctx).await?;
    match cmd {
        TokenCommand::Add {
            name,
            scopes,
            expires,
            user,
            json,
        } => {
            let scopes = parse_scopes(&scopes.join(","))?;
            let expires = expires.as_deref().map(parse_duration_ms).transpose()?;
            let now = crate::registry::store::now_ms();
            let (token, secret) = reg
                .add_token(&actor(), &name, &scopes, user.as_deref(), expires, now)
                .await?;
            if json {
                let mut v = json!(token);
                v["token"] = json!(secret.expose());
                print_json(&v)?;
            } else {
                out(secret.expose())?;
                eprintln!(
                    "token {} ({}) added; shown once: salt-steward keeps only its sha256",
                    token.name,
                    crate::registry::users::scopes_text(&token.scopes)
                );
            }
        }
        TokenCommand::List { json } => {
            let all = reg.list_tokens().await?;
            if json {
                print_json(&all)?;
            } else {
                out("id\tname\tuser\tscopes\texpires_at\tlast_used_at")?;
                for t in &all {
                    let opt = |v: Option<i64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
                    out(format_args!(
                        "{}\t{}\t{}\t{}\t{}\t{}",
                        t.id,
                        t.name,
                        t.user.as_deref().unwrap_or("-"),
                        crate::registry::users::scopes_text(&t.scopes),
                        opt(t.expires_at),
                        opt(t.last_used_at)
                    ))?;
                }
            }
        }
        TokenCommand::Rm { name } => {
            let t = reg.remove_token(&actor(), &name).await?;
            out(format_args!("removed token {}", t.name))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
