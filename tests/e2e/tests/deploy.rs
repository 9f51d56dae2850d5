//! The operations files in deploy/ against the real duplex: every metric that the Grafana
//! dashboard and the Prometheus alert rules query is one duplex exports, with labels it
//! has; every exported family is documented; the files are well formed and agree with
//! duplex's defaults. With `promtool` on PATH it also checks the rules, runs their unit
//! tests (deploy/prometheus/alerts_test.yml), checks the Prometheus configuration and
//! parses every dashboard query; with `systemd-analyze` on PATH it verifies the unit.
//! With `DUPLEX_REQUIRE_TOOLS=1` (CI sets it) a missing tool fails those tests instead.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value as Json};
use serde_yaml::Value as Yaml;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn deploy(rel: &str) -> PathBuf {
    root().join("deploy").join(rel)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn yaml(rel: &str) -> Yaml {
    let path = deploy(rel);
    serde_yaml::from_str(&read(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn dashboard() -> Json {
    let path = deploy("grafana/duplex-dashboard.json");
    serde_json::from_str(&read(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------
// What duplex exports

/// A metric family in duplex's registry.
struct Family {
    histogram: bool,
    labels: BTreeSet<String>,
}

/// Every family duplex exports, by name, with one series of each labelled family touched
/// so that it shows in `gather()`.
fn exported() -> BTreeMap<String, Family> {
    let m = duplex_metrics::Metrics::new();
    // No `..`: a metric added to `Metrics` does not compile here until it is touched below.
    let duplex_metrics::Metrics {
        registry,
        connections_accepted,
        connections_active,
        accept_errors,
        connections_limit: _,
        connection_limit_waits,
        listener_connections_limit,
        tls_handshake_errors,
        client_send_timeouts,
        connections_reclaimed,
        http_requests,
        http_request_duration,
        upgrades,
        handshake_duration,
        tunnels_active,
        tunnel_duration,
        tunnel_bytes,
        backend_connect_errors,
        backend_up,
        backend_health_checks,
        backend_ejections,
        backend_response_errors,
        dns_resolutions,
        config_reloads,
        config_generation: _,
        config_last_reload_success: _,
        holds: _,
    } = &m;
    connections_accepted.with_label_values(&["l"]).inc();
    connections_active.with_label_values(&["l"]).inc();
    accept_errors.with_label_values(&["l"]).inc();
    connection_limit_waits
        .with_label_values(&["l", "global"])
        .inc();
    listener_connections_limit.with_label_values(&["l"]).set(1);
    tls_handshake_errors
        .with_label_values(&["l", "failed"])
        .inc();
    client_send_timeouts.with_label_values(&["l"]).inc();
    connections_reclaimed.with_label_values(&["l"]).inc();
    http_requests.with_label_values(&["r", "u", "2xx"]).inc();
    http_request_duration.with_label_values(&["r"]).observe(0.1);
    upgrades.with_label_values(&["r", "u", "ok"]).inc();
    handshake_duration.with_label_values(&["r"]).observe(0.1);
    tunnels_active.with_label_values(&["r", "u", "b"]).inc();
    tunnel_duration.with_label_values(&["r"]).observe(1.0);
    tunnel_bytes
        .with_label_values(&["r", "client_to_backend"])
        .inc();
    backend_connect_errors
        .with_label_values(&["u", "b", "refused"])
        .inc();
    backend_up.with_label_values(&["u", "b"]).set(1);
    backend_health_checks
        .with_label_values(&["u", "b", "ok"])
        .inc();
    backend_ejections.with_label_values(&["u", "b"]).inc();
    backend_response_errors.with_label_values(&["u", "b"]).inc();
    dns_resolutions.with_label_values(&["u", "ok"]).inc();
    config_reloads.with_label_values(&["ok"]).inc();

    let families: BTreeMap<String, Family> = registry
        .gather()
        .iter()
        .map(|mf| {
            let labels = mf
                .get_metric()
                .iter()
                .flat_map(|s| s.get_label().iter().map(|l| l.name().to_owned()))
                .collect();
            // `MetricType` lives in the `prometheus` crate, not a dependency here; its
            // Debug name says the same.
            let histogram = format!("{:?}", mf.get_field_type()) == "HISTOGRAM";
            (mf.name().to_owned(), Family { histogram, labels })
        })
        .collect();
    assert!(
        families.len() >= 15,
        "expected every duplex family in gather(), got {:?}",
        families.keys().collect::<Vec<_>>()
    );
    families
}

// ---------------------------------------------------------------------------------------
// The queries in the files

/// A PromQL expression and where it comes from, for messages.
struct Query {
    place: String,
    expr: String,
}

/// Every alerting and recording rule's `expr`.
fn rule_queries(rules: &Yaml) -> Vec<Query> {
    let mut out = Vec::new();
    let groups = rules["groups"].as_sequence().expect("groups: a list");
    for g in groups {
        let group = g["name"].as_str().unwrap_or("?");
        for r in g["rules"].as_sequence().expect("rules: a list") {
            let name = r["alert"].as_str().or(r["record"].as_str()).unwrap_or("?");
            let expr = r["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("rule {name}: no expr"));
            out.push(Query {
                place: format!("alerts.yml {group}/{name}"),
                expr: expr.to_owned(),
            });
        }
    }
    out
}

/// Panels, including those nested in rows, flattened.
fn panels(d: &Json) -> Vec<&Json> {
    fn walk<'a>(list: &'a Json, out: &mut Vec<&'a Json>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p);
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&d["panels"], &mut out);
    out
}

/// The PromQL of every panel target and annotation (Grafana variables left in).
fn panel_queries(d: &Json) -> Vec<Query> {
    let mut out = Vec::new();
    for p in panels(d) {
        let title = p["title"].as_str().unwrap_or("?");
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("panel {title:?}: a target without expr"));
            out.push(Query {
                place: format!("dashboard panel {title:?} {}", t["refId"]),
                expr: expr.to_owned(),
            });
        }
    }
    for a in d["annotations"]["list"].as_array().into_iter().flatten() {
        if let Some(expr) = a["expr"].as_str() {
            out.push(Query {
                place: format!("dashboard annotation {}", a["name"]),
                expr: expr.to_owned(),
            });
        }
    }
    out
}

/// The queries of the dashboard's query variables (`label_values(...)`: Grafana's syntax,
/// not PromQL, but naming metrics all the same).
fn variable_queries(d: &Json) -> Vec<Query> {
    let mut out = Vec::new();
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] != "query" {
            continue;
        }
        let q = match &v["query"] {
            Json::String(s) => s.clone(),
            q => q["query"].as_str().unwrap_or_default().to_owned(),
        };
        for expr in [q, v["definition"].as_str().unwrap_or_default().to_owned()] {
            if !expr.is_empty() {
                out.push(Query {
                    place: format!("dashboard variable {}", v["name"]),
                    expr,
                });
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Metric names in PromQL

/// A metric named in a query, with the label names its `{...}` selector matches on.
#[derive(Debug, PartialEq)]
struct Ref {
    name: String,
    labels: Vec<String>,
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// `expr` with the inside of every string literal blanked, so that label values and
/// regexes are never read as names.
fn blank_strings(expr: &str) -> String {
    let mut out = String::with_capacity(expr.len());
    let mut quote = None;
    let mut escaped = false;
    for c in expr.chars() {
        match quote {
            None => {
                if matches!(c, '"' | '\'' | '`') {
                    quote = Some(c);
                }
                out.push(c);
            }
            Some(q) => {
                if escaped {
                    escaped = false;
                    out.push(' ');
                } else if c == '\\' && q != '`' {
                    escaped = true;
                    out.push(' ');
                } else if c == q {
                    quote = None;
                    out.push(c);
                } else {
                    out.push(' ');
                }
            }
        }
    }
    out
}

/// Every identifier in `expr` that starts with one of `prefixes`, with its selector's
/// label names. Grafana variables (`$name`, `${name}`) are not identifiers.
fn refs(expr: &str, prefixes: &[&str]) -> Vec<Ref> {
    let chars: Vec<char> = blank_strings(expr).chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let variable = (i >= 1 && chars[i - 1] == '$')
            || (i >= 2 && chars[i - 1] == '{' && chars[i - 2] == '$');
        let starts = (chars[i].is_ascii_alphabetic() || chars[i] == '_')
            && !variable
            && (i == 0 || !is_ident(chars[i - 1]));
        if !starts {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && is_ident(chars[i]) {
            i += 1;
        }
        let name: String = chars[start..i].iter().collect();
        if !prefixes.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let mut j = i;
        while j < chars.len() && chars[j].is_whitespace() {
            j += 1;
        }
        let mut labels = Vec::new();
        if j < chars.len() && chars[j] == '{' {
            let end = chars[j..]
                .iter()
                .position(|&c| c == '}')
                .map(|k| j + k)
                .unwrap_or_else(|| panic!("unclosed selector in {expr}"));
            let selector: String = chars[j + 1..end].iter().collect();
            for matcher in selector.split(',') {
                let label: String = matcher
                    .trim()
                    .chars()
                    .take_while(|&c| is_ident(c))
                    .collect();
                if !label.is_empty() {
                    labels.push(label);
                }
            }
            i = end + 1;
        }
        out.push(Ref { name, labels });
    }
    out
}

/// Labels every series gets from the scrape, not from duplex.
const TARGET_LABELS: &[&str] = &["job", "instance"];

/// Whether `r` names a series duplex exports, with labels it has.
fn check(r: &Ref, families: &BTreeMap<String, Family>) -> Result<(), String> {
    let (family, extra): (&Family, &[&str]) = match families.get(&r.name) {
        Some(f) if f.histogram => {
            return Err(
                "a histogram has no series by its own name: use _bucket, _sum or _count".into(),
            )
        }
        Some(f) => (f, &[]),
        None => {
            let histogram = ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
                let base = r.name.strip_suffix(suffix)?;
                let f = families.get(base).filter(|f| f.histogram)?;
                Some((
                    f,
                    if *suffix == "_bucket" {
                        &["le"][..]
                    } else {
                        &[][..]
                    },
                ))
            });
            histogram.ok_or("not a metric duplex exports")?
        }
    };
    for l in &r.labels {
        let known = family.labels.contains(l)
            || TARGET_LABELS.contains(&l.as_str())
            || extra.contains(&l.as_str());
        if !known {
            return Err(format!(
                "no label {l:?} (it has {:?}, plus {TARGET_LABELS:?} from the scrape)",
                family.labels
            ));
        }
    }
    Ok(())
}

/// The name prefixes checked: duplex's own, and the process collector's (Linux only).
fn prefixes() -> &'static [&'static str] {
    if cfg!(target_os = "linux") {
        &["duplex_", "process_"]
    } else {
        &["duplex_"]
    }
}

#[test]
fn the_name_checker_catches_what_it_should() {
    let families = exported();
    let expr = r#"sum by (route, le) (rate(duplex_websocket_handshake_duration_seconds_bucket{route!="duplex_x"}[$__rate_interval]))
        / on (job, instance) duplex_nope_total + duplex_backend_up{upstream=~"$upstream", colour="x"}
        + duplex_websocket_tunnel_duration_seconds + process_open_fds and ${duplex_var}"#;
    let found = refs(expr, &["duplex_", "process_"]);
    let names: Vec<&str> = found.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "duplex_websocket_handshake_duration_seconds_bucket",
            "duplex_nope_total",
            "duplex_backend_up",
            "duplex_websocket_tunnel_duration_seconds",
            "process_open_fds",
        ]
    );
    assert_eq!(found[0].labels, ["route"]);
    assert_eq!(found[2].labels, ["upstream", "colour"]);
    let verdicts: Vec<bool> = found.iter().map(|r| check(r, &families).is_ok()).collect();
    // Unknown metric, unknown label, bare histogram name: all refused.
    assert_eq!(
        verdicts,
        [true, false, false, false, cfg!(target_os = "linux")]
    );
}

#[test]
fn dashboard_and_rules_query_only_metrics_duplex_exports() {
    let families = exported();
    let rules = rule_queries(&yaml("prometheus/alerts.yml"));
    let d = dashboard();
    let panel_exprs = panel_queries(&d);
    let panels_with_queries = panels(&d)
        .iter()
        .filter(|p| p["targets"].as_array().is_some_and(|t| !t.is_empty()))
        .count();
    assert!(rules.len() >= 5, "only {} alert rules", rules.len());
    assert!(
        panels_with_queries >= 8,
        "only {panels_with_queries} dashboard panels with queries"
    );

    let mut errors = Vec::new();
    let mut seen = BTreeSet::new();
    let variables = variable_queries(&d);
    let all = rules.iter().chain(&panel_exprs).chain(&variables);
    let mut count = 0;
    for q in all {
        count += 1;
        for r in refs(&q.expr, prefixes()) {
            if let Err(e) = check(&r, &families) {
                errors.push(format!(
                    "{}: {}: {e}\n      in: {}",
                    q.place, r.name, q.expr
                ));
            }
            seen.insert(r.name);
        }
    }
    assert!(
        errors.is_empty(),
        "{} of the metric references in deploy/ are wrong:\n  {}",
        errors.len(),
        errors.join("\n  ")
    );
    // Not vacuous: the extraction found the metrics these files are about.
    let mut expected = vec![
        "duplex_websocket_tunnels_active",
        "duplex_websocket_upgrades_total",
        "duplex_websocket_handshake_duration_seconds_bucket",
        "duplex_tunnel_bytes_total",
        "duplex_http_requests_total",
        "duplex_backend_up",
        "duplex_config_reloads_total",
        "duplex_config_generation",
        "duplex_connections_active",
        "duplex_accept_errors_total",
        "duplex_connection_limit_waits_total",
    ];
    if cfg!(target_os = "linux") {
        expected.extend(["process_resident_memory_bytes", "process_open_fds"]);
    }
    let missing: Vec<_> = expected.iter().filter(|n| !seen.contains(**n)).collect();
    assert!(
        missing.is_empty(),
        "no query uses {missing:?}; found {seen:?}"
    );
    eprintln!(
        "{count} queries, {} distinct metrics, all exported by duplex",
        seen.len()
    );
}

#[test]
fn every_exported_metric_is_documented() {
    let path = root().join("docs/metrics.md");
    if !path.exists() {
        eprintln!(
            "note: {} does not exist yet: not checking that it documents every metric",
            path.display()
        );
        return;
    }
    let doc = read(&path);
    let missing: Vec<String> = exported()
        .into_keys()
        .filter(|n| !doc.contains(&format!("`{n}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/metrics.md does not mention (as `name`) {missing:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Shape of each file

#[test]
fn dashboard_is_well_formed() {
    let d = dashboard();
    assert_eq!(d["schemaVersion"], 39);
    assert!(d["uid"].as_str().is_some_and(|u| !u.is_empty()));

    let vars = d["templating"]["list"].as_array().expect("templating.list");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no templating variable {name:?}"))
    };
    let ds = var("datasource");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    let upstream = var("upstream");
    assert_eq!(upstream["type"], "query");
    let q = variable_queries(&d);
    assert!(
        q.iter().any(|q| q.place.contains("upstream")
            && q.expr == "label_values(duplex_http_requests_total{route!=\"\"}, upstream)"),
        "the upstream variable's query"
    );
    assert_eq!(upstream["datasource"]["uid"], "${datasource}");

    let mut ids = BTreeSet::new();
    let mut boxes: Vec<(String, [i64; 4])> = Vec::new();
    for p in panels(&d) {
        let title = p["title"].as_str().unwrap_or("?").to_owned();
        let kind = p["type"].as_str().unwrap_or_default();
        assert!(
            ["timeseries", "stat", "row"].contains(&kind),
            "panel {title:?}: type {kind:?}"
        );
        let id = p["id"]
            .as_i64()
            .unwrap_or_else(|| panic!("panel {title:?}: no id"));
        assert!(ids.insert(id), "panel id {id} used twice");
        let g = &p["gridPos"];
        let [x, y, w, h] = ["x", "y", "w", "h"].map(|k| {
            g[k].as_i64()
                .unwrap_or_else(|| panic!("panel {title:?}: gridPos.{k}"))
        });
        assert!(
            w > 0 && h > 0 && x >= 0 && y >= 0 && x + w <= 24,
            "panel {title:?}: gridPos {g}"
        );
        for (other, [ox, oy, ow, oh]) in &boxes {
            let overlap = x < ox + ow && ox < &(x + w) && y < oy + oh && oy < &(y + h);
            assert!(!overlap, "panels {title:?} and {other:?} overlap");
        }
        boxes.push((title.clone(), [x, y, w, h]));
        if kind == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "panel {title:?}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {title:?}: no targets");
        let mut refids = BTreeSet::new();
        for t in targets {
            assert!(
                refids.insert(t["refId"].to_string()),
                "panel {title:?}: refId twice"
            );
            assert_eq!(t["datasource"]["uid"], "${datasource}", "panel {title:?}");
        }
    }
}

#[test]
fn alert_rules_are_complete() {
    let rules = yaml("prometheus/alerts.yml");
    let group = rules["groups"]
        .as_sequence()
        .expect("groups")
        .iter()
        .find(|g| g["name"] == "duplex")
        .expect("a group named duplex");
    let mut names = BTreeSet::new();
    for r in group["rules"].as_sequence().expect("rules") {
        let name = r["alert"].as_str().expect("alerting rules only").to_owned();
        let severity = r["labels"]["severity"].as_str().unwrap_or_default();
        assert!(
            ["critical", "warning", "info"].contains(&severity),
            "{name}: severity {severity:?}"
        );
        for a in ["summary", "description"] {
            let text = r["annotations"][a].as_str().unwrap_or_default();
            assert!(
                text.len() > 20,
                "{name}: annotation {a} missing or too short"
            );
        }
        assert!(names.insert(name.clone()), "{name} twice");
    }
    for want in [
        "DuplexBackendDown",
        "DuplexUpstreamNoHealthyBackend",
        "DuplexReloadsFailing",
        "DuplexUpgradeErrorRatio",
        "DuplexAcceptErrors",
        "DuplexDown",
    ] {
        assert!(names.contains(want), "no alert {want}; have {names:?}");
    }
}

#[test]
fn prometheus_config_scrapes_the_admin_endpoint_and_loads_the_rules() {
    let cfg = yaml("prometheus/prometheus.yml");
    let job = cfg["scrape_configs"]
        .as_sequence()
        .expect("scrape_configs")
        .iter()
        .find(|j| j["job_name"] == "duplex")
        .expect("a scrape job named duplex");
    assert_eq!(job["scrape_interval"], "15s");
    assert!(
        job["metrics_path"].is_null() || job["metrics_path"] == "/metrics",
        "metrics_path {:?}",
        job["metrics_path"]
    );
    let admin = duplex_config::defaults::ADMIN_BIND.to_string();
    let targets: Vec<&str> = job["static_configs"]
        .as_sequence()
        .expect("static_configs")
        .iter()
        .flat_map(|s| s["targets"].as_sequence().into_iter().flatten())
        .filter_map(Yaml::as_str)
        .collect();
    assert!(
        targets.contains(&admin.as_str()),
        "targets {targets:?} should include duplex's default admin.bind {admin}"
    );

    // Prometheus resolves rule_files against the directory of the config file.
    let dir = deploy("prometheus");
    let files: Vec<PathBuf> = cfg["rule_files"]
        .as_sequence()
        .expect("rule_files")
        .iter()
        .map(|f| dir.join(f.as_str().expect("a path")))
        .collect();
    for f in &files {
        assert!(f.is_file(), "rule file {} does not exist", f.display());
    }
    let alerts = deploy("prometheus/alerts.yml")
        .canonicalize()
        .expect("alerts.yml");
    assert!(
        files
            .iter()
            .any(|f| f.canonicalize().ok().as_ref() == Some(&alerts)),
        "rule_files {files:?} does not load alerts.yml"
    );
}

/// The `[Service]` settings of the unit, every value of each key.
fn service_settings(unit: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut section = "";
    for line in unit.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') {
            section = line;
            continue;
        }
        if section == "[Service]" {
            let (k, v) = line.split_once('=').expect("KEY=VALUE");
            out.entry(k.to_owned()).or_default().push(v.to_owned());
        }
    }
    out
}

#[test]
fn systemd_unit_matches_duplex() {
    let unit = read(&deploy("systemd/duplex.service"));
    let s = service_settings(&unit);
    let one = |k: &str| -> &str {
        match s.get(k).map(Vec::as_slice) {
            Some([v]) => v,
            other => panic!("{k}: {other:?}"),
        }
    };
    assert_eq!(one("Type"), "simple");
    assert_eq!(
        one("ExecStart"),
        "/usr/local/bin/duplex run --config /etc/duplex/duplex.yaml --log-format json"
    );
    assert_eq!(one("ExecReload"), "/bin/kill -HUP $MAINPID");
    assert_eq!(one("KillSignal"), "SIGTERM");
    assert_eq!(one("Restart"), "on-failure");
    assert_eq!(one("LimitNOFILE"), "1048576");
    for (k, v) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("AmbientCapabilities", "CAP_NET_BIND_SERVICE"),
    ] {
        assert_eq!(one(k), v);
    }
    assert!(one("DynamicUser") == "yes" || s.contains_key("User"));
    // duplex needs shutdown_timeout, then about 2 s to close what is left and exit.
    let stop = one("TimeoutStopSec");
    let stop: u64 = stop
        .strip_suffix('s')
        .unwrap_or(stop)
        .parse()
        .expect("TimeoutStopSec in seconds");
    let drain = duplex_config::defaults::SHUTDOWN_TIMEOUT.as_secs();
    assert!(
        stop >= drain + 5,
        "TimeoutStopSec={stop}s leaves no room after shutdown_timeout {drain}s"
    );
}

// ---------------------------------------------------------------------------------------
// External checkers, when installed

/// How long one run of an external checker may take before it is killed and the test fails.
const TOOL_LIMIT: Duration = Duration::from_secs(60);

/// Runs `tool` in `dir` and collects its output, killing it (and failing) past
/// [`TOOL_LIMIT`]; `None` when it is not installed.
fn run(tool: &str, args: &[&str], dir: &Path) -> Option<Output> {
    let spawned = Command::new(tool)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("{tool}: {e}"),
    };
    // Read on threads, so that a chatty tool cannot fill a pipe and stall.
    let stdout = read_all(child.stdout.take());
    let stderr = read_all(child.stderr.take());
    const PAUSE: Duration = Duration::from_millis(20);
    let start = Instant::now();
    let mut status = None;
    for _ in 0..=TOOL_LIMIT.as_millis() / PAUSE.as_millis() {
        if let Some(s) = child.try_wait().expect("wait for the tool") {
            status = Some(s);
            break;
        }
        if start.elapsed() >= TOOL_LIMIT {
            break;
        }
        std::thread::sleep(PAUSE);
    }
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "{tool} {}: still running after {TOOL_LIMIT:?}, killed",
            args.join(" ")
        );
    };
    Some(Output {
        status,
        stdout: stdout.join().expect("the stdout reader"),
        stderr: stderr.join().expect("the stderr reader"),
    })
}

/// Reads `pipe` to its end on a thread of its own.
fn read_all<R: std::io::Read + Send + 'static>(
    pipe: Option<R>,
) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        buf
    })
}

/// Whether a missing checker must fail its test: CI (`.ci/run`) installs them all and sets
/// `DUPLEX_REQUIRE_TOOLS=1`; elsewhere a missing one is noted and its checks skipped.
fn tools_required() -> bool {
    std::env::var("DUPLEX_REQUIRE_TOOLS").is_ok_and(|v| v == "1")
}

/// Notes that `tool` is missing, or fails the test when tools are required.
#[track_caller]
fn missing_tool(tool: &str, install: &str) {
    assert!(
        !tools_required(),
        "{tool} is not on PATH and DUPLEX_REQUIRE_TOOLS=1: install it ({install})"
    );
    eprintln!(
        "note: {tool} is not on PATH: skipping its checks (CI installs it; locally: {install})"
    );
}

fn assert_ok(what: &str, out: &Output) {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what}: {}\n{text}", out.status);
    eprintln!("{what}: ok");
}

/// A scratch directory of this test process, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("duplex-deploy-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A dashboard query as plain PromQL: Grafana's variables replaced by sample values.
fn as_promql(expr: &str) -> String {
    let mut e = expr.to_owned();
    for (var, value) in [
        ("${__rate_interval}", "5m"),
        ("$__rate_interval", "5m"),
        ("${__interval}", "1m"),
        ("$__interval", "1m"),
        ("${__range}", "1h"),
        ("$__range", "1h"),
        ("${upstream}", ".*"),
        ("$upstream", ".*"),
    ] {
        e = e.replace(var, value);
    }
    assert!(
        !e.contains('$'),
        "a Grafana variable this test does not know: {expr}"
    );
    e
}

#[test]
fn promtool_accepts_the_rules_config_and_dashboard_queries() {
    let dir = deploy("prometheus");
    let Some(version) = run("promtool", &["--version"], &dir) else {
        missing_tool(
            "promtool",
            "apt-get install --no-install-recommends prometheus",
        );
        return;
    };
    assert_ok("promtool --version", &version);
    let promtool = |args: &[&str]| {
        let out = run("promtool", args, &dir).expect("promtool");
        assert_ok(&format!("promtool {}", args.join(" ")), &out);
    };
    promtool(&["check", "rules", "alerts.yml"]);
    promtool(&["test", "rules", "alerts_test.yml"]);
    promtool(&["check", "config", "prometheus.yml"]);

    // Every dashboard query, as a recording rule, so that promtool parses it.
    let rules: Vec<Json> = panel_queries(&dashboard())
        .iter()
        .enumerate()
        .map(|(i, q)| json!({ "record": format!("dashboard:query_{i}"), "expr": as_promql(&q.expr) }))
        .collect();
    let scratch = Scratch::new("promtool");
    let file = scratch.0.join("dashboard-queries.yml");
    let doc = json!({ "groups": [{ "name": "dashboard", "rules": rules }] });
    std::fs::write(&file, doc.to_string()).expect("write");
    promtool(&["check", "rules", file.to_str().expect("utf-8 path")]);
}

#[test]
fn systemd_analyze_verifies_the_unit() {
    // `verify` wants the ExecStart binary to exist: check a copy that runs /bin/true.
    let unit = read(&deploy("systemd/duplex.service"));
    let scratch = Scratch::new("systemd");
    let copy = scratch.0.join("duplex.service");
    std::fs::write(&copy, unit.replace("/usr/local/bin/duplex", "/bin/true")).expect("write");
    let path = copy.to_str().expect("utf-8 path");
    let Some(out) = run("systemd-analyze", &["verify", path], &scratch.0) else {
        missing_tool(
            "systemd-analyze",
            "apt-get install --no-install-recommends systemd",
        );
        return;
    };
    assert_ok("systemd-analyze verify", &out);
    // Unknown keys are only warnings, and leave the exit status at 0.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let about_unit: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("duplex.service"))
        .collect();
    assert!(
        about_unit.is_empty(),
        "systemd-analyze verify:\n{}",
        about_unit.join("\n")
    );
}
