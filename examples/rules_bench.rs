//! Matching throughput of the rules engine (issue #6): how many events per
//! second one core can match against 1,000 rules, to compare with Salt's
//! reactor (`scripts/bench-rules` runs both and prints the table).
//!
//! The corpus: the 173 events recorded from a real 3007.8 master
//! (`tests/fixtures/bus-3007.raw`: auth, key, job new/ret, minion start …)
//! and application events as minions fire them (`event.send`, wrapped by the
//! master), interleaved deterministically up to `--events` (default
//! 1,000,000). The rules: `--rules` (default 1,000) tag globs of the usual
//! shapes (literal, prefix, a wildcard in the middle, suffix), no condition,
//! so the work is the same as Salt's `Reactor.list_reactors`.
//!
//! Writes into `--out` (default `.bench/rules`): `rules.yaml` (ours),
//! `salt_reactor.yaml` (the same globs as a Salt `reactor:` list) and
//! `tags.txt` (the events' tags, in order), then prints one JSON line:
//! events, rules, seconds (best of 3), events_per_s, matches.
//!
//! `cargo run --release --example rules_bench -- [--rules N] [--events N] [--out DIR]`

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use bytes::BytesMut;
use salt_steward::bus::codec::{Decoded, FrameDecoder};
use salt_steward::bus::event::from_json;
use salt_steward::bus::{Event, Origin};
use salt_steward::rules::{compile, EventView, Scratch};
use serde_json::json;

const RECORDED: &[u8] = include_bytes!("../tests/fixtures/bus-3007.raw");

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The tag glob of rule `i`.
fn glob(i: usize) -> String {
    match i % 4 {
        0 => format!("app{i}/deploy"),
        1 => format!("app{i}/events/*"),
        2 => format!("salt/job/*/ret/web{i}"),
        _ => format!("*/alert/{i}"),
    }
}

fn recorded() -> Vec<Event> {
    let mut buf = BytesMut::from(RECORDED);
    let mut dec = FrameDecoder::default();
    let mut out = Vec::new();
    while let Some(d) = dec.decode(&mut buf) {
        if let Decoded::Event(e) = d {
            out.push(e);
        }
    }
    out
}

/// A minion-fired application event, as the master delivers `event.send`.
fn app_event(rng: &mut Rng, n_rules: usize) -> Event {
    // A quarter of the ids have no rule, so misses are measured too.
    let k = rng.below((n_rules + n_rules / 3) as u64) as usize;
    let minion = format!("web{}", rng.below(200));
    let tag = match rng.below(5) {
        0 => format!("app{k}/deploy"),
        1 => format!("app{k}/events/build/{}", rng.below(1000)),
        2 => format!("salt/job/2026112308{:012}/ret/web{k}", rng.below(1 << 40)),
        3 => format!("{minion}/alert/{k}"),
        _ => format!("app{k}/status"),
    };
    let data = json!({
        "cmd": "_minion_event", "id": minion, "tag": tag,
        "data": {"version": "1.2", "env": "prod", "__pub_fun": "event.send"},
        "_stamp": "2026-11-23T08:30:53.095846",
    });
    Event::new(tag, from_json(&data))
}

fn main() {
    let mut n_rules = 1000usize;
    let mut n_events = 1_000_000usize;
    let mut out = PathBuf::from(".bench/rules");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next().expect("a value after each option");
        match a.as_str() {
            "--rules" => n_rules = v.parse().expect("--rules N"),
            "--events" => n_events = v.parse().expect("--events N"),
            "--out" => out = PathBuf::from(v),
            other => panic!("unknown option {other}"),
        }
    }
    std::fs::create_dir_all(&out).unwrap();

    // The same globs for both engines.
    let mut ours = String::from("rules:\n");
    let mut salts = String::new();
    for i in 0..n_rules {
        let g = glob(i);
        ours.push_str(&format!(
            "  - name: r{i}\n    on: {g:?}\n    do:\n      - fire: {{ tag: \"bench/out/{i}\" }}\n"
        ));
        salts.push_str(&format!("- {g:?}:\n  - /srv/reactor/r{i}.sls\n"));
    }
    std::fs::write(out.join("rules.yaml"), &ours).unwrap();
    std::fs::write(out.join("salt_reactor.yaml"), &salts).unwrap();
    let set = compile(&[(out.join("rules.yaml"), ours)]).unwrap_or_else(|errors| {
        panic!(
            "{}",
            errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        )
    });

    // Corpus: recorded events interleaved with application events (3 in 10 recorded).
    let rec = recorded();
    let mut rng = Rng(0x5EED_1234_ABCD_0001);
    let events: Vec<Event> = (0..n_events)
        .map(|i| {
            if i % 10 < 3 {
                rec[(i / 10 * 3 + i % 10) % rec.len()].clone()
            } else {
                app_event(&mut rng, n_rules)
            }
        })
        .collect();
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(out.join("tags.txt")).unwrap());
        for e in &events {
            writeln!(f, "{}", e.tag).unwrap();
        }
    }

    // Match every event (sender from the master's wrapping, tag automaton,
    // sender and conditions), best of three rounds.
    let mut scratch = Scratch::default();
    let mut hits = Vec::new();
    let mut best = f64::MAX;
    let mut matches = 0usize;
    for _ in 0..3 {
        matches = 0;
        let t = Instant::now();
        for e in &events {
            let e = black_box(e);
            let origin = Origin::of_bus(e);
            let view = EventView::of(e, &origin);
            set.matching(&view, &mut scratch, &mut hits);
            matches += hits.len();
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    // Matches over the first 20,000 events, to cross-check with Salt's.
    let sample = events.len().min(20_000);
    let mut sample_matches = 0;
    for e in &events[..sample] {
        set.matching(
            &EventView::of(e, &Origin::of_bus(e)),
            &mut scratch,
            &mut hits,
        );
        sample_matches += hits.len();
    }
    println!(
        "{}",
        json!({
            "engine": "salt-steward", "events": events.len(), "rules": n_rules,
            "recorded_events": rec.len(), "seconds": best,
            "events_per_s": (events.len() as f64 / best).round(),
            "matches": matches, "sample": sample, "sample_matches": sample_matches,
        })
    );
}
