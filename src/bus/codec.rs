//! The wire format of the master's event bus (salt-protocol.md §1.2).
//!
//! A frame is the msgpack map `{"head": {}, "body": <bin>}` with
//! `body = tag + "\n\n" + msgpack(data)`. Two ways of delimiting frames are
//! in use ([`Framing`]):
//! - **raw**: frames back to back with no length prefix (Salt ≤ 3006.9 and
//!   ≤ 3007.8 on both bus sockets; 3007.17 and 3008.5 on the publish socket);
//! - **prefixed**: each frame preceded by its length as 4 bytes big-endian
//!   (`frame_msg_ipc` of 3006.30 on both sockets; of 3007.17 and 3008.5 on
//!   the pull socket, which reads the length first).
//!
//! A reader detects the framing of its connection from the first bytes
//! (`{"head"` at offset 0 or at offset 4). Decoding is check-then-parse:
//! [`object_len`] walks the msgpack headers of the next object without
//! allocating and says how long it is (or that more bytes are needed),
//! checking the size limit *before* anything is buffered.
//!
//! Errors are classified by whether the stream can go on:
//! - a frame whose boundaries are known but whose content is wrong (not a map,
//!   no `body`, no `\n\n`, bad data, a length prefix that disagrees with the
//!   frame) is skipped and reported;
//! - a byte that cannot start a msgpack object, or a declared length beyond the
//!   limit, means the stream is out of step: the decoder then discards bytes
//!   up to the next `{"head"` signature and carries on from there, so a single
//!   absurd length neither exhausts memory nor stops the reader.

use bytes::{Buf, BytesMut};
use rmpv::Value;

use super::event::Event;

/// Default limit on one frame (issue #2): a bigger event is dropped, not buffered.
pub const DEFAULT_MAX_FRAME: usize = 64 * 1024 * 1024;

/// The bytes every frame Salt writes starts with: `map(2) "head"`.
const FRAME_MAGIC: [u8; 6] = [0x82, 0xa4, b'h', b'e', b'a', b'd'];

/// Nesting limit for event data; Salt's own events are a few levels deep.
const MAX_DATA_DEPTH: usize = 512;

/// Why a frame could not be turned into an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// A declared length (or the buffered frame) is beyond the configured limit.
    #[error("frame of at least {len} bytes exceeds the limit of {max} bytes")]
    Oversized { len: u64, max: usize },
    /// The bytes cannot be msgpack at this position: the stream is out of step.
    #[error("invalid msgpack marker 0x{0:02x}: stream out of step")]
    InvalidMarker(u8),
    /// The frame is msgpack, but not a map.
    #[error("frame is not a map")]
    NotAMap,
    /// The frame map has no `body` entry, or its key is not a string.
    #[error("frame has no body")]
    NoBody,
    /// `body` is neither bin nor str.
    #[error("frame body is not bin or str")]
    BodyType,
    /// The body has no `\n\n` between tag and data.
    #[error("body has no tag separator")]
    NoSeparator,
    /// The tag is not UTF-8.
    #[error("tag is not UTF-8")]
    TagNotUtf8,
    /// The data after the separator is not one valid msgpack object.
    #[error("event data is not valid msgpack: {0}")]
    BadData(String),
    /// A length prefix announced this many bytes, which are not one frame.
    #[error("length prefix of {0} bytes does not match one msgpack frame")]
    PrefixMismatch(usize),
}

impl DecodeError {
    /// True when the decoder lost the frame boundaries and has to resynchronise.
    pub fn desynchronised(&self) -> bool {
        matches!(self, Self::Oversized { .. } | Self::InvalidMarker(_))
    }
}

/// A frame that was dropped: what went wrong, and what is known about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadFrame {
    pub error: DecodeError,
    /// The tag, when it could be read.
    pub tag: Option<String>,
    /// Bytes the frame occupied (or declared, for an oversized one).
    pub len: u64,
}

/// One step of the decoder.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    Event(Event),
    Bad(BadFrame),
}

/// How frames are delimited on one bus connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Frames back to back, no length prefix.
    Raw,
    /// Each frame preceded by its length (4 bytes, big-endian).
    Prefixed,
}

impl Framing {
    /// Bytes in front of each frame.
    fn prefix_len(self) -> usize {
        match self {
            Self::Raw => 0,
            Self::Prefixed => 4,
        }
    }
}

impl std::fmt::Display for Framing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Raw => "raw msgpack",
            Self::Prefixed => "length-prefixed msgpack",
        })
    }
}

/// Incremental decoder for the event bus byte stream.
#[derive(Debug)]
pub struct FrameDecoder {
    max_frame: usize,
    /// `None` until the first bytes tell.
    framing: Option<Framing>,
    resyncing: bool,
    discarded: u64,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_FRAME)
    }
}

impl FrameDecoder {
    /// A decoder that drops any frame larger than `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        Self {
            max_frame,
            framing: None,
            resyncing: false,
            discarded: 0,
        }
    }

    /// A decoder for a stream whose framing is known in advance.
    pub fn with_framing(max_frame: usize, framing: Framing) -> Self {
        Self {
            framing: Some(framing),
            ..Self::new(max_frame)
        }
    }

    /// The framing of this stream, once its first bytes have told it.
    pub fn framing(&self) -> Option<Framing> {
        self.framing
    }

    /// Bytes thrown away while resynchronising, in total.
    pub fn discarded(&self) -> u64 {
        self.discarded
    }

    /// Takes the next frame off `buf`. `None` means more bytes are needed.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Option<Decoded> {
        let framing = match self.framing {
            Some(f) => f,
            None => match detect(buf) {
                Detected::Known(f) => {
                    self.framing = Some(f);
                    f
                }
                Detected::NeedMore => return None,
                // Not a frame start at all (a healthy master's stream starts
                // with a frame): read it as raw, which reports the junk and
                // resynchronises on the next signature, as before prefixes.
                Detected::Neither => {
                    self.framing = Some(Framing::Raw);
                    Framing::Raw
                }
            },
        };
        if self.resyncing && !self.resync(buf, framing) {
            return None;
        }
        let result = match framing {
            Framing::Raw => object_len(buf, self.max_frame).map(|len| len.map(|l| (0, l))),
            Framing::Prefixed => self.prefixed_len(buf),
        };
        match result {
            Ok(None) => None,
            Ok(Some((skip, len))) => {
                buf.advance(skip);
                let frame = buf.split_to(len);
                Some(match parse_prefixed_frame(&frame, skip > 0) {
                    Ok(event) => Decoded::Event(event),
                    Err((error, tag)) => Decoded::Bad(BadFrame {
                        error,
                        tag,
                        len: (skip + len) as u64,
                    }),
                })
            }
            Err(error) => {
                let len = match error {
                    DecodeError::Oversized { len, .. } => len,
                    _ => 1,
                };
                // Drop the first byte so the signature search starts past it.
                buf.advance(1);
                self.discarded += 1;
                self.resyncing = true;
                Some(Decoded::Bad(BadFrame {
                    error,
                    tag: None,
                    len,
                }))
            }
        }
    }

    /// For a prefixed stream: `(4, frame length)` once the whole frame is here.
    fn prefixed_len(&self, buf: &[u8]) -> Result<Option<(usize, usize)>, DecodeError> {
        let Some(prefix) = buf.get(..4) else {
            return Ok(None);
        };
        let len = u64::from(u32::from_be_bytes([
            prefix[0], prefix[1], prefix[2], prefix[3],
        ]));
        if len > self.max_frame as u64 {
            return Err(DecodeError::Oversized {
                len,
                max: self.max_frame,
            });
        }
        // `len <= max_frame <= usize::MAX`.
        let len = len as usize;
        if buf.len() < 4 + len {
            return Ok(None);
        }
        Ok(Some((4, len)))
    }

    /// Discards bytes up to the next frame signature (and the length prefix
    /// in front of it, for a prefixed stream). Returns true once found.
    fn resync(&mut self, buf: &mut BytesMut, framing: Framing) -> bool {
        let prefix = framing.prefix_len();
        let from = prefix.min(buf.len());
        if let Some(at) = find(&buf[from..], &FRAME_MAGIC) {
            let start = from + at - prefix;
            buf.advance(start);
            self.discarded += start as u64;
            self.resyncing = false;
            return true;
        }
        // Keep a tail that could be the start of a signature cut by the read.
        let keep = (FRAME_MAGIC.len() - 1 + prefix).min(buf.len());
        let drop = buf.len() - keep;
        buf.advance(drop);
        self.discarded += drop as u64;
        false
    }
}

/// What the first bytes of a connection say about its framing.
enum Detected {
    Known(Framing),
    NeedMore,
    Neither,
}

/// A raw stream starts with the signature, a prefixed one with 4 length
/// bytes and then the signature.
fn detect(buf: &[u8]) -> Detected {
    let starts = |at: usize| {
        let have = buf.len().saturating_sub(at).min(FRAME_MAGIC.len());
        (
            buf.get(at..at + have) == Some(&FRAME_MAGIC[..have]),
            have == FRAME_MAGIC.len(),
        )
    };
    match starts(0) {
        (true, true) => return Detected::Known(Framing::Raw),
        (true, false) => return Detected::NeedMore,
        (false, _) => {}
    }
    if buf.len() < 4 {
        return Detected::NeedMore;
    }
    match starts(4) {
        (true, true) => Detected::Known(Framing::Prefixed),
        (true, false) => Detected::NeedMore,
        (false, _) => Detected::Neither,
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Length of the msgpack object at the start of `buf`: `Ok(None)` if it is not
/// complete yet. Never allocates; a declared length or element count that
/// would take the object past `max` is an error at once.
pub fn object_len(buf: &[u8], max: usize) -> Result<Option<usize>, DecodeError> {
    let mut pos: usize = 0;
    // Objects still to walk. Each needs at least one byte, so a count beyond
    // `max` can never fit and is reported as oversized.
    let mut pending: u64 = 1;
    let oversized = |len: u64| DecodeError::Oversized { len, max };
    while pending > 0 {
        let Some(&marker) = buf.get(pos) else {
            return Ok(None);
        };
        pending -= 1;
        // (header bytes after the marker, payload length, extra objects)
        let (header, payload, children): (usize, u64, u64) = match marker {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (0, 0, 0),
            0x80..=0x8f => (0, 0, 2 * u64::from(marker & 0x0f)),
            0x90..=0x9f => (0, 0, u64::from(marker & 0x0f)),
            0xa0..=0xbf => (0, u64::from(marker & 0x1f), 0),
            0xc4 | 0xd9 => (1, read_be(buf, pos + 1, 1)?, 0),
            0xc5 | 0xda => (2, read_be(buf, pos + 1, 2)?, 0),
            0xc6 | 0xdb => (4, read_be(buf, pos + 1, 4)?, 0),
            // ext 8/16/32: length, then one type byte
            0xc7 => (2, read_be(buf, pos + 1, 1)?, 0),
            0xc8 => (3, read_be(buf, pos + 1, 2)?, 0),
            0xc9 => (5, read_be(buf, pos + 1, 4)?, 0),
            0xca => (0, 4, 0),
            0xcb => (0, 8, 0),
            0xcc | 0xd0 => (0, 1, 0),
            0xcd | 0xd1 => (0, 2, 0),
            0xce | 0xd2 => (0, 4, 0),
            0xcf | 0xd3 => (0, 8, 0),
            // fixext 1/2/4/8/16: type byte + data
            0xd4 => (1, 1, 0),
            0xd5 => (1, 2, 0),
            0xd6 => (1, 4, 0),
            0xd7 => (1, 8, 0),
            0xd8 => (1, 16, 0),
            0xdc => (2, 0, read_be(buf, pos + 1, 2)?),
            0xdd => (4, 0, read_be(buf, pos + 1, 4)?),
            0xde => (2, 0, 2 * read_be(buf, pos + 1, 2)?),
            0xdf => (4, 0, 2 * read_be(buf, pos + 1, 4)?),
            0xc1 => return Err(DecodeError::InvalidMarker(marker)),
        };
        let end = pos as u64 + 1 + header as u64 + payload;
        if end > max as u64 {
            return Err(oversized(end));
        }
        pending += children;
        if pending > (max as u64).saturating_sub(end) {
            return Err(oversized(end + pending));
        }
        // `end <= max <= usize::MAX`, so the conversion is exact.
        pos = end as usize;
    }
    if pos > buf.len() {
        return Ok(None);
    }
    Ok(Some(pos))
}

/// Reads a big-endian length field; a short buffer reads as 0 here and the
/// caller's bounds check then asks for more bytes.
fn read_be(buf: &[u8], at: usize, width: usize) -> Result<u64, DecodeError> {
    let Some(bytes) = buf.get(at..at + width) else {
        // Not all header bytes are here: report "incomplete" by making the
        // object look longer than the buffer (but never oversized).
        return Ok(0);
    };
    Ok(bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
}

/// Decodes one frame; for a prefixed one, the frame must be exactly one
/// msgpack object (a prefix that disagrees with the frame is reported).
fn parse_prefixed_frame(
    frame: &[u8],
    prefixed: bool,
) -> Result<Event, (DecodeError, Option<String>)> {
    if prefixed {
        match object_len(frame, frame.len()) {
            Ok(Some(len)) if len == frame.len() => {}
            _ => return Err((DecodeError::PrefixMismatch(frame.len()), None)),
        }
    }
    parse_frame(frame)
}

/// Decodes one complete frame. On failure, returns the tag too when known.
fn parse_frame(frame: &[u8]) -> Result<Event, (DecodeError, Option<String>)> {
    let body = frame_body(frame).map_err(|e| (e, None))?;
    let Some(sep) = find(body, b"\n\n") else {
        let tag = std::str::from_utf8(body).ok().map(truncate_tag);
        return Err((DecodeError::NoSeparator, tag));
    };
    let tag = std::str::from_utf8(&body[..sep]).map_err(|_| (DecodeError::TagNotUtf8, None))?;
    let mut rest = &body[sep + 2..];
    let data = rmpv::decode::read_value_with_max_depth(&mut rest, MAX_DATA_DEPTH)
        .map_err(|e| (DecodeError::BadData(e.to_string()), Some(tag.to_owned())))?;
    Ok(Event::new(tag.to_owned(), data))
}

fn truncate_tag(s: &str) -> String {
    s.chars().take(200).collect()
}

/// Finds the `body` bytes of a frame map without decoding `head`.
fn frame_body(frame: &[u8]) -> Result<&[u8], DecodeError> {
    let mut rd = frame;
    let entries = rmp::decode::read_map_len(&mut rd).map_err(|_| DecodeError::NotAMap)?;
    for _ in 0..entries {
        let key = read_str_or_bin(&mut rd);
        match key {
            Some(b"body") => return read_str_or_bin(&mut rd).ok_or(DecodeError::BodyType),
            _ => {
                // Skip the value (and a non-string key's value alike).
                let len = object_len(rd, frame.len())
                    .ok()
                    .flatten()
                    .ok_or(DecodeError::NoBody)?;
                rd = &rd[len..];
            }
        }
    }
    Err(DecodeError::NoBody)
}

/// Reads a msgpack str or bin at the start of `rd` and advances past it.
fn read_str_or_bin<'a>(rd: &mut &'a [u8]) -> Option<&'a [u8]> {
    let (&marker, rest) = rd.split_first()?;
    let (len, hdr) = match marker {
        0xa0..=0xbf => (usize::from(marker & 0x1f), 0),
        0xc4 | 0xd9 => (usize::from(*rest.first()?), 1),
        0xc5 | 0xda => (
            usize::from(u16::from_be_bytes([*rest.first()?, *rest.get(1)?])),
            2,
        ),
        0xc6 | 0xdb => {
            let b = rest.get(..4)?;
            (u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize, 4)
        }
        _ => {
            // Not a string: leave the reader where it was for the caller to skip.
            return None;
        }
    };
    let out = rest.get(hdr..hdr + len)?;
    *rd = &rest[hdr + len..];
    Some(out)
}

/// Encodes one event with the given framing, as Salt's `frame_msg` (raw) or
/// `frame_msg_ipc` (prefixed) writes it.
pub fn encode_framed(framing: Framing, tag: &str, data: &Value) -> Vec<u8> {
    let frame = encode_frame(tag, data);
    match framing {
        Framing::Raw => frame,
        Framing::Prefixed => prefix_frame(&frame),
    }
}

/// Puts the 4-byte length in front of a frame. A frame is bounded far below
/// 4 GiB by the firer's size limit; a longer one gets a saturated length that
/// the master refuses.
pub fn prefix_frame(frame: &[u8]) -> Vec<u8> {
    let len = u32::try_from(frame.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(frame.len() + 4);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(frame);
    out
}

/// Encodes one event as a raw frame, exactly as Salt writes it (body as bin).
pub fn encode_frame(tag: &str, data: &Value) -> Vec<u8> {
    let mut body = Vec::with_capacity(tag.len() + 64);
    body.extend_from_slice(tag.as_bytes());
    body.extend_from_slice(b"\n\n");
    // Writing into a Vec cannot fail.
    let _ = rmpv::encode::write_value(&mut body, data);
    let mut frame = Vec::with_capacity(body.len() + 16);
    frame.extend_from_slice(&FRAME_MAGIC);
    frame.push(0x80); // head: {}
    let _ = rmp::encode::write_str(&mut frame, "body");
    let _ = rmp::encode::write_bin(&mut frame, &body);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const REAL: &[u8] = include_bytes!("../../tests/fixtures/bus-3007.raw");

    fn decode_all(dec: &mut FrameDecoder, bytes: &[u8]) -> Vec<Decoded> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(d) = dec.decode(&mut buf) {
            out.push(d);
        }
        out
    }

    fn events(decoded: &[Decoded]) -> Vec<&Event> {
        decoded
            .iter()
            .filter_map(|d| match d {
                Decoded::Event(e) => Some(e),
                Decoded::Bad(_) => None,
            })
            .collect()
    }

    #[test]
    fn decodes_every_frame_of_a_real_3007_session() {
        let out = decode_all(&mut FrameDecoder::default(), REAL);
        assert_eq!(out.len(), 173, "bus.raw holds 173 frames");
        let evs = events(&out);
        assert_eq!(evs.len(), 173);
        let auth = evs.iter().find(|e| e.tag == "salt/auth").unwrap();
        assert_eq!(auth.str_field("act"), Some("pend"));
        assert_eq!(auth.str_field("id"), Some("test-minion-1"));
        let pub_key = auth.str_field("pub").unwrap();
        assert!(pub_key.starts_with("-----BEGIN PUBLIC KEY-----"));
        assert!(pub_key.ends_with("-----END PUBLIC KEY-----"));
    }

    #[test]
    fn real_stream_cut_at_every_read_size_decodes_the_same() {
        let whole = events(&decode_all(&mut FrameDecoder::default(), REAL))
            .into_iter()
            .cloned()
            .collect::<Vec<_>>();
        for chunk in [1usize, 7, 100, 4096] {
            let mut dec = FrameDecoder::default();
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for piece in REAL.chunks(chunk) {
                buf.extend_from_slice(piece);
                while let Some(d) = dec.decode(&mut buf) {
                    if let Decoded::Event(e) = d {
                        got.push(e);
                    }
                }
            }
            assert_eq!(got, whole, "chunk size {chunk}");
        }
    }

    /// Sessions captured from real masters by `scripts/capture-bus`: the
    /// release and the framing its publish socket uses.
    const CAPTURES: [(&str, &[u8], Framing); 4] = [
        (
            "3006.30",
            include_bytes!("../../tests/fixtures/bus-3006.30.raw"),
            Framing::Prefixed,
        ),
        (
            "3007.8",
            include_bytes!("../../tests/fixtures/bus-3007.8.raw"),
            Framing::Raw,
        ),
        (
            "3007.17",
            include_bytes!("../../tests/fixtures/bus-3007.17.raw"),
            Framing::Raw,
        ),
        (
            "3008.5",
            include_bytes!("../../tests/fixtures/bus-3008.5.raw"),
            Framing::Raw,
        ),
    ];

    #[test]
    fn captures_of_every_release_decode_without_a_single_error() {
        for (release, bytes, framing) in CAPTURES {
            for chunk in [1usize, 3, 4, 5, 1000, 65536] {
                let mut dec = FrameDecoder::default();
                let mut buf = BytesMut::new();
                let mut out = Vec::new();
                for piece in bytes.chunks(chunk) {
                    buf.extend_from_slice(piece);
                    while let Some(d) = dec.decode(&mut buf) {
                        out.push(d);
                    }
                }
                assert!(buf.is_empty(), "{release}: {} bytes left", buf.len());
                let bad: Vec<_> = out
                    .iter()
                    .filter(|d| matches!(d, Decoded::Bad(_)))
                    .collect();
                assert!(bad.is_empty(), "{release} (reads of {chunk}): {bad:?}");
                assert_eq!(dec.framing(), Some(framing), "{release}");
                assert_eq!(dec.discarded(), 0, "{release}");
                let evs = events(&out);
                let tag = |t: &str| evs.iter().find(|e| e.tag == t).copied();
                let auth = tag("salt/auth").unwrap_or_else(|| panic!("{release}: no salt/auth"));
                assert_eq!(auth.str_field("act"), Some("pend"), "{release}");
                assert!(
                    evs.iter().any(|e| e.tag.starts_with("salt/job/")),
                    "{release}: no job event"
                );
                assert!(
                    tag("capture/runner").is_some(),
                    "{release}: no salt-run event.send"
                );
                assert!(
                    tag("capture/minion").is_some(),
                    "{release}: no salt-call event.send"
                );
                let large =
                    tag("capture/large").unwrap_or_else(|| panic!("{release}: no large event"));
                assert_eq!(
                    large.str_field("big").map(str::len),
                    Some(70_000),
                    "{release}"
                );
            }
        }
    }

    #[test]
    fn a_prefixed_stream_round_trips_and_survives_a_lying_prefix() {
        let data = Value::Map(vec![(Value::from("k"), Value::from("v"))]);
        let mut stream = encode_framed(Framing::Prefixed, "a/1", &data);
        // A prefix one byte short of its frame: the frame is reported, and the
        // stream finds its feet again at the next signature.
        let mut lying = encode_framed(Framing::Prefixed, "bad/1", &data);
        let len = u32::from_be_bytes([lying[0], lying[1], lying[2], lying[3]]) - 1;
        lying[..4].copy_from_slice(&len.to_be_bytes());
        stream.extend(lying);
        stream.extend(encode_framed(Framing::Prefixed, "a/2", &data));
        // An absurd prefix.
        stream.extend([0xff, 0xff, 0xff, 0xf0, 1, 2, 3]);
        stream.extend(encode_framed(Framing::Prefixed, "a/3", &data));
        let mut dec = FrameDecoder::new(1 << 20);
        let out = decode_all(&mut dec, &stream);
        let tags: Vec<_> = events(&out).iter().map(|e| e.tag.clone()).collect();
        assert_eq!(tags, ["a/1", "a/2", "a/3"]);
        assert_eq!(dec.framing(), Some(Framing::Prefixed));
        assert!(out.iter().any(
            |d| matches!(d, Decoded::Bad(b) if b.error == DecodeError::PrefixMismatch(len as usize))
        ));
        assert!(out.iter().any(
            |d| matches!(d, Decoded::Bad(b) if matches!(b.error, DecodeError::Oversized { .. }))
        ));
    }

    #[test]
    fn encode_round_trips_and_matches_salts_bytes() {
        // The 79-byte frame of salt-protocol.md §1.3, up to `_stamp`.
        let data = Value::Map(vec![
            (Value::from("hello"), Value::from("world")),
            (Value::from("n"), Value::from(1)),
        ]);
        let frame = encode_frame("my/custom/tag", &data);
        let expected_start = [
            0x82, 0xa4, b'h', b'e', b'a', b'd', 0x80, 0xa4, b'b', b'o', b'd', b'y', 0xc4,
        ];
        assert_eq!(&frame[..13], &expected_start);
        let out = decode_all(&mut FrameDecoder::default(), &frame);
        assert_eq!(
            out,
            vec![Decoded::Event(Event::new("my/custom/tag".into(), data))]
        );
    }

    #[test]
    fn body_as_str_is_accepted() {
        // Old msgpack (< 1.0) writes the body as str; accept it too.
        let mut frame = Vec::new();
        rmp::encode::write_map_len(&mut frame, 2).unwrap();
        rmp::encode::write_str(&mut frame, "head").unwrap();
        rmp::encode::write_map_len(&mut frame, 0).unwrap();
        rmp::encode::write_str(&mut frame, "body").unwrap();
        rmp::encode::write_str(&mut frame, "a/b\n\n\u{a1}x").unwrap();
        let out = decode_all(&mut FrameDecoder::default(), &frame);
        assert!(matches!(&out[..], [Decoded::Event(e)] if e.tag == "a/b"));
    }

    fn good(tag: &str) -> Vec<u8> {
        encode_frame(tag, &Value::Map(vec![(Value::from("k"), Value::from(tag))]))
    }

    fn raw_frame(body: &[u8]) -> Vec<u8> {
        let mut f = FRAME_MAGIC.to_vec();
        f.push(0x80);
        rmp::encode::write_str(&mut f, "body").unwrap();
        rmp::encode::write_bin(&mut f, body).unwrap();
        f
    }

    #[test]
    fn garbage_is_reported_and_the_next_valid_event_still_comes_through() {
        let mut stream = good("ok/1");
        // data truncated after the separator
        stream.extend(raw_frame(b"bad/truncated\n\n\x83\xa1a"));
        stream.extend(good("ok/2"));
        // a tag with no separator
        stream.extend(raw_frame(b"no-separator-here"));
        stream.extend(good("ok/3"));
        // wrong types: an integer where a frame should be, then a map without body
        stream.push(0x2a);
        stream.extend([0x81, 0xa4, b'h', b'e', b'a', b'd', 0x80]);
        stream.extend(good("ok/4"));
        // body is an integer
        stream.extend([
            0x82, 0xa4, b'h', b'e', b'a', b'd', 0x80, 0xa4, b'b', b'o', b'd', b'y', 0x07,
        ]);
        stream.extend(good("ok/5"));
        // an absurd length: bin32 declaring 4 GiB, followed by valid frames
        stream.extend([
            0x82, 0xa4, b'h', b'e', b'a', b'd', 0x80, 0xa4, b'b', b'o', b'd', b'y',
        ]);
        stream.extend([0xc6, 0xff, 0xff, 0xff, 0xf0, 1, 2, 3]);
        stream.extend(good("ok/6"));
        // an invalid marker
        stream.push(0xc1);
        stream.extend(good("ok/7"));
        // a frame truncated on the wire: its declared body swallows what follows,
        // then the decoder resynchronises on the next frame signature.
        let mut cut = good("lost/cut");
        cut.truncate(cut.len() - 5);
        stream.extend(cut);
        stream.extend(good("lost/swallowed"));
        stream.extend(good("ok/8"));
        stream.extend(good("ok/9"));

        let mut dec = FrameDecoder::new(1024 * 1024);
        let out = decode_all(&mut dec, &stream);
        let tags: Vec<_> = events(&out).iter().map(|e| e.tag.clone()).collect();
        for n in 1..=9 {
            if n == 8 {
                continue; // may be eaten by the cut frame's declared length
            }
            assert!(
                tags.contains(&format!("ok/{n}")),
                "ok/{n} missing from {tags:?}"
            );
        }
        let errors: Vec<_> = out
            .iter()
            .filter_map(|d| match d {
                Decoded::Bad(b) => Some(b.clone()),
                Decoded::Event(_) => None,
            })
            .collect();
        assert!(errors
            .iter()
            .any(|b| matches!(b.error, DecodeError::BadData(_))
                && b.tag.as_deref() == Some("bad/truncated")));
        assert!(errors.iter().any(|b| b.error == DecodeError::NoSeparator));
        assert!(errors.iter().any(|b| b.error == DecodeError::NotAMap));
        assert!(errors.iter().any(|b| b.error == DecodeError::NoBody));
        assert!(errors.iter().any(|b| b.error == DecodeError::BodyType));
        assert!(errors
            .iter()
            .any(|b| matches!(b.error, DecodeError::Oversized { len, .. } if len > 4_000_000_000)));
        assert!(errors
            .iter()
            .any(|b| b.error == DecodeError::InvalidMarker(0xc1)));
    }

    #[test]
    fn an_oversized_frame_is_never_buffered() {
        let big = encode_frame("big/one", &Value::Binary(vec![0u8; 10_000]));
        let mut dec = FrameDecoder::new(1000);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in big
            .chunks(64)
            .chain(std::iter::once(&good("after/big")[..]))
        {
            buf.extend_from_slice(piece);
            while let Some(d) = dec.decode(&mut buf) {
                out.push(d);
            }
            assert!(buf.len() <= 1000 + 64, "buffer grew to {}", buf.len());
        }
        assert!(
            matches!(&out[0], Decoded::Bad(b) if matches!(b.error, DecodeError::Oversized{..}))
        );
        assert!(matches!(out.last(), Some(Decoded::Event(e)) if e.tag == "after/big"));
    }

    #[test]
    fn huge_declared_counts_are_oversized_not_allocated() {
        // array32 with 2^32-1 elements, map32 likewise
        for bytes in [
            &[0xdd, 0xff, 0xff, 0xff, 0xff][..],
            &[0xdf, 0xff, 0xff, 0xff, 0xff][..],
        ] {
            assert!(matches!(
                object_len(bytes, 1 << 20),
                Err(DecodeError::Oversized { .. })
            ));
        }
    }

    fn arb_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Nil),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("NaN never equals itself", |f| !f.is_nan())
                .prop_map(Value::from),
            ".{0,40}".prop_map(Value::from),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(Value::Binary),
            (any::<i8>(), proptest::collection::vec(any::<u8>(), 0..20))
                .prop_map(|(t, d)| Value::Ext(t, d)),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                proptest::collection::vec((".{0,10}".prop_map(Value::from), inner), 0..8)
                    .prop_map(Value::Map),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn encode_then_decode_round_trips(tag in "[a-z0-9/_.-]{1,60}", data in arb_value()) {
            let frame = encode_frame(&tag, &data);
            let out = decode_all(&mut FrameDecoder::default(), &frame);
            prop_assert_eq!(out, vec![Decoded::Event(Event::new(tag, data))]);
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_never_hang(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut dec = FrameDecoder::new(4096);
            let mut buf = BytesMut::from(&bytes[..]);
            let mut steps = 0;
            while dec.decode(&mut buf).is_some() {
                steps += 1;
                prop_assert!(steps <= bytes.len() + 1, "decoder made no progress");
            }
        }

        #[test]
        fn prefixed_frames_round_trip_at_any_read_size(
            tags in proptest::collection::vec("[a-z]{1,8}/[a-z0-9/]{0,20}", 1..20),
            chunk in 1usize..64,
        ) {
            let mut stream = Vec::new();
            for t in &tags {
                stream.extend(encode_framed(
                    Framing::Prefixed,
                    t,
                    &Value::Map(vec![(Value::from("t"), Value::from(t.as_str()))]),
                ));
            }
            let mut dec = FrameDecoder::default();
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for piece in stream.chunks(chunk) {
                buf.extend_from_slice(piece);
                while let Some(d) = dec.decode(&mut buf) {
                    match d {
                        Decoded::Event(e) => got.push(e.tag),
                        Decoded::Bad(b) => prop_assert!(false, "bad frame {:?}", b),
                    }
                }
            }
            prop_assert_eq!(got, tags);
            prop_assert_eq!(dec.framing(), Some(Framing::Prefixed));
        }

        #[test]
        fn arbitrary_bytes_after_a_prefixed_frame_never_panic_and_always_progress(
            bytes in proptest::collection::vec(any::<u8>(), 0..2048),
        ) {
            let mut stream = encode_framed(Framing::Prefixed, "first/frame", &Value::Nil);
            stream.extend(&bytes);
            let mut dec = FrameDecoder::new(1 << 16);
            let mut buf = BytesMut::from(&stream[..]);
            let mut steps = 0usize;
            while dec.decode(&mut buf).is_some() {
                steps += 1;
                prop_assert!(steps <= stream.len() + 1, "decoder made no progress");
            }
            prop_assert_eq!(dec.framing(), Some(Framing::Prefixed));
        }

        #[test]
        fn garbage_before_a_frame_does_not_lose_it(
            junk in proptest::collection::vec(any::<u8>(), 0..512),
            tag in "[a-z]{1,10}/[a-z]{1,10}",
        ) {
            // Junk that ends inside an object it started may swallow what
            // follows (there is no length prefix to tell); any other junk must
            // not cost the frames after it.
            let mut probe = FrameDecoder::new(1 << 16);
            let mut rest = BytesMut::from(&junk[..]);
            while probe.decode(&mut rest).is_some() {}
            let junk_ends_mid_object = !rest.is_empty() && !probe.resyncing;

            let mut stream = junk.clone();
            stream.extend(good(&tag));
            stream.extend(good("sentinel/after"));
            let out = decode_all(&mut FrameDecoder::new(1 << 16), &stream);
            let tags: Vec<_> = events(&out).iter().map(|e| e.tag.clone()).collect();
            if !junk_ends_mid_object {
                prop_assert!(tags.contains(&tag), "{} lost after junk {:?}", tag, junk);
                prop_assert!(tags.contains(&"sentinel/after".to_string()));
            }
        }
    }
}
