//! Module dependencies go one way: no two files of `src/` may depend on each
//! other, directly or through others. A file depends on the module a
//! `crate::`, `super::` or `self::` path in it names (grouped `use` lines
//! included; tests modules after `#[cfg(test)]` are not read). A parent
//! `mod.rs` naming its children by their bare name (`pub use loader::X`) is
//! not an edge: a facade over its children is the one allowed way up.
//!
//! The check lists each strongly connected component of more than one file
//! with the paths that tie it; `KNOWN_CYCLES` names the ones still to break.

#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Cycles that exist and are to be broken, each as the set of files (under
/// `src/`) a found cycle may be part of. Remove an entry once its cycle is
/// gone (the test prints when an entry no longer matches anything).
const KNOWN_CYCLES: &[&[&str]] = &[
    // None: the engine's cycle (store, slice, loader and snapshot importing
    // each other) was broken by moving the shared data types down, into
    // `engine/slice.rs` and `engine/options.rs`.
];

/// One dependency of a file on a module, with where it is written.
#[derive(Debug, Clone)]
struct Edge {
    to: usize,
    evidence: String,
}

struct Graph {
    /// Files relative to the source root, `/`-separated.
    files: Vec<String>,
    edges: Vec<Vec<Edge>>,
}

/// The module path of a file: `engine/loader.rs` → `[engine, loader]`,
/// `engine/mod.rs` → `[engine]`, `lib.rs` → `[]`.
fn module_of(relative: &str) -> Vec<String> {
    let mut parts: Vec<String> = relative.split('/').map(str::to_owned).collect();
    let last = parts.pop().unwrap_or_default();
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" {
        parts.push(stem.to_owned());
    }
    parts
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push(path);
        }
    }
}

/// The text a file's dependencies are read from: code before `#[cfg(test)]`,
/// line comments removed, with each line's number.
fn code_lines(text: &str) -> Vec<(usize, String)> {
    let mut lines = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("#[cfg(test)]") {
            break;
        }
        let code = match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        };
        lines.push((index + 1, code.to_owned()));
    }
    lines
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Parses the path (or `use` tree) that starts at `text`: `a::b::{c, d::e}`
/// gives `[a, b, c]` and `[a, b, d, e]`. Returns the paths and the bytes read.
fn parse_tree(text: &str) -> (Vec<Vec<String>>, usize) {
    let mut segments = Vec::new();
    let mut at = 0;
    let bytes = text.as_bytes();
    let skip_space = |mut at: usize| {
        while at < bytes.len() && (bytes[at] as char).is_whitespace() {
            at += 1;
        }
        at
    };
    loop {
        at = skip_space(at);
        if at < bytes.len() && bytes[at] == b'{' {
            let mut paths = Vec::new();
            at += 1;
            loop {
                at = skip_space(at);
                if at >= bytes.len() {
                    return (paths, at);
                }
                if bytes[at] == b'}' {
                    at += 1;
                    break;
                }
                if bytes[at] == b',' {
                    at += 1;
                    continue;
                }
                let (inner, used) = parse_tree(&text[at..]);
                if used == 0 {
                    at += 1;
                    continue;
                }
                for path in inner {
                    let mut full = segments.clone();
                    full.extend(path);
                    paths.push(full);
                }
                at += used;
            }
            return (paths, at);
        }
        let start = at;
        while at < bytes.len() && (is_ident(bytes[at] as char) || bytes[at] == b'*') {
            at += 1;
        }
        if at == start {
            break;
        }
        segments.push(text[start..at].to_owned());
        let next = skip_space(at);
        if text[next..].starts_with("::") {
            at = next + 2;
        } else {
            break;
        }
    }
    if segments.is_empty() {
        (Vec::new(), 0)
    } else {
        (vec![segments], at)
    }
}

/// Every `crate::`, `super::` and `self::` path in `code`.
fn paths_in(code: &str) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    for keyword in ["crate::", "super::", "self::"] {
        let mut from = 0;
        while let Some(offset) = code[from..].find(keyword) {
            let at = from + offset;
            from = at + keyword.len();
            let before = code[..at].chars().next_back();
            if before.is_some_and(|c| is_ident(c) || c == '$' || c == ':') {
                continue;
            }
            found.extend(parse_tree(&code[at..]).0);
        }
    }
    found
}

/// The file a path names, from the file `module`: the longest prefix of the
/// path that is a module of a file.
fn resolve(
    module: &[String],
    path: &[String],
    modules: &BTreeMap<Vec<String>, usize>,
) -> Option<usize> {
    let mut base: Vec<String> = Vec::new();
    let mut rest = path;
    match path.first().map(String::as_str) {
        Some("crate") => rest = &path[1..],
        Some("self") => {
            base = module.to_vec();
            rest = &path[1..];
        }
        Some("super") => {
            base = module.to_vec();
            while rest.first().map(String::as_str) == Some("super") {
                base.pop()?;
                rest = &rest[1..];
            }
        }
        _ => return None,
    }
    for segment in rest {
        if segment == "self" || segment == "*" {
            break;
        }
        let mut next = base.clone();
        next.push(segment.clone());
        if modules.contains_key(&next) {
            base = next;
        } else {
            break;
        }
    }
    modules.get(&base).copied()
}

/// The dependency graph of the library's files under `root` (`main.rs`, the
/// binary's root, is not part of the library).
fn graph(root: &Path) -> Graph {
    let mut paths = Vec::new();
    rust_files(root, &mut paths);
    let mut files: Vec<String> = paths
        .iter()
        .map(|path| {
            path.strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/")
        })
        .filter(|file| file != "main.rs")
        .collect();
    files.sort();
    let modules: BTreeMap<Vec<String>, usize> = files
        .iter()
        .enumerate()
        .map(|(index, file)| (module_of(file), index))
        .collect();
    let mut edges = vec![Vec::new(); files.len()];
    for (index, file) in files.iter().enumerate() {
        let module = module_of(file);
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        for (line, code) in code_lines(&text) {
            for path in paths_in(&code) {
                let Some(to) = resolve(&module, &path, &modules) else {
                    continue;
                };
                if to != index && !edges[index].iter().any(|edge: &Edge| edge.to == to) {
                    edges[index].push(Edge {
                        to,
                        evidence: format!("{file}:{line} `{}`", path.join("::")),
                    });
                }
            }
        }
    }
    Graph { files, edges }
}

impl Graph {
    fn reachable(&self, from: usize) -> BTreeSet<usize> {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from];
        while let Some(node) = stack.pop() {
            for edge in &self.edges[node] {
                if seen.insert(edge.to) {
                    stack.push(edge.to);
                }
            }
        }
        seen
    }

    /// The strongly connected components of more than one file, as file
    /// names, each with the edges inside it.
    fn cycles(&self) -> Vec<(BTreeSet<String>, Vec<String>)> {
        let reach: Vec<BTreeSet<usize>> = (0..self.files.len())
            .map(|node| self.reachable(node))
            .collect();
        let mut done = BTreeSet::new();
        let mut cycles = Vec::new();
        for node in 0..self.files.len() {
            if done.contains(&node) {
                continue;
            }
            let component: BTreeSet<usize> = reach[node]
                .iter()
                .copied()
                .filter(|&other| other != node && reach[other].contains(&node))
                .chain([node])
                .collect();
            done.extend(component.iter().copied());
            if component.len() > 1 {
                let evidence = component
                    .iter()
                    .flat_map(|&from| &self.edges[from])
                    .filter(|edge| component.contains(&edge.to))
                    .map(|edge| edge.evidence.clone())
                    .collect();
                let names = component.iter().map(|&i| self.files[i].clone()).collect();
                cycles.push((names, evidence));
            }
        }
        cycles
    }
}

fn known(cycle: &BTreeSet<String>) -> Option<usize> {
    KNOWN_CYCLES
        .iter()
        .position(|allowed| cycle.iter().all(|file| allowed.contains(&file.as_str())))
}

#[test]
fn no_new_cycle_between_modules() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = graph(&root);
    let edge_count: usize = graph.edges.iter().map(Vec::len).sum();
    assert!(
        graph.files.len() > 30 && edge_count > 50,
        "the source tree was not read: {} files, {edge_count} edges",
        graph.files.len()
    );
    let mut matched = BTreeSet::new();
    let mut new = Vec::new();
    for (cycle, evidence) in graph.cycles() {
        let listing = format!("{cycle:?}\n    {}", evidence.join("\n    "));
        match known(&cycle) {
            Some(entry) => {
                matched.insert(entry);
                println!("known cycle (to break): {listing}");
            }
            None => new.push(listing),
        }
    }
    for (entry, files) in KNOWN_CYCLES.iter().enumerate() {
        if !matched.contains(&entry) {
            println!("KNOWN_CYCLES entry {files:?} matches no cycle any more: remove it");
        }
    }
    assert!(
        new.is_empty(),
        "modules that depend on each other:\n{}",
        new.join("\n")
    );
}

/// The check finds a cycle through `crate::` and grouped `super::` paths,
/// and none through a parent's bare child paths or tests modules.
#[test]
fn the_check_finds_a_cycle_and_only_a_cycle() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    write("lib.rs", "pub mod a;\npub mod b;\npub mod c;\n");
    write("a/mod.rs", "pub mod inner;\npub use inner::X;\n");
    write(
        "a/inner.rs",
        "use crate::b::Y; // b uses us back\npub struct X;\n",
    );
    write(
        "b.rs",
        "use super::{c::Z, a::inner::{self, X}};\npub struct Y;\n",
    );
    write(
        "c.rs",
        "use crate::a::X; // a facade: a/mod.rs\npub struct Z;\n#[cfg(test)]\nmod tests { use crate::b::Y; }\n",
    );
    let graph = graph(dir.path());
    let cycles: Vec<BTreeSet<String>> = graph.cycles().into_iter().map(|(c, _)| c).collect();
    let expected: BTreeSet<String> = ["a/inner.rs", "b.rs"].map(str::to_owned).into();
    assert_eq!(cycles, vec![expected], "{:?}", graph.edges);
}
