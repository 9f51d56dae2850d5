//! Finds a key written with no value (`key:`, `key: ~`, `key: null`) before the typed read.
//!
//! serde would read such a key as "not set", so `client_auth:` with every line under it
//! commented out would quietly turn client certificates off. `raw::present` refuses them
//! too, but serde_yaml puts that error on the enclosing map; this walk names the key and
//! points at it.

use serde_yaml::Value;

use crate::locate::{locate, Seg};

/// Keys whose empty value means an empty map, as documented: a route's `match:` (every
/// request) and its `headers:`.
const EMPTY_IS_A_MAP: [&str; 2] = ["match", "headers"];

/// The line, column and dotted path (`listeners[0].tls.client_auth`) of the first mapping
/// key in `src` whose value is null, if any. Text that is not YAML answers `None`: the
/// typed read reports it.
pub(crate) fn first_empty_key(src: &str) -> Option<(usize, usize, String)> {
    let doc: Value = serde_yaml::from_str(src).ok()?;
    let mut path = Vec::new();
    if !walk(&doc, &mut path) {
        return None;
    }
    let (line, col) = locate(src, &path);
    let mut name = String::new();
    for seg in &path {
        match seg {
            Seg::Key(k) if name.is_empty() => name.push_str(k),
            Seg::Key(k) => {
                name.push('.');
                name.push_str(k);
            }
            Seg::Index(i) => name.push_str(&format!("[{i}]")),
        }
    }
    Some((line, col, name))
}

/// Whether a null value is under `v`; `path` is left pointing at its key if so.
fn walk<'a>(v: &'a Value, path: &mut Vec<Seg<'a>>) -> bool {
    match v {
        Value::Mapping(m) => {
            for (k, v) in m {
                let Some(key) = k.as_str() else { continue };
                path.push(Seg::Key(key));
                if (v.is_null() && !EMPTY_IS_A_MAP.contains(&key)) || walk(v, path) {
                    return true;
                }
                path.pop();
            }
            false
        }
        Value::Sequence(items) => {
            for (i, v) in items.iter().enumerate() {
                path.push(Seg::Index(i));
                if walk(v, path) {
                    return true;
                }
                path.pop();
            }
            false
        }
        _ => false,
    }
}
