//! Exit codes and error messages of the command line (no Salt needed).

use crate::support::{steward, steward_for};

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn usage_errors_exit_2() {
    let o = steward()
        .args(["events", "watch", "--no-such-flag"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = steward()
        .args(["events", "fire", "a/b", "{not json"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("not valid JSON"), "{}", stderr(&o));
}

#[test]
fn a_missing_master_config_is_a_one_line_error_naming_it() {
    let o = steward_for("/nonexistent/master".as_ref(), &["events", "watch"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("/nonexistent/master"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn a_config_with_an_unknown_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.yaml");
    std::fs::write(&cfg, "rules_dri: /tmp\n").unwrap();
    let o = steward()
        .arg("--config")
        .arg(&cfg)
        .args(["events", "fire", "a/b"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("rules_dri"), "{}", stderr(&o));
}

#[test]
fn firing_with_no_master_running_says_the_bus_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let master = dir.path().join("master");
    std::fs::write(
        &master,
        format!(
            "sock_dir: {}/sock\ncachedir: {}\n",
            dir.path().display(),
            dir.path().display()
        ),
    )
    .unwrap();
    let o = steward_for(&master, &["events", "fire", "a/b", "{}"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("not reachable"), "{}", stderr(&o));
    let o = steward_for(&master, &["events", "fire", "", "{}"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("invalid tag"), "{}", stderr(&o));
}

/// A master config whose sock_dir is `dir` (no master runs there).
fn fake_master(dir: &std::path::Path) -> std::path::PathBuf {
    let master = dir.join("master");
    std::fs::write(
        &master,
        format!("sock_dir: {0}/s\ncachedir: {0}\n", dir.display()),
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("s")).unwrap();
    master
}

#[test]
fn watch_that_never_connected_fails() {
    let dir = tempfile::tempdir().unwrap();
    let master = fake_master(dir.path());
    let o = steward_for(&master, &["events", "watch", "--idle-timeout", "1"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("not reachable"), "{}", stderr(&o));
}

#[test]
fn idle_timeout_counts_only_matching_events() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().unwrap();
    let master = fake_master(dir.path());
    let listener =
        std::os::unix::net::UnixListener::bind(dir.path().join("s/master_event_pub.ipc")).unwrap();
    // A publisher that sends an unrelated event every 100 ms for 10 s.
    std::thread::spawn(move || {
        let Ok((mut conn, _)) = listener.accept() else {
            return;
        };
        let frame = salt_steward::bus::codec::encode_frame("other/tag", &rmpv::Value::Map(vec![]));
        for _ in 0..100 {
            if conn.write_all(&frame).is_err() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    });
    let started = std::time::Instant::now();
    let o = steward_for(
        &master,
        &[
            "events",
            "watch",
            "--tag",
            "wanted/*",
            "--idle-timeout",
            "1",
            "--stats",
        ],
    )
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(stderr(&o).contains("\"received\":0"), "{}", stderr(&o));
}

#[test]
fn the_daemon_refuses_an_out_of_range_number_at_start_up_without_panicking() {
    // `keys.bits: 1000` used to start the daemon, whose key pool then logged
    // a failure every 2 s forever.
    let dir = tempfile::tempdir().unwrap();
    let master = fake_master(dir.path());
    let cfg = dir.path().join("steward.yaml");
    std::fs::write(
        &cfg,
        format!(
            "master_config: {}\nregistry: sqlite://{}/registry.db\nkeys:\n  dir: {}/keys\n  bits: 1000\n",
            master.display(),
            dir.path().display(),
            dir.path().display()
        ),
    )
    .unwrap();
    let mut child = steward()
        .arg("--config")
        .arg(&cfg)
        .arg("daemon")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A daemon that started would never exit by itself: bound the wait.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the daemon started with keys.bits: 1000");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let want = format!(
        "config {}: keys.bits: 1000 is out of range (allowed 2048 to 8192) at line 5",
        cfg.display()
    );
    assert!(err.contains(&want), "want {want:?}, got {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        !dir.path().join("registry.db").exists(),
        "nothing was started"
    );
}

#[test]
fn an_impossible_idle_timeout_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let master = fake_master(dir.path());
    for value in ["-1", "1e300", "NaN"] {
        let o = steward_for(
            &master,
            &["events", "watch", &format!("--idle-timeout={value}")],
        )
        .output()
        .unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{value}: {err}");
        assert!(err.contains("--idle-timeout"), "{value}: {err}");
        assert!(!err.contains("panicked"), "{value}: {err}");
    }
}
