//! Finds a route that can never match: an earlier route takes every request it would.
//!
//! Routes are tried in file order and the first match wins, so a catch-all, a shorter
//! path prefix or a wildcard host placed before a more specific route leaves that route
//! dead, silently. Such a file is refused, naming both routes.

use crate::{HostMatch, PathMatch, Route};

/// The first route (by index) that an earlier one shadows, with that earlier one's index.
pub(crate) fn first_shadowed(routes: &[Route]) -> Option<(usize, usize)> {
    routes.iter().enumerate().find_map(|(i, later)| {
        routes[..i]
            .iter()
            .position(|earlier| covers(earlier, later))
            .map(|j| (i, j))
    })
}

/// Whether every request `b` matches is matched by `a` too.
fn covers(a: &Route, b: &Route) -> bool {
    host_covers(a.host.as_ref(), b.host.as_ref())
        && path_covers(a.path.as_ref(), b.path.as_ref())
        // Each header `a` asks for, `b` asks for with the same value.
        && a.headers.iter().all(|h| b.headers.contains(h))
        // Every listener `b` takes requests from, `a` takes them from too.
        && (a.listeners.is_empty()
            || (!b.listeners.is_empty() && b.listeners.iter().all(|l| a.listeners.contains(l))))
}

fn host_covers(a: Option<&HostMatch>, b: Option<&HostMatch>) -> bool {
    match (a, b) {
        (None, _) => true,
        // `b` also takes requests without a host, which `a` never does.
        (Some(_), None) => false,
        (Some(a), Some(HostMatch::Exact(h))) => a.matches(h),
        // Hosts ending in `.a.example.com` all end in `.example.com`, with a label more.
        (Some(HostMatch::Suffix(s)), Some(HostMatch::Suffix(t))) => t.ends_with(s.as_str()),
        (Some(HostMatch::Exact(_)), Some(HostMatch::Suffix(_))) => false,
    }
}

fn path_covers(a: Option<&PathMatch>, b: Option<&PathMatch>) -> bool {
    match (a, b) {
        (None, _) => true,
        (Some(PathMatch::Prefix(p)), _) if p == "/" => true,
        (Some(_), None) => false,
        (Some(a), Some(PathMatch::Exact(e))) => a.matches(e),
        // Segment-aware: every path under `/ws/room` is under `/ws`.
        (Some(a @ PathMatch::Prefix(_)), Some(PathMatch::Prefix(q))) => a.matches(q),
        (Some(PathMatch::Exact(_)), Some(PathMatch::Prefix(_))) => false,
    }
}
