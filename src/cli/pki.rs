//! `salt-steward pki init|verify|export-signing|import-signing`: the master's
//! own keys and its pre-made key signature ([`crate::pki::master`]).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;
use serde::Serialize;

use super::Context;
use crate::master_config::MasterConfig;
use crate::pki::master::{
    self, Action, ExportReport, ImportReport, InitReport, PairReport, SigningPair, VerifyReport,
};

/// `pki` subcommands.
#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Create the master pair and the signing pair if missing, and write the
    /// signature of master.pub that minions verify (replacing one that covers
    /// another text, such as salt-key --gen-signature's).
    Init {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Say which text the signature file covers; exit 1 unless minions will accept it.
    Verify {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Copy the signing pair into DIR (created 0700), for another master.
    ExportSigning {
        /// Directory to write `<master_sign_key_name>.pem/.pub` into.
        dir: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Install the signing pair from DIR, then sign this master's own key with it.
    ImportSigning {
        /// Directory made by `pki export-signing`.
        dir: PathBuf,
        /// Replace a different signing pair already on this master.
        #[arg(long)]
        force: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) fn run(ctx: &Context, cmd: PkiCommand) -> anyhow::Result<ExitCode> {
    let m = ctx.master()?;
    match cmd {
        PkiCommand::Init { json } => {
            let r = master::init(&m).context("pki init")?;
            emit(json, &r, || print_init(&m, &r))?;
        }
        PkiCommand::Verify { json } => {
            let r = master::verify(&m).context("pki verify")?;
            emit(json, &r, || print_verify(&r))?;
            if !r.ok() {
                return Ok(ExitCode::from(1));
            }
        }
        PkiCommand::ExportSigning { dir, json } => {
            let r = master::export_signing(&m, &dir).context("pki export-signing")?;
            emit(json, &r, || print_export(&r))?;
        }
        PkiCommand::ImportSigning { dir, force, json } => {
            let r = master::import_signing(&m, &dir, force).context("pki import-signing")?;
            emit(json, &r, || print_import(&m, &r))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn emit<T: Serialize>(json: bool, report: &T, human: impl FnOnce()) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        human();
    }
    Ok(())
}

fn print_pair(label: &str, p: &PairReport) {
    println!(
        "{label:<12} {:<8} {} + {}",
        p.action.as_str(),
        p.private.display(),
        p.public.display()
    );
    println!("{:<12} {:<8} fingerprint {}", "", "", p.fingerprint);
    if let Some(note) = p.note {
        println!("{:<12} {:<8} {note}", "", "");
    }
}

fn print_init(m: &MasterConfig, r: &InitReport) {
    print_pair("master key", &r.master);
    print_pair("signing key", &r.signing);
    let s = &r.signature;
    println!(
        "{:<12} {:<8} {} (over the stripped master.pub, as minions verify it)",
        "signature",
        s.action.as_str(),
        s.path.display()
    );
    if let Some(prev) = s.previous {
        println!(
            "{:<12} {:<8} the old one covered {}",
            "",
            "",
            prev.describe()
        );
    }
    hints(m, r.changed());
}

fn hints(m: &MasterConfig, changed: bool) {
    if !(m.master_sign_pubkey && m.master_use_pubkey_signature) {
        println!(
            "note: {} does not set master_sign_pubkey: True and master_use_pubkey_signature: \
             True, so the master does not send this signature yet",
            m.path.display()
        );
    } else if !m.master_pubkey_signature_set {
        println!(
            "note: {} does not set master_pubkey_signature: Salt 3008 would then look for \
             <master id>_pubkey_signature instead of {}; add `master_pubkey_signature: {}`",
            m.path.display(),
            m.master_pubkey_signature,
            m.master_pubkey_signature
        );
    } else if changed {
        println!("note: restart the salt-master: it reads the signature at start-up");
    }
    println!(
        "note: minions need verify_master_pubkey_sign: True and {}.pub in their pki_dir",
        m.master_sign_key_name
    );
}

fn print_verify(r: &VerifyReport) {
    println!("signature    {}", r.signature.display());
    println!("covers       {}", r.covers.describe());
    let pair = match r.signing_pair {
        SigningPair::Match => "the private and public keys belong together",
        SigningPair::Mismatch => "the public key is NOT the private key's (broken pair)",
        SigningPair::NoPrivateKey => {
            "public key only (fine: a master sending a pre-made signature needs no private key)"
        }
    };
    println!("signing pair {pair}");
    println!("master.pub   fingerprint {}", r.master_fingerprint);
    println!("signing pub  fingerprint {}", r.signing_fingerprint);
    println!("verdict      {}", if r.ok() { "OK" } else { "NOT OK" });
}

fn print_export(r: &ExportReport) {
    print_pair("signing key", &r.pair);
    println!(
        "note: {} is the signing private key: move it to the other master over a private \
         channel, then run `salt-steward pki import-signing DIR` there and delete it here",
        r.pair.private.display()
    );
}

fn print_import(m: &MasterConfig, r: &ImportReport) {
    print_pair("signing key", &r.signing);
    if r.signing.action == Action::Kept {
        println!("{:<12} {:<8} (the same pair was already installed)", "", "");
    }
    print_init(m, &r.init);
}
