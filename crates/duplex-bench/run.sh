#!/usr/bin/env bash
# The whole comparison in one command, from the repository root or anywhere:
#
#   crates/duplex-bench/run.sh                 # ~21 minutes; rewrites docs/benchmarks.md
#   crates/duplex-bench/run.sh --repeats 1     # any `duplex-bench run-all` option passes through
#
# Installs what is missing from Debian (nginx-light, haproxy, wrk), builds duplex and the
# load generator in release mode, takes the whole open-file allowance, and runs every
# scenario against direct, duplex, nginx and HAProxy in three CPU placements.
set -euo pipefail
cd "$(dirname "$0")/../.."

need=()
command -v nginx >/dev/null 2>&1 || need+=(nginx-light)
command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v taskset >/dev/null 2>&1 || need+=(util-linux)
if ((${#need[@]})); then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  echo "installing ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}"
fi

ulimit -n "$(ulimit -Hn)"
cargo build --release -p duplex -p duplex-bench
exec target/release/duplex-bench run-all --duplex target/release/duplex "$@"
