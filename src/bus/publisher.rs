//! Fires events into the master's pull socket (salt-protocol.md §1.3).
//!
//! The master answers nothing and silently drops a frame it cannot unpack, so
//! everything that could make it drop one is refused here, before writing:
//! the body is always msgpack bin, the tag is non-empty and has no `\n\n`.
//! Like Salt's own `fire_event`, a map gets a `_stamp` when it has none.

use std::time::{Duration, SystemTime};

use rmpv::Value;
use tokio::io::AsyncWriteExt;

use super::codec::{encode_frame, DEFAULT_MAX_FRAME};
use super::{BusEndpoint, BusStream};

/// Why an event was not fired.
#[derive(Debug, thiserror::Error)]
pub enum FireError {
    #[error("invalid tag {tag:?}: {reason}")]
    InvalidTag { tag: String, reason: &'static str },
    #[error("event {tag} is {len} bytes, over the limit of {max}")]
    TooLarge { tag: String, len: usize, max: usize },
    #[error("master event bus {endpoint} not reachable: {source}")]
    Connect {
        endpoint: BusEndpoint,
        source: std::io::Error,
    },
    #[error("writing to master event bus {endpoint}: {source}")]
    Write {
        endpoint: BusEndpoint,
        source: std::io::Error,
    },
    #[error("writing to master event bus {endpoint} timed out after {timeout:?}")]
    Timeout {
        endpoint: BusEndpoint,
        timeout: Duration,
    },
}

/// A connection to the pull socket, opened on first use and reopened once
/// when the master has restarted in between.
#[derive(Debug)]
pub struct EventFirer {
    endpoint: BusEndpoint,
    conn: Option<BusStream>,
    timeout: Duration,
}

impl EventFirer {
    /// A firer for `endpoint` (see `MasterConfig::event_pull`).
    pub fn new(endpoint: BusEndpoint) -> Self {
        Self {
            endpoint,
            conn: None,
            timeout: Duration::from_secs(5),
        }
    }

    /// Fires one event. `Ok` means the master's socket took the bytes; the
    /// master itself never acknowledges.
    pub async fn fire(&mut self, tag: &str, mut data: Value) -> Result<(), FireError> {
        check_tag(tag)?;
        add_stamp(&mut data, SystemTime::now());
        let frame = encode_frame(tag, &data);
        if frame.len() > DEFAULT_MAX_FRAME {
            return Err(FireError::TooLarge {
                tag: tag.to_owned(),
                len: frame.len(),
                max: DEFAULT_MAX_FRAME,
            });
        }
        match self.write(&frame).await {
            Ok(()) => Ok(()),
            // A connection kept from before a master restart fails on first
            // write: reconnect once and retry.
            Err(FireError::Write { .. }) => {
                self.conn = None;
                self.write(&frame).await
            }
            Err(e) => Err(e),
        }
    }

    async fn write(&mut self, frame: &[u8]) -> Result<(), FireError> {
        let conn = match self.conn.as_mut() {
            Some(c) => c,
            None => {
                let c = self
                    .endpoint
                    .connect()
                    .await
                    .map_err(|source| FireError::Connect {
                        endpoint: self.endpoint.clone(),
                        source,
                    })?;
                self.conn.insert(c)
            }
        };
        let write = async {
            conn.write_all(frame).await?;
            conn.flush().await
        };
        match tokio::time::timeout(self.timeout, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => {
                self.conn = None;
                Err(FireError::Write {
                    endpoint: self.endpoint.clone(),
                    source,
                })
            }
            Err(_) => {
                self.conn = None;
                Err(FireError::Timeout {
                    endpoint: self.endpoint.clone(),
                    timeout: self.timeout,
                })
            }
        }
    }
}

/// Refuses tags the master would drop or split wrongly.
pub fn check_tag(tag: &str) -> Result<(), FireError> {
    let reason = if tag.is_empty() {
        "empty"
    } else if tag.contains("\n\n") {
        "contains the tag/data separator \\n\\n"
    } else if tag.len() > 4096 {
        "longer than 4096 bytes"
    } else {
        return Ok(());
    };
    Err(FireError::InvalidTag {
        tag: tag.chars().take(80).collect(),
        reason,
    })
}

/// Adds `_stamp` (UTC, `YYYY-MM-DDTHH:MM:SS.ffffff`) to a map that has none,
/// as `salt.utils.event.SaltEvent.fire_event` does.
pub fn add_stamp(data: &mut Value, now: SystemTime) {
    if let Value::Map(entries) = data {
        if !entries
            .iter()
            .any(|(k, _)| super::event::as_str(k) == Some("_stamp"))
        {
            entries.push((Value::from("_stamp"), Value::from(salt_stamp(now))));
        }
    }
}

/// Formats a time as Salt's `_stamp` (`datetime.utcnow().isoformat()`).
pub fn salt_stamp(t: SystemTime) -> String {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:06}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        since.subsec_micros()
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_looks_like_salts() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_micros(1_795_422_653_095_846);
        assert_eq!(salt_stamp(t), "2026-11-23T08:30:53.095846");
        assert_eq!(
            salt_stamp(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000000"
        );
    }

    #[test]
    fn stamp_is_added_only_to_maps_without_one() {
        let t = SystemTime::UNIX_EPOCH;
        let mut m = Value::Map(vec![]);
        add_stamp(&mut m, t);
        assert_eq!(m.as_map().map(Vec::len), Some(1));
        add_stamp(&mut m, t);
        assert_eq!(m.as_map().map(Vec::len), Some(1));
        let mut list = Value::Array(vec![]);
        add_stamp(&mut list, t);
        assert_eq!(list, Value::Array(vec![]));
    }

    #[test]
    fn tags_the_master_would_drop_are_refused() {
        assert!(check_tag("").is_err());
        assert!(check_tag("a\n\nb").is_err());
        assert!(check_tag(&"x".repeat(5000)).is_err());
        assert!(check_tag("steward/v1/server/create").is_ok());
    }
}
