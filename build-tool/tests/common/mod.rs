//! The fake image shared by the loader tests and the corpus: 2 KiB of "text" (two
//! trampolines, implementations, four ifunc sites, two probe sites, an out-of-line
//! block) then 2 KiB of data (slots, then the table), at a real, aligned address.
#![allow(dead_code)]

pub mod toolchain;

use kernel_loader::format::{ProbeKind, SiteKind, Table};
use kernel_loader::patch::{PokeError, PokeFailure, TextPoker};
use ksites::table::{IfuncEntry, ProbeEntry, ProbeSiteEntry, SiteEntry, TableInput, build};

/// A fake image: 2 KiB of "text" then 2 KiB of data, 16-aligned, at a real address.
pub struct Image {
    pub mem: Vec<u64>, // u64 for alignment
}

pub const TEXT: usize = 0;
pub const DATA: usize = 2048;
pub const TABLE: usize = DATA + 256;

// Layout inside text.
pub const TRAMP0: usize = 0;
pub const TRAMP1: usize = 8;
pub const IMPL_A0: usize = 64; // ifunc 0 default
pub const IMPL_A1: usize = 80; // ifunc 0 fast
pub const IMPL_B0: usize = 96; // ifunc 1 default
pub const IMPL_B1: usize = 112; // ifunc 1 fast
pub const RESOLVER: usize = 120;
// Sites.
pub const S_CALL: usize = 128; // e8 -> tramp0
pub const S_JMP: usize = 133; // e9 -> tramp1
pub const S_PCALL: usize = 138; // 2e e8 -> tramp0
pub const S_JCC: usize = 144; // 0f 85 -> tramp1
// Probe sites (5-byte NOPs) and the Rust site's out-of-line block.
pub const P_RUST: usize = 160; // probe!(p, one, x)
pub const P_CCALL: usize = 165; // C call of __dtrace_probe_p___one, rewritten
pub const P_TARGET: usize = 176;
// Slots, in data.
pub const SLOT0: usize = DATA;
pub const SLOT1: usize = DATA + 8;

impl Image {
    pub fn new() -> Image {
        let mut img = Image {
            mem: vec![0u64; 4096 / 8],
        };
        img.bytes_mut()[TEXT..DATA].fill(0xcc);
        img.tramp(TRAMP0, SLOT0);
        img.tramp(TRAMP1, SLOT1);
        img.branch(S_CALL, &[0xe8], TRAMP0);
        img.branch(S_JMP, &[0xe9], TRAMP1);
        img.branch(S_PCALL, &[0x2e, 0xe8], TRAMP0);
        img.branch(S_JCC, &[0x0f, 0x85], TRAMP1);
        let (a0, b0) = (img.addr(IMPL_A0), img.addr(IMPL_B0));
        img.bytes_mut()[SLOT0..SLOT0 + 8].copy_from_slice(&a0.to_le_bytes());
        img.bytes_mut()[SLOT1..SLOT1 + 8].copy_from_slice(&b0.to_le_bytes());
        img.bytes_mut()[P_RUST..P_RUST + 5].copy_from_slice(&[0x0f, 0x1f, 0x44, 0x00, 0x00]);
        img.bytes_mut()[P_CCALL..P_CCALL + 5].copy_from_slice(&[0x0f, 0x1f, 0x44, 0x00, 0x00]);
        img.write_table(&img.table_input());
        img
    }

    /// Everything the image's table describes.
    pub fn table_input(&self) -> TableInput {
        TableInput {
            ifuncs: self.ifuncs(),
            sites: self.sites(),
            probes: vec![ProbeEntry {
                provider: "p".into(),
                name: "one".into(),
                nargs: 1,
            }],
            probe_sites: vec![
                ProbeSiteEntry {
                    addr: self.addr(P_RUST),
                    target: self.addr(P_TARGET),
                    kind: ProbeKind::RustJmp,
                    probe: 0,
                },
                ProbeSiteEntry {
                    addr: self.addr(P_CCALL),
                    target: 0,
                    kind: ProbeKind::CCall,
                    probe: 0,
                },
            ],
            ..TableInput::default()
        }
    }

    /// Writes `input` as the table (at `TABLE`).
    pub fn write_table(&mut self, input: &TableInput) {
        let table = build(self.addr(TABLE), input).unwrap();
        self.bytes_mut()[TABLE..TABLE + table.len()].copy_from_slice(&table);
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: reinterpreting an owned u64 buffer as bytes.
        unsafe { std::slice::from_raw_parts(self.mem.as_ptr().cast(), 4096) }
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: reinterpreting an owned u64 buffer as bytes.
        unsafe { std::slice::from_raw_parts_mut(self.mem.as_mut_ptr().cast(), 4096) }
    }

    pub fn addr(&self, off: usize) -> u64 {
        self.mem.as_ptr() as u64 + off as u64
    }

    pub fn tramp(&mut self, at: usize, slot: usize) {
        let disp = (slot as i64 - (at as i64 + 6)) as i32;
        let b = self.bytes_mut();
        b[at..at + 2].copy_from_slice(&[0xff, 0x25]);
        b[at + 2..at + 6].copy_from_slice(&disp.to_le_bytes());
    }

    pub fn branch(&mut self, at: usize, op: &[u8], target: usize) {
        let end = at + op.len() + 4;
        let rel = (target as i64 - end as i64) as i32;
        let b = self.bytes_mut();
        b[at..at + op.len()].copy_from_slice(op);
        b[at + op.len()..end].copy_from_slice(&rel.to_le_bytes());
    }

    pub fn ifuncs(&self) -> Vec<IfuncEntry> {
        vec![
            IfuncEntry {
                name: "t::zero".into(),
                trampoline: self.addr(TRAMP0),
                slot: self.addr(SLOT0),
                resolver: self.addr(RESOLVER),
                default: self.addr(IMPL_A0),
            },
            IfuncEntry {
                name: "t::one".into(),
                trampoline: self.addr(TRAMP1),
                slot: self.addr(SLOT1),
                resolver: self.addr(RESOLVER),
                default: self.addr(IMPL_B0),
            },
        ]
    }

    pub fn sites(&self) -> Vec<SiteEntry> {
        let s = |off: usize, kind, prefixes, ifunc| SiteEntry {
            addr: self.addr(off),
            kind,
            prefixes,
            ifunc,
        };
        vec![
            s(S_CALL, SiteKind::Call, 0, 0),
            s(S_JMP, SiteKind::Jmp, 0, 1),
            s(S_PCALL, SiteKind::Call, 1, 0),
            s(S_JCC, SiteKind::Jcc, 0, 1),
        ]
    }

    pub fn exec(&self) -> Vec<std::ops::Range<u64>> {
        std::iter::once(self.addr(TEXT)..self.addr(DATA)).collect()
    }

    pub fn table_bytes(&self) -> &[u8] {
        &self.bytes()[TABLE..DATA + 2048]
    }

    pub fn table(&self) -> Table<'_> {
        Table::parse(self.table_bytes(), self.addr(TABLE), &self.exec()).unwrap()
    }

    pub fn rel_target(&self, at: usize, oplen: usize) -> usize {
        let b = self.bytes();
        let rel = i32::from_le_bytes(b[at + oplen..at + oplen + 4].try_into().unwrap());
        (at as i64 + oplen as i64 + 4 + rel as i64) as usize
    }

    pub fn slot(&self, at: usize) -> u64 {
        u64::from_le_bytes(self.bytes()[at..at + 8].try_into().unwrap())
    }
}

#[derive(Default)]
pub struct FakePoker {
    pub writes: usize,
    pub fail_at: Option<usize>,
    /// Once failing, keep failing every write.
    pub fail_forever: bool,
    /// On the failing write, write this many bytes first (a torn write).
    pub partial: usize,
    pub began: usize,
    pub ended: usize,
    pub syncs: usize,
}

impl TextPoker for FakePoker {
    fn begin(&mut self) -> Result<(), PokeError> {
        self.began += 1;
        Ok(())
    }

    unsafe fn write(&mut self, addr: u64, bytes: &[u8]) -> Result<(), PokeError> {
        if self.fail_at.is_some_and(|n| self.writes >= n) {
            if !self.fail_forever {
                self.fail_at = None;
            }
            let n = self.partial.min(bytes.len());
            // SAFETY: as below; a torn write of the first `n` bytes.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), addr as *mut u8, n) };
            self.partial = 0;
            return Err(PokeError::new(addr, PokeFailure::Injected));
        }
        self.writes += 1;
        // SAFETY: the engine only writes inside sites of the test image.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), addr as *mut u8, bytes.len()) };
        Ok(())
    }

    fn sync_cores(&mut self) {
        self.syncs += 1;
    }

    fn end(&mut self) {
        self.ended += 1;
    }
}

pub fn resolve_fast(img: &Image) -> impl FnMut(&kernel_loader::format::Ifunc<'_>) -> u64 + '_ {
    move |f| {
        if f.index == 0 {
            img.addr(IMPL_A1)
        } else {
            img.addr(IMPL_B1)
        }
    }
}

/// The temporary files (`.ksites-tmp-…`) left in `dir`: there must be none once a
/// `ksites` command or an `embed_file` call has returned, whether it failed or not.
pub fn temp_files_left(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".ksites"))
        .map(|e| e.path())
        .collect()
}
