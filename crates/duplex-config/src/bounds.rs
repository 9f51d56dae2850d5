//! Bounds on a configuration file, checked before the YAML reader sees it: its size, and
//! how deep `[ ]` and `{ }` nest (the reader's time grows with the square of that depth,
//! so a 60 KB line of brackets would take seconds of a reload).

use std::io::{self, Read};
use std::path::Path;

/// The largest configuration file duplex reads: some 500,000 backends written out.
pub const MAX_FILE_BYTES: u64 = 16 << 20;

/// The deepest `[ ]` / `{ }` nesting accepted; a configuration needs four or five.
pub const MAX_FLOW_DEPTH: usize = 64;

/// A configuration file over [`MAX_FILE_BYTES`].
#[derive(Debug, thiserror::Error)]
#[error("the file is larger than the {} MiB a configuration may be", MAX_FILE_BYTES >> 20)]
pub struct TooLarge;

/// The largest certificate, key or CA file duplex reads: a CA bundle is some 200 KB.
pub const MAX_TLS_FILE_BYTES: u64 = 16 << 20;

/// A certificate, key or CA file over [`MAX_TLS_FILE_BYTES`] (a path to a device, say).
#[derive(Debug, thiserror::Error)]
#[error("the file is larger than the {} MiB a certificate, key or CA file may be", MAX_TLS_FILE_BYTES >> 20)]
pub struct TlsFileTooLarge;

/// Reads a configuration file as UTF-8, refusing one larger than [`MAX_FILE_BYTES`]
/// without reading it all.
pub fn read_source(path: &Path) -> io::Result<String> {
    let bytes = read_at_most(path, MAX_FILE_BYTES, TooLarge)?;
    String::from_utf8(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Reads a certificate, key or CA file, refusing one larger than [`MAX_TLS_FILE_BYTES`]
/// without reading it all.
pub fn read_tls_file(path: &Path) -> io::Result<Vec<u8>> {
    read_at_most(path, MAX_TLS_FILE_BYTES, TlsFileTooLarge)
}

/// A path that names a device or a socket rather than a file (`/dev/zero` never ends).
/// A FIFO is read: it is how a file can come from a process (`<(...)`), and a FIFO
/// with no writer is a read that hangs, as on a hung network mount, which reloads are
/// built to survive.
#[derive(Debug, thiserror::Error)]
#[error("not a regular file (a device or socket cannot be read as one)")]
pub struct NotAFile;

fn read_at_most(
    path: &Path,
    max: u64,
    too_large: impl std::error::Error + Send + Sync + 'static,
) -> io::Result<Vec<u8>> {
    use std::os::unix::fs::FileTypeExt;
    let kind = std::fs::metadata(path)?.file_type();
    if kind.is_char_device() || kind.is_block_device() || kind.is_socket() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, NotAFile));
    }
    let file = std::fs::File::open(path)?;
    let mut bytes = Vec::new();
    file.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(io::Error::new(io::ErrorKind::InvalidData, too_large));
    }
    Ok(bytes)
}

/// The 1-based line and column where flow collections first nest deeper than
/// [`MAX_FLOW_DEPTH`], if they do. A scan, not a parser, and it errs toward letting the
/// reader decide: a quote opens a string only where a value starts (`it's` is not one),
/// `\` escapes inside double quotes, comments are skipped, and the count starts again at
/// every top-level key (a flow collection cannot run past one).
pub fn too_deep(src: &str) -> Option<(usize, usize)> {
    let mut depth = 0usize;
    for (no, line) in src.lines().enumerate() {
        if line.starts_with(|c: char| c.is_ascii_alphanumeric()) {
            depth = 0;
        }
        let mut quote: Option<char> = None;
        let mut escaped = false;
        // The last character that was not a space, outside quotes.
        let mut before = ' ';
        let mut prev = ' ';
        for (col, c) in line.chars().enumerate() {
            if let Some(q) = quote {
                match c {
                    _ if escaped => escaped = false,
                    '\\' if q == '"' => escaped = true,
                    _ if c == q => {
                        quote = None;
                        before = c;
                    }
                    _ => {}
                }
                prev = c;
                continue;
            }
            match c {
                '"' | '\'' if matches!(before, ' ' | ':' | '-' | '[' | '{' | ',') => {
                    quote = Some(c)
                }
                '#' if prev.is_whitespace() => break,
                '[' | '{' => {
                    depth += 1;
                    if depth > MAX_FLOW_DEPTH {
                        return Some((no + 1, col + 1));
                    }
                }
                ']' | '}' => depth = depth.saturating_sub(1),
                _ => {}
            }
            if !c.is_whitespace() {
                before = c;
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
        // Apostrophes and escaped quotes inside values, and brackets in plain values,
        // never add up to a refusal.
        let routes = "  - {name: r, match: {headers: {X-Who: O'Brien}}, upstream: u}\n".repeat(100);
        assert_eq!(too_deep(&format!("routes:\n{routes}")), None);
        let escaped =
            "  - {name: r, match: {headers: {X-Q: \"a\\\"b\"}}, upstream: u}\n".repeat(100);
        assert_eq!(too_deep(&format!("routes:\n{escaped}")), None);
        let plain = "    path: /a[\n".repeat(40);
        let twice = format!("routes:\n{plain}upstreams:\n{plain}");
        assert_eq!(too_deep(&twice), None);
        // A flow collection over several lines still counts.
        let lines = format!("x:\n{}", "  [\n".repeat(MAX_FLOW_DEPTH + 1));
        assert_eq!(too_deep(&lines), Some((MAX_FLOW_DEPTH + 2, 3)));
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

    /// A certificate path naming a file too large is refused at the bound, unread, and
    /// one naming a device is refused before it is read.
    #[test]
    fn tls_files_are_regular_files_within_the_bound() {
        let dir = std::env::temp_dir().join(format!("duplex-tlsfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let big = dir.join("big.pem");
        let f = std::fs::File::create(&big).expect("create");
        f.set_len(MAX_TLS_FILE_BYTES + 1).expect("size");
        let e = read_tls_file(&big).expect_err("too large");
        assert!(
            e.to_string()
                .contains("larger than the 16 MiB a certificate, key or CA file may be"),
            "{e}"
        );
        let e = read_tls_file(Path::new("/dev/zero")).expect_err("a device");
        assert!(e.to_string().starts_with("not a regular file"), "{e}");
        let e = read_source(Path::new("/dev/urandom")).expect_err("a device as the config");
        assert!(e.to_string().starts_with("not a regular file"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
