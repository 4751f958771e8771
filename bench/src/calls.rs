//! ifunc dispatch: one call site per variant, each in a loop of [`CALLS`] calls of the
//! same popcount implementation (`popcnt` instruction), differing only in how the call
//! reaches it.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use kernel_loader::{CpuFeatures, ifunc};

/// Calls per benchmark iteration.
pub const CALLS: u64 = 100;

/// The implementation every variant ends up in.
#[inline(never)]
#[target_feature(enable = "popcnt")]
pub unsafe extern "C" fn popcount_popcnt(x: u64) -> u32 {
    x.count_ones()
}

/// The portable fallback (what runs before `init`).
#[inline(never)]
pub extern "C" fn popcount_soft(x: u64) -> u32 {
    let mut x = x;
    x -= (x >> 1) & 0x5555_5555_5555_5555;
    x = (x & 0x3333_3333_3333_3333) + ((x >> 2) & 0x3333_3333_3333_3333);
    x = (x + (x >> 4)) & 0x0f0f_0f0f_0f0f_0f0f;
    (x.wrapping_mul(0x0101_0101_0101_0101) >> 56) as u32
}

fn pick(f: &CpuFeatures) -> unsafe extern "C" fn(u64) -> u32 {
    if f.contains(CpuFeatures::POPCNT) {
        popcount_popcnt
    } else {
        popcount_soft
    }
}

ifunc! {
    /// The ifunc: after `patch::init`, every call below is `call popcount_popcnt`.
    pub fn ks_popcount(x: u64) -> u32;
    default = popcount_soft;
    resolver = pick;
}

/// A function-pointer slot holding the implementation (what an unpatched kernel does).
static SLOT: AtomicUsize = AtomicUsize::new(0);
/// `is_x86_feature_detected!` cached by hand.
static HAS_POPCNT: AtomicBool = AtomicBool::new(false);

/// Fills the slot and the cached flag. Call once, before benchmarking.
pub fn setup() {
    SLOT.store(popcount_popcnt as *const () as usize, Ordering::Relaxed);
    HAS_POPCNT.store(is_x86_feature_detected!("popcnt"), Ordering::Relaxed);
}

fn slot() -> unsafe extern "C" fn(u64) -> u32 {
    let p = SLOT.load(Ordering::Relaxed);
    // SAFETY: `setup` stored a `popcount_popcnt` pointer; before it, the slot is 0 and
    // no benchmark runs.
    unsafe { std::mem::transmute::<usize, unsafe extern "C" fn(u64) -> u32>(p) }
}

#[multiversion::multiversion(targets("x86_64+popcnt"))]
fn mv_popcount(x: u64) -> u32 {
    x.count_ones()
}

// The retpoline thunk Linux uses for `call *%rax` under spectre_v2=retpoline: the
// indirect jump becomes a `ret` to a return address rewritten on the stack, with a
// speculation trap behind the call.
std::arch::global_asm!(
    ".pushsection .text.ksites_bench_thunk,\"ax\",@progbits",
    ".globl ksites_bench_indirect_thunk_rax",
    ".type ksites_bench_indirect_thunk_rax,@function",
    "ksites_bench_indirect_thunk_rax:",
    "call 2f",
    "1: pause",
    "lfence",
    "jmp 1b",
    "2: mov [rsp], rax",
    "ret",
    ".size ksites_bench_indirect_thunk_rax, .-ksites_bench_indirect_thunk_rax",
    ".popsection",
);

unsafe extern "C" {
    fn ksites_bench_indirect_thunk_rax();
}

#[inline(always)]
fn call_retpoline(f: usize, x: u64) -> u32 {
    let ret: u64;
    // SAFETY: `f` is an `extern "C" fn(u64) -> u32` (the slot); the thunk jumps to it with
    // the argument in rdi and it returns to after the `call`; every caller-saved register
    // is declared clobbered (C ABI).
    unsafe {
        std::arch::asm!(
            "call {thunk}",
            thunk = sym ksites_bench_indirect_thunk_rax,
            inout("rax") f => ret,
            inout("rdi") x => _,
            clobber_abi("C"),
        );
    }
    ret as u32
}

/// The loop every variant runs: `CALLS` dependent calls.
macro_rules! call_loop {
    ($x:expr, |$v:ident| $call:expr) => {{
        let mut acc = 0u64;
        for i in 0..CALLS {
            let $v = black_box($x ^ i);
            acc = acc.wrapping_add(u64::from($call));
        }
        acc
    }};
}

/// Patched ifunc: `call popcount_popcnt` (rewritten at start by `patch::init`).
#[inline(never)]
pub fn patched(x: u64) -> u64 {
    call_loop!(x, |v| ks_popcount(v))
}

/// Plain direct call.
#[inline(never)]
pub fn direct(x: u64) -> u64 {
    // SAFETY: `setup`/main checked the CPU has POPCNT before benchmarking.
    call_loop!(x, |v| unsafe { popcount_popcnt(v) })
}

/// Indirect call through a slot (`call [rip+slot]`).
#[inline(never)]
pub fn via_slot(x: u64) -> u64 {
    // SAFETY: the slot holds `popcount_popcnt`; the CPU has POPCNT.
    call_loop!(x, |v| unsafe { slot()(v) })
}

/// The slot through the retpoline thunk.
#[inline(never)]
pub fn retpoline(x: u64) -> u64 {
    call_loop!(x, |v| call_retpoline(SLOT.load(Ordering::Relaxed), v))
}

/// An ifunc call that was not patched: a function pointer to the trampoline
/// (`call reg` → `jmp [rip+slot]`), what every call costs before `init`.
#[inline(never)]
pub fn trampoline(x: u64) -> u64 {
    let f: extern "C" fn(u64) -> u32 = black_box(ks_popcount);
    call_loop!(x, |v| f(v))
}

/// The `multiversion` crate's runtime dispatch.
#[inline(never)]
pub fn multiversion(x: u64) -> u64 {
    call_loop!(x, |v| mv_popcount(v))
}

/// `is_x86_feature_detected!` at every call, then a direct call.
#[inline(never)]
pub fn feature_check(x: u64) -> u64 {
    call_loop!(x, |v| if is_x86_feature_detected!("popcnt") {
        // SAFETY: just checked.
        unsafe { popcount_popcnt(v) }
    } else {
        popcount_soft(v)
    })
}

/// A cached `AtomicBool` at every call, then a direct call.
#[inline(never)]
pub fn cached_flag(x: u64) -> u64 {
    // Volatile, so LLVM keeps the load in the loop (see `probes::flag`).
    call_loop!(x, |v| if crate::probes::flag(&HAS_POPCNT) {
        // SAFETY: the flag is `is_x86_feature_detected!("popcnt")`.
        unsafe { popcount_popcnt(v) }
    } else {
        popcount_soft(v)
    })
}

/// Every variant, with its benchmark id and the row label.
pub const VARIANTS: &[crate::Variant] = &[
    ("patched", "patched ifunc call (ksites)", patched),
    ("direct", "plain direct call", direct),
    ("slot", "call through the slot (fn pointer)", via_slot),
    ("retpoline", "slot through a retpoline thunk", retpoline),
    (
        "trampoline",
        "unpatched ifunc (trampoline, jmp [slot])",
        trampoline,
    ),
    ("multiversion", "multiversion crate dispatch", multiversion),
    (
        "feature_check",
        "is_x86_feature_detected! per call",
        feature_check,
    ),
    ("cached_flag", "cached AtomicBool per call", cached_flag),
];
