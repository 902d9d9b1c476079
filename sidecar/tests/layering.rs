//! The sidecar's layers, checked on its source: every module imports (a `crate::`, `super::`
//! or `self::` path in code; comments, literals and `#[cfg(test)]` items left out) only from
//! its own layer or a lower one, the imports between modules form no cycle, and the rate
//! limiter names no `http::` or `hyper::` item. A scan of `src/**/*.rs`, so it costs no
//! dependency; `cargo test --test layering -- --nocapture` prints the modules of each layer.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Lowest layer first: (name, modules). A module is in the layer of the longest entry that is
/// its path or an ancestor of it; a module in no layer fails the test (give it one).
const LAYERS: &[(&str, &str)] = &[
    (
        "foundation",
        "crate error usage readiness memory_limit open_files heap cache",
    ),
    (
        "decisions and the engine, no HTTP answers",
        "auth limits engine route",
    ),
    ("admission and request metrics", "admit metrics"),
    ("the OpenAI protocol", "openai"),
    ("answers and forwarding", "stream forward"),
    ("serving", "http reload"),
    ("process", "app activate cli preflight model"),
];

/// Modules that know no HTTP: no `http::` or `hyper::` path in their code (the rate limiter
/// carries a refusal's cause; `openai` turns it into a status and headers).
const NO_HTTP: &[&str] = &["auth", "limits", "cache"];

fn layer(module: &str) -> usize {
    let under = |entry: &str| module == entry || module.starts_with(&format!("{entry}::"));
    let entries = LAYERS
        .iter()
        .enumerate()
        .flat_map(|(i, (_, modules))| modules.split_whitespace().map(move |m| (i, m)));
    let best = entries
        .filter(|(_, m)| under(m))
        .max_by_key(|(_, m)| m.len());
    best.unwrap_or_else(|| panic!("module {module} is in no layer: add it to LAYERS"))
        .0
}

/// `src/a/b.rs` → `a::b`; `src/lib.rs` → `crate`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file
        .strip_prefix(src)
        .expect("under src")
        .with_extension("");
    let segments: Vec<String> = rel.iter().map(|s| s.to_string_lossy().into()).collect();
    match segments.as_slice() {
        [lib] if lib == "lib" => "crate".to_owned(),
        [parent @ .., last] if last == "mod" => parent.join("::"),
        _ => segments.join("::"),
    }
}

/// `text` without comments and without the contents of string and char literals.
fn strip(text: &str) -> String {
    let (b, mut out, mut i) = (text.as_bytes(), String::new(), 0);
    let ident = |j: usize| j > 0 && (b[j - 1].is_ascii_alphanumeric() || b[j - 1] == b'_');
    while i < b.len() {
        let rest = &text[i..];
        let raw_hashes = rest.strip_prefix('r').and_then(|r| {
            let n = r.find(|c| c != '#')?;
            (r[n..].starts_with('"') && !ident(i)).then_some(n)
        });
        if rest.starts_with("//") {
            i += rest.find('\n').unwrap_or(rest.len());
        } else if rest.starts_with("/*") {
            i += rest.find("*/").map_or(rest.len(), |e| e + 2);
        } else if let Some(n) = raw_hashes {
            let close = format!("\"{}", "#".repeat(n));
            i += 2
                + n
                + rest[2 + n..]
                    .find(&close)
                    .map_or(rest.len(), |e| e + close.len());
            out.push_str("\"\"");
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if rest.starts_with("'\\") {
            i += 3 + rest[3..].find('\'').map_or(0, |e| e + 1); // '\n', '\'', '\u{..}'
        } else if b[i] == b'\'' && b.get(i + 2) == Some(&b'\'') {
            i += 3; // 'x'; a lifetime ('a) stays
        } else {
            let len = rest.chars().next().map_or(1, char::len_utf8);
            out.push_str(&rest[..len]);
            i += len;
        }
    }
    out
}

/// `code` without its `#[cfg(test)]` items; the names of `#[cfg(test)] mod x;` go to
/// `test_mods`.
fn without_tests(code: &str, test_mods: &mut Vec<String>) -> String {
    let mut out = String::new();
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let item = &rest[at + "#[cfg(test)]".len()..];
        let head = item.find([';', '{']).unwrap_or(item.len());
        if let Some(name) = item[..head].trim().strip_prefix("mod ") {
            test_mods.push(name.trim().to_owned());
        }
        let mut depth = 0;
        let end = item[head..].char_indices().find_map(|(j, c)| {
            depth += match c {
                '{' => 1,
                '}' => -1,
                _ => 0,
            };
            (depth == 0).then_some(head + j + 1)
        });
        rest = &item[end.unwrap_or(item.len())..];
    }
    out.push_str(rest);
    out
}

/// Every path of the use tree (or plain path) at the start of `s`, braces expanded, each
/// after `prefix`.
fn paths(s: &str, prefix: &str, out: &mut Vec<String>) {
    let s = s.trim_start();
    let is_path = |c: char| c.is_alphanumeric() || c == '_' || c == ':' || c.is_whitespace();
    let end = s.find(|c| !is_path(c)).unwrap_or(s.len());
    let path: String = format!("{prefix}{}", &s[..end])
        .split_whitespace()
        .collect();
    if !s[end..].starts_with('{') {
        out.push(path.trim_end_matches(':').to_owned());
        return;
    }
    let (mut depth, mut start) = (0, end + 1);
    for (j, c) in s.char_indices().skip_while(|(j, _)| *j < end) {
        match c {
            '{' => depth += 1,
            ',' | '}' if depth == 1 => {
                // A trailing comma leaves an empty item, which names nothing.
                if !s[start..j].trim().is_empty() {
                    paths(&s[start..j], &path, out);
                }
                start = j + 1;
            }
            _ => {}
        }
        if c == '}' {
            depth -= 1;
            if depth == 0 {
                return;
            }
        }
    }
}

/// Each module's source (test-only modules left out), by module path.
fn sources(src: &Path) -> BTreeMap<String, (PathBuf, String)> {
    let mut files = Vec::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("reads src") {
            let p = entry.expect("entry").path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|e| e == "rs") && !p.ends_with("src/main.rs") {
                files.push(p); // main.rs is the binary: it imports `sluice_sidecar::`
            }
        }
    }
    let (mut out, mut test_only) = (BTreeMap::new(), Vec::new());
    for file in files {
        let module = module_of(src, &file);
        let mut test_mods = Vec::new();
        let text = std::fs::read_to_string(&file).expect("reads");
        let code = without_tests(&strip(&text), &mut test_mods);
        let parent = if module == "crate" {
            String::new()
        } else {
            format!("{module}::")
        };
        test_only.extend(test_mods.iter().map(|t| format!("{parent}{t}")));
        out.insert(module, (file, code));
    }
    out.retain(|m, _| {
        !test_only
            .iter()
            .any(|t| m == t || m.starts_with(&format!("{t}::")))
    });
    out
}

#[test]
fn imports_go_down_the_layers_and_form_no_cycle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let modules = sources(&root.join("src"));
    let mut graph: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    let mut wrong = Vec::new();
    for (module, (file, code)) in &modules {
        graph.entry(module).or_default();
        let own: Vec<&str> = module.split("::").filter(|s| *s != "crate").collect();
        for (at, _) in code.match_indices("::") {
            let before = &code[..at];
            let Some(head) = ["crate", "super", "self"].into_iter().find(|k| {
                before.ends_with(k)
                    && !before[..at - k.len()]
                        .ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == ':')
            }) else {
                continue;
            };
            let mut found = Vec::new();
            paths(&code[at + 2..], "", &mut found);
            for path in found {
                let mut base = match head {
                    "crate" => vec![],
                    "self" => own.clone(),
                    _ => own[..own.len().saturating_sub(1)].to_vec(),
                };
                let mut rest = path.split("::").filter(|s| !s.is_empty()).peekable();
                while rest.next_if_eq(&"super").is_some() {
                    base.pop();
                }
                let full: Vec<&str> = base.into_iter().chain(rest).collect();
                // The longest prefix that is a module; the crate root when none is.
                let target = (1..=full.len())
                    .rev()
                    .map(|n| full[..n].join("::"))
                    .find(|m| modules.contains_key(m))
                    .unwrap_or_else(|| "crate".to_owned());
                let (target, _) = modules.get_key_value(&target).expect("a module");
                if target == module {
                    continue;
                }
                graph.entry(module).or_default().insert(target);
                if layer(target) > layer(module) {
                    let (to, from) = (layer(target), layer(module));
                    wrong.push(format!(
                        "{}: `{head}::{path}` imports {target} (layer {to}, {}) into {module} \
                         (layer {from}, {})",
                        file.strip_prefix(root).unwrap_or(file).display(),
                        LAYERS[to].0,
                        LAYERS[from].0,
                    ));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports must go down the layers of tests/layering.rs:\n{}",
        wrong.join("\n")
    );

    // Depth first: a module met again while it is on the path closes a cycle.
    fn visit<'a>(
        m: &'a str,
        graph: &BTreeMap<&'a str, BTreeSet<&'a str>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) {
        if let Some(i) = path.iter().position(|p| *p == m) {
            panic!("import cycle: {} → {m}", path[i..].join(" → "));
        }
        if done.insert(m) {
            path.push(m);
            graph[m].iter().for_each(|n| visit(n, graph, path, done));
            path.pop();
        }
    }
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        visit(m, &graph, &mut Vec::new(), &mut done);
    }

    for (i, (name, _)) in LAYERS.iter().enumerate() {
        let members: Vec<&str> = graph.keys().copied().filter(|m| layer(m) == i).collect();
        println!("{i} {name}: {}", members.join(", "));
    }
    let imports: usize = graph.values().map(BTreeSet::len).sum();
    println!(
        "{} modules, {imports} imports between them, none up a layer, no cycle",
        graph.len()
    );
}

#[test]
fn the_rate_limiter_knows_no_http() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let modules = sources(&root.join("src"));
    let mut wrong = Vec::new();
    for (module, (file, code)) in &modules {
        let pure = NO_HTTP
            .iter()
            .any(|m| module == m || module.starts_with(&format!("{m}::")));
        if !pure {
            continue;
        }
        for krate in ["http", "hyper"] {
            let needle = format!("{krate}::");
            for (at, _) in code.match_indices(&needle) {
                let before = code[..at].chars().next_back();
                if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                    continue; // e.g. `some_http::`
                }
                let start = code[..at].rfind('\n').map_or(0, |i| i + 1);
                let end = code[at..].find('\n').map_or(code.len(), |i| at + i);
                wrong.push(format!(
                    "{}: `{}` in {module}",
                    file.strip_prefix(root).unwrap_or(file).display(),
                    code[start..end].trim()
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{NO_HTTP:?} must not name HTTP types:\n{}",
        wrong.join("\n")
    );
    println!("{NO_HTTP:?}: no http:: or hyper:: path");
}
