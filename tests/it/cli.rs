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
