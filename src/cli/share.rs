//! `salt-steward share add|list|rm|passwd`: samba shares of samba-managed
//! servers, through the same `registry::Service` as the bus. A generated
//! password is printed once, here, and is not stored anywhere.

use std::process::ExitCode;

use clap::Subcommand;
use serde_json::json;

use super::registry::{open, out, parse_ref, print_json};
use super::Context;
use crate::registry::shares::{Password, Share};

/// `share` subcommands.
#[derive(Debug, Subcommand)]
pub enum ShareCommand {
    /// Share FOLDER (relative to SERVER's samba base) as NAME, with its own
    /// user and a new password, printed once.
    Add {
        /// The samba-managed server (id or name).
        server: String,
        /// The share name.
        name: String,
        /// The folder, relative to the server's samba base.
        folder: String,
        /// Print the record and the password as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Shares, of one server or all (never their passwords or hashes).
    List {
        /// Only this server's.
        #[arg(long, value_name = "SERVER")]
        server: Option<String>,
        /// One JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Remove a share (its user goes on the next apply; its data stays).
    Rm {
        /// Its id.
        id: i64,
    },
    /// Issue a new password for a share, printed once (the old one stops
    /// working once applied).
    Passwd {
        /// Its id.
        id: i64,
        /// Print the record and the password as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a `share` subcommand.
pub async fn run_share(ctx: &Context, cmd: ShareCommand) -> anyhow::Result<ExitCode> {
    let reg = open(ctx).await?;
    match cmd {
        ShareCommand::Add {
            server,
            name,
            folder,
            json,
        } => {
            let (share, password) = reg
                .create_share(&parse_ref(&server), &name, &folder)
                .await?;
            print_with_password(&share, &password, json)?;
        }
        ShareCommand::List { server, json } => {
            let all = reg
                .list_shares(server.as_deref().map(parse_ref).as_ref())
                .await?;
            if json {
                print_json(&all)?;
            } else {
                out("id\tserver\tname\tfolder\tuser\trevision")?;
                for s in &all {
                    out(format_args!(
                        "{}\t{}\t{}\t{}\t{}\t{}",
                        s.id, s.server, s.name, s.folder, s.user, s.revision
                    ))?;
                }
            }
        }
        ShareCommand::Rm { id } => {
            let s = reg.delete_share(id).await?;
            out(format_args!("removed {s}"))?;
        }
        ShareCommand::Passwd { id, json } => {
            let (share, password) = reg.share_passwd(id).await?;
            print_with_password(&share, &password, json)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The share and its password: JSON (`{…record, "password"}`) or text.
fn print_with_password(share: &Share, password: &Password, json: bool) -> anyhow::Result<()> {
    if json {
        let mut v = json!(share);
        v["password"] = json!(password.expose());
        return print_json(&v);
    }
    out(share)?;
    out(format_args!("user: {}", share.user))?;
    out(format_args!("password: {}", password.expose()))?;
    out("(shown once: salt-steward keeps only its NT hash; `share passwd` issues a new one)")
}
