//! Self-tests of the kernel's own infrastructure: boot protocol, CPU state, paging,
//! fault recovery, the breakpoint hook.

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::cpu;
use crate::harness::{Harness, TestResult};
use crate::idt::{self, PF_PRESENT, PF_WRITE};
use crate::paging::{self, PAGE_SIZE};
use crate::{ensure, msg};

/// A static in `.data` (non-zero initialiser, interior mutability).
static DATA_WORD: AtomicU64 = AtomicU64::new(0x5eed_5eed_5eed_5eed);
/// A static in `.rodata`.
static RODATA: [u8; 16] = *b"ksites rodata...";

/// Runs every self-test.
pub fn run(h: &mut Harness) {
    h.run("pvh_start_info", pvh_start_info);
    h.run("cpu_control_registers", cpu_control_registers);
    h.run("xcr0_matches_cpuid", xcr0_matches_cpuid);
    h.run("sse_usable", sse_usable);
    h.run("avx_usable", avx_usable);
    h.run("paging_text_is_rx", paging_text_is_rx);
    h.run("paging_data_is_nx", paging_data_is_nx);
    h.run(
        "paging_null_and_guard_unmapped",
        paging_null_and_guard_unmapped,
    );
    h.run("fault_recovery", fault_recovery);
    h.run("write_protect_toggle", write_protect_toggle);
    h.run("breakpoint_hook", breakpoint_hook);
}

fn pvh_start_info() -> TestResult {
    let addr = crate::start_info();
    ensure!(addr != 0, "no start_info pointer");
    ensure!(
        paging::translate(addr).is_some(),
        "start_info {addr:#x} is not mapped"
    );
    // SAFETY: `addr` is the hvm_start_info QEMU passed, mapped (checked above) and
    // 4-aligned per the PVH ABI; nothing writes it.
    let magic = unsafe { core::ptr::read_volatile(addr as *const u32) };
    ensure!(
        magic == crate::boot::HVM_START_MAGIC,
        "start_info at {addr:#x} has magic {magic:#x}, want {:#x}",
        crate::boot::HVM_START_MAGIC
    );
    Ok(())
}

fn cpu_control_registers() -> TestResult {
    let cr0 = cpu::read_cr0();
    let cr4 = cpu::read_cr4();
    ensure!(cr0 & cpu::CR0_WP != 0, "CR0.WP clear: {cr0:#x}");
    ensure!(cr0 & cpu::CR0_EM == 0, "CR0.EM set: {cr0:#x}");
    ensure!(cr0 & cpu::CR0_MP != 0, "CR0.MP clear: {cr0:#x}");
    ensure!(
        cr4 & (cpu::CR4_OSFXSR | cpu::CR4_OSXMMEXCPT) == cpu::CR4_OSFXSR | cpu::CR4_OSXMMEXCPT,
        "CR4.OSFXSR/OSXMMEXCPT clear: {cr4:#x}"
    );
    let (_, _, _, edx) = cpu::cpuid(0x8000_0001, 0);
    let has_nx = edx & (1 << 20) != 0;
    ensure!(
        cpu::nx_enabled() == has_nx,
        "EFER.NXE = {} but CPUID NX = {has_nx}",
        cpu::nx_enabled()
    );
    Ok(())
}

fn xcr0_matches_cpuid() -> TestResult {
    let (_, _, ecx, _) = cpu::cpuid(1, 0);
    let xsave = ecx & (1 << 26) != 0;
    let avx = ecx & (1 << 28) != 0;
    let osxsave = cpu::read_cr4() & cpu::CR4_OSXSAVE != 0;
    ensure!(
        osxsave == xsave,
        "CR4.OSXSAVE = {osxsave}, CPUID XSAVE = {xsave}"
    );
    if !xsave {
        return Ok(());
    }
    let xcr0 = kernel_loader::arch::x86_64::xcr0();
    ensure!(xcr0 & 0b11 == 0b11, "XCR0 {xcr0:#x} lacks x87|SSE");
    ensure!(
        (xcr0 & cpu::XCR0_AVX != 0) == avx,
        "XCR0 {xcr0:#x} AVX state vs CPUID AVX = {avx}"
    );
    let features = kernel_loader::CpuFeatures::detect();
    ensure!(
        features.contains(kernel_loader::CpuFeatures::YMM_STATE) == avx,
        "CpuFeatures YMM_STATE vs CPUID AVX = {avx}: {features:?}"
    );
    Ok(())
}

/// Doubles `x` in an XMM register (`paddq`): needs CR4.OSFXSR.
fn sse_double(x: u64) -> u64 {
    let out: u64;
    // SAFETY: register arithmetic on xmm0, which is saved and restored on the stack (this
    // soft-float target cannot name vector registers as asm operands or clobbers).
    unsafe {
        core::arch::asm!(
            "sub rsp, 16",
            "movdqu [rsp], xmm0",
            "movq xmm0, {x}",
            "paddq xmm0, xmm0",
            "movq {out}, xmm0",
            "movdqu xmm0, [rsp]",
            "add rsp, 16",
            x = in(reg) x,
            out = lateout(reg) out,
            options(pure, nomem),
        );
    }
    out
}

fn sse_usable() -> TestResult {
    let sum = sse_double(21);
    ensure!(sum == 42, "SSE2 paddq gave {sum}");
    Ok(())
}

/// Doubles the f64 with bits `x` in the upper half of a YMM register: needs the AVX
/// state enabled in XCR0.
///
/// # Safety
///
/// The CPU must support AVX and XCR0 must enable the YMM state.
unsafe fn avx_double_upper(x: u64) -> u64 {
    let out: u64;
    // SAFETY: register arithmetic on ymm0, which is saved and restored on the stack (this
    // soft-float target cannot name vector registers as asm operands or clobbers).
    unsafe {
        core::arch::asm!(
            "sub rsp, 32",
            "vmovdqu [rsp], ymm0",
            "vmovq xmm0, {x}",
            "vinsertf128 ymm0, ymm0, xmm0, 1",
            "vaddpd ymm0, ymm0, ymm0",
            "vextractf128 xmm0, ymm0, 1",
            "vmovq {out}, xmm0",
            "vmovdqu ymm0, [rsp]",
            "add rsp, 32",
            x = in(reg) x,
            out = lateout(reg) out,
            options(pure, nomem),
        );
    }
    out
}

/// With AVX and its XCR0 state enabled, YMM instructions run (else #UD is fatal).
fn avx_usable() -> TestResult {
    let features = kernel_loader::CpuFeatures::detect();
    if !features.contains(kernel_loader::CpuFeatures::AVX) {
        return Ok(());
    }
    // SAFETY: CpuFeatures reports AVX only when the CPU has it and XCR0 enables YMM.
    let sum = unsafe { avx_double_upper(21.0f64.to_bits()) };
    ensure!(sum == 42.0f64.to_bits(), "AVX vaddpd gave {sum:#x}");
    Ok(())
}

fn paging_text_is_rx() -> TestResult {
    let text = paging::text_range();
    ensure!(!text.is_empty(), "empty text range {text:#x?}");
    let here = paging_text_is_rx as fn() -> TestResult as usize as u64;
    ensure!(
        text.contains(&here),
        "this function ({here:#x}) is outside text {text:#x?}"
    );
    let mut page = text.start;
    while page < text.end {
        let Some(info) = paging::translate(page) else {
            return Err(msg!("text page {page:#x} is not mapped"));
        };
        ensure!(
            info.executable,
            "text page {page:#x} is not executable: {info:?}"
        );
        ensure!(!info.writable, "text page {page:#x} is writable: {info:?}");
        ensure!(
            info.phys == page && info.size == PAGE_SIZE,
            "text page {page:#x}: {info:?}"
        );
        page += PAGE_SIZE;
    }
    // The pages just around text are data: writable and not executable.
    for addr in [text.start - PAGE_SIZE, text.end] {
        let info = paging::translate(addr).ok_or_else(|| msg!("{addr:#x} is not mapped"))?;
        ensure!(
            info.writable && !info.executable,
            "page {addr:#x} next to text: {info:?}"
        );
    }
    Ok(())
}

fn paging_data_is_nx() -> TestResult {
    ensure!(cpu::nx_enabled(), "EFER.NXE is off (CPU without NX?)");
    let stack_var = 0u64;
    let probes = [
        ("static in .data", DATA_WORD.as_ptr() as u64),
        ("stack", &raw const stack_var as u64),
        ("rodata", RODATA.as_ptr() as u64),
        ("16 MiB", 16 << 20),
        ("1 GiB - 1", (1 << 30) - 1),
        ("local APIC (MMIO hole)", 0xfee0_0000),
    ];
    for (what, addr) in probes {
        let info =
            paging::translate(addr).ok_or_else(|| msg!("{what} at {addr:#x} is not mapped"))?;
        ensure!(
            info.writable,
            "{what} at {addr:#x} is not writable: {info:?}"
        );
        ensure!(
            !info.executable,
            "{what} at {addr:#x} is executable: {info:?}"
        );
        ensure!(
            info.phys == addr,
            "{what} at {addr:#x} is not identity mapped: {info:?}"
        );
    }
    ensure!(paging::translate(1 << 30).is_none(), "1 GiB is mapped");
    Ok(())
}

fn paging_null_and_guard_unmapped() -> TestResult {
    ensure!(paging::translate(0).is_none(), "page 0 is mapped");
    let guard = paging::guard_page();
    ensure!(
        paging::translate(guard).is_none(),
        "stack guard {guard:#x} is mapped"
    );
    let r = idt::probe_read(8);
    let fault = r
        .err()
        .ok_or_else(|| msg!("reading address 8 did not fault"))?;
    ensure!(
        fault.is_page_fault() && fault.error_code & PF_PRESENT == 0 && fault.cr2 == 8,
        "null read: {fault}"
    );
    Ok(())
}

fn fault_recovery() -> TestResult {
    ensure!(paging::write_protect_enabled(), "CR0.WP is off");
    let target = paging::text_range().start + 0x10;
    let byte = idt::probe_read(target).map_err(|f| msg!("read text: {f}"))?;
    // SAFETY: rewrites the boot stub's byte with the value it holds (and CR0.WP is on,
    // so the write to read-only text faults); only the boot CPU runs.
    let r = unsafe { idt::probe_write(target, byte) };
    let fault = r
        .err()
        .ok_or_else(|| msg!("write to text at {target:#x} succeeded"))?;
    ensure!(fault.vector == idt::PAGE_FAULT, "write to text: {fault}");
    ensure!(
        fault.error_code & (PF_WRITE | PF_PRESENT) == PF_WRITE | PF_PRESENT,
        "write to text: error code lacks W|P: {fault}"
    );
    ensure!(
        fault.cr2 == target,
        "write to text: cr2 {:#x} != {target:#x}",
        fault.cr2
    );

    let addr = DATA_WORD.as_ptr() as u64;
    // SAFETY: DATA_WORD is a scratch atomic; changing its low byte breaks nothing.
    let r = unsafe { idt::probe_write(addr, 0x42) };
    ensure!(r.is_ok(), "write to .data static at {addr:#x}: {r:?}");
    let now = DATA_WORD.load(Ordering::SeqCst);
    ensure!(
        now & 0xff == 0x42,
        "write to .data static did not land: {now:#x}"
    );
    let r = idt::probe_read(addr);
    ensure!(r == Ok(0x42), "read back: {r:?}");
    Ok(())
}

fn write_protect_toggle() -> TestResult {
    let target = paging::text_range().start + 0x10;
    let byte = idt::probe_read(target).map_err(|f| msg!("read text: {f}"))?;
    paging::set_write_protect(false);
    let off = !paging::write_protect_enabled();
    // SAFETY: rewrites a text byte with the value it already holds, in code that is not
    // running (the boot stub); with CR0.WP off the write to a read-only page succeeds.
    let r = unsafe { idt::probe_write(target, byte) };
    paging::set_write_protect(true);
    ensure!(off, "CR0.WP did not turn off");
    ensure!(
        paging::write_protect_enabled(),
        "CR0.WP did not turn back on"
    );
    ensure!(r.is_ok(), "write to text with CR0.WP off: {r:?}");
    cpu::serialize();
    Ok(())
}

static BP_HITS: AtomicUsize = AtomicUsize::new(0);
static BP_RIP: AtomicU64 = AtomicU64::new(0);

fn count_breakpoint(frame: &mut kernel_loader::probe::Int3Frame) -> bool {
    BP_HITS.fetch_add(1, Ordering::SeqCst);
    BP_RIP.store(frame.rip, Ordering::SeqCst);
    frame.rax = 0x1234;
    true
}

fn breakpoint_hook() -> TestResult {
    idt::set_breakpoint_hook(count_breakpoint);
    let rax: u64;
    let after: u64;
    // SAFETY: int3 traps into the hook set above, which only records the hit and sets
    // rax (declared as an output); execution resumes after the int3.
    unsafe {
        core::arch::asm!(
            "xor eax, eax",
            "int3",
            "2:",
            "lea {after}, [rip + 2b]",
            after = out(reg) after,
            out("rax") rax,
        );
    }
    idt::clear_breakpoint_hook();
    let hits = BP_HITS.load(Ordering::SeqCst);
    let rip = BP_RIP.load(Ordering::SeqCst);
    ensure!(hits == 1, "hook ran {hits} times");
    ensure!(
        rip == after,
        "trap rip {rip:#x}, want {after:#x} (just after int3)"
    );
    ensure!(rax == 0x1234, "hook's rax change was lost: {rax:#x}");
    Ok(())
}
