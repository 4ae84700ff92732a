//! The dispatch benchmark of issue #12, run by `scripts/bench-dispatch`
//! (whose header says what is measured and why): `#[ignore]`d, so the test
//! suite never runs it. One throwaway master, BENCH_HOSTS Proxmox hosts in
//! the registry, each with a real minion (installed from its bundle,
//! accepted by the running daemon) in a network namespace of its own with a
//! veth `ext0` (198.51.100.K/24, its peer inside too); BENCH_CHANGES port forwards in one burst,
//! first dispatched by salt-steward, then by a Salt reactor. Writes the
//! measurements as JSON to BENCH_OUT.
//!
//! Everything (master, minions, relays, daemon, namespaces) is stopped by the
//! harness's guards on return, on a panic, and on SIGINT/SIGTERM (caught
//! here, turned into a panic at the next poll).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::netns::Netns;
use crate::support::salt::{install_bundle, salt_states_dir};
use crate::support::{cli, run_ok, start_daemon, steward_config, MasterOptions, SaltHarness};

static STOP: AtomicBool = AtomicBool::new(false);

/// The change event the Salt admin's reactor listens to.
const CHANGE_TAG: &str = "steward/bench/change";
/// The table `steward.portfwd` owns.
const TABLE: &str = "salt_steward_portfwd";

fn env_num(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a number")),
        Err(_) => default,
    }
}

/// SIGINT/SIGTERM set STOP; the bench's loops check it and panic, so the
/// guards' drops tear everything down.
fn catch_signals() {
    std::thread::spawn(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            use tokio::signal::unix::{signal, SignalKind};
            let mut int = signal(SignalKind::interrupt()).unwrap();
            let mut term = signal(SignalKind::terminate()).unwrap();
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            STOP.store(true, Ordering::SeqCst);
        });
    });
}

/// Sleeps `ms`, unless interrupted.
fn nap(ms: u64) {
    assert!(!STOP.load(Ordering::SeqCst), "interrupted");
    std::thread::sleep(Duration::from_millis(ms));
    assert!(!STOP.load(Ordering::SeqCst), "interrupted");
}

fn say(msg: &str) {
    eprintln!("bench-dispatch: {msg}");
}

/// MemAvailable in MiB (the bench gives up below a floor: the machine is shared).
fn mem_available_mib() -> u64 {
    let text = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(u64::MAX, |kb| kb / 1024)
}

/// One Proxmox host of the bench: registry names, its minion, its namespace.
struct Host {
    name: String,
    guest: String,
    minion_id: String,
    ns: Netns,
    /// Where its `steward.portfwd` writes (`config_dir` …).
    state_dir: PathBuf,
}

impl Host {
    /// DNAT rules in the live table of its namespace (0 without a table).
    fn live_forwards(&self) -> usize {
        let out = self.ns.exec(&["nft", "list", "table", "ip", TABLE]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains(" dnat to "))
            .count()
    }

    /// Back to no table and no state files, as before any run.
    fn reset(&self) {
        let _ = self.ns.exec(&["nft", "delete", "table", "ip", TABLE]);
        let etc = self.state_dir.join("etc");
        let _ = fs::remove_dir_all(&etc);
        fs::create_dir_all(&etc).unwrap();
        assert_eq!(self.live_forwards(), 0, "{}: table not reset", self.name);
    }
}

/// `state.apply` jobs seen on the master's bus: publications and returns.
#[derive(Default)]
struct JobLog {
    /// jid → (target minions, when published).
    new: HashMap<String, (Vec<String>, Instant)>,
    /// (jid, minion) → when returned.
    ret: HashMap<(String, String), Instant>,
}

/// A bus reader recording every `state.apply` job's publication and returns.
struct JobRecorder {
    log: Arc<Mutex<JobLog>>,
    cancel: tokio_util::sync::CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl JobRecorder {
    fn start(h: &SaltHarness) -> Self {
        let log = Arc::new(Mutex::new(JobLog::default()));
        let cancel = tokio_util::sync::CancellationToken::new();
        let (ready_tx, ready_rx) = mpsc::channel();
        let endpoint = h.bus_endpoint();
        let (l, c) = (log.clone(), cancel.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                use salt_steward::bus::{BusHandle, BusItem, EventKind, SubscriberOptions};
                let opts = SubscriberOptions {
                    queue_capacity: 1 << 16,
                    ..SubscriberOptions::default()
                };
                let mut bus = BusHandle::new(endpoint, opts);
                let mut sub = bus.subscribe();
                bus.spawn(c.clone());
                loop {
                    let item = tokio::select! {
                        _ = c.cancelled() => return,
                        item = sub.recv() => item,
                    };
                    match item {
                        None => return,
                        Some(BusItem::Connected { .. }) => {
                            let _ = ready_tx.send(());
                        }
                        Some(BusItem::Event(e)) => {
                            let now = Instant::now();
                            match e.kind() {
                                EventKind::JobNew(j) if j.fun == "state.apply" => {
                                    let m = j.minions.iter().map(|s| s.to_string()).collect();
                                    l.lock().unwrap().new.insert(j.jid.to_owned(), (m, now));
                                }
                                EventKind::JobReturn(r) if r.fun == "state.apply" => {
                                    l.lock()
                                        .unwrap()
                                        .ret
                                        .entry((r.jid.to_owned(), r.id.to_owned()))
                                        .or_insert(now);
                                }
                                _ => {}
                            }
                        }
                        Some(BusItem::Lagged(n)) => {
                            eprintln!("bench-dispatch: job recorder lagged {n}")
                        }
                        Some(_) => {}
                    }
                }
            });
        });
        ready_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the job recorder connected to the bus");
        Self {
            log,
            cancel,
            thread: Some(thread),
        }
    }

    /// The `state.apply` jobs published after `t0`: (target, job) pairs
    /// published and returned, in all and by `by`; when the last was
    /// published and returned.
    fn counts(&self, t0: Instant, by: Option<Instant>) -> JobCounts {
        let log = self.log.lock().unwrap();
        let mut c = JobCounts::default();
        let by_ok = |at: &Instant| by.is_none_or(|b| *at <= b);
        for (jid, (minions, at)) in &log.new {
            if *at < t0 {
                continue;
            }
            let s = at.duration_since(t0).as_secs_f64();
            c.last_published_s = Some(c.last_published_s.map_or(s, |l: f64| l.max(s)));
            for m in minions {
                c.published += 1;
                if by_ok(at) {
                    c.published_by += 1;
                }
                if let Some(r) = log.ret.get(&(jid.clone(), m.clone())) {
                    c.returned += 1;
                    let s = r.duration_since(t0).as_secs_f64();
                    c.last_returned_s = Some(c.last_returned_s.map_or(s, |l: f64| l.max(s)));
                    if by_ok(r) {
                        c.returned_by += 1;
                    }
                }
            }
        }
        c
    }
}

/// What [`JobRecorder::counts`] found.
#[derive(Debug, Default)]
struct JobCounts {
    published: usize,
    returned: usize,
    published_by: usize,
    returned_by: usize,
    last_published_s: Option<f64>,
    last_returned_s: Option<f64>,
}

impl Drop for JobRecorder {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `state.apply` jobs in the master's job cache: jid → targeted minions.
fn cached_state_jobs(h: &SaltHarness) -> BTreeMap<String, Vec<String>> {
    let out = h.master_cmd(
        "salt-run",
        &[
            "jobs.list_jobs",
            "search_function=state.apply",
            "--out=json",
        ],
    );
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("jobs.list_jobs: {e}: {}", crate::support::text(&out)));
    let mut jobs = BTreeMap::new();
    for (jid, job) in v.as_object().into_iter().flatten() {
        let targets = match &job["Target"] {
            Value::String(s) => s.split(',').map(str::to_owned).collect(),
            Value::Array(a) => a
                .iter()
                .filter_map(|t| t.as_str().map(str::to_owned))
                .collect(),
            other => vec![other.to_string()],
        };
        jobs.insert(jid.clone(), targets);
    }
    jobs
}

/// Runs per host among the cached jobs not in `before`.
fn runs_per_host(
    h: &SaltHarness,
    before: &BTreeMap<String, Vec<String>>,
    hosts: &[Host],
) -> BTreeMap<String, usize> {
    let mut per: BTreeMap<String, usize> = hosts.iter().map(|x| (x.name.clone(), 0)).collect();
    let by_minion: HashMap<&str, &str> = hosts
        .iter()
        .map(|x| (x.minion_id.as_str(), x.name.as_str()))
        .collect();
    for (jid, targets) in cached_state_jobs(h) {
        if before.contains_key(&jid) {
            continue;
        }
        for t in targets {
            let name = by_minion.get(t.as_str()).copied().unwrap_or("(other)");
            *per.entry(name.to_owned()).or_default() += 1;
        }
    }
    per
}

/// When each host's live table first held `want` forwards (seconds after
/// `t0`), polled every 200 ms until all did or `give_up` passed (or memory
/// ran short); the last counts seen, and why it stopped early.
fn wait_converged(
    hosts: &[Host],
    want: usize,
    t0: Instant,
    give_up: Duration,
) -> (Vec<Option<f64>>, Vec<usize>, Option<String>) {
    let mut at: Vec<Option<f64>> = vec![None; hosts.len()];
    let mut seen = vec![0; hosts.len()];
    let mut last_report = Instant::now();
    loop {
        for (k, host) in hosts.iter().enumerate() {
            if at[k].is_none() {
                seen[k] = host.live_forwards();
                if seen[k] == want {
                    at[k] = Some(t0.elapsed().as_secs_f64());
                }
            }
        }
        if at.iter().all(Option::is_some) {
            return (at, seen, None);
        }
        if t0.elapsed() > give_up {
            return (
                at,
                seen,
                Some(format!("gave up after {} s", give_up.as_secs())),
            );
        }
        let mem = mem_available_mib();
        if mem < 2048 {
            return (
                at,
                seen,
                Some(format!("stopped: only {mem} MiB of memory left")),
            );
        }
        if last_report.elapsed() > Duration::from_secs(15) {
            last_report = Instant::now();
            say(&format!(
                "{:.0} s: {} of {} hosts converged, forwards live {}",
                t0.elapsed().as_secs_f64(),
                at.iter().filter(|a| a.is_some()).count(),
                hosts.len(),
                seen.iter().sum::<usize>()
            ));
        }
        nap(200);
    }
}

/// The host and port of change `i` (hosts in turn, each port once).
fn change(i: usize, n: usize) -> (usize, i64, i64) {
    let slot = i64::try_from(i / n).unwrap();
    (i % n, 20000 + slot, 8000 + slot)
}

fn portfwd_pillar(host: &Host, k: usize, revision: usize, forwards: &[Value]) -> Value {
    json!({"steward": {"portfwd": {
        "revision": revision,
        "target": host.name,
        "external_interface": "ext0",
        "external_ip": format!("198.51.100.{}", k + 1),
        "internal_network": format!("10.99.{}.0/24", k + 1),
        "forwards": forwards,
    }}})
}

/// Writes `text` to `path` through a rename (the master never reads half a file).
fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).unwrap();
    fs::rename(&tmp, path).unwrap();
}

struct Bench {
    h: SaltHarness,
    cfg: PathBuf,
    hosts: Vec<Host>,
    bench_dir: PathBuf,
    changes: usize,
    debounce_ms: u64,
    recorder: JobRecorder,
}

impl Bench {
    fn registry_url(&self) -> String {
        format!("sqlite://{}/registry.db", self.h.root().display())
    }

    fn ids(&self) -> String {
        self.hosts
            .iter()
            .map(|x| x.minion_id.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Every host's minion answers a `test.ping` (bounded).
    fn wait_pings(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let out = self.h.master_cmd(
                "salt",
                &[
                    "-L",
                    &self.ids(),
                    "test.ping",
                    "--out=json",
                    "--static",
                    "-t",
                    "10",
                ],
            );
            let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            if self.hosts.iter().all(|x| v[&x.minion_id] == json!(true)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not every minion answers test.ping: {}",
                crate::support::text(&out)
            );
            nap(1000);
        }
    }

    /// One `steward.portfwd` run with no forwards on every host, so both
    /// sides start with the states' files in the minions' caches; then no
    /// table anywhere.
    fn warm_up(&self) {
        let pillar = json!({"steward": {"portfwd": {"revision": 0, "target": "warm-up",
            "external_interface": null, "external_ip": null, "internal_network": null,
            "forwards": []}}});
        let out = self.h.master_cmd(
            "salt",
            &[
                "-L",
                &self.ids(),
                "state.apply",
                "steward.portfwd",
                &format!("pillar={pillar}"),
                "--out=json",
                "--static",
                "-t",
                "180",
            ],
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        for x in &self.hosts {
            let states = v[&x.minion_id].as_object();
            assert!(
                states.is_some_and(|s| s.values().all(|st| st["result"] == json!(true))),
                "warm-up run on {} failed: {}",
                x.name,
                crate::support::text(&out)
            );
        }
        for x in &self.hosts {
            x.reset();
        }
    }

    /// Waits (bounded) until no `state.apply` is running on any minion.
    fn wait_idle(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let out = self.h.master_cmd(
                "salt",
                &[
                    "-L",
                    &self.ids(),
                    "saltutil.running",
                    "--out=json",
                    "--static",
                    "-t",
                    "10",
                ],
            );
            let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            let busy = self
                .hosts
                .iter()
                .any(|x| v[&x.minion_id].as_array().is_none_or(|a| !a.is_empty()));
            if !busy {
                return true;
            }
            nap(1000);
        }
        false
    }

    fn summary(
        &self,
        side: &str,
        burst_s: f64,
        t0: Instant,
        conv: (Vec<Option<f64>>, Vec<usize>, Option<String>),
        runs: BTreeMap<String, usize>,
    ) -> Value {
        let (at, seen, stopped) = conv;
        let want = self.changes / self.hosts.len();
        let converged = at.iter().all(Option::is_some);
        let converge_s = if converged {
            at.iter().flatten().copied().fold(0.0, f64::max)
        } else {
            f64::NAN
        };
        let by = converged.then(|| t0 + Duration::from_secs_f64(converge_s));
        let at_conv = self.recorder.counts(t0, by);
        let total: usize = runs.values().sum();
        json!({
            "side": side,
            "hosts": self.hosts.len(),
            "changes": self.changes,
            "burst_s": burst_s,
            "converged": converged,
            "converge_s": if converged { json!(converge_s) } else { Value::Null },
            "stopped": stopped,
            "hosts_converged": at.iter().filter(|a| a.is_some()).count(),
            "forwards_wanted": want * self.hosts.len(),
            "forwards_live": seen.iter().sum::<usize>(),
            "per_host_converge_s": at,
            "runs_per_host": runs,
            "runs": total,
            "runs_max_per_host": runs.values().max().copied().unwrap_or(0),
            "runs_min_per_host": runs.values().min().copied().unwrap_or(0),
            "bus_published_by_convergence": at_conv.published_by,
            "bus_returned_by_convergence": at_conv.returned_by,
            "bus_published": at_conv.published,
            "bus_returned": at_conv.returned,
            "last_published_s": at_conv.last_published_s,
            "last_returned_s": at_conv.last_returned_s,
        })
    }

    /// salt-steward: the daemon (already running) dispatches the burst.
    fn ours(&self, daemon: &mut crate::support::LineChild) -> Value {
        let before = cached_state_jobs(&self.h);
        let n = self.hosts.len();
        say(&format!(
            "ours: {} port forwards in one burst (registry, through the library)",
            self.changes
        ));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let t0 = Instant::now();
        rt.block_on(async {
            use salt_steward::registry::{Proto, ServerRef};
            let svc = salt_steward::registry::open(&self.registry_url())
                .await
                .unwrap();
            for i in 0..self.changes {
                let (k, port, to_port) = change(i, n);
                let x = &self.hosts[k];
                svc.create_port_forward(
                    &ServerRef::Name(x.name.clone()),
                    &ServerRef::Name(x.guest.clone()),
                    Proto::Tcp,
                    port,
                    to_port,
                )
                .await
                .unwrap_or_else(|e| panic!("change {i}: {e}"));
            }
        });
        let burst_s = t0.elapsed().as_secs_f64();
        say(&format!(
            "ours: burst written in {burst_s:.2} s; waiting for the live tables"
        ));
        let give_up = Duration::from_secs(env_num("BENCH_OURS_GIVE_UP_S", 300));
        let conv = wait_converged(&self.hosts, self.changes / n, t0, give_up);
        // Runs the dispatcher might still start (a duplicate would show
        // here): a debounce window and a few seconds more.
        nap(self.debounce_ms + 5000);
        let idle = self.wait_idle(Duration::from_secs(60));
        let runs = runs_per_host(&self.h, &before, &self.hosts);
        let mut s = self.summary("salt-steward", burst_s, t0, conv, runs);
        s["idle_after"] = json!(idle);
        s["live_after"] = json!(self
            .hosts
            .iter()
            .map(Host::live_forwards)
            .collect::<Vec<_>>());
        let out = cli(&self.cfg, &["dispatch", "list", "--json"])
            .output()
            .unwrap();
        s["dispatch_list"] = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|_| json!(crate::support::text(&out)));
        daemon.drain_err();
        s
    }

    /// A Salt reactor: one `state.apply` per change event, pillar from a
    /// per-host pillar file the admin's tool rewrites before each event.
    fn salt(&self) -> Value {
        let n = self.hosts.len();
        let pillar_dir = self.bench_dir.join("pillar");
        let mut top = String::from("base:\n");
        for (k, x) in self.hosts.iter().enumerate() {
            top.push_str(&format!("  '{}':\n    - {}\n", x.minion_id, x.name));
            write_atomic(
                &pillar_dir.join(format!("{}.sls", x.name)),
                &format!("#!json\n{}\n", portfwd_pillar(x, k, 0, &[])),
            );
        }
        write_atomic(&pillar_dir.join("top.sls"), &top);
        let before = cached_state_jobs(&self.h);
        let master =
            salt_steward::master_config::MasterConfig::load(&self.h.master_config()).unwrap();
        let mut firer = salt_steward::bus::EventFirer::new(master.event_pull(), master.event_pub());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        say(&format!(
            "salt: {} changes in one burst (pillar file rewritten, then {CHANGE_TAG} fired, per change)",
            self.changes
        ));
        let mut forwards: Vec<Vec<Value>> = vec![Vec::new(); n];
        let t0 = Instant::now();
        rt.block_on(async {
            for i in 0..self.changes {
                let (k, port, to_port) = change(i, n);
                let x = &self.hosts[k];
                forwards[k].push(json!({"id": i + 1, "proto": "tcp", "port": port,
                    "to_ip": format!("10.99.{}.5", k + 1), "to_port": to_port}));
                write_atomic(
                    &pillar_dir.join(format!("{}.sls", x.name)),
                    &format!("#!json\n{}\n", portfwd_pillar(x, k, i + 1, &forwards[k])),
                );
                let data = json!({"minion_id": x.minion_id, "host": x.name, "change": i + 1});
                firer
                    .fire(CHANGE_TAG, salt_steward::bus::event::from_json(&data))
                    .await
                    .unwrap_or_else(|e| panic!("firing change {i}: {e}"));
            }
        });
        let burst_s = t0.elapsed().as_secs_f64();
        say(&format!(
            "salt: burst fired in {burst_s:.2} s; waiting for the live tables"
        ));
        let give_up = Duration::from_secs(env_num("BENCH_SALT_GIVE_UP_S", 600));
        let conv = wait_converged(&self.hosts, self.changes / n, t0, give_up);
        say(&format!(
            "salt: every table final: {} (at {:?} s); waiting for every run to return",
            conv.0.iter().all(Option::is_some),
            conv.0.iter().flatten().copied().reduce(f64::max)
        ));
        // How long the queued runs keep the minions busy after convergence:
        // every change's job (one per event) published and returned, bounded
        // by the same give-up time from the first change.
        let mut drained = Value::Null;
        let mut last_report = Instant::now();
        loop {
            let c = self.recorder.counts(t0, None);
            if c.published >= self.changes && c.returned >= c.published {
                drained = json!(t0.elapsed().as_secs_f64());
                break;
            }
            if t0.elapsed() > give_up || mem_available_mib() < 2048 {
                break;
            }
            if last_report.elapsed() > Duration::from_secs(30) {
                last_report = Instant::now();
                say(&format!(
                    "salt: {:.0} s: {} jobs published, {} returned",
                    t0.elapsed().as_secs_f64(),
                    c.published,
                    c.returned
                ));
            }
            nap(500);
        }
        let runs = runs_per_host(&self.h, &before, &self.hosts);
        let mut s = self.summary("salt-reactor", burst_s, t0, conv, runs);
        s["drained_s"] = drained;
        s["give_up_s"] = json!(give_up.as_secs());
        s["reactor_failures"] = reactor_failures(&self.h.root().join("m/master.log"));
        s["live_after"] = json!(self
            .hosts
            .iter()
            .map(Host::live_forwards)
            .collect::<Vec<_>>());
        s
    }
}

#[test]
#[ignore = "a benchmark: scripts/bench-dispatch runs it"]
fn bench_dispatch() {
    catch_signals();
    let n = usize::try_from(env_num("BENCH_HOSTS", 10)).unwrap();
    let changes = usize::try_from(env_num("BENCH_CHANGES", 1000)).unwrap();
    let debounce_ms = env_num("BENCH_DEBOUNCE_MS", 2000);
    let sides = std::env::var("BENCH_SIDES").unwrap_or_else(|_| "ours,salt".into());
    assert!(
        n > 0 && n < 250 && changes % n == 0,
        "BENCH_CHANGES must be a multiple of BENCH_HOSTS (< 250)"
    );
    let bench_dir = PathBuf::from(std::env::var("BENCH_DIR").expect("BENCH_DIR"));
    let out_file = PathBuf::from(std::env::var("BENCH_OUT").expect("BENCH_OUT"));
    let pillar_dir = bench_dir.join("pillar");
    let reactor_dir = bench_dir.join("reactor");
    fs::create_dir_all(&pillar_dir).unwrap();
    fs::create_dir_all(&reactor_dir).unwrap();
    // What a Salt admin writes: every change event applies the state on the
    // host it names; `queue: True` so a run is not refused while another runs.
    fs::write(
        reactor_dir.join("portfwd.sls"),
        "apply_portfwd:\n  local.state.apply:\n    - tgt: {{ data['minion_id'] }}\n    - args:\n      - mods: steward.portfwd\n      - queue: True\n",
    )
    .unwrap();
    let extra = format!(
        "master_sign_pubkey: True\n\
         reactor:\n  - '{CHANGE_TAG}':\n    - {reactor}\n\
         pillar_roots:\n  base:\n    - {pillar}\n",
        reactor = reactor_dir.join("portfwd.sls").display(),
        pillar = pillar_dir.display(),
    );
    say("master");
    let mut h = SaltHarness::start_with(MasterOptions {
        auto_accept: false,
        extra,
        file_roots: vec![salt_states_dir()],
        ..MasterOptions::default()
    });
    // Salt's default number of request workers (the harness runs 3): the
    // reactor's publications, the minions' pillar and file requests and
    // their returns all go through them. master.d overrides the main file.
    let master_d = h.master_config_dir.join("master.d");
    fs::create_dir_all(&master_d).unwrap();
    fs::write(master_d.join("bench.conf"), "worker_threads: 5\n").unwrap();
    h.restart_master();
    h.wait_req_ready();
    let dispatch = if sides.contains("ours") {
        format!("dispatch: {{debounce_ms: {debounce_ms}}}\n")
    } else {
        String::new()
    };
    let cfg = steward_config(
        &h,
        &[],
        &format!(
            "masters: [\"127.0.0.1:{}\"]\nkeys: {{dir: {}/keys, pool_size: 2}}\nlog: {{level: info}}\n{dispatch}",
            h.ret_port,
            h.root().display()
        ),
    );
    say(&format!("registry: {n} Proxmox hosts and a guest each"));
    run_ok(cli(&cfg, &["model", "add", "pve"]));
    run_ok(cli(&cfg, &["model", "add", "vm"]));
    let mut registered = Vec::new();
    for k in 1..=n {
        let name = format!("h{k}");
        let out = run_ok(cli(
            &cfg,
            &[
                "server",
                "add",
                &name,
                "--model",
                "pve",
                "--proxmox-host",
                "--external-interface",
                "ext0",
                "--external-ip",
                &format!("198.51.100.{k}"),
                "--internal-network",
                &format!("10.99.{k}.0/24"),
                "--json",
            ],
        ));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let guest = format!("g{k}");
        run_ok(cli(
            &cfg,
            &[
                "server",
                "add",
                &guest,
                "--model",
                "vm",
                "--vm-host",
                &name,
                "--internal-ip",
                &format!("10.99.{k}.5"),
            ],
        ));
        registered.push((name, guest, v["minion_id"].as_str().unwrap().to_owned()));
    }
    say("daemon");
    let mut daemon = start_daemon(&cfg);
    let mut hosts = Vec::new();
    for (k, (name, guest, minion_id)) in registered.into_iter().enumerate() {
        let ns = Netns::new("bench");
        let addr = format!("198.51.100.{}/24", k + 1);
        // A veth pair whose both ends stay inside (this kernel has no dummy).
        ns.exec_ok(&[
            "ip", "link", "add", "ext0", "type", "veth", "peer", "name", "ext0p",
        ]);
        ns.exec_ok(&["ip", "addr", "add", &addr, "dev", "ext0"]);
        ns.exec_ok(&["ip", "link", "set", "ext0p", "up"]);
        ns.exec_ok(&["ip", "link", "set", "ext0", "up"]);
        let bundle = h.root().join(format!("{name}.tgz"));
        run_ok(cli(
            &cfg,
            &["server", "bundle", &name, "-o", bundle.to_str().unwrap()],
        ));
        let state_dir = h.root().join(format!("state-{name}"));
        fs::create_dir_all(state_dir.join("etc")).unwrap();
        let sd = state_dir.display();
        // The states' paths into the temp root; process_count_max: Salt's
        // own flood guard (jobs past it wait in the minion's disk queue), so
        // a burst cannot fork hundreds of job processes on a shared machine.
        let settings = format!(
            "steward:\n  portfwd:\n    config_dir: {sd}/etc\n    sysctl_conf: {sd}/sysctl.conf\n    unit_dir: {sd}/systemd\n\
             process_count_max: {}\n",
            env_num("BENCH_PROCESS_COUNT_MAX", 4)
        );
        say(&format!(
            "minion of {name} ({minion_id}) in netns {}",
            ns.name()
        ));
        h.start_minion_in_netns_with(&name, &minion_id, &settings, ns.name(), |dir| {
            install_bundle(&bundle, dir)
        });
        hosts.push(Host {
            name,
            guest,
            minion_id,
            ns,
            state_dir,
        });
    }
    say("waiting for the daemon to accept every bundle's key (hosts online)");
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let out = run_ok(cli(&cfg, &["server", "list", "--json"]));
        let list: Value = serde_json::from_slice(&out.stdout).unwrap();
        let ok = list.as_array().unwrap().iter().filter(|s| {
            s["name"].as_str().is_some_and(|x| x.starts_with('h')) && s["status"] == "online"
        });
        if ok.count() == n {
            break;
        }
        daemon.drain_err();
        assert!(
            Instant::now() < deadline,
            "not every host registered: {list}\ndaemon:\n{}",
            daemon.seen_err.join("\n")
        );
        nap(500);
    }
    let recorder = JobRecorder::start(&h);
    let bench = Bench {
        h,
        cfg,
        hosts,
        bench_dir,
        changes,
        debounce_ms,
        recorder,
    };
    bench.wait_pings();
    say("warm-up run on every host, then tables reset");
    bench.warm_up();
    let mut result = json!({
        "salt_version": String::from_utf8_lossy(&bench.h.master_cmd("salt-master", &["--version"]).stdout).trim(),
        "hosts": n, "changes": changes, "debounce_ms": debounce_ms,
        "process_count_max": env_num("BENCH_PROCESS_COUNT_MAX", 4),
    });
    if sides.contains("ours") {
        result["ours"] = bench.ours(&mut daemon);
        say(&format!("ours: {}", brief(&result["ours"])));
    }
    // The Salt side runs without the daemon.
    let _ = daemon.terminate();
    if sides.contains("salt") {
        for x in &bench.hosts {
            x.reset();
        }
        result["salt"] = bench.salt();
        say(&format!("salt: {}", brief(&result["salt"])));
    }
    read_load(&mut result);
    fs::write(&out_file, serde_json::to_vec_pretty(&result).unwrap()).unwrap();
    say("tearing down");
}

/// The reactions the master logged as failed ("Reactor 'apply_portfwd'
/// failed to execute local 'state.apply'"): how many, and the last line of
/// the first one's traceback (why); the slow subscribers its event
/// publisher discarded.
fn reactor_failures(master_log: &Path) -> Value {
    let text = fs::read_to_string(master_log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let hits: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.contains("Reactor '") && l.contains("failed"))
        .map(|(i, _)| i)
        .collect();
    let why = hits.first().map(|&i| {
        let mut last = lines[i];
        for l in &lines[i + 1..] {
            if l.starts_with("20") {
                break;
            }
            if !l.trim().is_empty() {
                last = l;
            }
        }
        last.to_owned()
    });
    // The master's event publisher drops a subscriber that reads too slowly
    // (Salt 3008: "Publisher discarding slow subscriber"); the reactor is one.
    let discarded = lines
        .iter()
        .filter(|l| l.contains("discarding slow subscriber"))
        .count();
    json!({"count": hits.len(), "why": why, "slow_subscribers_discarded": discarded})
}

/// One line for the log: converged when, how many runs.
fn brief(side: &Value) -> String {
    format!(
        "converged {} ({}), {} runs ({}–{} per host), forwards live {}/{}",
        side["converged"],
        side["converge_s"],
        side["runs"],
        side["runs_min_per_host"],
        side["runs_max_per_host"],
        side["forwards_live"],
        side["forwards_wanted"]
    )
}

fn read_load(result: &mut Value) {
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    result["loadavg"] = json!(load
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" "));
}
