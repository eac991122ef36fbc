//! The module map of `lib.rs`'s `# Layout`, checked: every module sits on a
//! floor, imports only from floors below its own, and the primary wing and
//! the secondary wing never import each other (they meet in `wire` and the
//! generated `proto`). Reads the sources, so a new upward import fails here
//! before it becomes a cycle.

use std::collections::BTreeSet;
use std::path::Path;

/// Which side of a pair a module belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wing {
    Primary,
    Secondary,
    Shared,
}

/// (module, floor, wing), top floor first. Keep in step with `lib.rs`.
const MAP: &[(&str, u32, Wing)] = &[
    ("cli", 90, Wing::Shared),
    ("daemon", 80, Wing::Shared),
    ("roles", 75, Wing::Shared),
    ("control", 70, Wing::Shared),
    ("replicate", 60, Wing::Primary),
    ("datastore", 50, Wing::Primary),
    ("tracking", 40, Wing::Primary),
    ("journal", 30, Wing::Primary),
    ("mirror", 60, Wing::Secondary),
    ("replica", 50, Wing::Secondary),
    ("points", 40, Wing::Secondary),
    ("fs", 20, Wing::Shared),
    ("object", 18, Wing::Shared),
    ("tls", 16, Wing::Shared),
    ("auth", 15, Wing::Shared),
    ("throttle", 12, Wing::Shared),
    ("qcow2", 12, Wing::Shared),
    ("block", 12, Wing::Shared),
    ("wire", 12, Wing::Shared),
    ("state", 12, Wing::Shared),
    ("workers", 11, Wing::Shared),
    ("ids", 10, Wing::Shared),
    ("error", 10, Wing::Shared),
    ("sys", 10, Wing::Shared),
];

fn place(module: &str) -> (u32, Wing) {
    MAP.iter()
        .find(|(m, ..)| *m == module)
        .map(|&(_, floor, wing)| (floor, wing))
        .unwrap_or_else(|| panic!("module `{module}` is not on the map in tests/layers.rs"))
}

/// The crate modules a source file names (`crate::x`, `crate::{x, y::z}`),
/// test code excluded.
fn imports(text: &str) -> BTreeSet<String> {
    let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut found = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + 7..];
        match rest.strip_prefix('{') {
            Some(group) => {
                // Top-level items of the group: split on commas outside braces.
                let mut depth = 0;
                let mut start = 0;
                for (i, c) in group.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => {
                            found.insert(ident(&group[start..i]));
                            break;
                        }
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            found.insert(ident(&group[start..i]));
                            start = i + 1;
                        }
                        _ => {}
                    }
                }
            }
            None => {
                found.insert(ident(rest));
            }
        }
    }
    found.retain(|m| !m.is_empty() && m != "proto");
    found
}

fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn no_module_imports_a_floor_above_its_own_or_the_other_wing() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut wrong = Vec::new();
    for file in files {
        let rel = file.strip_prefix(&src).expect("below src");
        let top = rel.iter().next().and_then(|c| c.to_str()).expect("utf-8");
        let module = top.trim_end_matches(".rs");
        let name = rel.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if matches!(module, "lib" | "main") || name.ends_with("_tests.rs") {
            continue;
        }
        let (floor, wing) = place(module);
        let text = std::fs::read_to_string(&file).expect("read source");
        for used in imports(&text) {
            if used == module {
                continue;
            }
            let (their_floor, their_wing) = place(&used);
            let crosses = wing != Wing::Shared && their_wing != Wing::Shared && wing != their_wing;
            if their_floor >= floor || crosses {
                wrong.push(format!("{} imports {used}", rel.display()));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the module map:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn grouped_and_nested_imports_are_seen() {
    let found = imports(
        "use crate::{error::Result, ids::{FileId, Epoch}, state};\nfn f() { crate::sys::x(); }",
    );
    let names: Vec<&str> = found.iter().map(String::as_str).collect();
    assert_eq!(names, ["error", "ids", "state", "sys"]);
}
