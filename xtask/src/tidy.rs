//! `cargo xtask tidy`: checks on the source tree that no compiler makes.
//!
//! * **The architecture seam.** In `kernel-loader/src` and `build-tool/src`, x86 facts
//!   live only in the x86-64 modules, `kernel-loader/src/arch/x86_64/` and
//!   `build-tool/src/target/x86_64.rs` (not in the dispatchers beside them): elsewhere, no x86 opcode literal, no `R_X86_64_*`
//!   or `EM_X86_64`, no x86 register name (in code, strings or comments).
//! * **Small, documented modules.** Every `.rs` file of the four crates starts with a
//!   `//!` module doc; no file in `kernel-loader/src` or `build-tool/src` is over
//!   [`MAX_LINES`] lines.
//! * **The README matches the tree.** Its CLI block lists exactly the subcommands
//!   `build-tool/src/main.rs` defines; it names every fuzz target of `fuzz/Cargo.toml`;
//!   its Layout section names every top-level module of `kernel-loader/src` and
//!   `build-tool/src`, and every path it gives from the root exists.
//! * **The README's walkthrough is the example.** Every `rust`, `toml`, `ld` and `asm`
//!   block of "Using it in your kernel" is found in a file of `examples/minimal-kernel`
//!   (line by line, indentation aside; a line starting `// ...`, `# ...` or `/* ...`
//!   skips any lines), so the
//!   snippets compile as written: `cargo xtask example` builds and boots them. The
//!   example's `.rs` files start with `//!` too. It may state x86 facts: it is a
//!   kernel's own architecture code, outside the seam.
//!
//! `cargo xtask test` runs it first; `cargo test -p xtask` runs it as a test too.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

/// Longest source file allowed in the two library crates.
pub(crate) const MAX_LINES: usize = 1000;

/// Directories whose files the seam rule applies to, relative to the root.
const SEAM_DIRS: [&str; 2] = ["kernel-loader/src", "build-tool/src"];
/// Where x86 facts may live: the x86-64 modules themselves, not the dispatchers beside
/// them (`arch/mod.rs`, `target/mod.rs`), which name no encoding.
const X86_HOMES: [&str; 2] = [
    "kernel-loader/src/arch/x86_64",
    "build-tool/src/target/x86_64",
];
/// Directories whose `.rs` files must start with `//!`.
const DOC_DIRS: [&str; 5] = [
    "kernel-loader/src",
    "build-tool/src",
    "xtask/src",
    "bench/src",
    "examples/minimal-kernel/src",
];

/// x86 instruction bytes that stand alone as literals: `call`/`jmp rel32`, `jmp rel8`,
/// `int3`, `ret`, `nop`, `mov eax, imm32`.
const X86_OPCODES: [&str; 7] = ["0xe8", "0xe9", "0xeb", "0xcc", "0xc3", "0x90", "0xb8"];
/// x86 byte sequences (written `0xAA, 0xBB`): multi-byte NOPs, `jmp [rip+disp32]`,
/// `endbr64`.
const X86_SEQUENCES: [&str; 3] = ["0x0f,0x1f", "0xff,0x25", "0xf3,0x0f,0x1e"];
/// x86 register names, matched as whole words.
const X86_REGISTERS: [&str; 24] = [
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "rip", "r8", "r9", "r10", "r11", "r12",
    "r13", "r14", "r15", "eax", "ebx", "ecx", "edx", "esi", "edi", "esp",
];

/// Runs every check and fails with the list of violations.
pub(crate) fn run(root: &Path) -> Result<()> {
    let problems = check(root)?;
    if problems.is_empty() {
        println!("tidy: ok");
        return Ok(());
    }
    for p in &problems {
        eprintln!("tidy: {p}");
    }
    bail!("tidy: {} problem(s)", problems.len())
}

/// Every violation in the tree at `root`, one line each.
pub(crate) fn check(root: &Path) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    for dir in SEAM_DIRS {
        for file in rust_files(&root.join(dir))? {
            let rel = relative(root, &file);
            let text = fs::read_to_string(&file)?;
            problems.extend(x86_violations(&rel, &text));
            let lines = text.lines().count();
            if lines > MAX_LINES {
                problems.push(format!("{rel}: {lines} lines (at most {MAX_LINES})"));
            }
        }
    }
    for dir in DOC_DIRS {
        for file in rust_files(&root.join(dir))? {
            let text = fs::read_to_string(&file)?;
            if !text.starts_with("//!") {
                problems.push(format!(
                    "{}: does not start with a `//!` module doc",
                    relative(root, &file)
                ));
            }
        }
    }
    let readme = fs::read_to_string(root.join("README.md"))?;
    let main_rs = fs::read_to_string(root.join("build-tool/src/main.rs"))?;
    problems.extend(subcommand_mismatches(&readme, &main_rs));
    let fuzz = fs::read_to_string(root.join("fuzz/Cargo.toml"))?;
    problems.extend(fuzz_target_mismatches(&readme, &fuzz));
    problems.extend(layout_mismatches(root, &readme)?);
    problems.extend(walkthrough_mismatches(root, &readme)?);
    Ok(problems)
}

/// The README section the example kernel implements, and the example.
const WALKTHROUGH: (&str, &str) = ("## Using it in your kernel", crate::example::DIR);
/// How a line of a README snippet starts that stands for any number of the example's
/// lines.
const ELISIONS: [&str; 3] = ["// ...", "# ...", "/* ..."];

/// Every `rust`/`toml`/`ld`/`asm` block of the walkthrough section that no file of the example
/// contains (see [`snippet_in`]).
fn walkthrough_mismatches(root: &Path, readme: &str) -> Result<Vec<String>> {
    let (heading, dir) = WALKTHROUGH;
    let mut files = Vec::new();
    for name in ["Cargo.toml", ".cargo/config.toml", "linker.ld", "build.rs"] {
        files.push(fs::read_to_string(root.join(dir).join(name))?);
    }
    for file in rust_files(&root.join(dir).join("src"))? {
        files.push(fs::read_to_string(file)?);
    }
    let blocks = fenced_blocks(section(readme, heading), &["rust", "toml", "ld", "asm"]);
    // The section's first line in the README, for line numbers.
    let base = readme
        .find(&format!("\n{heading}\n"))
        .map_or(0, |at| readme[..=at].lines().count() + 1);
    let mut out = Vec::new();
    if blocks.is_empty() {
        out.push(format!(
            "README.md: no rust/toml/ld blocks under `{heading}`"
        ));
    }
    for (line, block) in blocks {
        if !files.iter().any(|f| snippet_in(&block, f)) {
            out.push(format!(
                "README.md:{}: this block of `{heading}` is not in {dir} as written",
                base + line
            ));
        }
    }
    Ok(out)
}

/// The fenced blocks of `text` whose language is one of `langs`: (line in `text`, body).
fn fenced_blocks(text: &str, langs: &[&str]) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut open: Option<(usize, bool, String)> = None;
    for (n, line) in text.lines().enumerate() {
        let fence = line.trim_start().strip_prefix("```");
        match (&mut open, fence) {
            (None, Some(lang)) => open = Some((n + 1, langs.contains(&lang.trim()), String::new())),
            (Some((at, wanted, body)), Some(_)) => {
                if *wanted {
                    out.push((*at, std::mem::take(body)));
                }
                open = None;
            }
            (Some((_, _, body)), None) => {
                body.push_str(line);
                body.push('\n');
            }
            (None, None) => {}
        }
    }
    out
}

/// Whether `file` contains `snippet`: its non-blank lines, indentation aside, in order
/// and consecutive, except that an elision line ([`ELISIONS`]) skips any lines.
fn snippet_in(snippet: &str, file: &str) -> bool {
    let file: Vec<&str> = file
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let lines = snippet.lines().map(str::trim).filter(|l| !l.is_empty());
    let mut at = 0;
    let mut runs: Vec<Vec<&str>> = vec![Vec::new()];
    for line in lines {
        if ELISIONS.iter().any(|e| line.starts_with(e)) {
            runs.push(Vec::new());
        } else if let Some(run) = runs.last_mut() {
            run.push(line);
        }
    }
    for run in runs.iter().filter(|r| !r.is_empty()) {
        match find_run(&file, run, at) {
            Some(end) => at = end,
            None => return false,
        }
    }
    true
}

/// The index after the first occurrence of `run` in `file` at or after `from`.
fn find_run(file: &[&str], run: &[&str], from: usize) -> Option<usize> {
    (from..=file.len().checked_sub(run.len())?)
        .find(|&i| file[i..i + run.len()] == *run)
        .map(|i| i + run.len())
}

/// Lines of `text` (the file `rel`) that state an x86 fact outside the x86 homes.
pub(crate) fn x86_violations(rel: &str, text: &str) -> Vec<String> {
    if X86_HOMES.iter().any(|home| rel.starts_with(home)) {
        return Vec::new();
    }
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let mut found: Vec<String> = Vec::new();
        for needle in ["R_X86_64_", "EM_X86_64"] {
            if line.contains(needle) {
                found.push(needle.to_string());
            }
        }
        let squeezed: String = line
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect::<String>()
            .to_ascii_lowercase();
        for seq in X86_SEQUENCES {
            if squeezed.contains(seq) {
                found.push(seq.replace(',', ", "));
            }
        }
        for word in words(line) {
            let lower = word.to_ascii_lowercase();
            let literal = lower.trim_end_matches("u8").trim_end_matches('_');
            if X86_OPCODES.contains(&literal) {
                found.push(word.to_string());
            }
            if X86_REGISTERS.contains(&word) {
                found.push(format!("register {word}"));
            }
        }
        if !found.is_empty() {
            out.push(format!(
                "{rel}:{}: x86 fact outside arch/x86_64 and target/x86_64: {}",
                n + 1,
                found.join(", ")
            ));
        }
    }
    out
}

/// The words of a line: maximal runs of ASCII letters, digits and `_`.
fn words(line: &str) -> impl Iterator<Item = &str> {
    line.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty())
}

/// The subcommands `main.rs`'s `enum Command` defines (kebab-case, or the
/// `#[command(name = "…")]` given).
pub(crate) fn defined_subcommands(main_rs: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let Some(start) = main_rs.find("enum Command {") else {
        return out;
    };
    let mut renamed: Option<String> = None;
    for line in main_rs[start..].lines().skip(1) {
        if line.starts_with('}') {
            break;
        }
        if line.trim_start().starts_with("#[command(") {
            let named = ["(name = \"", " name = \""]
                .iter()
                .find_map(|p| line.find(p).map(|at| at + p.len()));
            if let Some(at) = named {
                renamed = line[at..].split('"').next().map(str::to_string);
            }
        }
        let Some(variant) = line.strip_prefix("    ") else {
            continue;
        };
        let ident: String = variant
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect();
        let rest = &variant[ident.len()..];
        let is_variant = ident.starts_with(|c: char| c.is_ascii_uppercase())
            && (rest.starts_with(" {") || rest.starts_with('(') || rest.starts_with(','));
        if is_variant {
            out.insert(renamed.take().unwrap_or_else(|| kebab(&ident)));
        }
    }
    out
}

fn kebab(ident: &str) -> String {
    let mut out = String::new();
    for (i, c) in ident.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('-');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// The README's `## The CLI` section: the first word after `ksites ` on each line of its
/// first code block.
pub(crate) fn documented_subcommands(readme: &str) -> BTreeSet<String> {
    let section = section(readme, "## The CLI");
    let mut lines = section.lines().skip_while(|l| !l.starts_with("```"));
    lines.next();
    lines
        .take_while(|l| !l.starts_with("```"))
        .filter_map(|l| l.strip_prefix("ksites "))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter(|w| w.chars().all(|c| c.is_ascii_lowercase() || c == '-'))
        .map(str::to_string)
        .collect()
}

fn subcommand_mismatches(readme: &str, main_rs: &str) -> Vec<String> {
    let defined = defined_subcommands(main_rs);
    let documented = documented_subcommands(readme);
    let mut out = Vec::new();
    if defined.is_empty() {
        out.push("build-tool/src/main.rs: no `enum Command` subcommands found".to_string());
    }
    for s in defined.difference(&documented) {
        out.push(format!(
            "README.md: the CLI block does not list `ksites {s}`"
        ));
    }
    for s in documented.difference(&defined) {
        out.push(format!(
            "README.md: the CLI block lists `ksites {s}`, which build-tool does not define"
        ));
    }
    out
}

fn fuzz_target_mismatches(readme: &str, fuzz_toml: &str) -> Vec<String> {
    let spans = backticked(readme);
    let mut out = Vec::new();
    let mut bins = false;
    let mut any = false;
    for line in fuzz_toml.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            bins = line == "[[bin]]";
        } else if bins && line.starts_with("name") {
            let name = line.split('"').nth(1).unwrap_or_default();
            any = true;
            if !spans.iter().any(|s| s == name) {
                out.push(format!("README.md: does not name the fuzz target `{name}`"));
            }
        }
    }
    if !any {
        out.push("fuzz/Cargo.toml: no [[bin]] fuzz targets found".to_string());
    }
    out
}

/// The README's Layout section names every top-level module of the two library crates,
/// and every path it gives from the root (a backticked span with a `/` whose first
/// component is a top-level directory, no braces or wildcards) exists.
fn layout_mismatches(root: &Path, readme: &str) -> Result<Vec<String>> {
    let layout = section(readme, "## Layout");
    let mut out = Vec::new();
    if layout.is_empty() {
        out.push("README.md: no `## Layout` section".to_string());
        return Ok(out);
    }
    let spans = backticked(layout);
    let tokens: BTreeSet<&str> = spans.iter().flat_map(|s| words(s)).collect();
    for dir in SEAM_DIRS {
        for entry in fs::read_dir(root.join(dir))? {
            let path = entry?.path();
            let name = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default();
            let is_module = path.is_dir() || path.extension().is_some_and(|e| e == "rs");
            if !is_module || matches!(name, "lib" | "main" | "bin") {
                continue;
            }
            if !tokens.contains(name) {
                out.push(format!(
                    "README.md: the Layout section does not name `{dir}/{name}`"
                ));
            }
        }
    }
    for span in &spans {
        // A path from the root: its first component is a top-level directory.
        let first = span.split('/').next().unwrap_or_default();
        let is_path = span.contains('/')
            && !span.contains(['{', '*', ' ', '<'])
            && !first.is_empty()
            && root.join(first).is_dir();
        if is_path && !root.join(span.trim_end_matches('/')).exists() {
            out.push(format!(
                "README.md: the Layout section names `{span}`, which does not exist"
            ));
        }
    }
    Ok(out)
}

/// The text of the section that starts with the heading `heading`, up to the next
/// heading of the same or a higher level.
fn section<'a>(text: &'a str, heading: &str) -> &'a str {
    let Some(start) = text.find(&format!("\n{heading}\n")) else {
        return "";
    };
    let body = &text[start + heading.len() + 2..];
    let level = heading.chars().take_while(|&c| c == '#').count();
    let mut end = body.len();
    let mut at = 0;
    for line in body.split_inclusive('\n') {
        let hashes = line.chars().take_while(|&c| c == '#').count();
        if hashes > 0 && hashes <= level && line[hashes..].starts_with(' ') {
            end = at;
            break;
        }
        at += line.len();
    }
    &body[..end]
}

/// Every `inline code` span of a Markdown text (outside fenced blocks).
fn backticked(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        let mut parts = line.split('`');
        parts.next();
        while let Some(code) = parts.next() {
            out.push(code.to_string());
            parts.next();
        }
    }
    out
}

fn rust_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

fn relative(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .to_string_lossy()
        .replace('\\', "/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tree_is_tidy() {
        let root = crate::project_root();
        let problems = check(&root).expect("reading the tree");
        assert!(problems.is_empty(), "tidy:\n{}", problems.join("\n"));
    }

    #[test]
    fn an_opcode_outside_arch_is_refused() {
        let text = "//! table\nconst CALL: u8 = 0xe8;\n";
        let v = x86_violations("kernel-loader/src/format.rs", text);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].starts_with("kernel-loader/src/format.rs:2:"), "{v:?}");
        assert!(x86_violations("kernel-loader/src/arch/x86_64/branch.rs", text).is_empty());
        assert!(x86_violations("build-tool/src/target/x86_64.rs", text).is_empty());
        // The dispatchers beside them name no encoding.
        assert_eq!(
            x86_violations("build-tool/src/target/mod.rs", text).len(),
            1
        );
        assert_eq!(
            x86_violations("kernel-loader/src/arch/mod.rs", text).len(),
            1
        );
    }

    #[test]
    fn every_x86_kind_of_fact_is_caught() {
        for line in [
            "let r = object::elf::R_X86_64_PC32;",
            "if m != EM_X86_64 {}",
            "const NOP: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];",
            "const T: [u8; 2] = [0xFF, 0x25];",
            "const E: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];",
            "b[0] = 0xcc_u8;",
            "let ret = 0xC3;",
            "// arguments in rdi and rsi",
            "let s = \"8@%rdi\";",
        ] {
            assert_eq!(
                x86_violations("build-tool/src/sites.rs", line).len(),
                1,
                "not caught: {line}"
            );
        }
        for line in ["let mask = 0xff;", "let x = 0xe80;", "let rdx_like = r_dx;"] {
            assert!(
                x86_violations("build-tool/src/sites.rs", line).is_empty(),
                "{line}"
            );
        }
    }

    #[test]
    fn subcommands_are_read_from_main_and_readme() {
        let main_rs = "enum Command {\n    /// Doc\n    Embed {\n        x: u8,\n    },\n    \
                       #[command(name = \"check-module\")]\n    CheckModule {\n        \
                       #[arg(long, value_name = \"ADDR\")]\n        a: u8,\n    },\n    \
                       Scan(ScanArgs),\n}\n";
        let defined = defined_subcommands(main_rs);
        assert_eq!(
            defined.into_iter().collect::<Vec<_>>(),
            ["check-module", "embed", "scan"]
        );
        let readme = "# x\n\n## The CLI\n\n```\nksites embed A -o B\nksites scan FILE\n\
                      ksites-ld ARGS\n```\n\n## Next\n";
        let documented = documented_subcommands(readme);
        assert_eq!(
            documented.into_iter().collect::<Vec<_>>(),
            ["embed", "scan"]
        );
        let problems = subcommand_mismatches(readme, main_rs);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("check-module"));
    }

    #[test]
    fn fuzz_targets_must_be_named() {
        let toml = "[package]\nname = \"f\"\n\n[[bin]]\nname = \"a\"\n\n[[bin]]\nname = \"b\"\n";
        let problems = fuzz_target_mismatches("targets `a`", toml);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("`b`"));
    }

    #[test]
    fn readme_snippets_are_found_in_the_example() {
        let file = "fn a() {\n    let x = 1;\n\n    let y = 2;\n    done(x, y);\n}\n";
        assert!(snippet_in("let x = 1;\nlet y = 2;\n", file));
        assert!(snippet_in(
            "fn a() {\n// ... the rest\n    done(x, y);\n",
            file
        ));
        assert!(
            !snippet_in("let x = 1;\ndone(x, y);\n", file),
            "not consecutive"
        );
        assert!(
            !snippet_in("let y = 2;\n// ...\nlet x = 1;\n", file),
            "out of order"
        );
        assert!(!snippet_in("let x = 2;\n", file));
        let readme = "## S\n```rust\nlet x = 1;\n```\n```sh\nls\n```\n```toml\n[a]\n```\n";
        let blocks = fenced_blocks(readme, &["rust", "toml"]);
        assert_eq!(
            blocks,
            [(2, "let x = 1;\n".to_string()), (8, "[a]\n".to_string())]
        );
    }

    #[test]
    fn sections_end_at_the_next_heading() {
        let text = "# t\n\n## Layout\n\nrow `a/b`\n### sub\n`c/d`\n## Next\n`e/f`\n";
        let s = section(text, "## Layout");
        assert!(s.contains("a/b") && s.contains("c/d") && !s.contains("e/f"));
        assert_eq!(backticked(s), ["a/b", "c/d"]);
    }
}
