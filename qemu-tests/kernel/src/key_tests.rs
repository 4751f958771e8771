//! Static keys (issue 18), checked inside the booted kernel: the `static_key!` keys
//! below and their `static_branch_unlikely!` / `static_branch_likely!` sites, read back
//! from memory after every change.
//!
//! * defaults before any change: each key's state and count, the table's key entries,
//!   every site in the form its key's default calls for (the build tool wrote it);
//! * `enable`/`disable` (idempotent) and `inc`/`dec` (counted; patching only on 0 ↔ 1;
//!   `dec` at 0 is `KeyError::Underflow`), each site's bytes, the other keys' untouched;
//! * a failing poker at every write of a batch: an error, the count and every byte as
//!   before;
//! * `key::keys()` introspection against the table;
//! * modules: `rmod` and `cmod` use the kernel key [`KEY_MOD`] (exported as
//!   `ksites_test_key`) and define a key of their own: loaded while `KEY_MOD` is
//!   enabled, their sites of it come up enabled; one change of `KEY_MOD` then patches
//!   kernel and module sites; after unload the key still works;
//! * with several CPUs: [`TOGGLES`] changes of [`KEY_STRESS`] by CPU 0 while the APs run
//!   its sites, every settled observation (see [`crate::live_seq`]) matching the state.
//!
//! A site **jumps** (`e9 rel32` to its label) iff its key's state differs from the
//! site's `likely`, else it holds the 5-byte NOP.

use core::sync::atomic::{AtomicU64, Ordering};

use kernel_loader::format::{KSite, Table};
use kernel_loader::key::{self, KeyError, StaticKey};
use kernel_loader::{static_branch_likely, static_branch_unlikely, static_key};

use crate::harness::{Harness, Msg};
use crate::live_seq::{Crew, NAP_US, Seq, ms_since};
use crate::module_tests::{self as mt, Env};
use crate::poker::AliasPoker;
use crate::probe_tests::{self as pt, read5};
use crate::smp::{self, MAX_CPUS};
use crate::{apic, cpu, ensure, msg, println};

static_key!(pub KEY_OFF: default false);
static_key!(pub KEY_ON: default true);
static_key!(pub KEY_MOD: default false);
static_key!(pub KEY_STRESS: default false);

/// The x86-64 5-byte NOP every key site is compiled as.
const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];

/// One function per site: each returns what its branch says about the key.
macro_rules! site_fns {
    ($($name:ident = $mac:ident!($key:ident);)+) => {
        $(
            #[doc = concat!("`", stringify!($mac), "!(", stringify!($key), ")`: one site.")]
            #[inline(never)]
            pub fn $name() -> bool {
                $mac!($key)
            }
        )+
    };
}

site_fns! {
    off_unlikely = static_branch_unlikely!(KEY_OFF);
    off_likely = static_branch_likely!(KEY_OFF);
    on_unlikely = static_branch_unlikely!(KEY_ON);
    on_likely = static_branch_likely!(KEY_ON);
    mod_unlikely = static_branch_unlikely!(KEY_MOD);
    stress_unlikely = static_branch_unlikely!(KEY_STRESS);
    stress_likely = static_branch_likely!(KEY_STRESS);
}

/// A key of this kernel, its site functions (`unlikely`, `likely`) and its sites.
struct Kk {
    key: &'static StaticKey,
    name: &'static str,
    default: bool,
    fns: &'static [fn() -> bool],
    /// Sites in the table (one per site function).
    sites: usize,
}

const KEYS: [Kk; 4] = [
    Kk {
        key: &KEY_OFF,
        name: "KEY_OFF",
        default: false,
        fns: &[off_unlikely, off_likely],
        sites: 2,
    },
    Kk {
        key: &KEY_ON,
        name: "KEY_ON",
        default: true,
        fns: &[on_unlikely, on_likely],
        sites: 2,
    },
    Kk {
        key: &KEY_MOD,
        name: "KEY_MOD",
        default: false,
        fns: &[mod_unlikely],
        sites: 1,
    },
    Kk {
        key: &KEY_STRESS,
        name: "KEY_STRESS",
        default: false,
        fns: &[stress_unlikely, stress_likely],
        sites: 2,
    },
];

fn addr_of(k: &StaticKey) -> u64 {
    k as *const StaticKey as u64
}

/// The bytes site `s` must hold while its key is `enabled`.
pub(crate) fn key_site_form(s: &KSite, enabled: bool) -> [u8; 5] {
    if enabled == s.likely {
        return NOP5;
    }
    let rel = s.target.wrapping_sub(s.addr + 5) as i64;
    let r = (rel as i32).to_le_bytes();
    [0xe9, r[0], r[1], r[2], r[3]]
}

/// The table index of the key at `addr`.
fn index_of(t: &Table<'_>, addr: u64) -> Result<u32, Msg> {
    t.keys()
        .find(|k| k.addr == addr)
        .map(|k| k.index)
        .ok_or_else(|| msg!("no key at {addr:#x} in the table"))
}

/// Every site of the key at `addr` in `t` holds its form for `enabled`; returns how
/// many sites it has and how many of them jump.
pub(crate) fn check_key_sites(
    t: &Table<'_>,
    addr: u64,
    enabled: bool,
) -> Result<(usize, usize), Msg> {
    let index = index_of(t, addr)?;
    let (mut n, mut jumps) = (0, 0);
    for s in t.key_sites().filter(|s| s.key == index) {
        let want = key_site_form(&s, enabled);
        let found = read5(s.addr);
        ensure!(
            found == want,
            "key site {:#x} ({}, key {index} {}) holds {found:02x?}, expected {want:02x?}",
            s.addr,
            if s.likely { "likely" } else { "unlikely" },
            if enabled { "enabled" } else { "disabled" }
        );
        n += 1;
        jumps += usize::from(want != NOP5);
    }
    Ok((n, jumps))
}

/// Checks one kernel key: state, count, sites, what its site functions return.
fn check_kk(t: &Table<'_>, k: &Kk, enabled: bool, count: u32) -> Result<(), Msg> {
    ensure!(
        k.key.is_enabled() == enabled && k.key.count() == count,
        "{}: enabled {} count {}, expected {enabled} {count}",
        k.name,
        k.key.is_enabled(),
        k.key.count()
    );
    let (n, _) = check_key_sites(t, addr_of(k.key), enabled)?;
    ensure!(n == k.sites, "{}: {n} sites, expected {}", k.name, k.sites);
    for (i, f) in k.fns.iter().enumerate() {
        ensure!(
            f() == enabled,
            "{}: site function {i} says {}, the key is {}",
            k.name,
            f(),
            if enabled { "enabled" } else { "disabled" }
        );
    }
    Ok(())
}

/// FNV-1a over the bytes of every key site `keep` selects.
fn digest(t: &Table<'_>, keep: impl Fn(&KSite) -> bool) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for s in t.key_sites().filter(|s| keep(s)) {
        for b in read5(s.addr) {
            h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    h
}

/// [`digest`] of every key site except those of the key at `except`.
fn others_digest(t: &Table<'_>, except: u64) -> Result<u64, Msg> {
    let skip = index_of(t, except)?;
    Ok(digest(t, |s| s.key != skip))
}

/// [`digest`] of every key site.
fn all_digest(t: &Table<'_>) -> u64 {
    digest(t, |_| true)
}

// ---------------------------------------------------------------------------------------
// One CPU.

fn defaults(t: &Table<'_>) -> Result<(), Msg> {
    ensure!(t.version() == 2, "table format version {}", t.version());
    for k in &KEYS {
        let e = t
            .keys()
            .find(|e| e.addr == addr_of(k.key))
            .ok_or_else(|| msg!("{} is not in the table", k.name))?;
        ensure!(
            e.default == k.default && !e.imported && e.name.ends_with(k.name),
            "{}: table says name {} default {} imported {}",
            k.name,
            e.name,
            e.default,
            e.imported
        );
        check_kk(t, k, k.default, u32::from(k.default))?;
        // Exactly one of a key's two sites jumps at boot: the likely one of a false
        // key, the unlikely one of a true key (the build tool wrote it).
        let (n, jumps) = check_key_sites(t, addr_of(k.key), k.default)?;
        let want = if n == 2 { 1 } else { usize::from(k.default) };
        ensure!(
            jumps == want,
            "{}: {jumps} of {n} sites jump at boot",
            k.name
        );
    }
    println!(
        "keys: table v{}: {} keys, {} key sites; every site in its default's form",
        t.version(),
        t.key_count(),
        t.key_sites().count()
    );
    Ok(())
}

fn enable_disable(t: &Table<'_>) -> Result<(), Msg> {
    let [off, on, ..] = &KEYS;
    let others = others_digest(t, addr_of(off.key))?;
    let mut p = AliasPoker::default();
    // SAFETY: (every key change in these tests) the poker writes through the alias and
    // serializes every online CPU; the #BP hook passes traps to `probe::handle_int3`;
    // only CPU 0 changes keys.
    unsafe { off.key.enable(&mut p) }.map_err(|e| msg!("enable: {e}"))?;
    ensure!(p.writes > 0, "enable wrote nothing");
    check_kk(t, off, true, 1)?;
    let w = p.writes;
    // SAFETY: as above.
    unsafe { off.key.enable(&mut p) }.map_err(|e| msg!("second enable: {e}"))?;
    ensure!(p.writes == w, "a second enable wrote {} times", p.writes - w);
    check_kk(t, off, true, 1)?;
    // SAFETY: as above.
    unsafe { off.key.disable(&mut p) }.map_err(|e| msg!("disable: {e}"))?;
    check_kk(t, off, false, 0)?;
    let w = p.writes;
    // SAFETY: as above.
    unsafe { off.key.disable(&mut p) }.map_err(|e| msg!("second disable: {e}"))?;
    ensure!(p.writes == w, "a second disable wrote {} times", p.writes - w);
    ensure!(
        others_digest(t, addr_of(off.key))? == others,
        "changing KEY_OFF changed another key's sites"
    );

    // SAFETY: as above.
    unsafe { on.key.disable(&mut p) }.map_err(|e| msg!("disable KEY_ON: {e}"))?;
    check_kk(t, on, false, 0)?;
    // SAFETY: as above.
    unsafe { on.key.enable(&mut p) }.map_err(|e| msg!("enable KEY_ON: {e}"))?;
    check_kk(t, on, true, 1)?;
    Ok(())
}

fn inc_dec(t: &Table<'_>) -> Result<(), Msg> {
    let [off, on, ..] = &KEYS;
    let mut p = AliasPoker::default();
    for i in 1..=3u32 {
        let w = p.writes;
        // SAFETY: as in `enable_disable`.
        unsafe { off.key.inc(&mut p) }.map_err(|e| msg!("inc {i}: {e}"))?;
        check_kk(t, off, true, i)?;
        ensure!(
            (p.writes > w) == (i == 1),
            "inc {i} wrote {} times",
            p.writes - w
        );
    }
    for i in (0..3u32).rev() {
        let w = p.writes;
        // SAFETY: as above.
        unsafe { off.key.dec(&mut p) }.map_err(|e| msg!("dec to {i}: {e}"))?;
        check_kk(t, off, i > 0, i)?;
        ensure!(
            (p.writes > w) == (i == 0),
            "dec to {i} wrote {} times",
            p.writes - w
        );
    }
    let w = p.writes;
    // SAFETY: as above.
    match unsafe { off.key.dec(&mut p) } {
        Err(KeyError::Underflow { .. }) => {}
        Err(e) => return Err(msg!("dec at 0: {e}, expected Underflow")),
        Ok(()) => return Err(msg!("dec at 0 succeeded")),
    }
    ensure!(p.writes == w, "a refused dec wrote");
    check_kk(t, off, false, 0)?;
    // A true key starts at count 1.
    // SAFETY: as above.
    unsafe { on.key.inc(&mut p) }.map_err(|e| msg!("inc KEY_ON: {e}"))?;
    check_kk(t, on, true, 2)?;
    for left in [1u32, 0] {
        // SAFETY: as above.
        unsafe { on.key.dec(&mut p) }.map_err(|e| msg!("dec KEY_ON: {e}"))?;
        check_kk(t, on, left > 0, left)?;
    }
    // SAFETY: as above.
    unsafe { on.key.inc(&mut p) }.map_err(|e| msg!("inc KEY_ON: {e}"))?;
    check_kk(t, on, true, 1)?;
    Ok(())
}

/// A poker failing its Nth write, for N = 0, 1, … until a batch gets through: each
/// failed enable leaves the key disabled, its count 0 and every key site as it was.
fn failed_batch_rolls_back(t: &Table<'_>) -> Result<(), Msg> {
    let [off, ..] = &KEYS;
    let before = all_digest(t);
    let mut failures = 0;
    for n in 0..64 {
        let mut p = AliasPoker::failing_at(n);
        // SAFETY: as in `enable_disable`; the batch rolls back on failure.
        match unsafe { off.key.enable(&mut p) } {
            Err(_) => {
                failures += 1;
                ensure!(
                    !off.key.is_enabled() && off.key.count() == 0,
                    "write {n} failed: key left enabled {} count {}",
                    off.key.is_enabled(),
                    off.key.count()
                );
                ensure!(
                    all_digest(t) == before,
                    "write {n} failed: key sites not restored"
                );
                check_kk(t, off, false, 0)?;
            }
            Ok(()) => {
                check_kk(t, off, true, 1)?;
                let mut p = AliasPoker::default();
                // SAFETY: as above.
                unsafe { off.key.disable(&mut p) }.map_err(|e| msg!("disable: {e}"))?;
                ensure!(failures == n, "only {failures} of {n} injected failures failed");
                ensure!(n >= 2, "the batch had only {n} writes");
                println!("keys: a failed write at each of the batch's {n} writes rolled back");
                return Ok(());
            }
        }
    }
    Err(msg!("enable never succeeded in 64 attempts"))
}

fn introspection(t: &Table<'_>) -> Result<(), Msg> {
    for k in &KEYS {
        let info = key::keys()
            .find(|i| msg!("{}", i.name).as_str().ends_with(k.name))
            .ok_or_else(|| msg!("key::keys() does not list {}", k.name))?;
        let (n, _) = check_key_sites(t, addr_of(k.key), k.key.is_enabled())?;
        ensure!(
            info.enabled == k.key.is_enabled()
                && info.count == k.key.count()
                && info.sites as usize == n,
            "{}: keys() says enabled {} count {} sites {}; the key {} {}, the table {n} sites",
            k.name,
            info.enabled,
            info.count,
            info.sites,
            k.key.is_enabled(),
            k.key.count()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Modules.

type FnU64 = extern "C" fn() -> u64;

/// A module's key functions: the kernel key's unlikely and likely sites, its own key's
/// site, its own key's address.
struct ModKeys {
    kernel_unlikely: FnU64,
    kernel_likely: FnU64,
    own_unlikely: FnU64,
    own: &'static StaticKey,
}

fn mod_keys(m: &kernel_loader::module::Module<'_>, pre: &str) -> Result<ModKeys, Msg> {
    let name = |s: &str| mt::fmt_name(pre, s);
    // SAFETY: rmod and cmod define these, `extern "C" fn() -> u64`; the callers stop
    // using them before unloading the module.
    unsafe {
        let own: FnU64 = mt::func(m, &name("_own_key"))?;
        let own = own();
        let t = m.table().ok_or_else(|| msg!("{pre}: no table"))?;
        ensure!(
            t.keys().any(|k| k.addr == own && !k.imported),
            "{pre}: its own key {own:#x} is not in its table"
        );
        Ok(ModKeys {
            kernel_unlikely: mt::func(m, &name("_kkey_unlikely"))?,
            kernel_likely: mt::func(m, &name("_kkey_likely"))?,
            own_unlikely: mt::func(m, &name("_own_unlikely"))?,
            // SAFETY: the address of the module's `StaticKey` (checked in its table),
            // used only while the module is loaded.
            own: &*(own as usize as *const StaticKey),
        })
    }
}

/// The module's sites of the kernel key and of its own key hold their keys' forms, and
/// its functions say so.
fn check_module(
    m: &kernel_loader::module::Module<'_>,
    k: &ModKeys,
    kernel_on: bool,
) -> Result<(), Msg> {
    let t = m.table().ok_or_else(|| msg!("{}: no table", m.name()))?;
    let import = t
        .keys()
        .find(|e| e.imported)
        .ok_or_else(|| msg!("{}: no imported key", m.name()))?;
    ensure!(
        import.addr == addr_of(&KEY_MOD),
        "{}: imported key at {:#x}, KEY_MOD at {:#x}",
        m.name(),
        import.addr,
        addr_of(&KEY_MOD)
    );
    let (n, _) = check_key_sites(&t, import.addr, kernel_on)?;
    ensure!(n >= 2, "{}: {n} sites of the kernel key", m.name());
    let own_on = k.own.is_enabled();
    let (own_n, _) = check_key_sites(&t, addr_of(k.own), own_on)?;
    ensure!(own_n >= 1, "{}: no site of its own key", m.name());
    for s in t.key_sites() {
        ensure!(m.text().contains(&s.addr), "{}: site {:#x}", m.name(), s.addr);
    }
    let got = [(k.kernel_unlikely)(), (k.kernel_likely)(), (k.own_unlikely)()];
    let want = [u64::from(kernel_on), u64::from(kernel_on), u64::from(own_on)];
    ensure!(got == want, "{}: site functions {got:?}, expected {want:?}", m.name());
    Ok(())
}

/// `KEY_MOD` enabled, then rmod and cmod loaded: their sites of it come up enabled,
/// their own keys' disabled; one disable / enable of `KEY_MOD` patches kernel and
/// module sites; each module's own key works and is listed by `key::keys()`.
fn module_loaded_while_enabled(env: &Env, t: &Table<'_>) -> Result<(), Msg> {
    let kk = &KEYS[2];
    let mut p = AliasPoker::default();
    // SAFETY: as in `enable_disable`.
    unsafe { KEY_MOD.enable(&mut p) }.map_err(|e| msg!("enable KEY_MOD: {e}"))?;
    let rmod = env.load("rmod", &mt::RMOD.0)?;
    let cmod = match env.load("cmod", &mt::CMOD.0) {
        Ok(c) => c,
        Err(e) => {
            let _ = mt::unload_ok(rmod);
            return Err(e);
        }
    };
    let r = (|| {
        let ks = [mod_keys(&rmod, "rmod")?, mod_keys(&cmod, "cmod")?];
        let mods = [&rmod, &cmod];
        for (m, k) in mods.iter().zip(&ks) {
            check_module(m, k, true)?;
        }
        check_kk(t, kk, true, 1)?;
        for on in [false, true] {
            // SAFETY: as above.
            unsafe {
                if on {
                    KEY_MOD.enable(&mut p)
                } else {
                    KEY_MOD.disable(&mut p)
                }
            }
            .map_err(|e| msg!("KEY_MOD {on}: {e}"))?;
            check_kk(t, kk, on, u32::from(on))?;
            for (m, k) in mods.iter().zip(&ks) {
                check_module(m, k, on)?;
            }
        }
        for (m, k) in mods.iter().zip(&ks) {
            // SAFETY: as above; the key is the loaded module's.
            unsafe { k.own.enable(&mut p) }.map_err(|e| msg!("{}: enable: {e}", m.name()))?;
            check_module(m, k, true)?;
            let listed = key::keys().any(|i| {
                i.enabled && i.count == 1 && msg!("{}", i.name).as_str().contains(m.name())
            });
            ensure!(listed, "key::keys() does not list {}'s enabled key", m.name());
            // SAFETY: as above.
            unsafe { k.own.disable(&mut p) }.map_err(|e| msg!("{}: disable: {e}", m.name()))?;
            check_module(m, k, true)?;
        }
        let info = key::keys()
            .find(|i| msg!("{}", i.name).as_str().ends_with("KEY_MOD"))
            .ok_or("key::keys() does not list KEY_MOD")?;
        ensure!(
            info.sites >= 5,
            "KEY_MOD: key::keys() counts {} sites with both modules loaded",
            info.sites
        );
        println!(
            "keys: rmod and cmod loaded with KEY_MOD enabled came up enabled; {} sites of it \
             across the kernel and both modules follow each change",
            info.sites
        );
        Ok(())
    })();
    let u = mt::unload_ok(rmod).and(mt::unload_ok(cmod));
    r.and(u)
}

/// After the modules are gone: `KEY_MOD` toggles, only the kernel's site changes, and
/// `key::keys()` no longer lists the modules' keys.
fn after_unload(t: &Table<'_>) -> Result<(), Msg> {
    let kk = &KEYS[2];
    let mut p = AliasPoker::default();
    check_kk(t, kk, true, 1)?;
    // SAFETY: as in `enable_disable`.
    unsafe { KEY_MOD.disable(&mut p) }.map_err(|e| msg!("disable KEY_MOD: {e}"))?;
    check_kk(t, kk, false, 0)?;
    // SAFETY: as above.
    unsafe { KEY_MOD.inc(&mut p) }.map_err(|e| msg!("inc KEY_MOD: {e}"))?;
    check_kk(t, kk, true, 1)?;
    // SAFETY: as above.
    unsafe { KEY_MOD.dec(&mut p) }.map_err(|e| msg!("dec KEY_MOD: {e}"))?;
    check_kk(t, kk, false, 0)?;
    let info = key::keys()
        .find(|i| msg!("{}", i.name).as_str().ends_with("KEY_MOD"))
        .ok_or("key::keys() does not list KEY_MOD")?;
    ensure!(
        info.sites as usize == kk.sites,
        "KEY_MOD: {} sites after unload",
        info.sites
    );
    ensure!(
        !key::keys().any(|i| {
            let n = msg!("{}", i.name);
            n.as_str().contains("rmod") || n.as_str().contains("cmod")
        }),
        "key::keys() still lists a module's key"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Several CPUs.

/// Changes of [`KEY_STRESS`] in the SMP stress (enable, disable, inc, dec in turn).
const TOGGLES: u64 = 10_000;
/// Pause after each change, so the APs also run the sites between batches.
const GAP_US: u64 = 20;
/// Site calls per pass between naps.
const PASS: usize = 32;

struct KeySlot {
    calls: AtomicU64,
    settled: AtomicU64,
    seen_on: AtomicU64,
    seen_off: AtomicU64,
    bad: AtomicU64,
    /// The first mismatch: settled batch count << 2 | site << 1 | value seen.
    first_bad: AtomicU64,
}

static SLOTS: [KeySlot; MAX_CPUS] = [const {
    KeySlot {
        calls: AtomicU64::new(0),
        settled: AtomicU64::new(0),
        seen_on: AtomicU64::new(0),
        seen_off: AtomicU64::new(0),
        bad: AtomicU64::new(0),
        first_bad: AtomicU64::new(0),
    }
}; MAX_CPUS];
static SEQ: Seq = Seq::new();
static CREW: Crew = Crew::new();

/// The state of [`KEY_STRESS`] after `batches` changes (it starts disabled and every
/// change flips it).
fn stress_state(batches: u64) -> bool {
    batches % 2 == 1
}

fn key_worker(cpu: usize) {
    let (mut calls, mut settled, mut on, mut off, mut bad, mut first) = (0u64, 0, 0, 0, 0, 0);
    CREW.started();
    while !CREW.stopping() {
        for i in 0..PASS {
            let site = i % 2;
            let before = SEQ.read();
            let v = if site == 0 {
                stress_unlikely()
            } else {
                stress_likely()
            };
            let after = SEQ.read();
            calls += 1;
            if let Some(n) = Seq::settled(before, after) {
                settled += 1;
                if v != stress_state(n) {
                    if bad == 0 {
                        first = n << 2 | (site as u64) << 1 | u64::from(v);
                    }
                    bad += 1;
                } else if v {
                    on += 1;
                } else {
                    off += 1;
                }
            }
        }
        smp::nap(NAP_US);
    }
    let s = &SLOTS[cpu];
    s.calls.store(calls, Ordering::Relaxed);
    s.settled.store(settled, Ordering::Relaxed);
    s.seen_on.store(on, Ordering::Relaxed);
    s.seen_off.store(off, Ordering::Relaxed);
    s.first_bad.store(first, Ordering::Relaxed);
    s.bad.store(bad, Ordering::Release);
}

fn stress(t: &Table<'_>) -> Result<(), Msg> {
    let kk = &KEYS[3];
    check_kk(t, kk, false, 0)?;
    for s in &SLOTS {
        s.bad.store(0, Ordering::Relaxed);
    }
    SEQ.reset();
    let traps0 = pt::other_traps_on_aps();
    let syncs0 = smp::sync_rounds();
    CREW.start(key_worker)?;
    let t0 = cpu::rdtsc();
    let mut p = AliasPoker::default();
    let mut run = || -> Result<(), Msg> {
        for k in 0..TOGGLES {
            SEQ.begin();
            // SAFETY: as in `enable_disable`; the APs run the key's sites meanwhile,
            // which the int3 protocol covers.
            let r = unsafe {
                match k % 4 {
                    0 => KEY_STRESS.enable(&mut p),
                    1 => KEY_STRESS.disable(&mut p),
                    2 => KEY_STRESS.inc(&mut p),
                    _ => KEY_STRESS.dec(&mut p),
                }
            };
            SEQ.end();
            r.map_err(|e| msg!("change {k}: {e}"))?;
            ensure!(
                KEY_STRESS.is_enabled() == stress_state(k + 1),
                "after change {k} the key is {}",
                KEY_STRESS.is_enabled()
            );
            apic::delay_us(GAP_US);
        }
        Ok(())
    };
    let r = run();
    let ms = ms_since(t0);
    CREW.stop()?;
    r?;
    let n = smp::online();
    let (mut calls, mut settled, mut on, mut off) = (0, 0, 0, 0);
    for (cpu, s) in SLOTS.iter().enumerate().take(n).skip(1) {
        let bad = s.bad.load(Ordering::Acquire);
        let f = s.first_bad.load(Ordering::Relaxed);
        ensure!(
            bad == 0,
            "CPU {cpu}: {bad} settled calls saw the wrong state; first: after {} changes \
             the {} site said {}",
            f >> 2,
            if f & 2 != 0 { "likely" } else { "unlikely" },
            f & 1 != 0
        );
        let c = s.calls.load(Ordering::Relaxed);
        ensure!(c > 0, "CPU {cpu} made no calls");
        calls += c;
        settled += s.settled.load(Ordering::Relaxed);
        on += s.seen_on.load(Ordering::Relaxed);
        off += s.seen_off.load(Ordering::Relaxed);
    }
    ensure!(
        on > 0 && off > 0,
        "settled calls saw the key enabled {on} and disabled {off} times"
    );
    check_kk(t, kk, false, 0)?;
    println!(
        "keys: {TOGGLES} changes of KEY_STRESS in {ms} ms while {} APs ran its 2 sites: \
         {calls} calls, {settled} between batches ({on} enabled, {off} disabled), each \
         matching the key's state; {} int3 emulations at non-probe sites on APs; {} sync \
         rounds; {} alias writes",
        n - 1,
        pt::other_traps_on_aps() - traps0,
        smp::sync_rounds() - syncs0,
        p.writes
    );
    Ok(())
}

/// Runs the static key tests (after the probe tests registered the kernel image and
/// installed the #BP hook).
pub fn run(h: &mut Harness) {
    let Some(t) = pt::table() else {
        h.check("static_key_table", Err("no table registered"));
        return;
    };
    h.check("static_key_defaults_before_any_enable", defaults(t));
    h.check("static_key_enable_disable_patch_sites", enable_disable(t));
    h.check("static_key_inc_dec_refcount_underflow", inc_dec(t));
    h.check(
        "static_key_failed_batch_rolls_back",
        failed_batch_rolls_back(t),
    );
    h.check("static_key_introspection_lists_keys", introspection(t));
    match Env::new() {
        Ok(env) => {
            h.check(
                "static_key_module_loaded_while_enabled_gets_sites_enabled",
                module_loaded_while_enabled(&env, t),
            );
            h.check(
                "static_key_after_module_unload_still_toggles",
                after_unload(t),
            );
        }
        Err(e) => h.check("static_key_module_env", Err(e)),
    }
    if smp::online() > 1 {
        h.check("static_key_smp_10000_toggles_while_aps_run_sites", stress(t));
    }
}
