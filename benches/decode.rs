//! Decoding speed of recorded real events (issue #2): events/s on one core.
//!
//! Input: `tests/fixtures/bus-3007.raw`, 173 frames read from a 3007.8
//! master's publish socket (auth with a 2048-bit key, job new/ret, state
//! returns …). Each round feeds the whole stream through a fresh
//! `FrameDecoder` in 64 KiB reads, as the socket reader does, fully decoding
//! every event's data. Run with `cargo bench --bench decode`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use salt_steward::bus::codec::{Decoded, FrameDecoder};

const STREAM: &[u8] = include_bytes!("../tests/fixtures/bus-3007.raw");

fn round() -> usize {
    let mut dec = FrameDecoder::default();
    let mut buf = BytesMut::with_capacity(128 * 1024);
    let mut n = 0;
    for chunk in STREAM.chunks(64 * 1024) {
        buf.extend_from_slice(chunk);
        while let Some(d) = dec.decode(&mut buf) {
            if let Decoded::Event(e) = d {
                black_box(&e);
                n += 1;
            }
        }
    }
    n
}

fn main() {
    // Warm up, then measure for about 3 s, best of 5 runs.
    for _ in 0..200 {
        black_box(round());
    }
    let mut best = 0.0f64;
    let mut per_round = 0;
    for _ in 0..5 {
        let start = Instant::now();
        let mut events = 0usize;
        let mut rounds = 0usize;
        while start.elapsed() < Duration::from_millis(600) {
            events += round();
            rounds += 1;
        }
        per_round = events / rounds.max(1);
        let rate = events as f64 / start.elapsed().as_secs_f64();
        best = best.max(rate);
    }
    let bytes_per_event = STREAM.len() as f64 / per_round.max(1) as f64;
    println!(
        "decode: {per_round} real events per round ({bytes_per_event:.0} B/event avg), \
         best {:.0} events/s on one core ({:.1} MB/s)",
        best,
        best * bytes_per_event / 1e6
    );
}
