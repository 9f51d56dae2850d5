//! Every YAML example in the README and docs/ that is a whole configuration (or a whole
//! `upstreams:` section) is one duplex accepts: an operator copies them as they are.

use std::path::{Path, PathBuf};

use duplex_config::Config;

/// A listener and a catch-all route put in front of an example that only shows
/// `upstreams:`; the route uses the example's first upstream.
fn complete(block: &str) -> Option<String> {
    let top = |key: &str| block.lines().any(|l| l.starts_with(key));
    if top("listeners:") {
        return Some(block.to_owned());
    }
    if !top("upstreams:") || top("routes:") {
        return None;
    }
    let first = block
        .lines()
        .skip_while(|l| !l.starts_with("upstreams:"))
        .find_map(|l| l.trim_start().strip_prefix("- name:"))?
        .split('#')
        .next()?
        .trim()
        .to_owned();
    Some(format!(
        "listeners:\n  - name: l\n    bind: 127.0.0.1:1\nroutes:\n  - name: r\n    upstream: {first}\n{block}"
    ))
}

/// The ```yaml blocks of a Markdown file, with the line each starts on.
fn yaml_blocks(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (no, line) in text.lines().enumerate() {
        match current.as_mut() {
            None if line.trim_start() == "```yaml" => current = Some((no + 2, String::new())),
            None => {}
            Some(_) if line.trim_start() == "```" => out.extend(current.take()),
            Some((_, block)) => {
                block.push_str(line);
                block.push('\n');
            }
        }
    }
    out
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn the_documented_examples_are_accepted() {
    let mut files = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("docs/")
        .map(|e| e.expect("a docs/ entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    let (mut checked, mut wrong) = (0, Vec::new());
    for file in &files {
        let text = std::fs::read_to_string(file).expect("readable");
        for (line, block) in yaml_blocks(&text) {
            let Some(config) = complete(&block) else {
                continue;
            };
            checked += 1;
            // TLS files are named, not read, by the parse: the examples' paths need not exist.
            if let Err(e) = Config::parse(&config, "example.yaml") {
                wrong.push(format!("{}:{line}: {e}", file.display()));
            }
        }
    }
    assert!(wrong.is_empty(), "refused examples:\n{}", wrong.join("\n"));
    // The docs hold a dozen or so whole examples; finding none means the walk broke.
    assert!(checked >= 5, "only {checked} examples found");
}
