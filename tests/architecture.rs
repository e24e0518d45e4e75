//! The module layering of `src/`, checked: every `crate::<module>` a module names must be one
//! its row may use. `LAYERS` below is the table; `docs/architecture.md` draws it.
//!
//! To see every edge of today's graph (and the Mermaid block the table gives):
//!
//! ```text
//! KEYWARDEN_ARCH_PRINT=1 cargo test --test architecture print_the_graph -- --nocapture
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// One row of the layering.
struct Row {
    name: &'static str,
    modules: &'static [&'static str],
    /// Imports allowed between two modules of this row, `(from, to)`.
    allowed: &'static [(&'static str, &'static str)],
}

/// The layering, in rank order. A core module may use only modules of the rows above its own,
/// and a module of its own row only where `allowed` says so. The last row holds the plug-ins:
/// they may use any core module but the layer's internals (`LAYER_INTERNALS`), and each other
/// only where `allowed` says so.
const LAYERS: &[Row] = &[
    Row {
        name: "foundation",
        modules: &[
            "clock",
            "body",
            "key",
            "net",
            "secret",
            "credential",
            "rejection",
        ],
        allowed: &[
            ("secret", "key"),
            ("credential", "key"),
            ("rejection", "body"),
        ],
    },
    Row {
        name: "limits",
        modules: &["redis", "ratelimit"],
        allowed: &[("ratelimit", "redis")],
    },
    Row {
        name: "store",
        modules: &["audit", "store"],
        allowed: &[("store", "audit")],
    },
    Row {
        name: "identity",
        modules: &["principal"],
        allowed: &[],
    },
    Row {
        name: "cache",
        modules: &["metrics", "stats", "credits", "cache", "usage"],
        allowed: &[
            ("stats", "metrics"),
            ("usage", "cache"),
            ("cache", "credits"),
        ],
    },
    Row {
        name: "verification",
        modules: &["verify"],
        allowed: &[],
    },
    Row {
        name: "front",
        modules: &["layer", "scope"],
        allowed: &[("scope", "layer")],
    },
    Row {
        name: "plug-ins",
        modules: &[
            "interop",
            "invalidation",
            "manage",
            "server",
            "testing",
            "webhooks",
        ],
        allowed: &[
            ("manage", "invalidation"),
            ("manage", "webhooks"),
            ("server", "manage"),
            ("testing", "manage"),
        ],
    },
];

/// What a plug-in reaches only through the layer's public API.
const LAYER_INTERNALS: &[&str] = &["cache", "credits", "usage", "verify"];

const WHERE: &str = "the table is `LAYERS` at the top of tests/architecture.rs, \
                     and docs/architecture.md draws it";

#[test]
fn modules_import_only_what_their_row_may_use() {
    let graph = Graph::load();
    let mut report = String::new();
    let unknown: Vec<_> = graph
        .modules
        .iter()
        .filter(|(module, _)| rank(module).is_none())
        .collect();
    if !unknown.is_empty() {
        report.push_str("\nmodules not in the table (place each in a row of LAYERS):\n");
        for (module, path) in &unknown {
            let _ = writeln!(report, "  {module} ({path})");
        }
    }
    let mut broken = String::new();
    let mut roots = String::new();
    for edge in &graph.edges {
        match &edge.to {
            Target::Root(name) => {
                let _ = writeln!(roots, "  {} -> crate::{name} ({})", edge.from, edge.at);
            }
            Target::Module(to) => {
                if let Err(why) = may_use(&edge.from, to) {
                    let _ = writeln!(broken, "  {} -> {to} ({}): {why}", edge.from, edge.at);
                }
            }
        }
    }
    if !broken.is_empty() {
        report.push_str("\nimports the layering forbids:\n");
        report.push_str(&broken);
    }
    if !roots.is_empty() {
        report.push_str("\nuse the module path, not the root re-export:\n");
        report.push_str(&roots);
    }
    assert!(
        report.is_empty(),
        "the module layering is broken ({WHERE}):\n{report}"
    );
}

#[test]
fn the_table_is_well_formed() {
    let mut seen = BTreeMap::new();
    for row in LAYERS {
        for module in row.modules {
            assert!(
                seen.insert(*module, row.name).is_none(),
                "`{module}` is in two rows"
            );
        }
        for (from, to) in row.allowed {
            assert!(
                row.modules.contains(from) && row.modules.contains(to),
                "row {}: the allowance {from} -> {to} must name two modules of the row",
                row.name
            );
        }
        // Allowances inside a row are the only way back to a cycle.
        for (from, _) in row.allowed {
            let mut reached = vec![*from];
            let mut next = 0;
            while next < reached.len() {
                for (a, b) in row.allowed {
                    if *a == reached[next] {
                        assert!(*b != *from, "row {}: allowances form a cycle", row.name);
                        if !reached.contains(b) {
                            reached.push(b);
                        }
                    }
                }
                next += 1;
            }
        }
    }
    for internal in LAYER_INTERNALS {
        assert!(
            seen.contains_key(internal),
            "`{internal}` is not in the table"
        );
    }
}

/// The doc's diagram is the table's: paste the block this prints when it is not.
#[test]
fn docs_draw_the_table() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/architecture.md");
    let doc = std::fs::read_to_string(&path).expect("docs/architecture.md");
    let diagram = doc
        .split("```mermaid\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("docs/architecture.md has a ```mermaid block");
    let expected = mermaid();
    assert!(
        diagram.trim_end() == expected.trim_end(),
        "the diagram in docs/architecture.md is not the table's ({WHERE}); \
         replace its ```mermaid block with:\n\n{expected}"
    );
}

#[test]
fn print_the_graph() {
    if std::env::var_os("KEYWARDEN_ARCH_PRINT").is_none_or(|v| v != "1") {
        return;
    }
    let graph = Graph::load();
    let mut edges: BTreeMap<(String, String), (usize, &str)> = BTreeMap::new();
    for edge in &graph.edges {
        let to = match &edge.to {
            Target::Module(to) => to.clone(),
            Target::Root(name) => format!("crate::{name}"),
        };
        edges
            .entry((edge.from.clone(), to))
            .or_insert((0, &edge.at))
            .0 += 1;
    }
    println!("edges of src/ (from -> to, references, first at):");
    for ((from, to), (count, at)) in &edges {
        let verdict = match to.strip_prefix("crate::") {
            Some(_) => "root re-export".to_owned(),
            None if rank(from).is_none() || rank(to).is_none() => "not in the table".to_owned(),
            None => may_use(from, to).err().unwrap_or_else(|| "ok".to_owned()),
        };
        println!("  {from} -> {to}  ({count}, {at})  {verdict}");
    }
    println!("\nthe table as Mermaid:\n{}", mermaid());
}

/// The table as a Mermaid flowchart: arrows point at what a row may use, so the core reads
/// top to bottom (foundation first) and the plug-ins hang below it.
fn mermaid() -> String {
    let (plugins, core) = LAYERS.split_last().expect("a table");
    let id = |row: &Row| format!("row_{}", row.name.replace('-', "_"));
    let mut out = String::from("flowchart BT\n");
    let row = |out: &mut String, row: &Row, indent: &str| {
        let _ = writeln!(out, "{indent}subgraph {}[\"{}\"]", id(row), row.name);
        for module in row.modules {
            let _ = writeln!(out, "{indent}  {module}");
        }
        for (from, to) in row.allowed {
            let _ = writeln!(out, "{indent}  {from} --> {to}");
        }
        let _ = writeln!(out, "{indent}end");
    };
    out.push_str("  subgraph core[\"core: a row may use the rows above it\"]\n");
    for r in core {
        row(&mut out, r, "    ");
    }
    for pair in core.windows(2) {
        let _ = writeln!(out, "    {} --> {}", id(&pair[1]), id(&pair[0]));
    }
    out.push_str("  end\n");
    row(&mut out, plugins, "  ");
    let _ = writeln!(
        out,
        "  {} -. \"all but {}\" .-> core",
        id(plugins),
        LAYER_INTERNALS.join(", ")
    );
    out
}

/// A module's row, or `None` when it is not in the table.
fn rank(module: &str) -> Option<usize> {
    LAYERS.iter().position(|row| row.modules.contains(&module))
}

/// Whether `from` may import `to`, and why not.
fn may_use(from: &str, to: &str) -> Result<(), String> {
    let (Some(f), Some(t)) = (rank(from), rank(to)) else {
        return Ok(()); // reported as a module to place, not as an edge
    };
    let plugins = LAYERS.len() - 1;
    let row = &LAYERS[f];
    let allowed = row.allowed.contains(&(from, to));
    let ok = match (f == plugins, t == plugins) {
        (true, true) => allowed,
        (true, false) => !LAYER_INTERNALS.contains(&to),
        (false, _) => t < f || (t == f && allowed),
    };
    if ok {
        return Ok(());
    }
    Err(match (f == plugins, t == plugins) {
        (true, true) => "plug-ins do not import each other".to_owned(),
        (true, false) => format!("plug-ins stay off the layer's internals ({to})"),
        (false, true) => format!("the core ({}) never imports a plug-in", row.name),
        (false, false) if t == f => format!("same row ({}), not an allowed edge", row.name),
        (false, false) => format!("{} sits above {}", LAYERS[t].name, row.name),
    })
}

#[derive(PartialEq)]
enum Target {
    Module(String),
    /// `crate::Name` that names no module: a root re-export (or a `crate::*` glob).
    Root(String),
}

struct Edge {
    from: String,
    to: Target,
    /// `src/file.rs:line`
    at: String,
}

struct Graph {
    /// Top-level modules on disk, with the path that declares them.
    modules: BTreeMap<String, String>,
    edges: Vec<Edge>,
}

impl Graph {
    fn load() -> Self {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let src = root.join("src");
        let mut modules = BTreeMap::new();
        let mut files = Vec::new();
        for entry in std::fs::read_dir(&src).expect("src/") {
            let path = entry.expect("src/ entry").path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if path.is_dir() {
                if name != "bin" {
                    modules.insert(name.clone(), format!("src/{name}/"));
                    rust_files(&path, &mut files);
                }
            } else if let Some(stem) = name.strip_suffix(".rs") {
                if stem != "lib" && stem != "main" {
                    modules.insert(stem.to_owned(), format!("src/{name}"));
                    files.push(path);
                }
            }
        }
        files.sort();
        let mut edges = Vec::new();
        for file in files {
            let relative = file.strip_prefix(root).unwrap();
            let under_src = file.strip_prefix(&src).unwrap();
            let first = under_src.components().next().unwrap().as_os_str();
            let first = first.to_string_lossy();
            let from = first.strip_suffix(".rs").unwrap_or(&first).to_owned();
            let text = std::fs::read_to_string(&file).expect("a UTF-8 source file");
            for reference in crate_references(&text) {
                let is_module =
                    modules.contains_key(&reference.name) || rank(&reference.name).is_some();
                if is_module && reference.name == from {
                    continue;
                }
                edges.push(Edge {
                    from: from.clone(),
                    to: if is_module {
                        Target::Module(reference.name)
                    } else {
                        Target::Root(reference.name)
                    },
                    at: format!("{}:{}", relative.display(), reference.line),
                });
            }
        }
        // `use crate::{a::X, a::Y}` is one edge.
        edges.dedup_by(|a, b| a.from == b.from && a.to == b.to && a.at == b.at);
        Graph { modules, edges }
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("a source directory") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

// ---- the parser: a small Rust tokenizer, just enough to find `crate::` paths in code ----

#[derive(Debug, PartialEq)]
struct Reference {
    /// The first segment after `crate::` (`*` for a glob).
    name: String,
    line: usize,
}

#[derive(Debug, PartialEq)]
enum Tok {
    Ident(String),
    PathSep,
    Punct(char),
}

struct Token {
    tok: Tok,
    line: usize,
}

impl Token {
    fn is(&self, punct: char) -> bool {
        self.tok == Tok::Punct(punct)
    }

    fn is_ident(&self, word: &str) -> bool {
        matches!(&self.tok, Tok::Ident(w) if w == word)
    }
}

/// Code tokens of `source`: comments, string, char and byte literals are dropped.
fn tokenize(source: &str) -> Vec<Token> {
    let s: Vec<char> = source.chars().collect();
    let mut out = Vec::new();
    let (mut i, mut line) = (0, 1);
    let at = |i: usize| s.get(i).copied();
    while let Some(c) = at(i) {
        match c {
            '\n' => {
                line += 1;
                i += 1;
            }
            _ if c.is_whitespace() => i += 1,
            '/' if at(i + 1) == Some('/') => {
                while at(i).is_some_and(|c| c != '\n') {
                    i += 1;
                }
            }
            '/' if at(i + 1) == Some('*') => {
                let mut depth = 0;
                while let Some(c) = at(i) {
                    if c == '/' && at(i + 1) == Some('*') {
                        depth += 1;
                        i += 2;
                    } else if c == '*' && at(i + 1) == Some('/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        line += usize::from(c == '\n');
                        i += 1;
                    }
                }
            }
            '"' => i = skip_string(&s, i + 1, &mut line),
            '\'' => i = skip_char_or_lifetime(&s, i),
            ':' if at(i + 1) == Some(':') => {
                out.push(Token {
                    tok: Tok::PathSep,
                    line,
                });
                i += 2;
            }
            _ if c == '_' || c.is_alphanumeric() => {
                let start = i;
                while at(i).is_some_and(|c| c == '_' || c.is_alphanumeric()) {
                    i += 1;
                }
                let word: String = s[start..i].iter().collect();
                match (word.as_str(), at(i)) {
                    ("b" | "c", Some('"')) => i = skip_string(&s, i + 1, &mut line),
                    ("b", Some('\'')) => i = skip_char_or_lifetime(&s, i),
                    ("r" | "br" | "cr", Some('"' | '#')) => match skip_raw_string(&s, i, &mut line)
                    {
                        Some(end) => i = end,
                        // `r#ident`: a raw identifier.
                        None => i += 1,
                    },
                    _ => out.push(Token {
                        tok: Tok::Ident(word),
                        line,
                    }),
                }
            }
            _ => {
                out.push(Token {
                    tok: Tok::Punct(c),
                    line,
                });
                i += 1;
            }
        }
    }
    out
}

/// From just after the opening quote to just after the closing one.
fn skip_string(s: &[char], mut i: usize, line: &mut usize) -> usize {
    while let Some(&c) = s.get(i) {
        match c {
            '\\' => {
                *line += usize::from(s.get(i + 1) == Some(&'\n'));
                i += 2;
                continue;
            }
            '"' => return i + 1,
            '\n' => *line += 1,
            _ => {}
        }
        i += 1;
    }
    i
}

/// `i` is at the hashes or quote after `r`; `None` when this is a raw identifier.
fn skip_raw_string(s: &[char], mut i: usize, line: &mut usize) -> Option<usize> {
    let mut hashes = 0;
    while s.get(i) == Some(&'#') {
        hashes += 1;
        i += 1;
    }
    if s.get(i) != Some(&'"') {
        return None;
    }
    i += 1;
    while let Some(&c) = s.get(i) {
        if c == '"' && (1..=hashes).all(|k| s.get(i + k) == Some(&'#')) {
            return Some(i + 1 + hashes);
        }
        *line += usize::from(c == '\n');
        i += 1;
    }
    Some(i)
}

/// `i` is at a `'`: skips a char literal, or just the quote of a lifetime or label.
fn skip_char_or_lifetime(s: &[char], i: usize) -> usize {
    if s.get(i + 1) == Some(&'\\') {
        let mut j = i + 3;
        while s.get(j).is_some_and(|&c| c != '\'') {
            j += 1;
        }
        return j + 1;
    }
    if s.get(i + 2) == Some(&'\'') {
        return i + 3;
    }
    i + 1
}

/// Every `crate::<name>` in the code of `source`, in order. Items under `#[cfg(test)]` are
/// skipped: tests may use anything.
fn crate_references(source: &str) -> Vec<Reference> {
    let toks = tokenize(source);
    let mut refs = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        if let Some(end) = skip_test_item(&toks, i) {
            i = end;
        } else if toks[i].is_ident("crate")
            && toks.get(i + 1).is_some_and(|t| t.tok == Tok::PathSep)
        {
            i = tree_heads(&toks, i + 2, &mut refs);
        } else {
            i += 1;
        }
    }
    refs
}

/// At `#[cfg(test)]`: the index after the item it guards (`#![cfg(test)]`: the whole file).
fn skip_test_item(toks: &[Token], i: usize) -> Option<usize> {
    let inner = toks.get(i + 1).is_some_and(|t| t.is('!'));
    let attr = i + 1 + usize::from(inner);
    let matches = toks[i].is('#')
        && toks.get(attr).is_some_and(|t| t.is('['))
        && toks.get(attr + 1).is_some_and(|t| t.is_ident("cfg"))
        && toks.get(attr + 2).is_some_and(|t| t.is('('))
        && toks.get(attr + 3).is_some_and(|t| t.is_ident("test"))
        && toks.get(attr + 4).is_some_and(|t| t.is(')'))
        && toks.get(attr + 5).is_some_and(|t| t.is(']'));
    if !matches {
        return None;
    }
    if inner {
        return Some(toks.len());
    }
    // The item ends at a `;` outside any brackets, or at the `}` closing its body.
    let mut depth = 0usize;
    for (j, t) in toks.iter().enumerate().skip(attr + 6) {
        match &t.tok {
            Tok::Punct('(' | '[' | '{') => depth += 1,
            Tok::Punct('}') if depth == 1 => return Some(j + 1),
            Tok::Punct(')' | ']' | '}') => depth = depth.saturating_sub(1),
            Tok::Punct(';') if depth == 0 => return Some(j + 1),
            _ => {}
        }
    }
    Some(toks.len())
}

/// At the tree after `crate::`: records the first segment of each path in it (through
/// `{...}` groups, nested or not) and returns the index after what it read.
fn tree_heads(toks: &[Token], mut i: usize, refs: &mut Vec<Reference>) -> usize {
    let Some(token) = toks.get(i) else {
        return i;
    };
    match &token.tok {
        Tok::Ident(name) => {
            if name != "self" {
                refs.push(Reference {
                    name: name.clone(),
                    line: token.line,
                });
            }
            i + 1
        }
        Tok::Punct('*') => {
            refs.push(Reference {
                name: "*".to_owned(),
                line: token.line,
            });
            i + 1
        }
        Tok::Punct('{') => {
            i += 1;
            loop {
                match toks.get(i) {
                    None => return i,
                    Some(t) if t.is('}') => return i + 1,
                    Some(_) => {}
                }
                i = tree_heads(toks, i, refs);
                // The rest of this tree (`::{A, B}`, `as X`) up to the next `,` or `}`.
                let mut depth = 0usize;
                while let Some(t) = toks.get(i) {
                    match t.tok {
                        Tok::Punct('{') => depth += 1,
                        Tok::Punct('}' | ',') if depth == 0 => break,
                        Tok::Punct('}') => depth -= 1,
                        _ => {}
                    }
                    i += 1;
                }
                if toks.get(i).is_some_and(|t| t.is(',')) {
                    i += 1;
                }
            }
        }
        _ => i,
    }
}

mod parser {
    use super::{crate_references, Reference};

    fn names(source: &str) -> Vec<String> {
        crate_references(source)
            .into_iter()
            .map(|r| r.name)
            .collect()
    }

    #[test]
    fn plain_uses_and_expression_paths() {
        let source = "use crate::store::KeyStore;\nfn f() { crate::clock::now(); }\n";
        assert_eq!(
            crate_references(source),
            [
                Reference {
                    name: "store".into(),
                    line: 1
                },
                Reference {
                    name: "clock".into(),
                    line: 2
                },
            ]
        );
    }

    #[test]
    fn groups_and_nested_groups() {
        let source =
            "use crate::{cache::X, store::{A, B as C, sqlite::{D}}, self, {key::K}, verify};";
        assert_eq!(names(source), ["cache", "store", "key", "verify"]);
        assert_eq!(
            names("use crate::{\n  layer,\n  scope::{self, RequireScopeLayer},\n};"),
            ["layer", "scope"]
        );
    }

    #[test]
    fn root_names_and_globs_are_reported_as_written() {
        assert_eq!(
            names("let k = crate::RejectionKind::X; use crate::*;"),
            ["RejectionKind", "*"]
        );
    }

    #[test]
    fn comments_are_not_code() {
        let source = "// use crate::a;\n/// [`X`](crate::b::X)\n//! crate::c\n/* crate::d /* crate::e */ crate::f */\nuse crate::g;";
        assert_eq!(crate_references(source)[0].line, 5);
        assert_eq!(names(source), ["g"]);
    }

    #[test]
    fn strings_and_chars_are_not_code() {
        let source = r###"
            let a = "crate::a \" crate::b";
            let b = r#"crate::c "quoted" "#;
            let c = b"crate::d";
            let d = ('"', '\'', b'"', '{');
            fn f<'a>(x: &'a str) -> &'a str { crate::e::f(x) }
            let r#type = crate::g::H;
        "###;
        assert_eq!(names(source), ["e", "g"]);
    }

    #[test]
    fn items_under_cfg_test_are_skipped() {
        let source = "use crate::a;\n#[cfg(test)]\nuse crate::b;\n#[cfg(test)]\nfn helper() { crate::c::x(); }\nfn g() { crate::d::y(); }\n#[cfg(test)]\n#[allow(unused)]\nmod tests {\n    use crate::e;\n    fn t() { let s = \"}\"; { crate::f::z(); } }\n}\n";
        assert_eq!(names(source), ["a", "d"]);
        assert_eq!(names("#![cfg(test)]\nuse crate::a;"), Vec::<String>::new());
        assert_eq!(
            names(
                "#[cfg(feature = \"x\")]\nuse crate::a;\n#[cfg(test)]\nmod tests;\nuse crate::b;"
            ),
            ["a", "b"]
        );
    }

    #[test]
    fn other_crates_and_visibility_are_not_references() {
        assert_eq!(
            names("pub(crate) fn f() {} use my_crate::x; use super::crate_y; extern crate z;"),
            Vec::<String>::new()
        );
    }
}
