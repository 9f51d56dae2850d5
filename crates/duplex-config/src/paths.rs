//! The form of a path that routes are matched against: the path as backends commonly
//! read it, so that a route cannot be stepped around by spelling a path another way.

use std::borrow::Cow;

/// `path` with escapes of unreserved characters decoded (`%61` is `a`), `%2f`, `%5c` and
/// `\` taken as `/`, `;` parameters dropped from each segment (`/admin;x/` is `/admin/`
/// to Tomcat, Jetty and Spring), and runs of `/` merged (nginx's `merge_slashes`). Other
/// escapes stay as written. Borrowed when there is nothing to change, as for most paths.
pub fn routing_path(path: &str) -> Cow<'_, str> {
    let bytes = path.as_bytes();
    let plain = !bytes.windows(2).any(|w| {
        matches!(
            w,
            [b'%', _] | [b';', _] | [b'/', b'/'] | [b'\\', _] | [_, b'\\']
        )
    }) && !matches!(bytes.last(), Some(b'%' | b';' | b'\\'));
    if plain {
        return Cow::Borrowed(path);
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut params = false;
    let mut i = 0;
    while i < bytes.len() {
        let (b, next) = match bytes[i] {
            b'%' => match bytes.get(i + 1..i + 3).and_then(hex_pair) {
                Some(b'/' | b'\\') => (b'/', i + 3),
                Some(d) if d.is_ascii_alphanumeric() || b"-._~".contains(&d) => (d, i + 3),
                _ => (b'%', i + 1),
            },
            b'\\' => (b'/', i + 1),
            b => (b, i + 1),
        };
        i = next;
        if b == b'/' {
            params = false;
            if out.last() != Some(&b'/') {
                out.push(b'/');
            }
        } else if b == b';' {
            params = true;
        } else if !params {
            out.push(b);
        }
    }
    if out == bytes {
        // Escapes, but none to decode (`/caf%C3%A9`): no copy to keep.
        return Cow::Borrowed(path);
    }
    // Decoding only ever yields ASCII, and other bytes are copied whole: still UTF-8.
    Cow::Owned(String::from_utf8(out).unwrap_or_else(|_| path.to_owned()))
}

fn hex_pair(pair: &[u8]) -> Option<u8> {
    let digit = |b: u8| (b as char).to_digit(16);
    match pair {
        [h, l] => Some((digit(*h)? * 16 + digit(*l)?) as u8),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::routing_path;

    #[test]
    fn spellings_of_one_path_are_one_path() {
        for (sent, seen) in [
            ("/admin/users", "/admin/users"),
            ("/%61dmin/users", "/admin/users"),
            ("/%41DMIN", "/ADMIN"),
            ("/admin;jsessionid=1/users", "/admin/users"),
            ("/admin;x", "/admin"),
            ("//admin///users", "/admin/users"),
            ("/admin%2fusers", "/admin/users"),
            ("/admin%5Cusers", "/admin/users"),
            ("/admin\\users", "/admin/users"),
            ("/a%20b", "/a%20b"),
            ("/a%2", "/a%2"),
            ("/a%", "/a%"),
            ("/a%zz", "/a%zz"),
            ("/caf%C3%A9", "/caf%C3%A9"),
            ("/ws", "/ws"),
            ("/", "/"),
            ("/v1.2/x~y", "/v1.2/x~y"),
        ] {
            assert_eq!(routing_path(sent), seen, "{sent}");
        }
        for unchanged in ["/ws/room/42", "/caf%C3%A9", "/a%20b"] {
            assert!(
                matches!(routing_path(unchanged), std::borrow::Cow::Borrowed(_)),
                "{unchanged}"
            );
        }
    }
}
