//! Every public type, trait and trait method of the workspace's library crates has a runnable
//! example that asserts something: what the README promises, checked on the source.
//!
//! **What is scanned.** The `.rs` files under `core/src`, `strategies/src`, `backends/*/src`,
//! `src` and `integration-tests/src`, except files named `tests.rs`, files declared by a
//! `#[cfg(test)] mod name;` and the bodies of inline `#[cfg(test)] mod name { .. }` blocks.
//!
//! **What is an item.** A line `pub struct|enum|trait|type Name` (`pub(crate)` and the like are
//! not public), and every `fn` / `async fn` declared directly inside a `pub trait` block (named
//! `Trait::method` below). Its docs are the `///` lines and `#[doc = ..]` attributes above it.
//!
//! **The rule.** An item passes when its docs have `#[doc = include_str!(..)]` (the text is
//! checked where it lives), or at least one Rust code block (a ```` ``` ```` fence with no
//! language, or only rustdoc's own attributes) that
//! 1. runs: it is not marked `ignore` or `no_run`; and
//! 2. asserts: it is marked `should_panic` or `compile_fail`, or its text contains `assert`
//!    (hidden `# ` lines included). So `assert!`, `assert_eq!`, `assert_ne!`, `debug_assert!`
//!    count, and so does a call to a helper whose name says that it asserts
//!    (`assert_sorted(..)`, say). A `?` alone does not: it checks that nothing failed, not
//!    what came out.
//!
//! An item that truly cannot run in a doctest is listed in [`CANNOT_RUN`] with the reason
//! (which its docs also give), and passes with a `no_run` example. Items still being written
//! are listed in [`NOT_YET`]. An entry of either list that no longer needs to be there fails
//! the test too, so both lists only shrink.
//!
//! The scan is line-based and expects rustfmt's layout (a `}` closing a block at the indent of
//! the line that opened it).

use std::collections::BTreeSet;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

/// Items whose example cannot run in a doctest: (file, item, why). Each has a `no_run` example
/// and says why in its docs.
const CANNOT_RUN: &[(&str, &str, &str)] = &[];

/// Items without a passing example yet, in files being rewritten as this list was made:
/// (file, item). Remove an entry when its example is written.
const NOT_YET: &[(&str, &str)] = &[];

/// The source roots of the library crates, relative to the workspace root; `backends/*` is
/// expanded to every backend.
const ROOTS: &[&str] = &[
    "core/src",
    "strategies/src",
    "backends/*/src",
    "src",
    "integration-tests/src",
];

/// What is wrong with an item's docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Problem {
    /// No Rust code block at all.
    NoExample,
    /// Every Rust code block is `ignore` or `no_run`.
    NotRun,
    /// A block runs, but none asserts anything.
    AssertsNothing,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Problem::NoExample => "no example (no ``` code block in its docs)",
            Problem::NotRun => "its examples do not run (`ignore` / `no_run`)",
            Problem::AssertsNothing => "its example asserts nothing (no `assert` in any block)",
        })
    }
}

/// One public item found by the scan.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Item {
    /// `Name`, or `Trait::method` for a trait method.
    name: String,
    /// 1-based.
    line: usize,
    /// `None` when the docs pass the rule.
    problem: Option<Problem>,
}

/// A fenced code block of a doc comment.
struct Block {
    /// The info string's attributes (`no_run`, `should_panic`, ...).
    attrs: Vec<String>,
    text: String,
}

/// rustdoc's own attributes of a Rust block; any other word (`text`, `toml`, `sh`) makes the
/// block something else than Rust.
fn is_rust_attr(attr: &str) -> bool {
    matches!(
        attr,
        "rust"
            | "ignore"
            | "no_run"
            | "should_panic"
            | "compile_fail"
            | "test_harness"
            | "standalone_crate"
    ) || attr.starts_with("edition")
        || attr.starts_with("ignore-")
}

/// The fenced blocks of `doc` (the doc text, one line each, `///` stripped).
fn blocks(doc: &[String]) -> Vec<Block> {
    let mut out = Vec::new();
    let mut open: Option<Block> = None;
    for line in doc {
        let trimmed = line.trim_start();
        match (trimmed.strip_prefix("```"), open.take()) {
            (Some(_), Some(block)) => out.push(block),
            (Some(info), None) => {
                let attrs = info
                    .split(|c: char| c == ',' || c.is_whitespace())
                    .filter(|a| !a.is_empty())
                    .map(str::to_owned)
                    .collect();
                open = Some(Block {
                    attrs,
                    text: String::new(),
                });
            }
            (None, Some(mut block)) => {
                block.text.push_str(line);
                block.text.push('\n');
                open = Some(block);
            }
            (None, None) => {}
        }
    }
    // An unclosed fence runs to the end of the docs, as in rustdoc.
    out.extend(open);
    out
}

/// What is wrong with docs `doc` (`None`: they pass). `include` says the docs include a file.
fn judge(doc: &[String], include: bool) -> Option<Problem> {
    if include {
        return None;
    }
    let rust: Vec<Block> = blocks(doc)
        .into_iter()
        .filter(|b| b.attrs.iter().all(|a| is_rust_attr(a)))
        .collect();
    if rust.is_empty() {
        return Some(Problem::NoExample);
    }
    let has = |b: &Block, attr: &str| b.attrs.iter().any(|a| a == attr);
    let running: Vec<&Block> = rust
        .iter()
        .filter(|b| {
            !has(b, "ignore")
                && !has(b, "no_run")
                && !b.attrs.iter().any(|a| a.starts_with("ignore-"))
        })
        .collect();
    if running.is_empty() {
        return Some(Problem::NotRun);
    }
    let asserts = running
        .iter()
        .any(|b| has(b, "should_panic") || has(b, "compile_fail") || b.text.contains("assert"));
    (!asserts).then_some(Problem::AssertsNothing)
}

fn indent_of(line: &str) -> &str {
    &line[..line.len() - line.trim_start().len()]
}

/// Whether `line` closes a block opened at `indent`.
fn closes(line: &str, indent: &str) -> bool {
    line.strip_prefix(indent)
        .is_some_and(|rest| rest.starts_with('}'))
}

/// `Name` after `keyword ` at the start of `rest`, if any.
fn ident_after<'a>(rest: &'a str, keyword: &str) -> Option<&'a str> {
    let rest = rest.strip_prefix(keyword)?.strip_prefix(' ')?;
    let end = rest
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(rest.len());
    (end > 0).then(|| &rest[..end])
}

/// The public items of one file's source, and the modules it declares under `#[cfg(test)]`
/// (`mod name;`), whose files are not to be scanned.
fn scan(source: &str) -> (Vec<Item>, Vec<String>) {
    let lines: Vec<&str> = source.lines().collect();
    let mut items = Vec::new();
    let mut test_modules = Vec::new();
    // The docs and attributes gathered for the next item.
    let mut doc: Vec<String> = Vec::new();
    let mut include = false;
    let mut cfg_test = false;
    // The open `pub trait` block: its name and indent.
    let mut in_trait: Option<(String, String)> = None;
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start();
        if let Some(text) = trimmed.strip_prefix("///") {
            doc.push(text.strip_prefix(' ').unwrap_or(text).to_owned());
            i += 1;
            continue;
        }
        if trimmed.starts_with("#[") {
            // An attribute, over several lines until its brackets balance.
            let mut attr = String::new();
            let mut depth = 0i32;
            loop {
                let part = lines[i].trim();
                attr.push_str(part);
                attr.push(' ');
                depth += part.matches('[').count() as i32 - part.matches(']').count() as i32;
                i += 1;
                if depth <= 0 || i >= lines.len() {
                    break;
                }
            }
            let compact: String = attr.chars().filter(|c| !c.is_whitespace()).collect();
            if compact.starts_with("#[cfg(test)]") {
                cfg_test = true;
            }
            if let Some(value) = compact.strip_prefix("#[doc=") {
                if value.starts_with("include_str!") {
                    include = true;
                } else if let Some(text) = attr
                    .split_once('"')
                    .and_then(|(_, rest)| rest.rsplit_once('"'))
                {
                    doc.extend(text.0.split("\\n").map(str::to_owned));
                }
            }
            continue;
        }
        if trimmed.is_empty() || trimmed.starts_with("//") {
            i += 1;
            continue;
        }
        // A line of code: the gathered docs belong to it, or to nothing.
        let indent = indent_of(line).to_owned();
        if let Some((_, trait_indent)) = &in_trait {
            if closes(line, trait_indent) {
                in_trait = None;
            }
        }
        if cfg_test {
            let module = ident_after(trimmed, "mod").or_else(|| {
                trimmed
                    .strip_prefix("pub ")
                    .and_then(|r| ident_after(r, "mod"))
            });
            if let Some(module) = module {
                if trimmed.ends_with(';') {
                    test_modules.push(module.to_owned());
                } else {
                    // Skip the inline test module's body.
                    i += 1;
                    while i < lines.len() && !closes(lines[i], &indent) {
                        i += 1;
                    }
                }
            }
        }
        if let Some(rest) = trimmed.strip_prefix("pub ") {
            let found = ["struct", "enum", "trait", "type"]
                .iter()
                .find_map(|kw| ident_after(rest, kw).map(|name| (*kw, name)));
            if let Some((keyword, name)) = found {
                items.push(Item {
                    name: name.to_owned(),
                    line: i + 1,
                    problem: judge(&doc, include),
                });
                // A trait whose body is not on this line alone (`pub trait Sealed {}` is).
                if keyword == "trait" && !trimmed.ends_with('}') && !trimmed.ends_with(';') {
                    in_trait = Some((name.to_owned(), indent.clone()));
                }
            }
        } else if let Some((trait_name, trait_indent)) = &in_trait {
            let method_indent = format!("{trait_indent}    ");
            let method = line.strip_prefix(method_indent.as_str()).and_then(|rest| {
                let rest = rest.strip_prefix("async ").unwrap_or(rest);
                ident_after(rest, "fn")
            });
            if let Some(method) = method {
                items.push(Item {
                    name: format!("{trait_name}::{method}"),
                    line: i + 1,
                    problem: judge(&doc, include),
                });
            }
        }
        doc.clear();
        include = false;
        cfg_test = false;
        i += 1;
    }
    (items, test_modules)
}

/// The workspace root (the facade's manifest directory).
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The source roots, `backends/*` expanded.
fn source_roots() -> Vec<PathBuf> {
    let root = root();
    let mut out = Vec::new();
    for r in ROOTS {
        match r.split_once("/*/") {
            Some((parent, child)) => {
                let mut dirs: Vec<PathBuf> = fs::read_dir(root.join(parent))
                    .unwrap_or_else(|e| panic!("cannot list {parent}: {e}"))
                    .filter_map(|entry| entry.ok().map(|e| e.path().join(child)))
                    .filter(|p| p.is_dir())
                    .collect();
                dirs.sort();
                out.extend(dirs);
            }
            None => out.push(root.join(r)),
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Where the module `#[cfg(test)] mod name;` in `file` lives: `name.rs` and the directory
/// `name/` (its `mod.rs` and submodules), next to a `lib.rs` / `mod.rs` / `main.rs`, under
/// `stem/` for any other file.
fn module_paths(file: &Path, module: &str) -> (PathBuf, PathBuf) {
    let dir = file.parent().unwrap_or(Path::new("."));
    let stem = file.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    let base = if matches!(stem, "lib" | "mod" | "main") {
        dir.to_path_buf()
    } else {
        dir.join(stem)
    };
    (base.join(format!("{module}.rs")), base.join(module))
}

/// Every public item of the workspace's libraries: (file relative to the root, item).
fn workspace_items() -> Vec<(String, Item)> {
    let root = root();
    let mut files = Vec::new();
    for dir in source_roots() {
        rust_files(&dir, &mut files);
    }
    let mut scanned = Vec::new();
    // The files and directories of modules compiled only for tests.
    let mut test_files: BTreeSet<PathBuf> = BTreeSet::new();
    let mut test_dirs: BTreeSet<PathBuf> = BTreeSet::new();
    for file in &files {
        let source = fs::read_to_string(file)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
        let (items, test_modules) = scan(&source);
        for module in test_modules {
            let (file, dir) = module_paths(file, &module);
            test_files.insert(file);
            test_dirs.insert(dir);
        }
        scanned.push((file.clone(), items));
    }
    let mut out = Vec::new();
    for (file, items) in scanned {
        let skipped = file.file_name().is_some_and(|n| n == "tests.rs")
            || test_files.contains(&file)
            || test_dirs.iter().any(|d| file.starts_with(d));
        if skipped {
            continue;
        }
        let rel = file
            .strip_prefix(&root)
            .unwrap_or(&file)
            .to_string_lossy()
            .replace('\\', "/");
        out.extend(items.into_iter().map(|item| (rel.clone(), item)));
    }
    out
}

#[test]
fn every_public_type_trait_and_trait_method_has_an_example_that_asserts() {
    let items = workspace_items();
    assert!(
        items.len() > 100,
        "the scan found only {} items: is it looking in the right place ({})?",
        items.len(),
        root().display()
    );
    let listed = |file: &str, name: &str| NOT_YET.iter().any(|&(f, n)| f == file && n == name);
    let cannot_run =
        |file: &str, name: &str| CANNOT_RUN.iter().any(|&(f, n, _)| f == file && n == name);

    let mut failures = Vec::new();
    for (file, item) in &items {
        let problem = match item.problem {
            None => continue,
            Some(Problem::NotRun) if cannot_run(file, &item.name) => continue,
            Some(problem) => problem,
        };
        if !listed(file, &item.name) {
            failures.push(format!("  {file}:{} {}: {problem}", item.line, item.name));
        }
    }

    let mut stale = Vec::new();
    let find = |file: &str, name: &str| {
        items
            .iter()
            .find(|(f, i)| f == file && i.name == name)
            .map(|(_, i)| i)
    };
    for &(file, name) in NOT_YET {
        match find(file, name) {
            None => stale.push(format!("  NOT_YET ({file}, {name}): no such item any more")),
            Some(item) if item.problem.is_none() => stale.push(format!(
                "  NOT_YET ({file}, {name}): it has a passing example now"
            )),
            Some(_) => {}
        }
    }
    for &(file, name, _) in CANNOT_RUN {
        match find(file, name) {
            None => stale.push(format!(
                "  CANNOT_RUN ({file}, {name}): no such item any more"
            )),
            Some(item) if item.problem != Some(Problem::NotRun) => stale.push(format!(
                "  CANNOT_RUN ({file}, {name}): {}",
                match item.problem {
                    None => "its example runs now".to_owned(),
                    Some(p) => p.to_string(),
                }
            )),
            Some(_) => {}
        }
    }

    let mut message = String::new();
    if !failures.is_empty() {
        message.push_str(&format!(
            "{} of {} public items have no runnable example that asserts something:\n{}\n\n\
             Write one in each item's `///` docs: a ``` block that runs (no `ignore` / `no_run`) \
             and checks what the item does with `assert!` / `assert_eq!` (or is a \
             `should_panic` / `compile_fail` block). If an item truly cannot run in a doctest, \
             give a `no_run` example, say why in its docs and add it with the reason to \
             CANNOT_RUN in tests/api_docs.rs. The rule is in that file's docs.\n",
            failures.len(),
            items.len(),
            failures.join("\n")
        ));
    }
    if !stale.is_empty() {
        message.push_str(&format!(
            "\nEntries of tests/api_docs.rs's lists that are no longer needed; remove them:\n{}\n",
            stale.join("\n")
        ));
    }
    assert!(message.is_empty(), "{message}");
}

/// The scanner itself, on small sources: what it finds, what it skips, what it rejects.
#[test]
fn the_scan_finds_items_and_judges_their_examples() {
    let source = r#"
/// No example.
pub struct Bare;

/// ```
/// assert_eq!(1 + 1, 2);
/// ```
#[derive(Debug)]
pub enum Good { A }

/// ```
/// let _ = 1 + 1;
/// ```
pub type Silent = u8;

/// ```no_run
/// assert!(start_a_server());
/// ```
pub struct NotRun;

/// ```text
/// assert
/// ```
pub struct TextOnly;

/// ```should_panic
/// panic!("as documented");
/// ```
pub struct Panics;

/// ```
/// # fn assert_sorted(v: &[u8]) { assert!(v.windows(2).all(|w| w[0] <= w[1])) }
/// assert_sorted(&[1, 2]);
/// ```
#[cfg_attr(
    docsrs,
    doc(cfg(feature = "x"))
)]
pub trait Tr {
    /// ```
    /// assert!(true);
    /// ```
    fn documented(&self);

    /// Nothing runnable.
    async fn bare(&self) {}
}

#[doc = include_str!("../README.md")]
pub struct Included;

pub(crate) struct Private;

pub trait Sealed {}

fn free() {}

#[cfg(test)]
mod tests {
    pub struct InTests;
}

#[cfg(test)]
mod fake;

pub struct After;
"#;
    let (items, test_modules) = scan(source);
    let got: Vec<(&str, Option<Problem>)> =
        items.iter().map(|i| (i.name.as_str(), i.problem)).collect();
    assert_eq!(
        got,
        [
            ("Bare", Some(Problem::NoExample)),
            ("Good", None),
            ("Silent", Some(Problem::AssertsNothing)),
            ("NotRun", Some(Problem::NotRun)),
            ("TextOnly", Some(Problem::NoExample)),
            ("Panics", None),
            ("Tr", None),
            ("Tr::documented", None),
            ("Tr::bare", Some(Problem::NoExample)),
            ("Included", None),
            ("Sealed", Some(Problem::NoExample)),
            ("After", Some(Problem::NoExample)),
        ]
    );
    assert_eq!(test_modules, ["fake"]);
    assert_eq!(items[0].line, 3);
}
