//! The module rules that the `//!` docs state, enforced: each top-level module of `src/`
//! says `Depends on: …` (the other modules of the crate it may import; "nothing of this
//! crate" for none) and may say `Never uses: …` (external crates it must not touch: the
//! tunnel knows nothing of Kubernetes, the controllers nothing of websockets). This test reads
//! every source file and fails, naming the file and line, when code imports what its module's
//! doc forbids, or when a module has no such doc.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The words of a doc line `//! <label>: a, b and c.` up to the first period or parenthesis.
fn listed(doc: &str, label: &str) -> Option<BTreeSet<String>> {
    let start = doc.find(&format!("{label}:"))? + label.len() + 1;
    let rest = &doc[start..];
    let end = rest.find(['.', '(']).unwrap_or(rest.len());
    let list = rest[..end]
        .replace("//!", " ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace(" and ", ",");
    if list.trim().starts_with("nothing") {
        return Some(BTreeSet::new());
    }
    Some(
        list.split(',')
            .map(|w| w.trim().to_string())
            .filter(|w| !w.is_empty())
            .collect(),
    )
}

fn module_doc(root: &Path) -> String {
    std::fs::read_to_string(root)
        .unwrap()
        .lines()
        .take_while(|l| l.starts_with("//!"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn rust_files(path: &Path) -> Vec<PathBuf> {
    if path.is_file() {
        return vec![path.to_path_buf()];
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

/// `crate::name` paths and uses of the external crates `names` in code (comments skipped).
fn violations(
    file: &Path,
    module: &str,
    allowed: &BTreeSet<String>,
    never: &BTreeSet<String>,
) -> Vec<String> {
    let text = std::fs::read_to_string(file).unwrap();
    let mut found = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or_default();
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let name: String = rest[at + 7..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if name != module && !allowed.contains(&name) {
                found.push(format!(
                    "{}:{}: `crate::{name}` (its doc allows {allowed:?})",
                    file.display(),
                    number + 1
                ));
            }
            rest = &rest[at + 7..];
        }
        for external in never {
            let used = code
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .any(|token| token == external || token.starts_with(&format!("{external}::")));
            if used {
                found.push(format!(
                    "{}:{}: uses `{external}`, which its module's doc forbids",
                    file.display(),
                    number + 1
                ));
            }
        }
    }
    found
}

#[test]
fn modules_import_only_what_their_docs_allow() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    let modules: Vec<String> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("pub mod "))
        .map(|l| l.trim_end_matches(';').to_string())
        .collect();
    assert!(modules.len() >= 10, "modules in lib.rs: {modules:?}");
    let mut problems = Vec::new();
    for module in &modules {
        // A module is `name/mod.rs`, or `name.rs` with its submodules in `name/`, or `name.rs`.
        let (paths, root) = if src.join(module).join("mod.rs").is_file() {
            (vec![src.join(module)], src.join(module).join("mod.rs"))
        } else {
            let file = src.join(format!("{module}.rs"));
            let mut paths = vec![file.clone()];
            if src.join(module).is_dir() {
                paths.push(src.join(module));
            }
            (paths, file)
        };
        let doc = module_doc(&root);
        let Some(allowed) = listed(&doc, "Depends on") else {
            problems.push(format!("{}: no `//! Depends on: …` line", root.display()));
            continue;
        };
        for name in &allowed {
            if !modules.contains(name) {
                problems.push(format!(
                    "{}: `Depends on` names `{name}`, not a module",
                    root.display()
                ));
            }
        }
        let never = listed(&doc, "Never uses").unwrap_or_default();
        for file in paths.iter().flat_map(|p| rust_files(p)) {
            problems.extend(violations(&file, module, &allowed, &never));
        }
    }
    // Every module is listed in the crate's layout doc.
    for module in &modules {
        assert!(
            lib.contains(&format!("[`{module}`]")),
            "lib.rs's layout doc does not mention `{module}`"
        );
    }
    assert!(
        problems.is_empty(),
        "module rules broken:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_rule_reader_sees_what_the_docs_say() {
    let doc =
        "//! Depends on: crd, render and\n//! relay. More text.\n//! Never uses: kube (none).";
    let deps = listed(doc, "Depends on").unwrap();
    assert_eq!(deps, ["crd", "relay", "render"].map(String::from).into());
    assert_eq!(
        listed(doc, "Never uses").unwrap(),
        ["kube"].map(String::from).into()
    );
    assert_eq!(
        listed("//! Depends on: nothing of this crate.", "Depends on").unwrap(),
        BTreeSet::new()
    );
    // A forbidden path is found; the module itself and comments are not.
    let dir = std::env::temp_dir().join(format!("architecture-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("x.rs");
    std::fs::write(
        &file,
        "use crate::x::y;\n// crate::hub in a comment\nuse crate::hub::api;\nuse kube::Api;\n",
    )
    .unwrap();
    let found = violations(&file, "x", &BTreeSet::new(), &["kube".to_string()].into());
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(found[0].contains("crate::hub"), "{found:?}");
    assert!(found[1].contains("kube"), "{found:?}");
}
