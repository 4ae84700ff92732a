//! `steward.share` applied for real by `salt-call --local` against a private
//! smbd on loopback ([`SmbdLab`]): system users created with `useradd`
//! (names unique to the test process, deleted on drop by [`TestUsers`]),
//! passdb entries from NT hashes RSA-OAEP-encrypted to the minion's own key
//! the way the daemon will, checked with `smbclient`.

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::Path;

use serde_json::{json, Value};

use crate::support::eventually;
use crate::support::salt_local::{LocalMinion, StateRun};
use crate::support::smbd::{
    logon_refused, md4, nt_hash_enc, nt_hash_hex, write_minion_key, SmbdLab, TestUsers,
};

const MINION: &str = "files-test";

/// A masterless minion pointed at the lab, with a fresh RSA key in its
/// pki_dir; the key's public PEM (what the master holds).
fn minion(lab: &SmbdLab, extra: &str) -> (LocalMinion, String) {
    let m = LocalMinion::new(MINION, &lab.minion_settings(extra));
    let public = write_minion_key(&m.dir().join("root/pki"));
    (m, public)
}

#[derive(Clone, Copy)]
struct Share<'a> {
    id: u64,
    name: &'a str,
    folder: &'a str,
    user: &'a str,
    password: &'a str,
}

fn pillar(lab: &SmbdLab, public: &str, revision: u64, shares: &[Share]) -> Value {
    let shares: Vec<Value> = shares
        .iter()
        .map(|s| {
            json!({
                "id": s.id,
                "name": s.name,
                "folder": s.folder,
                "user": s.user,
                "nt_hash_enc": nt_hash_enc(public, s.password),
            })
        })
        .collect();
    json!({"steward": {"share": {
        "revision": revision,
        "target": MINION,
        "base": lab.base,
        "shares": shares,
    }}})
}

fn assert_applied(run: &StateRun) {
    assert!(run.ok(), "state failed:\n{}", run.raw);
    assert!(run.changed(), "state reported no changes:\n{}", run.raw);
}

fn assert_unchanged(run: &StateRun) {
    assert!(run.ok(), "state failed:\n{}", run.raw);
    assert!(!run.changed(), "repeat run reported changes:\n{}", run.raw);
}

fn assert_failed(run: &StateRun, why: &str) {
    assert!(!run.ok(), "state passed:\n{}", run.raw);
    assert!(
        run.comments().contains(why),
        "{why:?} not in the comment:\n{}",
        run.raw
    );
}

/// No NT hash of `passwords` anywhere in what salt-call printed or in the
/// minion's log.
fn assert_no_hash(m: &LocalMinion, run: &StateRun, passwords: &[&str]) {
    let log = std::fs::read_to_string(m.dir().join("root/minion.log")).unwrap_or_default();
    for p in passwords {
        let h = nt_hash_hex(p);
        assert!(
            !run.raw.to_lowercase().contains(&h),
            "the NT hash is in the state's output:\n{}",
            run.raw
        );
        assert!(
            !log.to_lowercase().contains(&h),
            "the NT hash is in the minion log"
        );
    }
}

fn can_login(lab: &SmbdLab, share: &str, user: &str, password: &str) -> Result<String, String> {
    lab.smbclient(share, user, password, "ls")
}

#[test]
fn md4_and_nt_hash_match_the_references() {
    // RFC 1320's test suite, and the NT hash of "password" everyone quotes.
    let hex = |d: [u8; 16]| d.iter().map(|b| format!("{b:02x}")).collect::<String>();
    assert_eq!(hex(md4(b"")), "31d6cfe0d16ae931b73c59d7e0c089c0");
    assert_eq!(hex(md4(b"abc")), "a448017aaf21d8525fc10ae87aa6729d");
    assert_eq!(
        hex(md4(
            b"12345678901234567890123456789012345678901234567890123456789012345678901234567890"
        )),
        "e33b4ddc9c38f2199c3e7b164fcc0536"
    );
    assert_eq!(nt_hash_hex("password"), "8846f7eaee8fb117ad06bdd830b7586c");
}

#[test]
fn shares_serve_their_users_change_passwords_and_go_away_keeping_data() {
    let lab = SmbdLab::start();
    let users = TestUsers::new();
    // pdbedit through a wrapper that logs its command lines: the hash must
    // never be on one (/proc/*/cmdline is world-readable).
    let argv_log = lab.dir().join("pdbedit-argv.log");
    let wrapper = lab.dir().join("pdbedit-logged");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nprintf '%s\\n' \"$*\" >> {}\nexec pdbedit \"$@\"\n",
            argv_log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (m, public) = minion(&lab, &format!("    pdbedit: {}\n", wrapper.display()));
    let (u1, u2) = (users.name("proj"), users.name("team"));
    let projects = |pw| Share {
        id: 3,
        name: "projects",
        folder: "projects",
        user: &u1,
        password: pw,
    };
    let team = Share {
        id: 4,
        name: "team",
        folder: "dept/team",
        user: &u2,
        password: "Team-pw-1",
    };
    let conf_before = std::fs::read_to_string(&lab.smb_conf).unwrap();

    let run = m.apply(
        "steward.share",
        &pillar(&lab, &public, 1, &[projects("Proj-pw-1"), team]),
    );
    assert_applied(&run);
    assert_no_hash(&m, &run, &["Proj-pw-1", "Team-pw-1"]);
    let c = &run.single().changes;
    let p = &c["shares"]["projects"];
    assert_eq!(p["user"], "created", "{}", run.raw);
    assert_eq!(p["passdb"], "created", "{}", run.raw);
    assert_eq!(p["share"], "added", "{}", run.raw);
    assert!(
        p["folder"].as_str().unwrap().starts_with("created"),
        "{}",
        run.raw
    );
    assert_eq!(c["reloaded"], true, "{}", run.raw);
    assert_eq!(c["revision"], 1, "{}", run.raw);

    // The folders: owner the share user, its group, 0770; parents root.
    let folder = lab.base.join("projects");
    let meta = std::fs::metadata(&folder).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o770);
    let pw = passwd_entry(&u1).unwrap();
    assert_eq!(meta.uid().to_string(), pw[2], "{pw:?}");
    assert_eq!(meta.gid().to_string(), pw[3], "{pw:?}");
    assert_eq!(pw[6], "/usr/sbin/nologin", "{pw:?}");
    assert_eq!(pw[5], folder.display().to_string(), "{pw:?}");
    assert_eq!(
        std::fs::metadata(lab.base.join("dept")).unwrap().uid(),
        0,
        "a parent folder belongs to root"
    );

    // smb.conf: the admin's text untouched, our include appended.
    let conf = std::fs::read_to_string(&lab.smb_conf).unwrap();
    assert!(conf.starts_with(&conf_before), "{conf}");
    assert!(
        conf[conf_before.len()..].contains(&format!("include = {}", lab.shares_file.display())),
        "{conf}"
    );

    // Real SMB: write and list a file with the password; a wrong one refused.
    let hello = lab.dir().join("hello.txt");
    std::fs::write(&hello, "hello from the test\n").unwrap();
    let out = lab
        .smbclient(
            "projects",
            &u1,
            "Proj-pw-1",
            &format!("put {} hello.txt; ls", hello.display()),
        )
        .unwrap();
    assert!(out.contains("hello.txt"), "{out}");
    assert_eq!(
        std::fs::read_to_string(folder.join("hello.txt")).unwrap(),
        "hello from the test\n"
    );
    logon_refused(can_login(&lab, "projects", &u1, "wrong-password"));
    // Each share only for its own user.
    let err = can_login(&lab, "team", &u1, "Proj-pw-1").unwrap_err();
    assert!(err.contains("NT_STATUS_ACCESS_DENIED"), "{err}");
    lab.smbclient(
        "team",
        &u2,
        "Team-pw-1",
        &format!("put {} kept.txt", hello.display()),
    )
    .unwrap();
    let listed = lab.list_shares(&u1, "Proj-pw-1").unwrap();
    for s in ["projects", "team", "admin"] {
        assert!(listed.iter().any(|l| l == s), "{s} not in {listed:?}");
    }

    // Same pillar again: nothing to do (same hashes, encrypted anew).
    assert_unchanged(&m.apply(
        "steward.share",
        &pillar(&lab, &public, 1, &[projects("Proj-pw-1"), team]),
    ));

    // A new password: the passdb entry is updated, the old one refused.
    let run = m.apply(
        "steward.share",
        &pillar(&lab, &public, 2, &[projects("Proj-pw-2"), team]),
    );
    assert_applied(&run);
    assert_no_hash(&m, &run, &["Proj-pw-1", "Proj-pw-2"]);
    let c = &run.single().changes;
    assert_eq!(
        c["shares"]["projects"],
        json!({"passdb": "updated"}),
        "{}",
        run.raw
    );
    assert!(c.get("shares_file").is_none(), "{}", run.raw);
    assert!(c.get("reloaded").is_none(), "{}", run.raw);
    logon_refused(can_login(&lab, "projects", &u1, "Proj-pw-1"));
    assert!(can_login(&lab, "projects", &u1, "Proj-pw-2")
        .unwrap()
        .contains("hello.txt"));

    // The team share leaves the pillar: out of the list, its user out of
    // passdb and /etc/passwd, its data kept.
    let run = m.apply(
        "steward.share",
        &pillar(&lab, &public, 3, &[projects("Proj-pw-2")]),
    );
    assert_applied(&run);
    let c = &run.single().changes;
    assert_eq!(c["shares"]["team"]["share"], "removed", "{}", run.raw);
    let team_dir = lab.base.join("dept/team");
    assert_eq!(
        c["removed_users"][&u2],
        json!({"passdb": "deleted", "user": "deleted",
               "data": format!("kept in {}, locked root:root 0700", team_dir.display())}),
        "{}",
        run.raw
    );
    eventually("team gone from the share list", || {
        let listed = lab.list_shares(&u1, "Proj-pw-2")?;
        if listed.iter().any(|l| l == "team") {
            Err(format!("still listed: {listed:?}"))
        } else {
            Ok(())
        }
    });
    assert!(
        !lab.passdb_users().contains(&u2),
        "{:?}",
        lab.passdb_users()
    );
    assert!(lab.passdb_users().contains(&u1), "{:?}", lab.passdb_users());
    assert!(!TestUsers::exists(&u2));
    assert!(TestUsers::exists(&u1));
    assert_eq!(
        std::fs::read_to_string(lab.base.join("dept/team/kept.txt")).unwrap(),
        "hello from the test\n"
    );
    let shares = std::fs::read_to_string(&lab.shares_file).unwrap();
    assert!(!shares.contains("[team]"), "{shares}");
    assert!(can_login(&lab, "projects", &u1, "Proj-pw-2").is_ok());

    // The freed uid goes to the next system user created: the kept folder
    // is root's until a share takes it again.
    let meta = std::fs::metadata(&team_dir).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (0, 0));
    assert_eq!(meta.permissions().mode() & 0o7777, 0o700);

    // And that is stable too.
    assert_unchanged(&m.apply(
        "steward.share",
        &pillar(&lab, &public, 3, &[projects("Proj-pw-2")]),
    ));

    // The share added again on its folder: a new user, the kept data is
    // handed to it and served again.
    let team = Share {
        password: "Team-pw-2",
        ..team
    };
    let run = m.apply(
        "steward.share",
        &pillar(&lab, &public, 4, &[projects("Proj-pw-2"), team]),
    );
    assert_applied(&run);
    let t = &run.single().changes["shares"]["team"];
    assert_eq!(t["user"], "created", "{}", run.raw);
    assert!(
        t["folder"].as_str().unwrap().starts_with(&format!(
            "kept data handed to {u2} (entries re-owned from uid "
        )) && t["folder"].as_str().unwrap().ends_with(": 1)"),
        "{}",
        run.raw
    );
    let out = lab
        .smbclient("team", &u2, "Team-pw-2", "get kept.txt /dev/null; ls")
        .unwrap();
    assert!(out.contains("kept.txt"), "{out}");
    let meta = std::fs::metadata(&team_dir).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o770);
    assert_eq!(
        std::fs::metadata(team_dir.join("kept.txt")).unwrap().uid(),
        meta.uid()
    );
    assert_unchanged(&m.apply(
        "steward.share",
        &pillar(&lab, &public, 4, &[projects("Proj-pw-2"), team]),
    ));

    let argv = std::fs::read_to_string(&argv_log).unwrap();
    assert!(
        argv.contains("-i smbpasswd:/proc/self/fd/"),
        "no import seen:\n{argv}"
    );
    for p in ["Proj-pw-1", "Proj-pw-2", "Team-pw-1", "Team-pw-2"] {
        assert!(
            !argv.to_lowercase().contains(&nt_hash_hex(p)),
            "an NT hash on pdbedit's command line:\n{argv}"
        );
    }
}

#[test]
fn a_candidate_testparm_refuses_is_never_written_and_smbd_keeps_serving() {
    let lab = SmbdLab::start();
    let users = TestUsers::new();
    let (m, public) = minion(&lab, "");
    let u1 = users.name("keep");
    let keep = || Share {
        id: 1,
        name: "keep",
        folder: "keep",
        user: &u1,
        password: "Keep-pw-1",
    };
    assert_applied(&m.apply("steward.share", &pillar(&lab, &public, 1, &[keep()])));
    let live = std::fs::read(&lab.shares_file).unwrap();
    let conf = std::fs::read(&lab.smb_conf).unwrap();

    // The same server with a site option samba does not know, in every
    // share section (steward:share:share_options of the minion config):
    // testparm exits 0 on it, the state refuses all the same.
    let m2 = LocalMinion::new(
        MINION,
        &lab.minion_settings("    share_options:\n      bogus option: yes\n"),
    );
    std::fs::create_dir_all(m2.dir().join("root/pki")).unwrap();
    for f in ["minion.pem", "minion.pub"] {
        std::fs::copy(
            m.dir().join("root/pki").join(f),
            m2.dir().join("root/pki").join(f),
        )
        .unwrap();
    }
    let u2 = users.name("new");
    let new = Share {
        id: 2,
        name: "newshare",
        folder: "new",
        user: &u2,
        password: "New-pw-1",
    };
    let run = m2.apply("steward.share", &pillar(&lab, &public, 2, &[keep(), new]));
    assert_failed(&run, "Unknown parameter encountered: \"bogus option\"");
    assert_failed(&run, "not written");
    assert_no_hash(&m2, &run, &["Keep-pw-1", "New-pw-1"]);
    assert_eq!(std::fs::read(&lab.shares_file).unwrap(), live);
    assert_eq!(std::fs::read(&lab.smb_conf).unwrap(), conf);
    // Refused before anything: no user, no folder for the new share.
    assert!(!TestUsers::exists(&u2));
    assert!(!lab.base.join("new").exists());
    // smbd serves the old file.
    assert!(can_login(&lab, "keep", &u1, "Keep-pw-1").is_ok());
    let listed = lab.list_shares(&u1, "Keep-pw-1").unwrap();
    assert!(listed.iter().any(|l| l == "keep"), "{listed:?}");
    assert!(!listed.iter().any(|l| l == "newshare"), "{listed:?}");

    // A value samba would read as more than a name never reaches the file:
    // `]` ends a section header early (samba silently serves `[bad]`).
    let u3 = users.name("bad");
    let bad = Share {
        id: 3,
        name: "bad]name",
        folder: "bad",
        user: &u3,
        password: "Bad-pw-1",
    };
    let run = m.apply("steward.share", &pillar(&lab, &public, 3, &[keep(), bad]));
    assert_failed(&run, "name 'bad]name' refused");
    assert_eq!(std::fs::read(&lab.shares_file).unwrap(), live);
    assert!(!TestUsers::exists(&u3));

    // The original minion still converges with nothing to do.
    assert_unchanged(&m.apply("steward.share", &pillar(&lab, &public, 1, &[keep()])));
}

#[test]
fn folders_outside_base_and_foreign_users_are_refused() {
    let lab = SmbdLab::start();
    let users = TestUsers::new();
    let (m, public) = minion(&lab, "");
    let outside = lab.dir().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, lab.base.join("link")).unwrap();
    let ok_user = users.name("ok");
    let names: Vec<String> = ["dots", "abs", "link", "foreign", "admin"]
        .iter()
        .map(|s| users.name(s))
        .collect();
    let good = Share {
        id: 1,
        name: "good",
        folder: "good",
        user: &ok_user,
        password: "Good-pw-1",
    };
    let bad = [
        Share {
            id: 2,
            name: "dots",
            folder: "good/../../outside",
            user: &names[0],
            password: "x",
        },
        Share {
            id: 3,
            name: "abs",
            folder: "/etc",
            user: &names[1],
            password: "x",
        },
        Share {
            id: 4,
            name: "viasymlink",
            folder: "link/sub",
            user: &names[2],
            password: "x",
        },
        // A section of the admin's smb.conf (samba would merge the two).
        Share {
            id: 7,
            name: "Admin",
            folder: "admin",
            user: &names[4],
            password: "x",
        },
        // An account that exists and that we did not create.
        Share {
            id: 5,
            name: "foreign",
            folder: "foreign",
            user: "nobody",
            password: "x",
        },
    ];
    let mut all = vec![good];
    all.extend(bad);
    let run = m.apply("steward.share", &pillar(&lab, &public, 1, &all));
    assert_failed(&run, "dots: folder 'good/../../outside': contains '..'");
    assert_failed(&run, "abs: folder '/etc': absolute");
    assert_failed(&run, "viasymlink: folder 'link/sub': leads out of base");
    assert_failed(
        &run,
        "foreign: user nobody exists and was not created by salt-steward",
    );
    // The good one is applied all the same.
    assert!(run.changed(), "{}", run.raw);
    assert!(can_login(&lab, "good", &ok_user, "Good-pw-1").is_ok());
    let shares = std::fs::read_to_string(&lab.shares_file).unwrap();
    for n in ["[dots]", "[abs]", "[viasymlink]", "[foreign]", "[Admin]"] {
        assert!(!shares.contains(n), "{n} in\n{shares}");
    }
    for u in &names {
        assert!(!TestUsers::exists(u), "{u} was created");
    }
    assert!(!lab.passdb_users().iter().any(|u| u == "nobody"));
    assert!(std::fs::read_dir(&outside).unwrap().next().is_none());

    // A symlink put in place of a served folder later: that share is no
    // longer served (left out of the file), the state fails naming it.
    let later_user = users.name("later");
    let later = || Share {
        id: 6,
        name: "later",
        folder: "later",
        user: &later_user,
        password: "Later-pw-1",
    };
    let good = || Share {
        id: 1,
        name: "good",
        folder: "good",
        user: &ok_user,
        password: "Good-pw-1",
    };
    assert_applied(&m.apply(
        "steward.share",
        &pillar(&lab, &public, 2, &[good(), later()]),
    ));
    assert!(can_login(&lab, "later", &later_user, "Later-pw-1").is_ok());
    std::fs::rename(lab.base.join("later"), lab.dir().join("later-moved")).unwrap();
    std::os::unix::fs::symlink(&outside, lab.base.join("later")).unwrap();
    let run = m.apply(
        "steward.share",
        &pillar(&lab, &public, 2, &[good(), later()]),
    );
    assert_failed(&run, "later: folder 'later': leads out of base");
    assert_eq!(
        run.single().changes["shares"]["later"]["share"],
        "removed",
        "{}",
        run.raw
    );
    let shares = std::fs::read_to_string(&lab.shares_file).unwrap();
    assert!(!shares.contains("[later]"), "{shares}");
    eventually("later no longer served", || {
        match can_login(&lab, "later", &later_user, "Later-pw-1") {
            Ok(out) => Err(format!("still served: {out}")),
            Err(e) if e.contains("NT_STATUS_BAD_NETWORK_NAME") => Ok(()),
            Err(e) => Err(e),
        }
    });
    // Its user stays (the share is still in the pillar).
    assert!(TestUsers::exists(&later_user));
    assert!(Path::new(&lab.dir().join("later-moved")).is_dir());

    // A pillar for another minion is refused as a whole.
    let mut other = pillar(&lab, &public, 3, &[good()]);
    other["steward"]["share"]["target"] = json!("files-other");
    let run = m.apply("steward.share", &other);
    assert_failed(&run, "is for 'files-other', this minion is 'files-test'");
}

/// The `/etc/passwd` fields of `user`.
fn passwd_entry(user: &str) -> Option<Vec<String>> {
    let out = std::process::Command::new("getent")
        .args(["passwd", user])
        .output()
        .unwrap();
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .split(':')
            .map(str::to_owned)
            .collect()
    })
}
