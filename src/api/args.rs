//! A request's arguments (the JSON map beside `request_id`) read as the
//! registry's operations want them, with the registry's `invalid_value`
//! naming the key when one cannot be read. Shared by every entity served on
//! the bus, so each reads text, numbers, server references and aliases the
//! same way.

use serde_json::{Map, Value as Json};

use crate::registry::{Error, ServerRef};

/// A request's arguments.
#[derive(Debug, Clone, Copy)]
pub struct Args<'a>(pub &'a Map<String, Json>);

impl<'a> Args<'a> {
    /// Text under `key` (a number is taken as its digits); required.
    pub fn text(&self, key: &str) -> Result<String, Error> {
        self.opt_text(key)?
            .ok_or_else(|| Error::invalid(key, "required"))
    }

    /// Text under `key` (a number is taken as its digits); `None` when
    /// absent or null, `invalid_value` for a list, map or boolean.
    pub fn opt_text(&self, key: &str) -> Result<Option<String>, Error> {
        match self.0.get(key) {
            None | Some(Json::Null) => Ok(None),
            Some(Json::String(s)) => Ok(Some(s.clone())),
            Some(Json::Number(n)) => Ok(Some(n.to_string())),
            Some(other) => Err(Error::invalid(key, format!("must be text, not {other}"))),
        }
    }

    /// The value under whichever of `keys` (aliases of one argument, the
    /// first the name errors use) is given, with the key it came under;
    /// `invalid_value` when two are given with different values.
    fn alias(&self, keys: &[&'a str]) -> Result<Option<(&'a str, &'a Json)>, Error> {
        let mut found: Option<(&str, &Json)> = None;
        for &k in keys {
            let Some(v) = self.0.get(k).filter(|v| !v.is_null()) else {
                continue;
            };
            match found {
                Some((first, seen)) if seen != v => {
                    return Err(Error::invalid(
                        keys[0],
                        format!("{first} and {k} say different things: give one"),
                    ))
                }
                Some(_) => {}
                None => found = Some((k, v)),
            }
        }
        Ok(found)
    }

    /// A whole number under one of `keys` (aliases), given as a number or
    /// as its digits; `None` when none is given.
    pub fn opt_int(&self, keys: &[&'a str]) -> Result<Option<i64>, Error> {
        let Some((key, v)) = self.alias(keys)? else {
            return Ok(None);
        };
        let n = match v {
            Json::Number(n) => n.as_i64(),
            Json::String(s) => s.trim().parse().ok(),
            _ => None,
        };
        n.map(Some)
            .ok_or_else(|| Error::invalid(key, format!("must be a whole number, not {v}")))
    }

    /// A whole number under one of `keys` (aliases); required.
    pub fn int(&self, keys: &[&'a str]) -> Result<i64, Error> {
        self.opt_int(keys)?
            .ok_or_else(|| Error::invalid(keys[0], "required"))
    }

    /// A server, by id (a number, or all digits) or name, under one of
    /// `keys` (aliases), as the CLI reads one; `None` when none is given.
    pub fn opt_server(&self, keys: &[&'a str]) -> Result<Option<ServerRef>, Error> {
        match self.alias(keys)? {
            None => Ok(None),
            Some((_, Json::Number(n))) if n.as_i64().is_some() => Ok(n.as_i64().map(ServerRef::Id)),
            Some((_, Json::String(s))) => Ok(Some(s.parse().unwrap_or(ServerRef::Name(s.clone())))),
            Some((key, v)) => Err(Error::invalid(
                key,
                format!("must be a server id or name, not {v}"),
            )),
        }
    }

    /// A server under one of `keys` (aliases); required.
    pub fn server(&self, keys: &[&'a str]) -> Result<ServerRef, Error> {
        self.opt_server(keys)?
            .ok_or_else(|| Error::invalid(keys[0], "required"))
    }

    /// `invalid_value` for the first key not in `accepted`, so a misspelt
    /// argument is never silently ignored.
    pub fn only(&self, accepted: &[&str]) -> Result<(), Error> {
        match self.0.keys().find(|k| !accepted.contains(&k.as_str())) {
            Some(k) => Err(Error::invalid(
                k,
                format!("not an argument here (accepted: {})", accepted.join(", ")),
            )),
            None => Ok(()),
        }
    }

    /// Whether any of `keys` is given (and not null).
    pub fn has_any(&self, keys: &[&str]) -> bool {
        keys.iter()
            .any(|k| self.0.get(*k).is_some_and(|v| !v.is_null()))
    }
}

/// A result as reply JSON.
pub fn encode<T: serde::Serialize>(v: &T) -> Result<Json, Error> {
    serde_json::to_value(v).map_err(|e| Error::invalid("result", format!("cannot encode: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args(v: Json) -> Map<String, Json> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn aliases_numbers_and_references_are_read_like_the_cli() {
        let m = args(
            json!({"port": "8080", "to_port": 80, "dest_port": 80, "host": "pve1",
                             "dest_id": 7, "bad": [1], "null": null}),
        );
        let a = Args(&m);
        assert_eq!(a.int(&["port", "source_port"]).unwrap(), 8080);
        assert_eq!(
            a.int(&["to_port", "dest_port"]).unwrap(),
            80,
            "same value twice"
        );
        assert_eq!(a.opt_int(&["listen_port"]).unwrap(), None);
        assert_eq!(
            a.server(&["host", "host_id"]).unwrap(),
            ServerRef::Name("pve1".into())
        );
        assert_eq!(a.server(&["dest", "dest_id"]).unwrap(), ServerRef::Id(7));
        assert_eq!(a.opt_text("null").unwrap(), None);
        assert_eq!(a.text("port").unwrap(), "8080");
        for e in [
            a.text("bad").unwrap_err(),
            a.text("missing").unwrap_err(),
            a.int(&["bad"]).unwrap_err(),
            a.server(&["bad"]).unwrap_err(),
            a.only(&["port", "to_port"]).unwrap_err(),
        ] {
            assert_eq!(e.code(), "invalid_value", "{e}");
        }
        let differ = args(json!({"port": 1, "source_port": 2}));
        let e = Args(&differ).int(&["port", "source_port"]).unwrap_err();
        assert!(e.to_string().contains("give one"), "{e}");
        let frac = args(json!({"port": 1.5}));
        assert!(Args(&frac).int(&["port"]).is_err());
        assert!(Args(&differ).has_any(&["source_port"]));
        assert!(!Args(&m).has_any(&["null", "missing"]));
    }
}
