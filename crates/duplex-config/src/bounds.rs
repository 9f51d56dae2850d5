//! Bounds on a configuration file, checked before the YAML reader sees it: its size, and
//! how deep `[ ]` and `{ }` nest (the reader's time grows with the square of that depth,
//! so a 60 KB line of brackets would take seconds of a reload).

use std::io::{self, Read};
use std::path::Path;

/// The largest configuration file duplex reads: some 500,000 backends written out.
pub const MAX_FILE_BYTES: u64 = 16 << 20;

/// The deepest `[ ]` / `{ }` nesting accepted; a configuration needs four or five.
pub const MAX_FLOW_DEPTH: usize = 64;

/// Reads a configuration file as UTF-8, refusing one larger than [`MAX_FILE_BYTES`]
/// without reading it all.
pub fn read_source(path: &Path) -> io::Result<String> {
    let file = std::fs::File::open(path)?;
    let mut src = String::new();
    file.take(MAX_FILE_BYTES + 1).read_to_string(&mut src)?;
    if src.len() as u64 > MAX_FILE_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the file is larger than the {} MiB a configuration may be",
                MAX_FILE_BYTES >> 20
            ),
        ));
    }
    Ok(src)
}

/// The 1-based line and column where flow collections first nest deeper than
/// [`MAX_FLOW_DEPTH`], if they do. Brackets inside quotes and comments are not counted;
/// the scan is a bound, not a parser, and errs toward letting the reader decide.
pub fn too_deep(src: &str) -> Option<(usize, usize)> {
    let mut depth = 0usize;
    for (no, line) in src.lines().enumerate() {
        let mut quote: Option<char> = None;
        let mut prev = ' ';
        for (col, c) in line.chars().enumerate() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '"' | '\'') => quote = Some(c),
                (None, '#') if prev.is_whitespace() => break,
                (None, '[' | '{') => {
                    depth += 1;
                    if depth > MAX_FLOW_DEPTH {
                        return Some((no + 1, col + 1));
                    }
                }
                (None, ']' | '}') => depth = depth.saturating_sub(1),
                _ => {}
            }
            prev = c;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deep_flow_nesting_is_found_and_quoted_brackets_are_not() {
        let deep = format!("x: {}", "[".repeat(60_000));
        assert_eq!(too_deep(&deep), Some((1, 4 + MAX_FLOW_DEPTH)));
        let fine = "listeners: [{name: a, bind: '127.0.0.1:1'}]\nx: \"[[[[[[\"\n";
        assert_eq!(too_deep(fine), None);
        let quoted = format!("x: '{}'\n# {}\n", "[".repeat(100), "{".repeat(100));
        assert_eq!(too_deep(&quoted), None);
    }

    #[test]
    fn a_file_over_the_bound_is_refused_unread() {
        let dir = std::env::temp_dir().join(format!("duplex-bounds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("big.yaml");
        let f = std::fs::File::create(&path).expect("create");
        f.set_len(MAX_FILE_BYTES + 1).expect("size");
        let e = read_source(&path).expect_err("too large");
        assert!(e.to_string().contains("16 MiB"), "{e}");
        std::fs::write(&path, "listeners: []\n").expect("write");
        assert_eq!(read_source(&path).expect("small"), "listeners: []\n");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
