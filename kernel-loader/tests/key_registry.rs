//! Static keys before the registry is ready, in a process of their own (the crate's
//! unit tests share one registry, whose kernel slot they fill): a key cannot change
//! before the kernel's table is registered (`NotRegistered`), nor, on an int3
//! architecture, before the #BP route is declared (`NoTrapRoute`); the count is
//! unchanged either way and the messages say what to do.

use kernel_loader::format::{ARCH_X86_64, HEADER_SIZE, Header, MAGIC, SubTable, Table, VERSION};
use kernel_loader::key::KeyError;
use kernel_loader::patch::{PokeError, TextPoker};
use kernel_loader::{probe, static_key};

static_key!(EARLY: default false);

struct NoWrites;
impl TextPoker for NoWrites {
    unsafe fn write(&mut self, addr: u64, _: &[u8]) -> Result<(), PokeError> {
        panic!("no key site, nothing to write (at {addr:#x})")
    }
    fn sync_cores(&mut self) {}
    fn end(&mut self) {}
}

/// An empty v2 table: the kernel's, with nothing in it.
fn empty_table() -> &'static [u8] {
    let empty = SubTable {
        offset: HEADER_SIZE as u32,
        count: 0,
    };
    let h = Header {
        magic: MAGIC,
        version: VERSION,
        arch: ARCH_X86_64,
        flags: 0,
        header_size: HEADER_SIZE as u32,
        total_size: HEADER_SIZE as u32,
        ifuncs: empty,
        ifunc_sites: empty,
        probes: empty,
        probe_sites: empty,
        strings: empty,
        keys: empty,
        key_sites: empty,
    };
    #[repr(align(8))]
    struct Aligned([u8; HEADER_SIZE]);
    &Box::leak(Box::new(Aligned(h.to_bytes()))).0
}

#[test]
fn a_key_waits_for_the_kernel_table_and_the_trap_route() {
    let mut p = NoWrites;
    // SAFETY: no table registered: nothing is written.
    let e = unsafe { EARLY.enable(&mut p) }.unwrap_err();
    assert_eq!(e, KeyError::NotRegistered);
    assert!(e.to_string().contains("probe::register_image"), "{e}");
    // SAFETY: as above.
    assert_eq!(unsafe { EARLY.inc(&mut p) }, Err(KeyError::NotRegistered));
    assert_eq!((EARLY.count(), EARLY.is_enabled()), (0, false));

    let bytes = empty_table();
    let t = Table::parse(bytes, bytes.as_ptr() as u64, &[]).unwrap();
    assert_eq!(t.version(), 2);
    probe::register_image(t, &NoWrites).unwrap();
    if cfg!(target_arch = "x86_64") {
        // SAFETY: no key site anywhere: nothing is written.
        let e = unsafe { EARLY.enable(&mut p) }.unwrap_err();
        assert_eq!(e, KeyError::NoTrapRoute);
        assert!(e.to_string().contains("declare_int3_route"), "{e}");
        assert_eq!(EARLY.count(), 0);
        // SAFETY: this test's key has no site that could trap.
        unsafe { probe::declare_int3_route() };
    }
    // A key with no site in any image: only its count moves.
    // SAFETY: as above.
    unsafe {
        EARLY.enable(&mut p).unwrap();
        EARLY.inc(&mut p).unwrap();
    }
    assert_eq!(EARLY.count(), 2);
    // SAFETY: as above.
    unsafe { EARLY.disable(&mut p) }.unwrap();
    assert_eq!(EARLY.count(), 0);
    // SAFETY: as above.
    let r = unsafe { EARLY.dec(&mut p) };
    assert!(matches!(r, Err(KeyError::Underflow { .. })), "{r:?}");
    assert_eq!(EARLY.name(), "key_registry::EARLY");
    assert!(!EARLY.default());
}
