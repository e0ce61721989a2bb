//! The Markdown documentation's relative links lead somewhere: every link or
//! image in a `*.md` file of the repository (README.md, docs/, fuzz/, ...;
//! not target/ or .venv/) that is not a URL names a file that exists inside
//! the repository, and its `#anchor`, if any, is a heading of that file, as
//! GitHub renders it (lowercase, spaces to '-', punctuation other than '-'
//! and '_' dropped, '-1', '-2' after repeats).

use std::collections::HashSet;
use std::fs;
use std::path::{Component, Path, PathBuf};

#[test]
fn relative_links_and_anchors_in_markdown_resolve() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let files = markdown_files(root);
    assert!(files.iter().any(|f| f.ends_with("README.md")), "no README.md found under {}", root.display());
    let mut broken = Vec::new();
    for file in &files {
        let text = fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        for link in links(&text) {
            if let Err(problem) = check(root, file, &link.target) {
                let shown = file.strip_prefix(root).unwrap_or(file).display();
                broken.push(format!("{shown}:{}: ({}) {problem}", link.line, link.target));
            }
        }
    }
    assert!(broken.is_empty(), "{} broken link(s) in Markdown files:\n{}", broken.len(), broken.join("\n"));
}

/// Every `*.md` file below `root`, skipping build output, virtualenvs and
/// hidden folders (.git, .venv, .cargo).
fn markdown_files(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(kind) = entry.file_type() else { continue };
            if kind.is_dir() {
                let skipped = name.starts_with('.')
                    || name == "target"
                    || name.starts_with("mutants.out")
                    || name == "node_modules"
                    || name == "__pycache__";
                if !skipped {
                    pending.push(path);
                }
            } else if kind.is_file() && name.ends_with(".md") {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

#[derive(Debug, PartialEq)]
struct Link {
    line: usize,
    target: String,
}

/// The targets of inline links and images (`[text](target)`,
/// `![alt](target "title")`) and of reference definitions (`[name]: target`),
/// outside fenced code blocks and code spans.
fn links(text: &str) -> Vec<Link> {
    let mut found = Vec::new();
    for (number, line) in outside_fences(text) {
        let line_text = without_code_spans(line);
        let mut push = |target: &str| {
            let target = target.trim().trim_start_matches('<').trim_end_matches('>');
            if !target.is_empty() {
                found.push(Link { line: number + 1, target: target.to_string() });
            }
        };
        // Reference definitions: `[name]: target`.
        let definition = line_text.trim_start();
        if definition.starts_with('[')
            && let Some(end) = definition.find("]:")
            && !definition[..end].contains('(')
        {
            push(definition[end + 2..].split_whitespace().next().unwrap_or(""));
            continue;
        }
        let mut rest = line_text.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let Some(close) = closing_paren(after) else { break };
            let inside = &after[..close];
            // A title after the target: `(target "title")`.
            push(inside.split_once(" \"").map_or(inside, |(target, _)| target));
            rest = &after[close + 1..];
        }
    }
    found
}

/// The lines of `text` outside fenced code blocks, with their index.
fn outside_fences(text: &str) -> impl Iterator<Item = (usize, &str)> {
    let mut fence: Option<&str> = None;
    text.lines().enumerate().filter(move |(_, line)| {
        let trimmed = line.trim_start();
        if let Some(open) = fence {
            if trimmed.starts_with(open) {
                fence = None;
            }
            return false;
        }
        if trimmed.starts_with("```") || trimmed.starts_with("~~~") {
            fence = Some(&trimmed[..3]);
            return false;
        }
        true
    })
}

/// Where the link target that `text` starts with ends: its closing
/// parenthesis, nested pairs allowed.
fn closing_paren(text: &str) -> Option<usize> {
    let mut depth = 0usize;
    for (at, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' if depth == 0 => return Some(at),
            ')' => depth -= 1,
            _ => {}
        }
    }
    None
}

/// `line` with every code span (text between backticks) taken out.
fn without_code_spans(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(open) = rest.find('`') {
        out.push_str(&rest[..open]);
        let ticks = rest[open..].chars().take_while(|&c| c == '`').count();
        let after = &rest[open + ticks..];
        match after.find(&"`".repeat(ticks)) {
            Some(close) => rest = &after[close + ticks..],
            None => {
                rest = after;
                break;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Whether `target`, a link found in `file`, resolves.
fn check(root: &Path, file: &Path, target: &str) -> Result<(), String> {
    if is_url(target) {
        return Ok(());
    }
    let (path, anchor) = match target.split_once('#') {
        Some((path, anchor)) => (path, Some(anchor)),
        None => (target, None),
    };
    let path = path.split_once('?').map_or(path, |(path, _)| path);
    let linked = if path.is_empty() {
        file.to_path_buf()
    } else if path.starts_with('/') {
        return Err("an absolute path: write it relative to the file".into());
    } else {
        let joined = normalize(&file.parent().unwrap().join(path));
        if !joined.starts_with(root) {
            return Err("leads outside the repository".into());
        }
        joined
    };
    if !linked.exists() {
        return Err("no such file".into());
    }
    let Some(anchor) = anchor else { return Ok(()) };
    if linked.is_dir() || linked.extension().is_none_or(|e| e != "md") {
        return Err("an anchor on something that is not a Markdown file".into());
    }
    let text = fs::read_to_string(&linked).map_err(|e| e.to_string())?;
    if anchors(&text).contains(anchor) { Ok(()) } else { Err(format!("no heading with anchor #{anchor}")) }
}

fn is_url(target: &str) -> bool {
    let scheme: String = target.chars().take_while(|c| c.is_ascii_alphanumeric() || "+-.".contains(*c)).collect();
    !scheme.is_empty() && target[scheme.len()..].starts_with(':')
}

/// `path` with `.` and `..` resolved, without touching the file system.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// The anchors GitHub gives a Markdown file's headings (outside code fences),
/// plus explicit `<a name="...">` / `id="..."` ones.
fn anchors(text: &str) -> HashSet<String> {
    let mut seen = HashSet::new();
    for (_, line) in outside_fences(text) {
        for marker in ["name=\"", "id=\""] {
            let mut rest = line;
            while let Some(at) = rest.find(marker) {
                let value = &rest[at + marker.len()..];
                let end = value.find('"').unwrap_or(value.len());
                seen.insert(value[..end].to_string());
                rest = &value[end..];
            }
        }
        let hashes = line.chars().take_while(|&c| c == '#').count();
        if (1..=6).contains(&hashes) && line[hashes..].starts_with(' ') {
            let base = slug(line[hashes..].trim().trim_end_matches('#').trim());
            let mut anchor = base.clone();
            let mut repeat = 0;
            while seen.contains(&anchor) {
                repeat += 1;
                anchor = format!("{base}-{repeat}");
            }
            seen.insert(anchor);
        }
    }
    seen
}

/// GitHub's anchor for a heading: the text as rendered (links become their
/// text), lowercased, with every character but letters, digits, spaces, '-'
/// and '_' dropped and spaces turned into '-'.
fn slug(heading: &str) -> String {
    let mut rendered = String::new();
    let mut rest = heading;
    while let Some(at) = rest.find("](") {
        let Some(close) = closing_paren(&rest[at + 2..]) else { break };
        rendered.push_str(&rest[..at]);
        rest = &rest[at + 2 + close + 1..];
    }
    rendered.push_str(rest);
    rendered
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

#[test]
fn slugs_follow_github() {
    assert_eq!(slug("Durability: exactly what is guaranteed"), "durability-exactly-what-is-guaranteed");
    assert_eq!(slug("`config.json`"), "configjson");
    assert_eq!(slug("Metrics, health and the live web view"), "metrics-health-and-the-live-web-view");
    assert_eq!(slug("Hostile input & bounded_resources"), "hostile-input--bounded_resources");
    assert_eq!(slug("See [the guide](docs/using.md) now"), "see-the-guide-now");
    let text = "# Raft\n## Status\n```sh\n# not a heading\n```\n## Status\n";
    let found = anchors(text);
    assert!(found.contains("raft") && found.contains("status") && found.contains("status-1"));
    assert!(!found.contains("not-a-heading"));
}

#[test]
fn links_outside_code_are_found() {
    let text = "See [a](docs/a.md#x) and ![img](p.png \"title\"), not `[b](c.md)`.\n\
                ```\n[d](e.md)\n```\n[ref]: other.md\nA URL [u](https://example.com).";
    let targets: Vec<String> = links(text).into_iter().map(|l| l.target).collect();
    assert_eq!(targets, ["docs/a.md#x", "p.png", "other.md", "https://example.com"]);
}

#[test]
fn a_broken_link_or_anchor_is_reported() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = root.join("README.md");
    assert!(check(root, &readme, "Cargo.toml").is_ok());
    assert!(check(root, &readme, "#raft-zmq").is_ok());
    assert_eq!(check(root, &readme, "no/such/file.md"), Err("no such file".to_string()));
    assert!(check(root, &readme, "#no-such-heading").unwrap_err().contains("no heading"));
    assert!(check(root, &readme, "../outside.md").unwrap_err().contains("outside"));
    assert!(check(root, &readme, "https://example.com/#whatever").is_ok());
}
