//! Cross-check `ksites inspect` against `objdump -dr`: for every ifunc, the number of sites
//! the build tool found must equal the number of branch instructions whose relocation
//! names the ifunc's trampoline: x86_64 `call`/`jmp`/`j<cc>` with PLT32/PC32, aarch64
//! `bl`/`b` with CALL26/JUMP26 (`aarch64-linux-gnu-objdump`), riscv64 calls and tail
//! calls in every form relaxation leaves them (`riscv64-linux-gnu-objdump`): an `auipc
//! ra`/`auipc t1` with CALL/CALL_PLT followed by `jalr …(ra)`/`jr …(t1)`, a `jal`
//! linking `ra` or a `j` (`jal zero` or `c.j`) with JAL/RVC_JUMP (or a relaxed CALL).
//! The kernels are linked with `--emit-relocs`, so the relocations are still there.
//! On riscv64 the check also goes site by site: every site `ksites inspect` lists must
//! be such a call at the same address ([`site_forms`]), counted by its form (pair,
//! `jal`, `c.j`: [`render_forms`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The static keys' cross-check (issue 18): `ksites inspect` against the key site
/// records.
#[path = "crosscheck_keys.rs"]
pub(crate) mod keys;

/// One `ifunc <name> trampoline=0x<hex> <symbol> sites=<N>` line of `ksites inspect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InspectedIfunc {
    pub(crate) name: String,
    pub(crate) trampoline: u64,
    pub(crate) symbol: String,
    pub(crate) sites: usize,
}

/// Parse the `ifunc` lines of `ksites inspect` output. Other lines (headers, indented
/// `  site …` lines, probes) are ignored; an `ifunc … trampoline=…` line that does not
/// have exactly the expected shape is an error.
pub(crate) fn parse_inspect(text: &str) -> Result<Vec<InspectedIfunc>, String> {
    let mut ifuncs = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let Some(rest) = line.strip_prefix("ifunc ") else {
            continue;
        };
        if !rest.contains(" trampoline=") {
            continue;
        }
        let bad = || {
            format!(
                "ksites inspect, line {}: expected `ifunc <name> trampoline=0x<hex> <symbol> \
                 sites=<N>`, got `{line}`",
                index + 1
            )
        };
        let fields: Vec<&str> = rest.split(' ').collect();
        let [name, trampoline, symbol, sites] = fields[..] else {
            return Err(bad());
        };
        let trampoline = trampoline
            .strip_prefix("trampoline=0x")
            .filter(|hex| is_hex(hex))
            .and_then(|hex| u64::from_str_radix(hex, 16).ok())
            .ok_or_else(bad)?;
        let sites = sites
            .strip_prefix("sites=")
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse().ok())
            .ok_or_else(bad)?;
        if name.is_empty() || symbol.is_empty() {
            return Err(bad());
        }
        ifuncs.push(InspectedIfunc {
            name: name.to_owned(),
            trampoline,
            symbol: symbol.to_owned(),
            sites,
        });
    }
    Ok(ifuncs)
}

/// The `  site 0x<hex> …` lines under each `ifunc` line of `ksites inspect` output, as
/// (ifunc name, site address); the sites listed under a `probe` line are not ifunc sites.
pub(crate) fn parse_inspect_sites(text: &str) -> Result<Vec<(String, u64)>, String> {
    let mut sites = Vec::new();
    let mut ifunc: Option<&str> = None;
    for (index, line) in text.lines().enumerate() {
        if let Some(rest) = line.strip_prefix("ifunc ") {
            ifunc = rest.split(' ').next();
        } else if !line.starts_with(' ') {
            ifunc = None;
        } else if let (Some(name), Some(rest)) = (ifunc, line.strip_prefix("  site ")) {
            let addr = rest
                .split(' ')
                .next()
                .and_then(|a| a.strip_prefix("0x"))
                .filter(|hex| is_hex(hex))
                .and_then(|hex| u64::from_str_radix(hex, 16).ok())
                .ok_or_else(|| {
                    format!(
                        "ksites inspect, line {}: expected `  site 0x<hex> …`, got `{line}`",
                        index + 1
                    )
                })?;
            sites.push((name.to_owned(), addr));
        }
    }
    Ok(sites)
}

/// The relocations that make a branch instruction a branch to their symbol: x86_64's
/// PLT32/PC32 (`call`/`jmp`/`j<cc>`), aarch64's CALL26 (`bl`) and JUMP26 (`b`).
const BRANCH_RELOCS: &[&str] = &[
    "R_X86_64_PLT32",
    "R_X86_64_PC32",
    "R_AARCH64_CALL26",
    "R_AARCH64_JUMP26",
];

/// Count, per symbol, the [`BRANCH_RELOCS`] relocations (any addend) that belong to a
/// branch instruction (x86_64 `call`, `jmp`, `j<cc>`; aarch64 `bl`, `b`), and the
/// riscv64 calls and tail calls ([`riscv64_calls`]), in `objdump -dr
/// --no-show-raw-insn` output. A relocation line belongs to the instruction line just
/// before it.
pub(crate) fn count_branch_relocs(objdump: &str) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for call in scan(objdump) {
        *counts.entry(call.symbol).or_default() += 1;
    }
    counts
}

/// The form of a riscv64 ifunc call site (the table's `prefixes` value: the riscv64
/// contract's forms 0, 1 and 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Form {
    /// `auipc rX` + `jalr`/`jr` through `rX`, 8 bytes: what the compiler emits.
    Pair,
    /// `jal ra` or `j` (`jal zero`), 4 bytes: a pair relaxed by the linker.
    Jal,
    /// `c.j`, 2 bytes: a tail-call pair relaxed by the linker.
    CJ,
}

/// One branch objdump shows to `symbol`, at `addr` (a pair's `auipc`); `form` is
/// `None` off riscv64.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Call {
    pub(crate) addr: u64,
    pub(crate) symbol: String,
    pub(crate) form: Option<Form>,
}

/// The riscv64 calls and tail calls of `riscv64-linux-gnu-objdump -dr
/// --no-show-raw-insn` output, in every form relaxation leaves them: an `auipc ra`
/// (`auipc t1`) with CALL/CALL_PLT followed by `jalr …(ra)` (`jr …(t1)`), a `jal`
/// linking `ra` or a `j` with JAL, RVC_JUMP or a relaxed CALL. objdump prints `c.j` as
/// `j` too: a `j` is a `c.j` when the next instruction starts 2 bytes after it (or, at
/// the end of the listing, when its relocation is RVC_JUMP).
pub(crate) fn riscv64_calls(objdump: &str) -> Vec<Call> {
    scan(objdump)
        .into_iter()
        .filter(|c| c.form.is_some())
        .collect()
}

fn scan(objdump: &str) -> Vec<Call> {
    let mut calls = Vec::new();
    let mut after_branch = false;
    // riscv64: the instruction the relocations belong to (address, mnemonic, operands),
    // a CALL on an `auipc` waiting for the `jalr` after it (symbol, the `auipc`'s
    // register, its address), and the `j` whose length the next instruction tells.
    let mut riscv_last: Option<(u64, String, String)> = None;
    let mut riscv_pair: Option<(String, String, u64)> = None;
    let mut short_jump: Option<usize> = None;
    for line in objdump.lines() {
        let Some((address, rest)) = line.trim_start().split_once(':') else {
            continue;
        };
        if !is_hex(address) {
            // Symbol headers (`0000000000101230 <foo>:`), section headers, file header.
            after_branch = false;
            riscv_last = None;
            riscv_pair = None;
            continue;
        }
        let Ok(addr) = u64::from_str_radix(address, 16) else {
            continue;
        };
        let rest = rest.trim_start();
        if let Some(r) = rest.strip_prefix("R_RISCV_") {
            let mut parts = r.split_whitespace();
            let (Some(kind), Some(target)) = (parts.next(), parts.next()) else {
                continue;
            };
            let symbol = strip_addend(target).to_owned();
            if let Some((at, mnemonic, operands)) = &riscv_last {
                match (kind, mnemonic.as_str()) {
                    ("CALL" | "CALL_PLT", "auipc") => {
                        let rx = operands.split(',').next().unwrap_or("").to_owned();
                        riscv_pair = Some((symbol, rx, *at));
                    }
                    ("CALL" | "CALL_PLT" | "JAL" | "RVC_JUMP", "j")
                    | ("CALL" | "CALL_PLT" | "JAL", "jal")
                        if mnemonic == "j" || !operands.contains(',') =>
                    {
                        let form = if kind == "RVC_JUMP" {
                            Form::CJ
                        } else {
                            Form::Jal
                        };
                        short_jump = (mnemonic == "j").then_some(calls.len());
                        calls.push(Call {
                            addr: *at,
                            symbol,
                            form: Some(form),
                        });
                    }
                    _ => {}
                }
            }
            continue;
        }
        if rest.starts_with("R_X86_64_") || rest.starts_with("R_AARCH64_") {
            let mut parts = rest.split_whitespace();
            let (Some(kind), Some(target)) = (parts.next(), parts.next()) else {
                continue;
            };
            if after_branch && BRANCH_RELOCS.contains(&kind) {
                calls.push(Call {
                    addr,
                    symbol: strip_addend(target).to_owned(),
                    form: None,
                });
            }
        } else {
            if let Some(j) = short_jump.take() {
                let call = &mut calls[j];
                if addr == call.addr + 2 {
                    call.form = Some(Form::CJ);
                } else if addr == call.addr + 4 {
                    call.form = Some(Form::Jal);
                }
            }
            after_branch = is_branch(rest);
            let mut tokens = rest.split_whitespace();
            let mnemonic = tokens.next().unwrap_or("").to_owned();
            let operands = tokens.next().unwrap_or("").to_owned();
            // `jalr 282(ra)` (links ra) after `auipc ra`; `jr 246(t1)` after `auipc t1`.
            if let Some((symbol, rx, at)) = riscv_pair.take() {
                let through = |r: &str| operands.ends_with(&format!("({r})"));
                let call = mnemonic == "jalr" && rx == "ra" && !operands.contains(',');
                let tail = mnemonic == "jr" && rx == "t1";
                if (call || tail) && through(&rx) {
                    calls.push(Call {
                        addr: at,
                        symbol,
                        form: Some(Form::Pair),
                    });
                }
            }
            riscv_last = Some((addr, mnemonic, operands));
        }
    }
    calls
}

/// Whether an instruction's text (`bnd jmp 1234 <x>`, `callq 1234 <x>`, `jne,pt 10 <y>`,
/// aarch64 `bl 40211a34 <x>`) is a direct call, unconditional jump or conditional jump,
/// ignoring prefixes. Indirect forms (`call *0x0(%rip)`; aarch64's `blr`/`br` take a
/// register) read a pointer *at* the symbol, so they are not branches to it.
fn is_branch(instruction: &str) -> bool {
    let mut tokens = instruction
        .split_whitespace()
        .skip_while(|token| is_prefix(token));
    let Some(mnemonic) = tokens.next() else {
        return false;
    };
    if tokens
        .next()
        .is_some_and(|operand| operand.starts_with('*'))
    {
        return false;
    }
    // Branch hints: `jne,pt` / `jne,pn`.
    let mnemonic = mnemonic.split(',').next().unwrap_or(mnemonic);
    is_branch_mnemonic(mnemonic)
        || mnemonic == "bl"
        || mnemonic == "b"
        || mnemonic
            .strip_suffix('q')
            .is_some_and(|m| m == "call" || m == "jmp")
}

fn is_prefix(token: &str) -> bool {
    const PREFIXES: &[&str] = &[
        "cs", "ds", "es", "ss", "fs", "gs", "bnd", "notrack", "data16", "data32", "addr16",
        "addr32", "lock", "rep", "repz", "repe", "repnz", "repne", "xacquire", "xrelease",
    ];
    PREFIXES.contains(&token) || token.starts_with("rex") || token.starts_with('{')
}

fn is_branch_mnemonic(mnemonic: &str) -> bool {
    const CONDITIONS: &[&str] = &[
        "o", "no", "b", "c", "nae", "ae", "nb", "nc", "e", "z", "ne", "nz", "be", "na", "a", "nbe",
        "s", "ns", "p", "pe", "np", "po", "l", "nge", "ge", "nl", "le", "ng", "g", "nle",
    ];
    mnemonic == "call"
        || mnemonic == "jmp"
        || mnemonic
            .strip_prefix('j')
            .is_some_and(|cc| CONDITIONS.contains(&cc))
}

/// `sym-0x4` → `sym`, `sym+0x10` → `sym`, `sym` → `sym`.
fn strip_addend(target: &str) -> &str {
    if let Some(at) = target.rfind(['+', '-']) {
        let (symbol, addend) = target.split_at(at);
        if !symbol.is_empty() && addend[1..].strip_prefix("0x").is_some_and(is_hex) {
            return symbol;
        }
    }
    target
}

fn is_hex(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// One row of the cross-check table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Row {
    pub(crate) name: String,
    pub(crate) symbol: String,
    pub(crate) inspect: usize,
    pub(crate) objdump: usize,
}

/// Pair every inspected ifunc with objdump's count for its trampoline symbol.
pub(crate) fn compare(ifuncs: &[InspectedIfunc], counts: &BTreeMap<String, usize>) -> Vec<Row> {
    ifuncs
        .iter()
        .map(|f| Row {
            name: f.name.clone(),
            symbol: f.symbol.clone(),
            inspect: f.sites,
            objdump: counts.get(&f.symbol).copied().unwrap_or(0),
        })
        .collect()
}

/// The `ifunc  inspect  objdump` table.
pub(crate) fn render(rows: &[Row]) -> String {
    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(0).max(5);
    let mut out = format!("{:<width$}  inspect  objdump\n", "ifunc");
    for row in rows {
        let mark = if row.inspect == row.objdump {
            ""
        } else {
            "  <-- MISMATCH"
        };
        let _ = writeln!(
            out,
            "{:<width$}  {:>7}  {:>7}{mark}",
            row.name, row.inspect, row.objdump
        );
    }
    out
}

/// How many sites of an ifunc are in each riscv64 [`Form`]: pair, `jal`, `c.j`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct FormCounts {
    pub(crate) pair: usize,
    pub(crate) jal: usize,
    pub(crate) c_j: usize,
}

impl FormCounts {
    /// The sites linker relaxation shortened (`jal` and `c.j`).
    pub(crate) fn relaxed(&self) -> usize {
        self.jal + self.c_j
    }

    fn add(&mut self, form: Form) {
        match form {
            Form::Pair => self.pair += 1,
            Form::Jal => self.jal += 1,
            Form::CJ => self.c_j += 1,
        }
    }
}

/// riscv64: every site `ksites inspect` lists (`sites`, from [`parse_inspect_sites`])
/// must be one of objdump's `calls` ([`riscv64_calls`]) at the same address to the
/// ifunc's trampoline, so the table and objdump agree site by site, not only in
/// number. Returns each ifunc's sites by the form objdump shows them in.
pub(crate) fn site_forms(
    ifuncs: &[InspectedIfunc],
    sites: &[(String, u64)],
    calls: &[Call],
) -> Result<BTreeMap<String, FormCounts>, String> {
    let by_addr: BTreeMap<u64, &Call> = calls.iter().map(|c| (c.addr, c)).collect();
    let mut forms: BTreeMap<String, FormCounts> = ifuncs
        .iter()
        .map(|f| (f.name.clone(), FormCounts::default()))
        .collect();
    let mut problems = Vec::new();
    for (name, addr) in sites {
        let Some(f) = ifuncs.iter().find(|f| &f.name == name) else {
            problems.push(format!("site {addr:#x} of unknown ifunc {name}"));
            continue;
        };
        match by_addr.get(addr) {
            Some(Call {
                symbol,
                form: Some(form),
                ..
            }) if *symbol == f.symbol => {
                if let Some(counts) = forms.get_mut(name) {
                    counts.add(*form);
                }
            }
            _ => problems.push(format!(
                "{name}: site {addr:#x} is no call or tail call objdump shows to {}",
                f.symbol
            )),
        }
    }
    if problems.is_empty() {
        Ok(forms)
    } else {
        Err(format!(
            "ksites inspect lists sites objdump does not:\n  {}",
            problems.join("\n  ")
        ))
    }
}

/// The cross-check table with the riscv64 form columns (`pair  jal  c.j`) and a
/// `total` line.
pub(crate) fn render_forms(rows: &[Row], forms: &BTreeMap<String, FormCounts>) -> String {
    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(0).max(5);
    let mut out = format!(
        "{:<width$}  inspect  objdump   pair    jal    c.j\n",
        "ifunc"
    );
    let mut total = (0, 0, FormCounts::default());
    for row in rows {
        let f = forms.get(&row.name).copied().unwrap_or_default();
        let mark = if row.inspect == row.objdump {
            ""
        } else {
            "  <-- MISMATCH"
        };
        let _ = writeln!(
            out,
            "{:<width$}  {:>7}  {:>7}  {:>5}  {:>5}  {:>5}{mark}",
            row.name, row.inspect, row.objdump, f.pair, f.jal, f.c_j
        );
        total.0 += row.inspect;
        total.1 += row.objdump;
        total.2.pair += f.pair;
        total.2.jal += f.jal;
        total.2.c_j += f.c_j;
    }
    let (inspect, objdump, f) = total;
    let _ = writeln!(
        out,
        "{:<width$}  {inspect:>7}  {objdump:>7}  {:>5}  {:>5}  {:>5}",
        "total", f.pair, f.jal, f.c_j
    );
    out
}

/// Ok if there is at least one ifunc and every count agrees.
pub(crate) fn check(rows: &[Row]) -> Result<(), String> {
    if rows.is_empty() {
        return Err("ksites inspect reported no ifuncs in the test kernel".to_owned());
    }
    let mismatches: Vec<String> = rows
        .iter()
        .filter(|r| r.inspect != r.objdump)
        .map(|r| {
            format!(
                "{} (trampoline {}): ksites inspect found {} site(s), objdump shows {} \
                 call/jmp relocation(s)",
                r.name, r.symbol, r.inspect, r.objdump
            )
        })
        .collect();
    if mismatches.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "site counts disagree with objdump:\n  {}",
            mismatches.join("\n  ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INSPECT: &str = "\
ksites table v1, x86_64, 2 ifuncs, 3 ifunc sites, 1 probe
ifunc kfuncs::popcount trampoline=0x101000 __ksites_tramp_popcount sites=2
  site 0x101234 call
  site 0x101300 jmp (tail call)
ifunc kfuncs::sum_u32 trampoline=0x101010 _ZN6kfuncs7sum_u3210trampoline17h0123456789abcdefE sites=1
  site 0x101400 call
probe net:rx sites=1
";

    #[test]
    fn parses_inspect() {
        let ifuncs = parse_inspect(INSPECT).unwrap();
        assert_eq!(
            ifuncs,
            vec![
                InspectedIfunc {
                    name: "kfuncs::popcount".into(),
                    trampoline: 0x101000,
                    symbol: "__ksites_tramp_popcount".into(),
                    sites: 2,
                },
                InspectedIfunc {
                    name: "kfuncs::sum_u32".into(),
                    trampoline: 0x101010,
                    symbol: "_ZN6kfuncs7sum_u3210trampoline17h0123456789abcdefE".into(),
                    sites: 1,
                },
            ]
        );
    }

    #[test]
    fn rejects_malformed_inspect() {
        for bad in [
            "ifunc a trampoline=0x10 sym\n",
            "ifunc a trampoline=10 sym sites=1\n",
            "ifunc a trampoline=0xzz sym sites=1\n",
            "ifunc a trampoline=0x10 sym sites=x\n",
            "ifunc a trampoline=0x10 sym sites=1 extra\n",
            "ifunc a  trampoline=0x10 sym sites=1\n",
        ] {
            assert!(parse_inspect(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_inspect("ifuncs: 0\n").unwrap(), vec![]);
    }

    const OBJDUMP: &str = "
qemu-tests-kernel:     file format elf64-x86-64


Disassembly of section .text:

0000000000101000 <__ksites_tramp_popcount>:
  101000:\tjmp    *0x1000(%rip)        # 102006 <slot>
\t\t\t101002: R_X86_64_PC32\t__ksites_slot_popcount-0x4
  101006:\tcs nopw 0x0(%rax,%rax,1)

0000000000101234 <caller>:
  101234:\tcall   101239 <caller+0x5>
\t\t\t101235: R_X86_64_PLT32\t__ksites_tramp_popcount-0x4
  101239:\tbnd jmp 10123e <caller+0xa>
\t\t\t10123a: R_X86_64_PLT32\t__ksites_tramp_popcount-0x4
  10123e:\tjne    101244 <caller+0x10>
\t\t\t101240: R_X86_64_PC32\t__ksites_tramp_popcount+0x10
  101244:\tcallq  101249 <caller+0x15>
\t\t\t101245: R_X86_64_PLT32\tsum-0x4
  101249:\tnotrack jmpq  10124e <caller+0x1a>
\t\t\t10124a: R_X86_64_PC32\tsum-0x4
  10124e:\tlea    0x0(%rip),%rax        # 101255 <caller+0x21>
\t\t\t101251: R_X86_64_PC32\t__ksites_tramp_popcount-0x4
  101255:\tmov    0x0(%rip),%rax        # 10125c <caller+0x28>
\t\t\t101258: R_X86_64_PLT32\tsum-0x4
  10125c:\tcall   *0x0(%rip)        # 101262 <caller+0x2e>
\t\t\t10125e: R_X86_64_GOTPCRELX\tsum-0x4
  101262:\tje,pt  101268 <caller+0x34>
\t\t\t101264: R_X86_64_PLT32\tsum_more-0x4
  101268:\tcall   10126d <caller+0x39>
\t\t\t101269: R_X86_64_PLT32\tsum_more
";

    #[test]
    fn counts_objdump_branches() {
        let counts = count_branch_relocs(OBJDUMP);
        let expected: BTreeMap<String, usize> = [
            ("__ksites_tramp_popcount".to_owned(), 3),
            ("sum".to_owned(), 2),
            ("sum_more".to_owned(), 2),
        ]
        .into_iter()
        .collect();
        assert_eq!(counts, expected);
    }

    /// `aarch64-linux-gnu-objdump -dr --no-show-raw-insn` of a kernel linked with
    /// `--emit-relocs`.
    const OBJDUMP_AARCH64: &str = "
qemu-tests-kernel:     file format elf64-littleaarch64

Disassembly of section .text:

0000000040211a34 <_ZN6kfuncs9fetch_add17hE>:
    40211a34:\tadrp\tx16, 4022c000 <slot>
\t\t\t40211a34: R_AARCH64_ADR_PREL_PG_HI21\t.data.ksites_slot+0x18
    40211a38:\tldr\tx16, [x16, #320]
    40211a3c:\tbr\tx16

0000000040211b90 <counter_add>:
    40211ba0:\tb\t40211a34 <_ZN6kfuncs9fetch_add17hE>
\t\t\t40211ba0: R_AARCH64_JUMP26\t_ZN6kfuncs9fetch_add17hE
    40211bc4:\tbl\t40211a34 <_ZN6kfuncs9fetch_add17hE>
\t\t\t40211bc4: R_AARCH64_CALL26\t_ZN6kfuncs9fetch_add17hE
    40211bc8:\tadrp\tx0, 40211000 <counter_add>
\t\t\t40211bc8: R_AARCH64_ADR_PREL_PG_HI21\t_ZN6kfuncs9fetch_add17hE
    40211bcc:\tadd\tx0, x0, #0xa34
\t\t\t40211bcc: R_AARCH64_ADD_ABS_LO12_NC\t_ZN6kfuncs9fetch_add17hE
    40211bd0:\tb.ne\t40211bd8 <counter_add+0x48>
    40211bd4:\tbl\t40211000 <other>
\t\t\t40211bd4: R_AARCH64_CALL26\tother+0x8
";

    #[test]
    fn counts_aarch64_objdump_branches() {
        let counts = count_branch_relocs(OBJDUMP_AARCH64);
        let expected: BTreeMap<String, usize> = [
            ("_ZN6kfuncs9fetch_add17hE".to_owned(), 2),
            ("other".to_owned(), 1),
        ]
        .into_iter()
        .collect();
        assert_eq!(counts, expected);
    }

    /// `riscv64-linux-gnu-objdump -dr --no-show-raw-insn` of a kernel linked with
    /// `--emit-relocs`, relaxed (`jal`, `j`) and not (pairs).
    const OBJDUMP_RISCV64: &str = "
k.elf:     file format elf64-littleriscv

Disassembly of section .text:

0000000000010120 <c_calls>:
   10124:\tauipc\tra,0x0
\t\t\t10124: R_RISCV_CALL_PLT\tfixture_add
\t\t\t10124: R_RISCV_RELAX\t*ABS*
   10128:\tjalr\t282(ra) # 10240 <fixture_add>
   1012c:\tjal\t10240 <fixture_add>
\t\t\t1012c: R_RISCV_JAL\tfixture_add
   10130:\tj\t10240 <fixture_add>
\t\t\t10130: R_RISCV_RVC_JUMP\tfixture_add
   10132:\tj\t10240 <fixture_add>
\t\t\t10132: R_RISCV_JAL\tfixture_add
   10136:\tauipc\tt1,0x0
\t\t\t10136: R_RISCV_CALL_PLT\tfixture_add
   1013a:\tjr\t246(t1) # 10240 <fixture_add>
   1013e:\tjal\tt0,10240 <fixture_add>
\t\t\t1013e: R_RISCV_JAL\tfixture_add
   10142:\tauipc\tt0,0x0
\t\t\t10142: R_RISCV_CALL_PLT\tfixture_add
   10146:\tjalr\tt0,230(t0) # 10240 <fixture_add>
   1014a:\tauipc\ta0,0x0
\t\t\t1014a: R_RISCV_PCREL_HI20\tfixture_add
   1014e:\taddi\ta0,a0,242 # 10240 <fixture_add>
   10152:\tbnez\ta0,10240 <fixture_add>
\t\t\t10152: R_RISCV_RVC_BRANCH\tfixture_add
   10154:\tauipc\tra,0x0
\t\t\t10154: R_RISCV_CALL_PLT\tother+0x4
   10158:\tjalr\t-4(ra) # 10154 <other>
";

    #[test]
    fn counts_riscv64_objdump_calls_in_every_form() {
        let counts = count_branch_relocs(OBJDUMP_RISCV64);
        let expected: BTreeMap<String, usize> =
            [("fixture_add".to_owned(), 5), ("other".to_owned(), 1)]
                .into_iter()
                .collect();
        assert_eq!(counts, expected);
    }

    #[test]
    fn riscv64_calls_with_their_forms() {
        let call = |addr, symbol: &str, form| Call {
            addr,
            symbol: symbol.into(),
            form: Some(form),
        };
        let mut calls = riscv64_calls(OBJDUMP_RISCV64);
        calls.sort_by_key(|c| c.addr);
        assert_eq!(
            calls,
            [
                call(0x10124, "fixture_add", Form::Pair),
                call(0x1012c, "fixture_add", Form::Jal),
                // `j` 2 bytes before the next instruction: a `c.j`; 4 bytes: `jal zero`.
                call(0x10130, "fixture_add", Form::CJ),
                call(0x10132, "fixture_add", Form::Jal),
                call(0x10136, "fixture_add", Form::Pair),
                call(0x10154, "other", Form::Pair),
            ]
        );
        // A `j` whose length no next instruction tells: its relocation's type does.
        let last = "  2000:\tj\t2040 <f>\n\t\t\t2000: R_RISCV_RVC_JUMP\tf\n";
        assert_eq!(riscv64_calls(last), [call(0x2000, "f", Form::CJ)]);
        // x86_64 and aarch64 branches have no form.
        assert!(riscv64_calls(OBJDUMP_AARCH64).is_empty());
    }

    #[test]
    fn inspect_sites_of_ifuncs_only() {
        let sites =
            parse_inspect_sites(&(INSPECT.to_owned() + "  site 0x105000 probe-nop probe_fn\n"))
                .unwrap();
        assert_eq!(
            sites,
            [
                ("kfuncs::popcount".to_owned(), 0x101234),
                ("kfuncs::popcount".to_owned(), 0x101300),
                ("kfuncs::sum_u32".to_owned(), 0x101400),
            ]
        );
        assert!(
            parse_inspect_sites("ifunc a trampoline=0x10 t sites=1\n  site 12 call\n").is_err()
        );
    }

    #[test]
    fn riscv64_sites_by_form() {
        let inspect = "\
ifunc fixture trampoline=0x10240 fixture_add sites=4
  slot=0x20000 resolver=0x10300 default=0x10400 fixture_soft
  site 0x10124 call c_calls
  site 0x1012c call c_calls
  site 0x10130 jmp (tail call) c_calls
  site 0x10136 jmp (tail call) c_calls
";
        let ifuncs = parse_inspect(inspect).unwrap();
        let sites = parse_inspect_sites(inspect).unwrap();
        let calls = riscv64_calls(OBJDUMP_RISCV64);
        let forms = site_forms(&ifuncs, &sites, &calls).unwrap();
        let f = forms["fixture"];
        assert_eq!((f.pair, f.jal, f.c_j, f.relaxed()), (2, 1, 1, 2));
        let rows = compare(&ifuncs, &count_branch_relocs(OBJDUMP_RISCV64));
        let table = render_forms(&rows, &forms);
        assert_eq!(
            table,
            "ifunc    inspect  objdump   pair    jal    c.j\n\
             fixture        4        5      2      1      1  <-- MISMATCH\n\
             total          4        5      2      1      1\n"
        );
        // A listed site objdump shows as no call to the trampoline (here a `jal t0`),
        // or a call to another symbol.
        for bad in [0x1013e, 0x10154] {
            let mut wrong = sites.clone();
            wrong.push(("fixture".to_owned(), bad));
            let err = site_forms(&ifuncs, &wrong, &calls).unwrap_err();
            assert!(err.contains(&format!("{bad:#x}")), "{err}");
        }
    }

    #[test]
    fn branch_mnemonics() {
        for yes in [
            "call   1 <x>",
            "callq  1 <x>",
            "jmp 1",
            "jmpq 1",
            "bnd jmp 1",
            "notrack jmp 1",
            "cs call 1",
            "ds jne,pn 1",
            "jae 1",
            "jg 1",
            "rex.W jmp 1",
            "bl\t40211a34 <x>",
            "b\t40211a34 <x>",
        ] {
            assert!(is_branch(yes), "{yes}");
        }
        for no in [
            "",
            "ret",
            "lea 0x0(%rip),%rax",
            "jrcxz 1",
            "jq 1",
            "cs nopw 0x0(%rax,%rax,1)",
            "(bad)",
            "jmpq *%rax",
            "notrack jmp *%rax",
            "call   *0x0(%rip)",
            "br\tx16",
            "blr\tx8",
            "adrp\tx16, 4022c000 <slot>",
        ] {
            assert!(!is_branch(no), "{no}");
        }
    }

    #[test]
    fn addends() {
        assert_eq!(strip_addend("foo-0x4"), "foo");
        assert_eq!(strip_addend("foo+0x1c"), "foo");
        assert_eq!(strip_addend("foo"), "foo");
        assert_eq!(strip_addend("a-b"), "a-b");
        assert_eq!(strip_addend("-0x4"), "-0x4");
    }

    #[test]
    fn compares_and_checks() {
        let ifuncs = parse_inspect(INSPECT).unwrap();
        let counts = count_branch_relocs(OBJDUMP);
        let rows = compare(&ifuncs, &counts);
        assert_eq!(rows[0].objdump, 3);
        assert_eq!(rows[1].objdump, 0);
        let err = check(&rows).unwrap_err();
        assert!(err.contains("kfuncs::popcount"), "{err}");
        assert!(err.contains("kfuncs::sum_u32"), "{err}");
        let table = render(&rows);
        assert!(
            table.starts_with("ifunc             inspect  objdump\n"),
            "{table}"
        );
        assert!(table.contains("MISMATCH"));

        let good = [Row {
            name: "a".into(),
            symbol: "t".into(),
            inspect: 4,
            objdump: 4,
        }];
        assert_eq!(check(&good), Ok(()));
        assert!(!render(&good).contains("MISMATCH"));
        assert!(check(&[]).is_err());
    }
}
