//! Issue #13's samba shares end to end: the CLI exactly as an operator types
//! it, a running `salt-steward daemon` dispatching `steward.share` through a
//! real master to a real minion (registered from its bundle by the daemon's
//! acceptor) whose samba is the private smbd of [`SmbdLab`], and the result
//! checked with `smbclient` and the password `share add` printed once:
//! writes and lists work, a wrong password and the old one after `share
//! passwd` are refused, `share rm` takes the share and its user away and
//! keeps the data; bad input is refused with its specific error and nothing
//! is written or dispatched; the NT hash is never in the daemon's log, on
//! the bus (`steward/v1/*`) or in clear in the master's job cache.

use std::path::{Path, PathBuf};
use std::time::Duration;

use salt_steward::registry;
use serde_json::Value;

use crate::accept::{bundle, signing_master_serving, wait_status};
use crate::support::salt::{install_bundle, salt_states_dir};
use crate::support::smbd::{logon_refused, nt_hash_hex, SmbdLab, TestUsers};
use crate::support::{
    assert_ok, cli, eventually_within, run_ok, start_daemon, steward_config, text, watch_steward,
    LineChild, SaltHarness,
};

const FILES: &str = "files1.example.org";
const PLAIN: &str = "plain1.example.org";

/// How long a target may take to converge (a state run through the master
/// on a loaded 2-core machine, after the debounce).
const CONVERGE: Duration = Duration::from_secs(120);

/// The daemon's config: bundles name this master, short dispatch delays,
/// share users named with the test users' prefix (deleted on drop).
fn config(h: &SaltHarness, user_prefix: &str) -> PathBuf {
    steward_config(
        h,
        &[],
        &format!(
            "masters: [\"127.0.0.1:{}\"]\n\
             dispatch:\n  debounce_ms: 300\n  job_timeout: 120\n  retry_base_ms: 2000\n\
             shares:\n  user_prefix: \"{user_prefix}\"\n",
            h.ret_port
        ),
    )
}

/// `salt-steward ARGS` (it must succeed): its stdout.
fn steward(cfg: &Path, args: &[&str]) -> String {
    String::from_utf8_lossy(&run_ok(cli(cfg, args)).stdout).into_owned()
}

/// `salt-steward ARGS` whose stdout is JSON.
fn steward_json(cfg: &Path, args: &[&str]) -> Value {
    let out = steward(cfg, args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {out}"))
}

/// `salt-steward ARGS` that must fail with exit 1 and `why` in its message.
fn refused(cfg: &Path, args: &[&str], why: &str) {
    let out = cli(cfg, args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {}", text(&out));
    assert!(err.contains(why), "{args:?}: {why:?} not in {err}");
}

/// A share as `share add|passwd --json` prints it: (id, user, password).
fn added(v: &Value) -> (String, String, String) {
    (
        v["id"].as_i64().unwrap().to_string(),
        v["user"].as_str().unwrap().to_owned(),
        v["password"].as_str().unwrap().to_owned(),
    )
}

/// The (server, state) target as `dispatch show SERVER --json` lists it.
fn target(cfg: &Path, server: &str, state: &str) -> Option<Value> {
    let show = steward_json(cfg, &["dispatch", "show", server, "--json"]);
    show["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["state"] == state)
        .cloned()
}

/// The dispatcher's outbox consumer: (position, pending).
fn dispatcher_cursor(cfg: &Path) -> (Option<i64>, Option<i64>) {
    let status = steward_json(cfg, &["outbox", "status", "--json"]);
    let c = status
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["consumer"] == "dispatch")
        .cloned()
        .unwrap_or(Value::Null);
    (c["position"].as_i64(), c["pending"].as_i64())
}

/// Waits until the dispatcher read every change and `server`'s share target
/// is `done` with `applied == desired`, at least at outbox id `at_least`;
/// the target.
fn converged(cfg: &Path, daemon: &mut LineChild, at_least: i64) -> Value {
    eventually_within("share target converged", CONVERGE, || {
        let (_, pending) = dispatcher_cursor(cfg);
        let t = target(cfg, FILES, "share");
        match (&pending, &t) {
            (Some(0), Some(t))
                if t["status"] == "done"
                    && t["applied"] == t["desired"]
                    && t["applied"].as_i64() >= Some(at_least) =>
            {
                Ok(t.clone())
            }
            _ => {
                daemon.drain_err();
                Err(format!(
                    "pending {pending:?}, target {}\ndaemon:\n{}",
                    t.map(|t| t.to_string()).unwrap_or_default(),
                    daemon.seen_err[daemon.seen_err.len().saturating_sub(15)..].join("\n")
                ))
            }
        }
    })
}

/// The outbox position after the last change (every change read).
fn last_change(cfg: &Path) -> i64 {
    eventually_within(
        "dispatcher read every change",
        CONVERGE,
        || match dispatcher_cursor(cfg) {
            (Some(pos), Some(0)) => Ok(pos),
            other => Err(format!("{other:?}")),
        },
    )
}

/// Every `state.apply` job of `minion` in the master's job cache, as text.
fn job_cache_text(h: &SaltHarness, minion: &str) -> String {
    let out = h.master_cmd(
        "salt-run",
        &[
            "jobs.list_jobs",
            "search_function=state.apply",
            "--out=json",
        ],
    );
    assert_ok(&out);
    let all: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut text = String::new();
    for (jid, job) in all.as_object().unwrap() {
        let targets = job["Target"].to_string();
        if !targets.contains(minion) {
            continue;
        }
        text.push_str(&job.to_string());
        let ret = h.master_cmd("salt-run", &["jobs.lookup_jid", jid, "--out=json"]);
        text.push_str(&String::from_utf8_lossy(&ret.stdout));
    }
    text
}

/// `smbclient` on `share` as `user` runs `commands`: its output. Retried for
/// a few seconds: smbd takes the state's `reload-config` asynchronously, and
/// on a loaded machine a login right after the run was once refused.
fn serves(lab: &SmbdLab, share: &str, user: &str, password: &str, commands: &str) -> String {
    eventually_within(
        &format!("{share} serves {user}"),
        Duration::from_secs(20),
        || lab.smbclient(share, user, password, commands),
    )
}

/// The private smbd, the test users (deleted on drop), a signing master
/// serving `salt-states/`, the daemon's config, the model `files` and the
/// samba-managed server [`FILES`] on the lab's base (`server add --json`).
fn files_server() -> (SmbdLab, TestUsers, SaltHarness, PathBuf, Value) {
    let lab = SmbdLab::start();
    let users = TestUsers::new();
    let h = signing_master_serving(vec![salt_states_dir()]);
    let cfg = config(&h, &users.name(""));
    steward(&cfg, &["model", "add", "files"]);
    let base = lab.base.display().to_string();
    let server = steward_json(
        &cfg,
        &[
            "server",
            "add",
            FILES,
            "--model",
            "files",
            "--samba-base",
            &base,
            "--json",
        ],
    );
    (lab, users, h, cfg, server)
}

#[test]
fn shares_added_by_the_cli_serve_with_the_printed_password_and_go_away_keeping_data() {
    let (lab, users, mut h, cfg, server) = files_server();
    let prefix = users.name("");
    let base = lab.base.display().to_string();
    assert_eq!(server["samba_managed"], true, "{server}");
    assert_eq!(server["samba_base_folder"], base.as_str(), "{server}");
    let minion = server["minion_id"].as_str().unwrap().to_owned();
    steward(&cfg, &["server", "add", PLAIN, "--model", "files"]);

    let mut daemon = start_daemon(&cfg);
    let mut w = watch_steward(&cfg);
    let b = bundle(&h, &cfg, FILES, "files1.tgz");
    h.start_minion_with(FILES, &minion, &lab.minion_settings(""), |dir| {
        install_bundle(&b, dir)
    });
    wait_status(&cfg, FILES, "online");

    // Two shares; each password printed once.
    let projects = steward_json(
        &cfg,
        &["share", "add", FILES, "Projects", "projects", "--json"],
    );
    let (p_id, p_user, p_pw1) = added(&projects);
    assert_eq!(p_user, format!("{prefix}projects"));
    let team = steward_json(
        &cfg,
        &["share", "add", FILES, "team", "groups/team", "--json"],
    );
    let (_, t_user, t_pw) = added(&team);
    let text_add = steward(&cfg, &["share", "list"]);
    assert!(!text_add.contains(&p_pw1), "share list shows a password");
    let t = converged(&cfg, &mut daemon, 0);
    assert_eq!(t["attempts"], 0, "{t}");

    // Real SMB with the printed password: write and list a file; a wrong
    // password is refused.
    let hello = lab.dir().join("hello.txt");
    std::fs::write(&hello, "hello through salt-steward\n").unwrap();
    let out = serves(
        &lab,
        "Projects",
        &p_user,
        &p_pw1,
        &format!("put {} hello.txt; ls", hello.display()),
    );
    assert!(out.contains("hello.txt"), "{out}");
    let kept = lab.base.join("projects/hello.txt");
    assert_eq!(
        std::fs::read_to_string(&kept).unwrap(),
        "hello through salt-steward\n"
    );
    logon_refused(lab.smbclient("Projects", &p_user, "wrong-password", "ls"));
    serves(&lab, "team", &t_user, &t_pw, "ls");

    // A new password: the old one is refused once applied, the new one works.
    let at = last_change(&cfg);
    let (_, _, p_pw2) = added(&steward_json(&cfg, &["share", "passwd", &p_id, "--json"]));
    assert_ne!(p_pw1, p_pw2);
    converged(&cfg, &mut daemon, at + 1);
    let out = serves(&lab, "Projects", &p_user, &p_pw2, "ls");
    logon_refused(lab.smbclient("Projects", &p_user, &p_pw1, "ls"));
    assert!(out.contains("hello.txt"), "{out}");

    // Bad input: the specific error, nothing written, nothing dispatched.
    let settled = converged(&cfg, &mut daemon, 0);
    let at = last_change(&cfg);
    let shares_before = steward_json(&cfg, &["share", "list", "--json"]);
    let too_long = "a".repeat(32 - prefix.len() + 1);
    for (args, why) in [
        (
            vec!["share", "add", FILES, "up", "../etc"],
            "leaves the samba base",
        ),
        (vec!["share", "add", FILES, "abs", "/etc"], "is absolute"),
        (
            vec!["share", "add", PLAIN, "plain", "plain"],
            "is not samba-managed",
        ),
        (
            vec!["share", "add", FILES, "PROJECTS", "other"],
            "is taken by share #",
        ),
        (
            vec!["share", "add", FILES, "other", "projects/"],
            "folder \"projects\" on files1.example.org is taken by share #",
        ),
        (
            vec!["share", "add", FILES, too_long.as_str(), "long"],
            "is longer than 32 characters",
        ),
        (vec!["share", "add", FILES, "homes", "h"], "reserves"),
    ] {
        refused(&cfg, &args, why);
    }
    assert_eq!(
        steward_json(&cfg, &["share", "list", "--json"]),
        shares_before
    );
    assert_eq!(dispatcher_cursor(&cfg), (Some(at), Some(0)));
    assert_eq!(target(&cfg, FILES, "share"), Some(settled.clone()));
    assert_eq!(target(&cfg, PLAIN, "share"), None);
    // A server with shares can neither go nor stop being samba-managed.
    refused(&cfg, &["server", "rm", FILES], "share #");
    refused(&cfg, &["server", "set", FILES, "samba_base="], "share #");

    // A share the state refuses (its folder leads out of the base through a
    // symlink): the run fails, recorded with the state's comment, the other
    // shares keep serving; removing it converges again.
    std::os::unix::fs::symlink("/tmp", lab.base.join("escape")).unwrap();
    let escape = steward_json(&cfg, &["share", "add", FILES, "escape", "escape", "--json"]);
    let (e_id, _, _) = added(&escape);
    let failed = eventually_within(
        "the escaping share's run failed",
        CONVERGE,
        || match target(&cfg, FILES, "share") {
            Some(t)
                if t["status"] == "failed"
                    && t["last_error"]
                        .as_str()
                        .unwrap_or_default()
                        .contains("escape") =>
            {
                Ok(t)
            }
            t => Err(format!("{t:?}")),
        },
    );
    assert!(failed["attempts"].as_i64() >= Some(1), "{failed}");
    let status = cli(&cfg, &["status"]).output().unwrap();
    let shown = String::from_utf8_lossy(&status.stdout);
    assert_eq!(status.status.code(), Some(1), "{shown}");
    assert!(
        shown
            .lines()
            .any(|l| l.contains(FILES) && l.contains("share") && l.contains("failed")),
        "{shown}"
    );
    serves(&lab, "Projects", &p_user, &p_pw2, "ls");
    steward(&cfg, &["share", "rm", &e_id]);
    let at = last_change(&cfg);
    converged(&cfg, &mut daemon, at);

    // Removing a share: gone from the list, its user gone, its data kept.
    steward(&cfg, &["share", "rm", &p_id]);
    let last = converged(&cfg, &mut daemon, at + 1);
    let listed = lab.list_shares(&t_user, &t_pw).unwrap();
    assert!(listed.iter().any(|s| s == "team"), "{listed:?}");
    assert!(
        !listed.iter().any(|s| s.eq_ignore_ascii_case("projects")),
        "{listed:?}"
    );
    assert!(!TestUsers::exists(&p_user), "{p_user} still exists");
    assert!(!lab.passdb_users().contains(&p_user));
    assert_eq!(
        std::fs::read_to_string(&kept).unwrap(),
        "hello through salt-steward\n"
    );

    // `status` and `dispatch list` show the share target like the others.
    let list = steward(&cfg, &["dispatch", "list"]);
    assert!(
        list.lines()
            .any(|l| l.contains(FILES) && l.contains("share")),
        "{list}"
    );

    // The secrets never left the registry in clear: not in the daemon's
    // log, not on the bus, not in the master's job cache (the pillar holds
    // them encrypted for the minion).
    let jobs = job_cache_text(&h, &minion);
    assert!(
        jobs.contains("nt_hash_enc"),
        "no share pillar in the job cache"
    );
    daemon.drain_err();
    let log = format!("{}\n{}", daemon.seen.join("\n"), daemon.seen_err.join("\n"));
    // Every event up to the last run's end (the removal's notification
    // comes before it).
    let jid = last["last_jid"].as_str().unwrap().to_owned();
    w.wait_line("the last run's done event", crate::support::T, |l| {
        l.contains("steward/v1/dispatch/done") && l.contains(&jid)
    });
    for verb in ["created", "updated", "deleted"] {
        let tag = format!("steward/v1/share/{verb}");
        if !w.seen.iter().any(|l| l.contains(&tag)) {
            w.wait_line(&tag, crate::support::T, |l| l.contains(&tag));
        }
    }
    let bus = w.seen.join("\n");
    for pw in [&p_pw1, &p_pw2, &t_pw] {
        let hash = nt_hash_hex(pw);
        for (place, text) in [("daemon log", &log), ("bus", &bus), ("job cache", &jobs)] {
            assert!(!text.contains(&hash), "an NT hash is in the {place}");
            assert!(!text.contains(pw.as_str()), "a password is in the {place}");
        }
    }
}

// ---- the registry, on both backends ----

/// Shares in the registry: the service's refusals write nothing; the
/// database itself refuses what the service would (a writer that skips it,
/// a race); every write has one outbox row naming the server, without the
/// hash; a server with shares can neither go nor lose its samba base.
async fn share_story(svc: registry::Service<registry::DbStore>) {
    use registry::shares::{NtHash, Password};
    use registry::store::{NewShare, ShareStore as _, Store as _};
    use registry::{ServerPatch, ServerRef};

    svc.create_model("files", "", &[]).await.unwrap();
    let mut p = ServerPatch::default();
    for kv in ["name=files1", "model=files", "samba_base=/srv/samba"] {
        p.set_assignment(kv).unwrap();
    }
    let files = svc.create_server(p).await.unwrap();
    assert!(files.samba_managed);
    svc.store().outbox_subscribe("story").await.unwrap();
    let all = || async { svc.store().outbox_pending("story", 1000).await.unwrap() };
    // The rows of the story (the server's own rows before are not).
    let before = all().await.len();
    let outbox = || async { all().await.split_off(before) };
    let server = ServerRef::Name("files1".into());

    let (share, password) = svc
        .create_share(&server, "Projects", "projects")
        .await
        .unwrap();
    let hash = NtHash::of(&password);
    let rows = outbox().await;
    assert_eq!(rows.len(), 1);
    let registry::OutboxRow::Entry(entry) = &rows[0] else {
        panic!("{rows:?}")
    };
    assert_eq!(entry.kind, registry::OutboxKind::ShareCreated);
    assert_eq!(entry.payload["targets"], serde_json::json!([files.id]));
    assert!(!entry.payload.to_string().contains(hash.expose()));
    assert!(entry.payload.get("password").is_none());

    // Refused by the service: nothing written.
    for (name, folder, code) in [
        ("projects", "x", "duplicate_share"),
        ("x", "projects", "duplicate_share"),
        ("x", "../x", "invalid_value"),
        ("x", "/x", "invalid_value"),
        (&*"a".repeat(29), "y", "user_name_too_long"),
    ] {
        let e = svc.create_share(&server, name, folder).await.unwrap_err();
        assert_eq!(e.code(), code, "{name} {folder}: {e}");
    }
    assert_eq!(outbox().await.len(), 1);

    // Refused by the database when the service is skipped.
    let raw = |name: &str, folder: &str, user: &str| NewShare {
        server_id: files.id,
        name: name.into(),
        folder: folder.into(),
        user: user.into(),
        nt_hash: NtHash::of(&Password::generate().unwrap()),
    };
    for (s, code) in [
        (raw("PROJECTS", "a", "u1"), "duplicate_share"),
        (raw("b", "projects", "u2"), "duplicate_share"),
        (raw("c", "c", &share.user), "duplicate_share"),
        (raw("d", "../d", "u4"), "invalid_value"),
        (raw("e", "/e", "u5"), "invalid_value"),
        (raw("homes", "f", "u6"), "invalid_value"),
    ] {
        let e = svc.store().insert_share(&s).await.unwrap_err();
        assert_eq!(e.code(), code, "{s:?}: {e}");
    }
    assert_eq!(svc.list_shares(None).await.unwrap().len(), 1);
    assert_eq!(outbox().await.len(), 1);

    // A new password: a new hash, one outbox row, revision + 1.
    let (after, new_password) = svc.share_passwd(share.id).await.unwrap();
    assert_eq!(after.revision, share.revision + 1);
    let stored = svc.store().shares_with_hashes(files.id).await.unwrap();
    assert_eq!(stored[0].1, NtHash::of(&new_password));
    assert_ne!(stored[0].1, hash);
    assert_eq!(outbox().await.len(), 2);

    // The server keeps its shares possible.
    let mut unset = ServerPatch::default();
    unset.set("samba_base", "").unwrap();
    for e in [
        svc.update_server(&server, unset.clone()).await.unwrap_err(),
        svc.delete_server(&server).await.unwrap_err(),
    ] {
        assert_eq!(e.code(), "server_in_use", "{e}");
        assert!(e.to_string().contains("Projects"), "{e}");
    }
    let gone = svc.delete_share(share.id).await.unwrap();
    assert_eq!(gone.id, share.id);
    assert_eq!(
        svc.delete_share(share.id).await.unwrap_err().code(),
        "not_found"
    );
    svc.update_server(&server, unset).await.unwrap();
    let e = svc.create_share(&server, "x", "x").await.unwrap_err();
    assert_eq!(e.code(), "not_samba_managed", "{e}");
    svc.delete_server(&server).await.unwrap();
}

#[tokio::test]
async fn share_registry_on_sqlite() {
    let db = crate::registry::TestDb::sqlite();
    share_story(registry::open(&db.url).await.unwrap()).await;
}

#[tokio::test]
async fn share_registry_on_postgres() {
    let db = crate::registry::TestDb::postgres_required().await;
    share_story(registry::open(&db.url).await.unwrap()).await;
}

// ---- the bus ----

/// Fires a request from the master (`salt-run event.send`) and waits for its reply.
fn ask(
    h: &SaltHarness,
    w: &mut LineChild,
    daemon: &mut LineChild,
    tag: &str,
    request_id: &str,
    mut data: Value,
) -> Value {
    data["request_id"] = serde_json::json!(request_id);
    assert_ok(&h.master_cmd("salt-run", &["event.send", tag, &data.to_string()]));
    crate::support::reply(w, daemon, request_id)
}

/// The data of notification `tag` for share `id`, seen already (waiting for
/// a reply reads past it) or to come.
fn notified(w: &mut LineChild, daemon: &mut LineChild, tag: &str, id: &Value) -> Value {
    let is = |v: &Value| v["tag"] == tag && v["data"]["id"] == *id;
    if let Some(v) = w.seen.iter().map(|l| crate::support::json_line(l)).find(is) {
        return v["data"].clone();
    }
    crate::support::wait_event_data(w, daemon, tag, |d| d["id"] == *id)
}

#[test]
fn shares_on_the_bus_reply_the_password_to_the_trusted_requester_only() {
    use serde_json::json;
    let mut h = SaltHarness::start();
    h.wait_req_ready();
    h.start_minions_and_wait(&["s-trusted", "s-untrusted"]);
    let cfg = steward_config(&h, &["s-trusted"], "");
    steward(&cfg, &["model", "add", "files"]);
    steward(
        &cfg,
        &[
            "server",
            "add",
            "files1",
            "--model",
            "files",
            "--samba-base",
            "/srv/samba",
        ],
    );
    steward(&cfg, &["server", "add", "plain1", "--model", "files"]);
    let mut d = start_daemon(&cfg);
    let mut w = watch_steward(&cfg);
    let (w, d) = (&mut w, &mut d);
    let create = "steward/v1/share/create";

    let r = ask(
        &h,
        w,
        d,
        create,
        "c1",
        json!({"server": "files1", "name": "docs", "folder": "docs"}),
    );
    assert_eq!(r["ok"], true, "{r}");
    let id = r["result"]["id"].clone();
    let first = r["result"]["password"].as_str().unwrap().to_owned();
    assert_eq!(r["result"]["user"], "smb-docs", "{r}");
    let created = notified(w, d, "steward/v1/share/created", &id);
    assert_eq!(
        created["targets"].as_array().map(Vec::len),
        Some(1),
        "{created}"
    );

    // Refusals, with their codes; nothing written.
    for (rid, data, code) in [
        (
            "b1",
            json!({"server": "files1", "name": "x", "folder": "../x"}),
            "invalid_value",
        ),
        (
            "b2",
            json!({"server": "files1", "name": "x", "folder": "/x"}),
            "invalid_value",
        ),
        (
            "b3",
            json!({"server": "plain1", "name": "x", "folder": "x"}),
            "not_samba_managed",
        ),
        (
            "b4",
            json!({"server": "files1", "name": "DOCS", "folder": "x"}),
            "duplicate_share",
        ),
        (
            "b5",
            json!({"server": "files1", "name": "x", "folder": "docs"}),
            "duplicate_share",
        ),
        (
            "b6",
            json!({"server": "files1", "name": "a".repeat(29), "folder": "y"}),
            "user_name_too_long",
        ),
    ] {
        let r = ask(&h, w, d, create, rid, data);
        assert_eq!(r["error"]["code"], code, "{rid}: {r}");
    }
    let listed = steward_json(&cfg, &["share", "list", "--json"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");

    // find: for anyone, never a password.
    assert_ok(&h.minion_call(
        "s-untrusted",
        &[
            "event.send",
            "steward/v1/share/find",
            &json!({"request_id": "f1", "server": "files1"}).to_string(),
        ],
    ));
    let r = crate::support::reply(w, d, "f1");
    assert_eq!(r["result"][0]["name"], "docs", "{r}");
    assert!(r["result"][0].get("password").is_none(), "{r}");

    // passwd: an untrusted minion is refused; the trusted one gets the new password.
    let passwd = |minion: &str, rid: &str| {
        assert_ok(&h.minion_call(
            minion,
            &[
                "event.send",
                "steward/v1/share/passwd",
                &json!({"request_id": rid, "id": id}).to_string(),
            ],
        ));
    };
    passwd("s-untrusted", "p1");
    let r = crate::support::reply(w, d, "p1");
    assert_eq!(r["error"]["code"], "untrusted_sender", "{r}");
    passwd("s-trusted", "p2");
    let r = crate::support::reply(w, d, "p2");
    assert_eq!(r["ok"], true, "{r}");
    let second = r["result"]["password"].as_str().unwrap().to_owned();
    assert_ne!(first, second);
    assert_eq!(r["result"]["revision"], 2, "{r}");

    let r = ask(&h, w, d, "steward/v1/share/delete", "d1", json!({"id": id}));
    assert_eq!(r["ok"], true, "{r}");
    notified(w, d, "steward/v1/share/deleted", &id);

    // The passwords went in the replies to their requesters only: no other
    // steward event carries them, nor their hashes.
    for line in &w.seen {
        let v = crate::support::json_line(line);
        let tag = v["tag"].as_str().unwrap_or_default();
        for pw in [&first, &second] {
            assert!(
                !line.contains(&nt_hash_hex(pw)),
                "a hash on the bus: {line}"
            );
            if !tag.starts_with("steward/v1/reply/") {
                assert!(!line.contains(pw.as_str()), "a password in {tag}: {line}");
            }
        }
    }
}

/// The `state.apply steward.share` jobs of `minion` in the master's job cache.
fn share_runs(h: &SaltHarness, minion: &str) -> usize {
    let out = h.master_cmd(
        "salt-run",
        &[
            "jobs.list_jobs",
            "search_function=state.apply",
            "--out=json",
        ],
    );
    assert_ok(&out);
    let all: Value = serde_json::from_slice(&out.stdout).unwrap();
    all.as_object()
        .unwrap()
        .values()
        .filter(|j| j["Target"].to_string().contains(minion))
        .filter(|j| j["Arguments"].to_string().contains("steward.share"))
        .count()
}

#[test]
fn share_changes_made_while_the_daemon_is_stopped_give_one_run() {
    // The test users stay until the end: the share users are deleted with them.
    let (lab, _users, mut h, cfg, server) = files_server();
    let minion = server["minion_id"].as_str().unwrap().to_owned();
    let daemon = start_daemon(&cfg);
    let b = bundle(&h, &cfg, FILES, "files1.tgz");
    h.start_minion_with(FILES, &minion, &lab.minion_settings(""), |dir| {
        install_bundle(&b, dir)
    });
    wait_status(&cfg, FILES, "online");
    last_change(&cfg);
    assert!(daemon.terminate().success());
    let before = share_runs(&h, &minion);

    // Five changes, one target, no daemon.
    let add = |name: &str| {
        added(&steward_json(
            &cfg,
            &["share", "add", FILES, name, name, "--json"],
        ))
    };
    let (a_id, a_user, _) = add("alpha");
    let (b_id, _, _) = add("beta");
    let (_, g_user, g_pw) = add("gamma");
    let (_, _, a_pw) = added(&steward_json(&cfg, &["share", "passwd", &a_id, "--json"]));
    steward(&cfg, &["share", "rm", &b_id]);

    let mut daemon = start_daemon(&cfg);
    let at = last_change(&cfg);
    let t = converged(&cfg, &mut daemon, at);
    assert_eq!(t["attempts"], 0, "{t}");
    assert_eq!(
        share_runs(&h, &minion),
        before + 1,
        "one run for five changes"
    );
    serves(&lab, "alpha", &a_user, &a_pw, "ls");
    serves(&lab, "gamma", &g_user, &g_pw, "ls");
    let listed = lab.list_shares(&g_user, &g_pw).unwrap();
    assert!(!listed.iter().any(|s| s == "beta"), "{listed:?}");
}
