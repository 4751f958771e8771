//! Live retargeting of an ifunc (Linux's `static_call_update`): every call site of the
//! ifunc, in the kernel and in every registered module (whose imports name the kernel's
//! trampoline), is rewritten to branch to a new implementation in **one** live batch,
//! then the slot (so calls through the trampoline and function pointers follow).
//!
//! # What a site may hold
//!
//! After [`crate::patch::init`] (and after module load), a site branches to its ifunc's
//! implementation when that is within the branch's reach from the site, else to the
//! trampoline (which jumps through the slot). A retarget keeps that rule: before it
//! writes anything it checks that **every** site holds exactly the branch the rule
//! gives for the old implementation (the slot's value), and it rewrites each site to
//! the branch the rule gives for the new one. A site whose form does not change (on the
//! trampoline before and after) is not written. A site out of reach of both the
//! implementation and the trampoline cannot be (patch and module load refuse it) and
//! is reported as [`RetargetError::OutOfReach`].
//!
//! # The protocol
//!
//! All under the registry lock (`crate::probe`'s: probe batches, module load and unload
//! and retargets are serialised), with no allocation:
//!
//! * x86-64, the int3 protocol, batched: `int3` over every changed site's first byte,
//!   then the new implementation is published to the #BP hook, `sync_cores`; the new
//!   rel32 of every site, `sync_cores`; every first byte back, `sync_cores`; a
//!   read-back of every site; a wait until no CPU is still inside the #BP hook; then
//!   the slot (one aligned 8-byte store). Three `sync_cores` (IPI rounds) per retarget
//!   whatever the number of sites. A CPU reaching a site meanwhile traps and is
//!   emulated (`arch::x86_64::emulate`) into the branch to the ifunc's current target:
//!   `call` pushes the return address, `jmp` jumps, `jcc` evaluates its condition
//!   from RFLAGS. A CPU that trapped just before a first byte came back and reaches
//!   the hook after the batch is resumed at the site, to run it again (the hook
//!   recognises a site of any registered ifunc whose first byte is no longer the
//!   trap). The first byte of a prefixed site is a prefix, which the trap hides: the
//!   batch keeps those bytes in a static buffer ([`MAX_PREFIXED_SITES`] of them per
//!   retarget).
//! * aarch64: `bl`/`b` may be replaced by one another while other CPUs run them (the
//!   ARM ARM's concurrent modification rule), so every changed site gets its new
//!   instruction in one aligned 32-bit store, then one `sync_cores`, no trap.
//! * riscv64: not supported ([`RetargetError::Unsupported`]): its `auipc`+`jalr` call
//!   pair cannot be replaced with one store.
//!
//! A call in flight on another CPU finishes in whichever implementation it entered: no
//! code is freed or changed but the sites' branches. On any failure every written byte
//! is put back with the same protocol, the slot is not touched, and the error says
//! which site.
//!
//! # Images
//!
//! The images are the probe registry's (`probe::register_image` for the kernel, module
//! load for modules): a module must be registered to have its imported sites
//! retargeted. Module load patches a module's imports from the kernel's slot before it
//! registers the module; it then calls `refresh_imports` under the registry lock,
//! before publishing it, so a retarget that ran in between cannot leave the module on
//! the old implementation (a retarget after that sees the module).

use core::sync::atomic::{AtomicU64, Ordering};

use crate::CpuFeatures;
use crate::arch::{Arch, BranchSite, InsnBytes, TargetField, x86_64};
use crate::format::{Site, Table};
use crate::name::Name;

pub use super::error::{ReresolveError, ReresolveReport, RetargetError, RetargetReport};
use crate::patch::{PokeError, TextPoker};
use crate::probe::MAX_IMAGES;

/// Most prefixed sites (x86-64: a site with bytes before its opcode) one retarget
/// rewrites: their first bytes are kept in a static buffer while the trap hides them.
pub const MAX_PREFIXED_SITES: usize = 4096;

/// The trampoline of the ifunc whose sites a batch is rewriting; [`NEVER`] until a
/// batch first writes a trap, [`IDLE`] between batches. Set before the first trap is
/// written, back to [`IDLE`] once no CPU can still trap on one (or left set when a
/// rollback could not remove them all).
static IN_FLIGHT: AtomicU64 = AtomicU64::new(NEVER);
/// [`IN_FLIGHT`]: no batch ever wrote a trap (the #BP hook returns at once).
const NEVER: u64 = 0;
/// [`IN_FLIGHT`]: no batch in flight now (the #BP hook still recognises a stale trap).
const IDLE: u64 = 1;
/// Where a CPU trapping on a site of [`IN_FLIGHT`] goes: the old implementation until
/// every site is trapped, the new one after, the old one again during a rollback.
static TARGET: AtomicU64 = AtomicU64::new(0);
/// Moves on (SeqCst) when a batch starts, before it publishes [`TARGET`] and
/// [`IN_FLIGHT`]: the #BP hook reads it first and again after everything it read of
/// them, and if it moved, resumes the CPU at the site (which then runs or traps again)
/// instead of acting on a mix of two batches (the target of another ifunc's batch, or a
/// trap taken for foreign because a whole batch ran in between).
static GENERATION: AtomicU64 = AtomicU64::new(0);
/// Moves [`GENERATION`] on, as a batch does when it starts (tests that play a batch's
/// writes by hand).
#[cfg(test)]
pub(super) fn start_generation() {
    GENERATION.fetch_add(1, Ordering::SeqCst);
}
/// Times the #BP hook emulated an ifunc site.
static EMULATIONS: AtomicU64 = AtomicU64::new(0);
/// Times the #BP hook resumed a CPU at an ifunc site whose trap a batch had already
/// replaced.
static STALE_RETRIES: AtomicU64 = AtomicU64::new(0);
/// The first bytes of the prefixed sites of the batch in flight (in site order).
static PREFIX0: spin::Mutex<[u8; MAX_PREFIXED_SITES]> = spin::Mutex::new([0; MAX_PREFIXED_SITES]);

/// How many times the #BP hook emulated an ifunc site trapped mid-retarget.
pub fn retarget_int3_emulations() -> u64 {
    EMULATIONS.load(Ordering::Relaxed)
}

/// How many times the #BP hook resumed a CPU at an ifunc site whose trap a batch had
/// already put back (the CPU trapped just before, and reached the hook just after).
pub fn retarget_stale_traps() -> u64 {
    STALE_RETRIES.load(Ordering::Relaxed)
}

/// Rewrites every site of the ifunc whose trampoline is `trampoline`, in every
/// registered image, to branch to `implementation`, then stores it in the slot: one
/// live batch (see the [module docs](self)). Returns what it did; on error nothing is
/// changed (but see [`RetargetError::RollbackIncomplete`]).
///
/// Prefer the signature-checked `popcount::retarget(new, poker)` that
/// [`ifunc!`](crate::ifunc!) defines, or [`retarget!`](crate::retarget!).
///
/// # Safety
///
/// 1. `implementation` is an `extern "C"` function with the ifunc's signature, valid to
///    run on every CPU (its target features are present), and stays mapped as long as
///    any site or the slot may branch to it.
/// 2. The registered tables describe live images (as for `probe::enable`), and
///    [`crate::patch::init`] ran on each (their sites hold the resolved branches).
/// 3. On x86-64 every CPU's #BP reaches `probe::handle_int3` (checked:
///    [`RetargetError::NoTrapRoute`]), and the #BP entry allows the emulation of a
///    `call` to push below the interrupted stack pointer (`probe::int3_entry` does).
pub unsafe fn retarget_raw<P: TextPoker + ?Sized>(
    trampoline: usize,
    implementation: usize,
    poker: &mut P,
) -> Result<RetargetReport, RetargetError> {
    let lock = crate::probe::lock_images();
    if cfg!(target_arch = "x86_64") && !crate::probe::int3_route_declared() {
        return Err(RetargetError::NoTrapRoute);
    }
    let mut images: [Option<&Table<'static>>; MAX_IMAGES] = [None; MAX_IMAGES];
    for (d, t) in images.iter_mut().zip(lock.tables()) {
        *d = Some(t);
    }
    let drain = || lock.wait_for_int3();
    // SAFETY: forwarded; the lock is held for the whole batch.
    unsafe {
        retarget_in(
            &images,
            trampoline as u64,
            implementation as u64,
            poker,
            &drain,
        )
    }
}

/// Reruns the resolver of every ifunc each registered image defines with `features`
/// and retargets ([`retarget_raw`]) those whose choice differs from their slot, all
/// under one hold of the registry lock. Stops at the first failed retarget.
///
/// # Safety
///
/// As for [`retarget_raw`], for every implementation a resolver returns; every
/// resolver is an `extern "C" fn(u64) -> usize` ([`crate::ifunc!`]'s adapter) safe to
/// call now.
pub unsafe fn reresolve_all<P: TextPoker + ?Sized>(
    features: &CpuFeatures,
    poker: &mut P,
) -> Result<ReresolveReport, ReresolveError> {
    let lock = crate::probe::lock_images();
    if cfg!(target_arch = "x86_64") && !crate::probe::int3_route_declared() {
        return Err(ReresolveError {
            trampoline: 0,
            error: RetargetError::NoTrapRoute,
            done: ReresolveReport::default(),
        });
    }
    let mut images: [Option<&Table<'static>>; MAX_IMAGES] = [None; MAX_IMAGES];
    for (d, t) in images.iter_mut().zip(lock.tables()) {
        *d = Some(t);
    }
    let drain = || lock.wait_for_int3();
    // SAFETY: forwarded; the lock is held throughout.
    unsafe { reresolve_in(&images, features.bits(), poker, &drain) }
}

/// [`reresolve_all`] over `images` (the caller holds what serialises writers).
///
/// # Safety
///
/// As for [`reresolve_all`].
pub(super) unsafe fn reresolve_in<P: TextPoker + ?Sized>(
    images: &[Option<&Table<'static>>],
    features: u64,
    poker: &mut P,
    drain: &dyn Fn(),
) -> Result<ReresolveReport, ReresolveError> {
    let mut done = ReresolveReport::default();
    for t in images.iter().flatten() {
        for f in t.ifuncs().filter(|f| !f.imported) {
            // SAFETY: precondition: the resolver is an `ifunc!` adapter (the reader
            // checked it lies in an executable range).
            let r: extern "C" fn(u64) -> usize =
                unsafe { core::mem::transmute(f.resolver as usize) };
            let chosen = r(features) as u64;
            done.ifuncs += 1;
            // SAFETY: a defined ifunc's slot: validated 8-aligned data of a live image.
            if chosen == unsafe { slot_load(f.slot) } {
                continue;
            }
            // SAFETY: forwarded.
            match unsafe { retarget_in(images, f.trampoline, chosen, poker, drain) } {
                Ok(r) => {
                    done.retargeted += 1;
                    done.sites_rewritten += r.sites_rewritten;
                    done.sites_on_trampoline += r.sites_on_trampoline;
                }
                Err(error) => {
                    return Err(ReresolveError {
                        trampoline: f.trampoline,
                        error,
                        done,
                    });
                }
            }
        }
    }
    Ok(done)
}

/// The value of the slot at `slot`.
///
/// # Safety
///
/// `slot` is the slot of a defined ifunc of a validated, live table (8-aligned data).
unsafe fn slot_load(slot: u64) -> u64 {
    // SAFETY: the caller's precondition: mapped, 8-aligned, only written atomically.
    unsafe { AtomicU64::from_ptr(slot as usize as *mut u64) }.load(Ordering::SeqCst)
}

/// [`retarget_raw`] over `images` (the caller holds what serialises writers; `drain`
/// waits until no CPU is inside the #BP hook).
///
/// # Safety
///
/// As for [`retarget_raw`], the tables being `images`.
pub(super) unsafe fn retarget_in<P: TextPoker + ?Sized>(
    images: &[Option<&Table<'static>>],
    trampoline: u64,
    implementation: u64,
    poker: &mut P,
    drain: &dyn Fn(),
) -> Result<RetargetReport, RetargetError> {
    let stuck = IN_FLIGHT.load(Ordering::Acquire);
    if stuck > IDLE {
        return Err(RetargetError::Stuck { trampoline: stuck });
    }
    let Some((def, f)) = images.iter().flatten().find_map(|t| {
        t.ifuncs()
            .find(|f| !f.imported && f.trampoline == trampoline)
            .map(|f| (*t, f))
    }) else {
        return Err(RetargetError::NoSuchIfunc { trampoline });
    };
    let name = f.name;
    if implementation == 0 || implementation == trampoline {
        return Err(RetargetError::BadImplementation {
            ifunc: Name::new(name),
            addr: implementation,
        });
    }
    let arch = def.arch();
    if arch == Arch::Riscv64 {
        return Err(RetargetError::Unsupported { arch });
    }
    // SAFETY: a defined ifunc's slot (precondition 2).
    let old = unsafe { slot_load(f.slot) };
    let b = Batch {
        images,
        arch,
        trampoline,
        old,
        new: implementation,
        name,
    };
    let mut report = b.check(poker)?;
    if report.sites_rewritten > 0 {
        // SAFETY: forwarded; every site passed the check.
        unsafe {
            match arch {
                Arch::X86_64 => b.int3(poker, drain),
                _ => b.single_store(poker),
            }
        }?;
    }
    // The sites branch to the new implementation: now the slot.
    // SAFETY: as above.
    unsafe { AtomicU64::from_ptr(f.slot as usize as *mut u64) }
        .store(implementation, Ordering::SeqCst);
    report.previous = old;
    Ok(report)
}

/// One retarget's sites and addresses.
struct Batch<'a> {
    images: &'a [Option<&'a Table<'static>>],
    arch: Arch,
    trampoline: u64,
    old: u64,
    new: u64,
    name: &'a str,
}

/// What a site holds before and after.
#[derive(Clone, Copy)]
struct Plan {
    b: BranchSite,
    /// Address of the target field.
    field_at: u64,
    old: TargetField,
    new: TargetField,
    /// The new form is the branch to the trampoline.
    on_trampoline: bool,
}

impl Plan {
    fn changes(&self) -> bool {
        self.old.value != self.new.value
    }
}

/// Reads `len` (≤ 8) bytes of text at `addr` as a little-endian word.
#[inline(always)]
fn rd<P: TextPoker + ?Sized>(poker: &P, addr: u64, len: usize) -> u64 {
    // SAFETY: every caller passes bytes inside a validated site of a live image, which
    // lies in an executable range the kernel declared mapped.
    unsafe { poker.read_word(addr, len) }
}

/// Writes the low `len` bytes of `value` at `addr`.
///
/// # Safety
///
/// As for [`TextPoker::write`]: inside a validated site, at a step the protocol allows.
#[inline(always)]
unsafe fn wr<P: TextPoker + ?Sized>(
    poker: &mut P,
    addr: u64,
    value: u64,
    len: usize,
) -> Result<(), PokeError> {
    let b = value.to_le_bytes();
    // SAFETY: forwarded.
    unsafe { poker.write(addr, &b[..len.min(8)]) }
}

impl Batch<'_> {
    fn err_name(&self) -> Name {
        Name::new(self.name)
    }

    /// Whether descriptor `i` of `t` names this ifunc (a definition or an import of the
    /// same trampoline; a module may import one trampoline under two names).
    fn names_us(&self, t: &Table<'_>, i: u32) -> bool {
        t.ifunc_trampoline_slot(i)
            .is_some_and(|(tr, _)| tr == self.trampoline)
    }

    /// Every site of the ifunc, image by image, each in table order: the sites of every
    /// descriptor of `t` that names its trampoline.
    fn sites(&self) -> impl Iterator<Item = Site> + '_ {
        self.images.iter().flatten().flat_map(move |t| {
            let any = (0..t.ifunc_count()).any(|i| self.names_us(t, i));
            t.site_walk()
                .filter(move |s| any && self.names_us(t, s.ifunc))
        })
    }

    /// The site's old and new forms.
    fn plan(&self, s: &Site) -> Result<Plan, RetargetError> {
        let b = s.branch();
        let reach = |t| self.arch.encode_target(&b, t);
        let tramp = reach(self.trampoline);
        let out = |target| RetargetError::OutOfReach {
            site: s.addr,
            ifunc: self.err_name(),
            target,
        };
        let old = reach(self.old).or(tramp).ok_or(out(self.old))?;
        let (new, on_trampoline) = match reach(self.new) {
            Some(f) => (f, false),
            None => (tramp.ok_or(out(self.new))?, true),
        };
        Ok(Plan {
            b,
            field_at: s.target_field().start,
            old,
            new,
            on_trampoline,
        })
    }

    /// The changed sites' plans (those that plan: every one, after [`Batch::check`]).
    fn changed(&self) -> impl Iterator<Item = Plan> + '_ {
        self.sites()
            .filter_map(|s| self.plan(&s).ok())
            .filter(Plan::changes)
    }

    /// Checks every site holds its old form (nothing is written), and counts.
    fn check<P: TextPoker + ?Sized>(&self, poker: &P) -> Result<RetargetReport, RetargetError> {
        let mut r = RetargetReport::default();
        let mut prefixed = 0u32;
        for s in self.sites() {
            let p = self.plan(&s)?;
            let len = s.len().min(8);
            let found = InsnBytes::from_word(rd(poker, s.addr, len), len);
            let field = rd(poker, p.field_at, p.old.len as usize);
            let ok = self.arch.has_branch_opcode(&p.b, found.as_slice()) && field == p.old.value;
            if !ok {
                let target = if self.arch.encode_target(&p.b, self.old).is_some() {
                    self.old
                } else {
                    self.trampoline
                };
                let expected = self
                    .arch
                    .expected_original(&p.b, &found, target)
                    .unwrap_or(found);
                return Err(RetargetError::UnexpectedSiteBytes {
                    site: s.addr,
                    ifunc: self.err_name(),
                    expected,
                    found,
                });
            }
            r.sites += 1;
            r.sites_on_trampoline += u32::from(p.on_trampoline);
            if p.changes() {
                r.sites_rewritten += 1;
                prefixed += u32::from(s.prefixes > 0 && self.arch == Arch::X86_64);
            }
        }
        if prefixed as usize > MAX_PREFIXED_SITES {
            return Err(RetargetError::TooManyPrefixedSites {
                ifunc: self.err_name(),
                count: prefixed,
            });
        }
        r.images = self
            .images
            .iter()
            .flatten()
            .filter(|t| t.site_walk().any(|s| self.names_us(t, s.ifunc)))
            .count() as u32;
        Ok(r)
    }

    /// The aarch64 batch: one aligned 32-bit store per changed site (the whole
    /// instruction is the target field), then one `sync_cores`.
    ///
    /// # Safety
    ///
    /// As for [`retarget_raw`]; every site passed [`Batch::check`].
    unsafe fn single_store<P: TextPoker + ?Sized>(
        &self,
        poker: &mut P,
    ) -> Result<(), RetargetError> {
        poker.begin().map_err(|error| RetargetError::Poke {
            ifunc: self.err_name(),
            error,
        })?;
        let mut failed = None;
        for p in self.changed() {
            // SAFETY: the site's whole instruction, checked; `bl`/`b` replaced by
            // `bl`/`b` is allowed under concurrent execution.
            if let Err(error) = unsafe { wr(poker, p.field_at, p.new.value, p.new.len as usize) } {
                failed = Some(RetargetError::Poke {
                    ifunc: self.err_name(),
                    error,
                });
                break;
            }
        }
        poker.sync_cores();
        let failed = failed.or_else(|| {
            self.changed()
                .find(|p| rd(poker, p.field_at, p.new.len as usize) != p.new.value)
                .map(|p| RetargetError::VerifyFailed {
                    site: p.b.addr,
                    ifunc: self.err_name(),
                })
        });
        let Some(err) = failed else {
            poker.end();
            return Ok(());
        };
        for p in self.changed() {
            if rd(poker, p.field_at, p.old.len as usize) != p.old.value {
                // SAFETY: as above, back to the checked old instruction.
                let _ = unsafe { wr(poker, p.field_at, p.old.value, p.old.len as usize) };
            }
        }
        poker.sync_cores();
        poker.end();
        let incomplete = self
            .changed()
            .find(|p| rd(poker, p.field_at, p.old.len as usize) != p.old.value);
        Err(match incomplete {
            Some(p) => RetargetError::RollbackIncomplete {
                site: p.b.addr,
                ifunc: self.err_name(),
            },
            None => err,
        })
    }

    /// The x86-64 int3 batch (module docs).
    ///
    /// # Safety
    ///
    /// As for [`retarget_raw`]; every site passed [`Batch::check`].
    unsafe fn int3<P: TextPoker + ?Sized>(
        &self,
        poker: &mut P,
        drain: &dyn Fn(),
    ) -> Result<(), RetargetError> {
        let mut prefix0 = PREFIX0.lock();
        let buf = &mut *prefix0;
        poker.begin().map_err(|error| RetargetError::Poke {
            ifunc: self.err_name(),
            error,
        })?;
        GENERATION.fetch_add(1, Ordering::SeqCst);
        TARGET.store(self.old, Ordering::SeqCst);
        IN_FLIGHT.store(self.trampoline, Ordering::SeqCst);
        // SAFETY: forwarded.
        let r = unsafe { self.int3_rounds(poker, buf) };
        let r = match r {
            Ok(()) => Ok(()),
            Err((stored, err)) => {
                // SAFETY: forwarded; `stored` first bytes were kept.
                match unsafe { self.int3_roll_back(poker, &buf[..stored]) } {
                    Some(incomplete) => Err(incomplete),
                    None => Err(err),
                }
            }
        };
        poker.end();
        // No CPU may still be emulating a site of this batch once the hook is off.
        drain();
        if !matches!(r, Err(RetargetError::RollbackIncomplete { .. })) {
            IN_FLIGHT.store(IDLE, Ordering::SeqCst);
        }
        r
    }

    /// The first byte a changed site had: its opcode, or the prefix kept in `kept` (the
    /// `k`-th prefixed site), or (a site the batch did not reach) the one it holds.
    fn first_byte<P: TextPoker + ?Sized>(&self, p: &Plan, k: usize, kept: &[u8], poker: &P) -> u8 {
        if p.b.prefixes == 0 {
            x86_64::first_opcode_byte(p.b.kind)
        } else {
            match kept.get(k) {
                Some(&b) => b,
                None => rd(poker, p.b.addr, 1) as u8,
            }
        }
    }

    /// The three rounds and the read-back. On failure, returns how many prefixed
    /// first bytes `buf` holds and the error.
    ///
    /// # Safety
    ///
    /// As for [`Batch::int3`].
    unsafe fn int3_rounds<P: TextPoker + ?Sized>(
        &self,
        poker: &mut P,
        buf: &mut [u8],
    ) -> Result<(), (usize, RetargetError)> {
        let poke = |error| RetargetError::Poke {
            ifunc: self.err_name(),
            error,
        };
        // Round 0: the trap over every changed site's first byte (a prefixed site's
        // kept first).
        let mut k = 0;
        for p in self.changed() {
            if p.b.prefixes > 0 {
                let Some(slot) = buf.get_mut(k) else {
                    return Err((
                        k,
                        poke(PokeError::new(p.b.addr, crate::patch::PokeFailure::Busy)),
                    ));
                };
                *slot = rd(poker, p.b.addr, 1) as u8;
                k += 1;
            }
            // SAFETY: one byte, atomic: a CPU decodes either the old instruction or
            // the trap.
            if let Err(e) = unsafe { wr(poker, p.b.addr, u64::from(x86_64::INT3), 1) } {
                return Err((k, poke(e)));
            }
        }
        let stored = k;
        // Every site is trapped: a trapping CPU now goes to the new implementation.
        TARGET.store(self.new, Ordering::SeqCst);
        poker.sync_cores();
        // Round 1: the new target fields (no CPU decodes them: byte 0 is the trap).
        for p in self.changed() {
            // SAFETY: behind the trap, after a serialization of every CPU.
            if let Err(e) = unsafe { wr(poker, p.field_at, p.new.value, p.new.len as usize) } {
                return Err((stored, poke(e)));
            }
        }
        poker.sync_cores();
        // Round 2: the first bytes back.
        let mut k = 0;
        for p in self.changed() {
            let b0 = self.first_byte(&p, k, &buf[..stored], poker);
            k += usize::from(p.b.prefixes > 0);
            // SAFETY: one byte, atomic, after the tail was serialized.
            if let Err(e) = unsafe { wr(poker, p.b.addr, u64::from(b0), 1) } {
                return Err((stored, poke(e)));
            }
        }
        poker.sync_cores();
        let mut k = 0;
        for p in self.changed() {
            let b0 = self.first_byte(&p, k, &buf[..stored], poker);
            k += usize::from(p.b.prefixes > 0);
            if rd(poker, p.b.addr, 1) as u8 != b0
                || rd(poker, p.field_at, p.new.len as usize) != p.new.value
            {
                let e = RetargetError::VerifyFailed {
                    site: p.b.addr,
                    ifunc: self.err_name(),
                };
                return Err((stored, e));
            }
        }
        Ok(())
    }

    /// Puts every changed site back to its old form with the same protocol (a site is
    /// moved on to the next round only if it holds the trap), then reads each back.
    /// Returns [`RetargetError::RollbackIncomplete`] for the first site not restored.
    ///
    /// # Safety
    ///
    /// As for [`Batch::int3`]; `kept` holds the first bytes round 0 kept.
    unsafe fn int3_roll_back<P: TextPoker + ?Sized>(
        &self,
        poker: &mut P,
        kept: &[u8],
    ) -> Option<RetargetError> {
        TARGET.store(self.old, Ordering::SeqCst);
        let trap = u64::from(x86_64::INT3);
        let intact = |p: &Plan, b0: u8, poker: &P| {
            rd(poker, p.b.addr, 1) as u8 == b0
                && rd(poker, p.field_at, p.old.len as usize) == p.old.value
        };
        let mut k = 0;
        for p in self.changed() {
            let b0 = self.first_byte(&p, k, kept, poker);
            k += usize::from(p.b.prefixes > 0);
            if !intact(&p, b0, poker) && rd(poker, p.b.addr, 1) != trap {
                // SAFETY: one byte, atomic: the trap over a complete instruction.
                let _ = unsafe { wr(poker, p.b.addr, trap, 1) };
            }
        }
        poker.sync_cores();
        for p in self.changed() {
            if rd(poker, p.b.addr, 1) == trap {
                // SAFETY: behind the trap, serialized.
                let _ = unsafe { wr(poker, p.field_at, p.old.value, p.old.len as usize) };
            }
        }
        poker.sync_cores();
        let mut k = 0;
        for p in self.changed() {
            let b0 = self.first_byte(&p, k, kept, poker);
            k += usize::from(p.b.prefixes > 0);
            if rd(poker, p.b.addr, 1) == trap
                && rd(poker, p.field_at, p.old.len as usize) == p.old.value
            {
                // SAFETY: one byte, atomic, the old tail serialized.
                let _ = unsafe { wr(poker, p.b.addr, u64::from(b0), 1) };
            }
        }
        poker.sync_cores();
        let mut k = 0;
        for p in self.changed() {
            let b0 = self.first_byte(&p, k, kept, poker);
            k += usize::from(p.b.prefixes > 0);
            if !intact(&p, b0, poker) {
                return Some(RetargetError::RollbackIncomplete {
                    site: p.b.addr,
                    ifunc: self.err_name(),
                });
            }
        }
        None
    }
}

/// Brings the sites of `module`'s imported ifuncs to the current value of the defining
/// image's slot (found among `registered`, by trampoline): what module load calls under
/// the registry lock, before it publishes the module, so a retarget that ran after
/// `patch::init` read the kernel's slot for the module cannot leave the module's sites
/// on the old implementation. Each site must hold a branch of its kind (to whatever
/// implementation the slot held then); sites already right are not written. Returns
/// how many sites it rewrote. Imports whose definition is not registered are left
/// alone (nothing can retarget them).
///
/// # Safety
///
/// No CPU runs `module`'s text yet (it is not published; its init has not run), and
/// `module` and `registered` describe live images.
#[cfg_attr(not(test), allow(dead_code))] // Called by module load (registry lock held).
pub(crate) unsafe fn refresh_imports<'a, P: TextPoker + ?Sized>(
    module: &Table<'_>,
    registered: impl Iterator<Item = &'a Table<'static>> + Clone,
    poker: &mut P,
) -> Result<u32, RetargetError> {
    let arch = module.arch();
    let mut n = 0;
    let mut begun = false;
    let mut result = Ok(());
    'ifuncs: for f in module.ifuncs().filter(|f| f.imported) {
        let Some(slot) = registered.clone().find_map(|t| {
            t.ifuncs()
                .find(|d| !d.imported && d.trampoline == f.trampoline)
                .map(|d| d.slot)
        }) else {
            continue;
        };
        // SAFETY: a defined ifunc's slot in a registered, live table.
        let current = unsafe { slot_load(slot) };
        for s in module.site_walk().filter(|s| s.ifunc == f.index) {
            let b = s.branch();
            let reach = |t| arch.encode_target(&b, t);
            let Some(want) = reach(current).or(reach(f.trampoline)) else {
                result = Err(RetargetError::OutOfReach {
                    site: s.addr,
                    ifunc: Name::new(f.name),
                    target: current,
                });
                break 'ifuncs;
            };
            let len = s.len().min(8);
            let found = InsnBytes::from_word(rd(poker, s.addr, len), len);
            if !arch.has_branch_opcode(&b, found.as_slice()) {
                result = Err(RetargetError::UnexpectedSiteBytes {
                    site: s.addr,
                    ifunc: Name::new(f.name),
                    expected: arch.expected_original(&b, &found, current).unwrap_or(found),
                    found,
                });
                break 'ifuncs;
            }
            let at = s.target_field().start;
            if rd(poker, at, want.len as usize) == want.value {
                continue;
            }
            if !begun {
                if let Err(error) = poker.begin() {
                    return Err(RetargetError::Poke {
                        ifunc: Name::new(f.name),
                        error,
                    });
                }
                begun = true;
            }
            // SAFETY: a validated site of a module no CPU runs yet (precondition).
            let w = unsafe { wr(poker, at, want.value, want.len as usize) };
            if let Err(error) = w {
                result = Err(RetargetError::Poke {
                    ifunc: Name::new(f.name),
                    error,
                });
                break 'ifuncs;
            }
            if rd(poker, at, want.len as usize) != want.value {
                result = Err(RetargetError::VerifyFailed {
                    site: s.addr,
                    ifunc: Name::new(f.name),
                });
                break 'ifuncs;
            }
            n += 1;
        }
    }
    if begun {
        poker.sync_cores();
        poker.end();
    }
    result.map(|()| n)
}

/// The #BP hook's part for ifunc sites (`probe::handle_int3` calls it first): if a
/// retarget is in flight and the trap is on one of its sites, emulates the branch to
/// the ifunc's current target and returns `true`; if the trap is at the start of an
/// ifunc site whose first byte is no longer the trap (a CPU that hit it just before a
/// batch put the byte back, and reached the hook only after), resumes the CPU at the
/// site to run it again, and returns `true`. One load when no retarget ever ran; after
/// that, a trap elsewhere (a probe's) also costs a lookup of its address among the
/// ifunc sites of the image holding it (a binary search).
///
/// # Safety
///
/// As for `probe::handle_int3`: `f` is the live interrupted context of a #BP on this
/// CPU, whose program counter and stack pointer the kernel writes back.
#[inline(always)]
pub(crate) unsafe fn emulate_retarget_trap(f: &mut crate::arch::native::probe::Int3Frame) -> bool {
    if IN_FLIGHT.load(Ordering::Acquire) == NEVER {
        return false;
    }
    // SAFETY: forwarded.
    unsafe { emulate_in_flight(f) }
}

/// [`emulate_retarget_trap`] once a retarget is in flight: the site from the registry.
///
/// # Safety
///
/// As for [`emulate_retarget_trap`].
#[cfg(target_arch = "x86_64")]
#[cold]
#[inline(never)]
unsafe fn emulate_in_flight(f: &mut crate::arch::native::probe::Int3Frame) -> bool {
    // SAFETY: forwarded.
    unsafe {
        emulate_with(f, |addr, tramp| {
            crate::probe::with_table_at(addr, |t| site_of(t, addr, tramp)).flatten()
        })
    }
}

/// Elsewhere no batch writes a trap, so nothing traps on an ifunc site.
///
/// # Safety
///
/// None beyond the caller's.
#[cfg(not(target_arch = "x86_64"))]
#[cold]
unsafe fn emulate_in_flight(_f: &mut crate::arch::native::probe::Int3Frame) -> bool {
    false
}

/// The site of `t` starting at `addr`, if it is a site of the ifunc whose trampoline
/// is `tramp` (`None`: of any ifunc).
#[cfg(any(target_arch = "x86_64", test))]
pub(super) fn site_of(t: &Table<'_>, addr: u64, tramp: Option<u64>) -> Option<BranchSite> {
    let s = t.site_containing(addr)?;
    let (tr, _) = t.ifunc_trampoline_slot(s.ifunc)?;
    (s.addr == addr && tramp.is_none_or(|t| t == tr)).then(|| s.branch())
}

/// [`emulate_retarget_trap`] with the site found by `find(addr, trampoline)` (`None`:
/// a site of any ifunc).
///
/// # Safety
///
/// As for [`emulate_retarget_trap`]; `find` returns only validated sites of live images.
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn emulate_with(
    f: &mut crate::arch::native::probe::Int3Frame,
    find: impl Fn(u64, Option<u64>) -> Option<BranchSite>,
) -> bool {
    use crate::arch::SiteKind;
    use x86_64::emulate;
    let generation = GENERATION.load(Ordering::SeqCst);
    let state = IN_FLIGHT.load(Ordering::SeqCst);
    if state == NEVER {
        return false;
    }
    // Another batch started since `generation` was read: what was read may mix two.
    let moved = || GENERATION.load(Ordering::SeqCst) != generation;
    let addr = x86_64::probe::trap_site(f);
    let found = if state == IDLE {
        None
    } else {
        find(addr, Some(state))
    };
    let Some(site) = found else {
        // A stale trap? Only at the start of an ifunc site (looked up first: a frame
        // handed to the hook may name any address) whose first byte is not the trap.
        if find(addr, None).is_none() {
            return false;
        }
        // SAFETY: the first byte of a validated site of a live image.
        let b0 = unsafe { core::ptr::read_volatile(addr as usize as *const u8) };
        // A trap there again, and a batch in flight now: it began after `state` was
        // read (a batch publishes itself before it writes a trap); running the site
        // again traps into it. A trap no batch wrote stays the kernel's.
        if b0 == x86_64::INT3 && !moved() && IN_FLIGHT.load(Ordering::SeqCst) <= IDLE {
            return false;
        }
        // The trap is gone and a complete instruction is back: run it again.
        STALE_RETRIES.fetch_add(1, Ordering::Relaxed);
        emulate::resume_at(f, addr);
        return true;
    };
    let target = TARGET.load(Ordering::SeqCst);
    if moved() {
        // `target` may be another ifunc's (a later batch): run the site again, which
        // holds the trap or a complete instruction.
        STALE_RETRIES.fetch_add(1, Ordering::Relaxed);
        emulate::resume_at(f, addr);
        return true;
    }
    let cc = if site.kind == SiteKind::Jcc {
        // SAFETY: the condition byte lies inside the validated site; the protocol
        // never writes it.
        let op = unsafe {
            core::ptr::read_volatile(emulate::condition_byte(&site) as usize as *const u8)
        };
        emulate::jcc_condition(op)
    } else {
        0
    };
    EMULATIONS.fetch_add(1, Ordering::Relaxed);
    // SAFETY: `f` is the live context of a trap on `site`'s first byte (precondition).
    unsafe { emulate::emulate_branch(f, &site, cc, target) };
    true
}

/// Clears a stuck batch's published state (tests only: a rollback they made fail).
#[cfg(test)]
pub(super) fn reset_in_flight_for_tests() {
    if IN_FLIGHT.load(Ordering::SeqCst) > IDLE {
        IN_FLIGHT.store(IDLE, Ordering::SeqCst);
    }
}
