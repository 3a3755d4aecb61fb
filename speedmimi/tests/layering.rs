//! The one-way house: lower layers do not import upper ones. Read from the source: every
//! `crate::<module>` a file names (in `use` lines, braced groups and paths alike, comments
//! aside) must be allowed for the directory the file is in.
//!
//! - `datapath/` (the kernel layer) takes kernel-shaped plans and names only `config`;
//! - `balance/` picks among backends and knows nothing of routing state or the proxy;
//! - `backend` and `upstream/` (a backend, its record and its connections) sit below the proxy,
//!   the routing state and the health checker.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

/// What the files under one directory (or one file) of src/ may name.
struct Rule {
    dir: &'static str,
    /// The only crate modules allowed; None: any but `denied`.
    allowed: Option<&'static [&'static str]>,
    denied: &'static [&'static str],
}

const RULES: &[Rule] = &[
    Rule { dir: "datapath", allowed: Some(&["config"]), denied: &[] },
    Rule { dir: "balance", allowed: None, denied: &["state", "proxy", "steering", "admin", "health", "datapath"] },
    Rule { dir: "backend.rs", allowed: None, denied: UPPER },
    Rule { dir: "backend", allowed: None, denied: UPPER },
    Rule { dir: "upstream", allowed: None, denied: UPPER },
];

/// What a backend and its connections must not name.
const UPPER: &[&str] = &["state", "proxy", "balance", "steering", "admin", "health", "datapath"];

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    if dir.is_file() {
        return vec![dir.to_owned()];
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

/// The crate's top-level modules a source text names through `crate::`.
fn crate_modules(source: &str) -> BTreeSet<String> {
    let code: String = source.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n");
    let ident = |s: &str| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>();
    let mut out = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level items of the braced group.
            let (mut depth, mut start) = (0, 0);
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        out.insert(ident(group[start..i].trim()));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.insert(ident(group[start..i].trim()));
                        start = i + 1;
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(ident(rest));
        }
    }
    out.retain(|m| !m.is_empty());
    out
}

#[test]
fn lower_layers_do_not_import_upper_ones() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut broken = Vec::new();
    for Rule { dir, allowed, denied } in RULES {
        let files = rust_files(&src.join(dir));
        assert!(!files.is_empty(), "no sources under src/{dir}");
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            for m in crate_modules(&text) {
                let ok = allowed.is_none_or(|a| a.contains(&m.as_str())) && !denied.contains(&m.as_str());
                if !ok {
                    broken.push(format!("{} names crate::{m}", file.strip_prefix(&src).unwrap().display()));
                }
            }
        }
    }
    assert!(broken.is_empty(), "imports against the layering rules:\n{}", broken.join("\n"));
}

#[test]
fn the_reader_finds_grouped_and_path_imports() {
    let text = "use crate::{config::{A, B}, state::Upstream};\n// crate::proxy in a comment\nlet x = crate::backend::Backend::new();\nuse crate::datapath;";
    let found: Vec<String> = crate_modules(text).into_iter().collect();
    assert_eq!(found, ["backend", "config", "datapath", "state"]);
}
