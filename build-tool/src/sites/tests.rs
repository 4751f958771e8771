//! The site engine's tests: gap decoding on objects built from the target's code samples.

use object::write::{Object, Relocation, Symbol, SymbolSection};
use object::{
    Architecture, BinaryFormat, Endianness, RelocationFlags, SectionKind, SymbolFlags, SymbolKind,
    SymbolScope,
};

use super::*;
use crate::target::{Samples, Target};

const T: Target = Target::X86_64;

fn x() -> &'static Samples {
    T.samples()
}

/// Code being put together: its bytes, the symbols on it and where branch
/// relocations go.
#[derive(Default)]
struct Code {
    bytes: Vec<u8>,
    /// (name, offset, size, is a function).
    syms: Vec<(&'static str, u64, u64, bool)>,
    relocs: Vec<u64>,
}

impl Code {
    fn at(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// An instruction whose last field a branch relocation fills (to `ext`).
    fn reloc(&mut self, insn: &[u8]) -> u64 {
        let start = self.at();
        self.bytes.extend_from_slice(insn);
        self.relocs.push(self.at() - T.branch_field_len());
        start
    }

    fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.bytes.extend_from_slice(bytes);
        self
    }

    fn sym(&mut self, name: &'static str, size: u64, func: bool) {
        let at = self.at();
        self.syms.push((name, at, size, func));
    }
}

/// An ET_REL object holding `sections` (name, code), relocations in the order
/// given (`reverse`: in reverse).
fn object(sections: &[(&str, &Code)], reverse: bool) -> Vec<u8> {
    let mut obj = Object::new(BinaryFormat::Elf, Architecture::X86_64, Endianness::Little);
    let ext = obj.add_symbol(Symbol {
        name: b"ext".to_vec(),
        value: 0,
        size: 0,
        kind: SymbolKind::Text,
        scope: SymbolScope::Linkage,
        weak: false,
        section: SymbolSection::Undefined,
        flags: SymbolFlags::None,
    });
    for (name, code) in sections {
        let id = obj.add_section(Vec::new(), name.as_bytes().to_vec(), SectionKind::Text);
        obj.append_section_data(id, &code.bytes, 16);
        for &(name, value, size, func) in &code.syms {
            obj.add_symbol(Symbol {
                name: name.as_bytes().to_vec(),
                value,
                size,
                kind: if func {
                    SymbolKind::Text
                } else {
                    SymbolKind::Label
                },
                scope: SymbolScope::Compilation,
                weak: false,
                section: SymbolSection::Section(id),
                flags: SymbolFlags::None,
            });
        }
        let mut relocs = code.relocs.clone();
        if reverse {
            relocs.reverse();
        }
        let (r_type, addend) = T.branch_reloc();
        for offset in relocs {
            let r = Relocation {
                offset,
                symbol: ext,
                addend,
                flags: RelocationFlags::Elf {
                    r_type: object::elf::RelocationType(r_type),
                },
            };
            obj.add_relocation(id, r).unwrap();
        }
    }
    obj.write().unwrap()
}

/// (section, offset, kind, enclosing function) of every site, and the offsets of
/// the other references, of every branch relocation in `data`.
#[allow(clippy::type_complexity)]
fn scan(data: &[u8]) -> (Vec<(String, u64, SiteKind, Option<String>)>, Vec<u64>) {
    let img = Image::parse("t.o", data).unwrap();
    let all = |_: &Reloc| {
        Some(Selected {
            target: 0,
            target_addr: None,
        })
    };
    let s = find_sites_with(&img, &all).unwrap();
    let sites = s
        .sites
        .iter()
        .map(|f| {
            let func = s.functions.get(f.function as usize).map(|f| f.name.clone());
            (
                s.section_name(f).to_string(),
                s.section_offset(f),
                f.kind,
                func,
            )
        })
        .collect();
    // Sites and references are named as `Image::describe` names them.
    for f in &s.sites {
        let at = s.location(f).to_string();
        assert_eq!(at, img.describe(s.section_index(f), f.addr));
    }
    for r in &s.other_refs {
        let sec = s.sections.iter().find(|x| x.name == r.section).unwrap();
        assert_eq!(r.location, img.describe(sec.index, r.addr));
    }
    (sites, s.other_refs.iter().map(|r| r.addr).collect())
}

fn site(off: u64, kind: SiteKind, func: Option<&str>) -> (String, u64, SiteKind, Option<String>) {
    (".text".to_string(), off, kind, func.map(str::to_string))
}

/// The scan of `code` as `.text`, the same whichever order its relocations come in.
#[allow(clippy::type_complexity)]
fn scan_text(code: &Code) -> (Vec<(String, u64, SiteKind, Option<String>)>, Vec<u64>) {
    let forward = scan(&object(&[(".text", code)], false));
    assert_eq!(forward, scan(&object(&[(".text", code)], true)));
    forward
}

#[test]
fn code_past_a_functions_size_is_decoded_on_from_the_function() {
    let mut c = Code::default();
    c.sym("f", 0, true);
    let call_f = c.reloc(x().call);
    c.raw(x().other);
    c.syms[0].2 = c.at();
    // A stripped function after `f`, behind nop and trap padding.
    c.raw(x().nops).raw(&[x().trap; 3]).raw(x().other);
    let call = c.reloc(x().call);
    c.raw(x().other);
    let jcc = c.reloc(x().jcc);
    let jmp = c.reloc(x().jmp);
    c.raw(&[x().trap; 5]);
    c.sym("g", 0, true);
    let call_g = c.reloc(x().call);
    let g = c.syms.len() - 1;
    c.syms[g].2 = c.at() - c.syms[g].1;
    let (sites, other) = scan_text(&c);
    assert_eq!(
        sites,
        vec![
            site(call_f, SiteKind::Call, Some("f")),
            site(call, SiteKind::Call, None),
            site(jcc, SiteKind::Jcc, None),
            site(jmp, SiteKind::Jmp, None),
            site(call_g, SiteKind::Call, Some("g")),
        ]
    );
    assert!(other.is_empty());
}

#[test]
fn a_section_without_symbols_is_decoded_from_its_start() {
    let mut c = Code::default();
    c.raw(x().nops);
    let call = c.reloc(x().call);
    c.raw(x().other).raw(&[x().trap]);
    let jmp = c.reloc(x().jmp);
    let mut d = Code::default();
    d.sym("late", 0, true);
    let late = d.reloc(x().call);
    let data = object(&[(".text", &c), (".text.other", &d)], false);
    // Sites are sorted by address, then section: both sections start at 0.
    let (sites, _) = scan(&data);
    let other = (
        ".text.other".into(),
        late,
        SiteKind::Call,
        Some("late".into()),
    );
    assert_eq!(
        sites,
        vec![
            other,
            site(call, SiteKind::Call, None),
            site(jmp, SiteKind::Jmp, None),
        ]
    );
}

#[test]
fn the_byte_before_a_relocation_is_never_taken_for_an_opcode() {
    let mut c = Code::default();
    c.sym("f", 0, true);
    c.raw(x().other);
    c.syms[0].2 = c.at();
    // In the gap: an instruction whose field follows the call opcode byte, and a
    // relocation two bytes into a call's field.
    let fake = c.reloc(x().not_branch) + x().not_branch.len() as u64 - T.branch_field_len();
    let call = c.at();
    c.raw(x().call);
    c.relocs.push(call + 2);
    let real = c.reloc(x().call);
    let (sites, other) = scan_text(&c);
    assert_eq!(sites, vec![site(real, SiteKind::Call, None)]);
    assert_eq!(other, vec![fake, call + 2]);
}

#[test]
fn a_function_without_size_ends_where_the_next_symbol_starts() {
    let mut c = Code::default();
    c.sym("nosize", 0, true);
    let a = c.reloc(x().call);
    c.raw(x().nops);
    // `short` is declared smaller than its code: decoding goes on through it.
    c.sym("short", 2, true);
    c.raw(x().other);
    let b = c.reloc(x().call);
    let d = c.reloc(x().jmp);
    c.sym("label", 0, false);
    let e = c.reloc(x().call);
    let (sites, other) = scan_text(&c);
    assert_eq!(
        sites,
        vec![
            site(a, SiteKind::Call, Some("nosize")),
            site(b, SiteKind::Call, Some("nosize")),
            site(d, SiteKind::Jmp, Some("nosize")),
            site(e, SiteKind::Call, Some("label")),
        ]
    );
    assert!(other.is_empty());
}

#[test]
fn zero_fill_is_decoded_like_any_code() {
    for zeros in 1..=4 * x().zero_step {
        let mut c = Code::default();
        c.sym("f", 0, true);
        c.raw(x().other);
        c.syms[0].2 = c.at();
        c.raw(&vec![0; zeros]);
        let call = c.reloc(x().call);
        let (sites, other) = scan_text(&c);
        if zeros % x().zero_step == 0 {
            // Back in step: the call is found.
            assert_eq!(sites, vec![site(call, SiteKind::Call, None)], "{zeros}");
        } else {
            // Out of step, as for objdump: not a site, and not guessed.
            assert!(sites.is_empty(), "{zeros}: {sites:?}");
            assert_eq!(other.len(), 1, "{zeros}");
        }
    }
}

/// What [`Span`] must answer for `addr`: [`Image::enclosing_span`]'s symbol, and the
/// decoding start the module documentation gives.
fn reference(img: &Image<'_>, sec: SectionIndex, addr: u64) -> (Option<usize>, u64) {
    let sym = img.enclosing_span(sec, addr).0;
    let start = match sym.map(|i| img.sym(i)) {
        Some(s) if s.is_func && s.size > 0 => s.addr,
        _ => (0..img.defined_count())
            .map(|i| img.sym(i))
            .filter(|s| s.section == sec && s.addr <= addr)
            .map(|s| s.addr)
            .max()
            .unwrap_or(0),
    };
    (sym, start)
}

proptest::proptest! {
    /// Any symbols (sized or not, functions or labels, overlapping or not), any order
    /// of questions: the span's shortcuts answer as `Image::enclosing_span` does, and
    /// decoding starts where the rule says.
    #[test]
    fn spans_answer_as_the_image_does(
        syms in proptest::collection::vec((0u64..48, 0u64..24, proptest::bool::ANY), 0..10),
        order in proptest::collection::vec(0u64..56, 1..40),
    ) {
        let mut c = Code { bytes: vec![0; 48], ..Code::default() };
        for (i, &(at, size, func)) in syms.iter().enumerate() {
            let name: &'static str = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"][i];
            c.syms.push((name, at, size, func));
        }
        let data = object(&[(".text", &c)], false);
        let img = Image::parse("t.o", &data).unwrap();
        let sec = img.exec_sections().next().unwrap();
        let none = |_: &Reloc| None;
        let ctx = SectionCtx::new(&img, &sec, 0, &none);
        let mut sorted = order.clone();
        sorted.sort();
        for asks in [order, sorted, (0..56).collect()] {
            let (mut span, mut starts) = (Span::EMPTY, Span::EMPTY);
            for addr in asks {
                let want = reference(&img, sec.index(), addr);
                assert_eq!(span.enclosing(&ctx, addr), want.0, "{addr} {syms:?}");
                assert_eq!(starts.decode_start(&ctx, addr), want.1, "{addr} {syms:?}");
                let mut fresh = Span::EMPTY;
                assert_eq!(fresh.decode_start(&ctx, addr), want.1, "{addr} {syms:?}");
            }
        }
    }
}
