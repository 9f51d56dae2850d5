#!/usr/bin/env bash
# CI smoke: every scenario against duplex and direct with tiny sizes, in seconds, through
# the same runner as the full benchmark (separate processes, taskset placement). Needs no
# nginx or HAProxy. Exits non-zero on any failure, such as a tunnel that did not echo.
#
#   crates/duplex-bench/smoke.sh             # debug build (what CI already has)
#   crates/duplex-bench/smoke.sh --release
set -euo pipefail
cd "$(dirname "$0")/../.."

profile=debug
flags=()
if [ "${1:-}" = "--release" ]; then
  profile=release
  flags=(--release)
fi
cargo build "${flags[@]}" --quiet -p duplex -p duplex-bench
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
exec timeout 300 "target/$profile/duplex-bench" run-all --smoke --duplex "target/$profile/duplex"
