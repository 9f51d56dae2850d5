//! Finds the line and column of a value in block-style YAML, for errors found after parsing.
//!
//! serde_yaml reports positions only for errors raised while it reads a value. Checks that
//! span several values (an unknown upstream, a duplicate name) run later, on the parsed
//! form; this walks the source text by indentation to point at the offending value. It
//! understands the block style operators write (`key: value`, `- item`); for anything it
//! cannot follow it answers with the closest enclosing place it found.

/// One step of a path into the document: a mapping key or a sequence index.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

/// A line reduced to what the walk needs.
struct Line<'a> {
    /// Column of the first character after any `- ` prefix: where a key on this line starts.
    key_col: usize,
    /// Column of the `-` when the line opens a sequence item.
    dash_col: Option<usize>,
    /// The text from `key_col` on.
    text: &'a str,
}

fn lines(src: &str) -> Vec<(usize, Line<'_>)> {
    let mut out = Vec::new();
    for (no, raw) in src.lines().enumerate() {
        let indent = raw.len() - raw.trim_start_matches(' ').len();
        let rest = &raw[indent..];
        if rest.is_empty() || rest.starts_with('#') || rest.starts_with("---") {
            continue;
        }
        let (dash_col, key_col, text) = if rest == "-" || rest.starts_with("- ") {
            let after = rest[1..].trim_start_matches(' ');
            (Some(indent), raw.len() - after.len(), after)
        } else {
            (None, indent, rest)
        };
        out.push((
            no + 1,
            Line {
                key_col,
                dash_col,
                text,
            },
        ));
    }
    out
}

/// Returns the 1-based line and column of the value at `path`, or of the nearest enclosing
/// node found; `(1, 1)` when nothing of the path is found.
pub(crate) fn locate(src: &str, path: &[Seg<'_>]) -> (usize, usize) {
    let all = lines(src);
    let mut best = (1, 1);
    // The scope is a range of lines holding one node's content.
    let (mut lo, mut hi) = (0, all.len());
    for seg in path {
        if lo >= hi {
            break;
        }
        match *seg {
            Seg::Key(key) => {
                let col = all[lo].1.key_col;
                let found = (lo..hi).find(|&i| {
                    let l = &all[i].1;
                    l.key_col == col
                        && l.text.starts_with(key)
                        && l.text[key.len()..].starts_with(':')
                });
                let Some(i) = found else { break };
                let l = &all[i].1;
                let value = l.text[key.len() + 1..].trim_start();
                let vcol = l.key_col + (l.text.len() - value.len());
                best = (
                    all[i].0,
                    if value.is_empty() {
                        l.key_col + 1
                    } else {
                        vcol + 1
                    },
                );
                // The value's lines: deeper ones, or a sequence at the key's own indent.
                let mut end = i + 1;
                while end < hi {
                    let n = &all[end].1;
                    let deeper = n.dash_col.unwrap_or(n.key_col) > col;
                    let seq_same = n.dash_col == Some(col);
                    if !(deeper || seq_same) {
                        break;
                    }
                    end += 1;
                }
                if value.is_empty() {
                    lo = i + 1;
                    hi = end;
                } else {
                    lo = i;
                    hi = i;
                }
            }
            Seg::Index(idx) => {
                let Some(dash) = all[lo].1.dash_col else {
                    break;
                };
                let starts: Vec<usize> = (lo..hi)
                    .filter(|&i| all[i].1.dash_col == Some(dash))
                    .collect();
                let Some(&start) = starts.get(idx) else { break };
                let end = starts.get(idx + 1).copied().unwrap_or(hi);
                best = (all[start].0, dash + 1);
                lo = start;
                hi = end;
            }
        }
    }
    best
}

/// Where key `key` appears a second time in the block mapping that starts at `line`,
/// `col` (1-based, as serde_yaml reports a duplicate field: at the mapping, not the key).
/// `None` when the mapping is not in block style or has no second `key`.
pub(crate) fn second_key(src: &str, line: usize, col: usize, key: &str) -> Option<(usize, usize)> {
    let all = lines(src);
    let col = col.checked_sub(1)?;
    let first = all.iter().position(|(no, _)| *no >= line)?;
    let mut seen = 0;
    for (i, (no, l)) in all.iter().enumerate().skip(first) {
        // The mapping ends at a line less indented, or at the next item of a sequence.
        let outer = l.key_col < col || (i > first && l.dash_col.is_some_and(|d| d < col));
        if outer {
            break;
        }
        // The key as written: bare, or in single or double quotes.
        let after_key = [key.to_owned(), format!("\"{key}\""), format!("'{key}'")]
            .iter()
            .find_map(|k| l.text.strip_prefix(k.as_str()));
        let is_key =
            l.key_col == col && after_key.is_some_and(|rest| rest.trim_start().starts_with(':'));
        if is_key {
            seen += 1;
            if seen == 2 {
                return Some((*no, col + 1));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_duplicate_key_is_found_in_its_own_mapping() {
        let src = "\
shutdown_timeout: 5s
upstreams:
  - name: a
    balancer: x
    backends:
      - addr: 1
        weight: 1
  - name: b
    balancer: y
    balancer: z
shutdown_timeout: 6s
";
        // The top level starts at 1:1; its second shutdown_timeout is on line 11.
        assert_eq!(second_key(src, 1, 1, "shutdown_timeout"), Some((11, 1)));
        // Upstream b (at 8:5) has two; upstream a's one balancer is not counted with them.
        assert_eq!(second_key(src, 8, 5, "balancer"), Some((10, 5)));
        assert_eq!(second_key(src, 3, 5, "balancer"), None);
        assert_eq!(second_key(src, 6, 9, "weight"), None);
        let quoted = "\"shutdown_timeout\": 5s\nlisteners: []\n'shutdown_timeout': 6s\n";
        assert_eq!(second_key(quoted, 1, 1, "shutdown_timeout"), Some((3, 1)));
    }

    const SRC: &str = "\
listeners:
  - name: public
    bind: 127.0.0.1:8080
routes:
# a comment
  - name: chat
    match:
      path_prefix: /ws
    upstream: chat
  - name: other
    upstream: nope
upstreams:
- name: chat
  backends:
    - addr: 127.0.0.1:1
    - addr: 127.0.0.1:2
";

    #[test]
    fn finds_values_in_nested_sequences() {
        use Seg::*;
        assert_eq!(
            locate(SRC, &[Key("routes"), Index(1), Key("upstream")]),
            (11, 15)
        );
        assert_eq!(
            locate(SRC, &[Key("routes"), Index(0), Key("name")]),
            (6, 11)
        );
        assert_eq!(
            locate(SRC, &[Key("listeners"), Index(0), Key("bind")]),
            (3, 11)
        );
        assert_eq!(
            locate(
                SRC,
                &[
                    Key("upstreams"),
                    Index(0),
                    Key("backends"),
                    Index(1),
                    Key("addr")
                ]
            ),
            (16, 13)
        );
        assert_eq!(
            locate(SRC, &[Key("upstreams"), Index(0), Key("name")]),
            (13, 9)
        );
    }

    #[test]
    fn falls_back_to_the_nearest_enclosing_node() {
        use Seg::*;
        assert_eq!(
            locate(SRC, &[Key("routes"), Index(1), Key("missing")]),
            (10, 3)
        );
        assert_eq!(locate(SRC, &[Key("nothing")]), (1, 1));
        assert_eq!(locate("", &[Key("routes")]), (1, 1));
    }
}
