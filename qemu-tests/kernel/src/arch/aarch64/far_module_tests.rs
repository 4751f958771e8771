//! A module out of `bl` reach of the kernel (`module_far_calls_through_veneers`):
//! `farmod` (`qemu-tests/modules/farmod.c`) loaded into the far module block
//! (`mmu::FAR_MODULE_BASE`, 160 MiB into RAM), so its `bl` and tail `b` to the kernel's
//! [`ksites_test_kernel_add`] go through the veneer the loader builds in the module's RX
//! veneer area, while `adrp`/`add` and an `ABS64` pointer reach it directly.
//!
//! farmod has no ksites records: a C probe's enabled form is a `bl` to the kernel's
//! `ksites_probe_c_entry` and an imported ifunc's site must branch to the kernel's
//! trampoline, and neither is routed through a veneer today (rmod loaded there is
//! refused with `PatchError::TrampolineOutOfReach`: `module_far_ifunc_import_refused_clearly`).

use kernel_loader::arch::aarch64::branch::{B_OPCODE_MASK, BL, branch_dest};
use kernel_loader::module::{Export, Kernel, Module, ModuleError};
use kernel_loader::patch::PatchError;

use super::mmu::{self, AliasPoker};
use super::module_arena::FarArena;
use crate::harness::{Harness, Msg};
use crate::shared::module_tests::{
    Env, FARMOD, Fn2, FnU64, RMOD, check_mapping, func, read_u32, report, unload_from,
};
use crate::{ensure, msg, println};

/// Runs the far-module tests (after `module_unknown_symbol_fails_cleanly`).
pub fn run(h: &mut Harness, env: &Env) {
    h.check(
        "module_far_calls_through_veneers",
        check_far_module(&env.exec),
    );
    h.check(
        "module_far_ifunc_import_refused_clearly",
        far_import_refused(env),
    );
}

/// The kernel function farmod calls: `a * 3 + b`.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn ksites_test_kernel_add(a: u64, b: u64) -> u64 {
    a.wrapping_mul(3).wrapping_add(b)
}

static FAR_EXPORTS: [Export; 1] = [kernel_loader::export!(ksites_test_kernel_add)];

/// Loads farmod into the far block, checks it, unloads it; the far block is free again.
fn check_far_module(exec: &[core::ops::Range<u64>]) -> Result<(), Msg> {
    let kernel = Kernel {
        symbols: &FAR_EXPORTS,
        table: None,
        exec,
        features: kernel_loader::CpuFeatures::detect(),
    };
    let mut far = FarArena;
    let mut poker = AliasPoker::default();
    // SAFETY: the far block is executable once protected; farmod has no ifuncs (no
    // table to check imports against) and no probes; the poker writes module text
    // through the alias; the module is ours.
    let m = unsafe { Module::load("farmod", &FARMOD.0, &kernel, &mut far, &mut poker) }
        .map_err(|e| msg!("loading farmod into the far block: {e}"))?;
    let r = checks(&m);
    let u = unload_from(m, &mut far).map_err(|(_, e)| msg!("unloading farmod: {e}"));
    r.and(u)?;
    ensure!(!far.in_use(), "the far block was not freed");
    Ok(())
}

fn checks(m: &Module<'_>) -> Result<(), Msg> {
    report(m);
    let target = ksites_test_kernel_add as *const () as u64;
    let distance = m.text().start.abs_diff(target);
    ensure!(
        distance > 1 << 27,
        "the far block is within bl reach of the kernel"
    );
    let v = m.veneers();
    ensure!(m.report().veneers >= 1 && !v.is_empty(), "no veneers built");
    ensure!(
        mmu::far_module_range().contains(&v.start),
        "veneers at {:#x} outside the far block",
        v.start
    );
    check_mapping(m)?;
    // SAFETY: farmod defines these with these C signatures and stays loaded.
    let (call, tail, ptr, agrees, state) = unsafe {
        (
            func::<Fn2>(m, "farmod_call")?,
            func::<Fn2>(m, "farmod_tail")?,
            func::<FnU64>(m, "farmod_ptr")?,
            func::<FnU64>(m, "farmod_ptr_agrees")?,
            func::<FnU64>(m, "farmod_state")?,
        )
    };
    // The `bl` in farmod_call goes to a veneer, which goes to the kernel function.
    let bl = (0..16u64)
        .map(|i| m.symbol("farmod_call").unwrap_or(0) + 4 * i)
        .find(|&a| read_u32(a) & B_OPCODE_MASK == BL)
        .ok_or("no bl in farmod_call")?;
    let dest = branch_dest(read_u32(bl), bl).ok_or("not a branch")?;
    ensure!(
        v.contains(&dest),
        "farmod_call's bl goes to {dest:#x}, not a veneer"
    );
    let via = super::testing::veneer_target(dest);
    ensure!(
        via == Some(target),
        "veneer {dest:#x} goes to {via:x?}, want {target:#x}"
    );
    ensure!(call(5, 2) == 18, "farmod_call(5, 2) = {}", call(5, 2));
    ensure!(tail(7, 1) == 22, "farmod_tail(7, 1) = {}", tail(7, 1));
    ensure!(ptr() == target, "farmod_ptr {:#x}, want {target:#x}", ptr());
    ensure!(agrees() == 1, "adrp/add and ABS64 disagree");
    ensure!(state() == 1, "farmod init ran {} times", state());
    println!(
        "modules: farmod at {:#x} ({} MiB from ksites_test_kernel_add): {} veneer(s), bl and tail b through {dest:#x}, adrp/add and ABS64 direct",
        m.text().start,
        distance >> 20,
        m.report().veneers
    );
    Ok(())
}

/// `rmod` imports kernel ifuncs; loaded into the far block its import sites cannot
/// reach the kernel's trampolines with a `bl`, so the load is refused with
/// `PatchError::TrampolineOutOfReach` naming the site, and the far block is free again.
fn far_import_refused(env: &Env) -> Result<(), Msg> {
    let mut far = FarArena;
    match env.try_load("rmod", &RMOD.0, &mut far).0 {
        Ok(m) => {
            let _ = unload_from(m, &mut far);
            Err(msg!("rmod loaded into the far block"))
        }
        Err(ModuleError::Patch(PatchError::TrampolineOutOfReach {
            site, trampoline, ..
        })) => {
            ensure!(
                site.abs_diff(trampoline) > 1 << 27,
                "site {site:#x} is within reach of {trampoline:#x}"
            );
            ensure!(!far.in_use(), "the far block was not freed");
            Ok(())
        }
        Err(e) => Err(msg!("rmod in the far block: unexpected error: {e}")),
    }
}
