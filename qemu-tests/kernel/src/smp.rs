//! Symmetric multiprocessing: per-CPU data, application-processor (AP) bring-up, jobs
//! on the APs, and cross-CPU serialization for live text patching.
//!
//! **Bring-up** ([`init`]). The boot CPU lists the CPUs from the ACPI MADT
//! ([`crate::acpi`]), copies a real-mode trampoline to [`TRAMPOLINE`] (below 1 MiB, as a
//! STARTUP IPI requires) and makes that page read-only + executable (everything else
//! stays W^X; the trampoline's parameters live in the next page, [`TRAMPOLINE_DATA`],
//! writable + NX). For each AP, one at a time, it fills in the parameters (CR3, EFER
//! bits, a 64 KiB stack with an unmapped guard page below it, the CPU index) and sends
//! INIT, STARTUP, and a second STARTUP only if the first did not take. The trampoline
//! goes real mode → 32-bit protected mode → long mode on the kernel's own page tables
//! and calls [`ap_entry`], which sets the CPU's GS base (its [`PerCpu`]), CR0/CR4/XCR0
//! like the boot CPU ([`crate::cpu::init`]), its own GDT, TSS (and double-fault stack)
//! and the shared IDT, software-enables its local APIC, reports itself alive and parks.
//!
//! **Parking and jobs.** An AP waits in `sti; hlt` for [`run_on_aps`] to post a job
//! (a `fn(cpu index)`), runs it with interrupts on, executes a serializing instruction
//! first (the text may have been patched since it last ran), and reports done
//! ([`wait_aps`]). APs always run with interrupts enabled outside handlers; the boot
//! CPU never does (it would receive the firmware's PIC timer).
//!
//! **Cross-CPU serialization** ([`sync_all_cores`]): a fixed IPI ([`SYNC_VECTOR`]) to
//! every other online CPU, whose handler executes CPUID (serializing) and acknowledges
//! with the round's generation; the sender waits until every CPU has acknowledged. A
//! CPU inside the #BP handler (an interrupt gate: interrupts off) can only acknowledge
//! after it has left it. Only CPU 0 may call it, because only the APs take interrupts.

use core::arch::{asm, global_asm};
use core::ops::Range;
use core::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

use crate::idt::{self, DF_STACK_SIZE, Stack, TrapFrame, Tss};
use crate::{acpi, apic, boot, cpu, paging, println};

/// Most CPUs this kernel runs on (more in the MADT are left halted and reported).
pub const MAX_CPUS: usize = 8;
/// Physical address of the real-mode trampoline (STARTUP vector 0x08).
pub const TRAMPOLINE: u64 = 0x8000;
/// Physical address of the trampoline's parameter block.
pub const TRAMPOLINE_DATA: u64 = 0x9000;
/// Vector of the serialize-and-acknowledge IPI.
pub const SYNC_VECTOR: u8 = 0xf0;
/// Vector of the wake-up IPI (a job was posted).
pub const WAKE_VECTOR: u8 = 0xf1;
/// Vector of the local APIC timer ([`nap`]).
pub const TIMER_VECTOR: u8 = 0xf2;
/// Size of an AP's stack.
pub const AP_STACK_SIZE: usize = 64 * 1024;

const IA32_GS_BASE: u32 = 0xc000_0101;
const EFER_LME: u64 = 1 << 8;

// Offsets in the parameter block at TRAMPOLINE_DATA.
const DATA_CR3: u64 = 0;
const DATA_EFER: u64 = 8;
const DATA_STACK: u64 = 16;
const DATA_ENTRY: u64 = 24;
const DATA_INDEX: u64 = 32;

/// Per-CPU data; `gs:[0]` is the CPU's index (0 = the boot CPU).
#[repr(C, align(64))]
#[derive(Debug, Clone, Copy)]
pub struct PerCpu {
    index: usize,
}

const fn per_cpu() -> [PerCpu; MAX_CPUS] {
    let mut a = [PerCpu { index: 0 }; MAX_CPUS];
    let mut i = 0;
    while i < MAX_CPUS {
        a[i].index = i;
        i += 1;
    }
    a
}

static PER_CPU: [PerCpu; MAX_CPUS] = per_cpu();

/// An AP's stack, with a guard page below it that [`init`] unmaps.
#[repr(C, align(4096))]
struct ApStack {
    guard: [u8; 4096],
    stack: [u8; AP_STACK_SIZE],
}

/// An AP's own descriptor tables and double-fault stack.
#[repr(C, align(16))]
struct CpuTables {
    gdt: [u64; 5],
    tss: Tss,
    df_stack: Stack,
}

static mut AP_STACKS: [ApStack; MAX_CPUS - 1] = [const {
    ApStack {
        guard: [0; 4096],
        stack: [0; AP_STACK_SIZE],
    }
}; MAX_CPUS - 1];

static mut AP_TABLES: [CpuTables; MAX_CPUS - 1] = [const {
    CpuTables {
        gdt: [0; 5],
        tss: Tss::new(),
        df_stack: Stack([0; DF_STACK_SIZE]),
    }
}; MAX_CPUS - 1];

/// CPUs online (indices `0..ONLINE`).
static ONLINE: AtomicUsize = AtomicUsize::new(1);
static APIC_IDS: [AtomicU32; MAX_CPUS] = [const { AtomicU32::new(0) }; MAX_CPUS];
/// Index of the last AP that finished its start-up.
static ALIVE: AtomicUsize = AtomicUsize::new(0);

static SYNC_GEN: AtomicU64 = AtomicU64::new(0);
static SYNC_ACK: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static SYNC_ROUNDS: AtomicU64 = AtomicU64::new(0);
static SYNC_IPIS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

static JOB: AtomicUsize = AtomicUsize::new(0);
static JOB_SEQ: AtomicU64 = AtomicU64::new(0);
static JOB_DONE: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

unsafe extern "C" {
    static ap_trampoline_start: u8;
    static ap_trampoline_end: u8;
}

// The trampoline. Copied to TRAMPOLINE and entered by a STARTUP IPI in real mode with
// CS = TRAMPOLINE >> 4, IP = 0; every address in it is absolute (TRAMPOLINE + offset).
// Its GDT has the accessed bits preset, so loading a selector never writes to the
// (read-only) page.
global_asm!(
    r#"
    .pushsection .rodata.ap_trampoline, "a", @progbits
    .p2align 4
    .globl ap_trampoline_start
ap_trampoline_start:
    .code16
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    lgdtl (ap_tramp_gdtr - ap_trampoline_start)
    movl %cr0, %eax
    orl $1, %eax                    /* CR0.PE */
    movl %eax, %cr0
    ljmpl $0x08, $({base} + ap_tramp_32 - ap_trampoline_start)

    .code32
ap_tramp_32:
    movl $0x10, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %cr4, %eax
    orl $(1 << 5), %eax             /* CR4.PAE */
    movl %eax, %cr4
    movl ({data} + {cr3}), %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx          /* IA32_EFER: LME, and NXE like the boot CPU */
    rdmsr
    orl ({data} + {efer}), %eax
    wrmsr
    movl $0x80010033, %eax          /* PG | WP | NE | ET | MP | PE; CD/NW clear */
    movl %eax, %cr0
    ljmpl $0x18, $({base} + ap_tramp_64 - ap_trampoline_start)

    .code64
ap_tramp_64:
    movl $0x10, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    xorl %eax, %eax
    movl %eax, %fs
    movl %eax, %gs
    movq ({data} + {stack}), %rsp
    movq ({data} + {index}), %rdi
    xorl %ebp, %ebp
    movq ({data} + {entry}), %rax
    callq *%rax
1:
    cli
    hlt
    jmp 1b

    .p2align 3
ap_tramp_gdt:
    .quad 0
    .quad 0x00cf9b000000ffff        /* 0x08: 32-bit code, accessed */
    .quad 0x00cf93000000ffff        /* 0x10: data, accessed */
    .quad 0x00af9b000000ffff        /* 0x18: 64-bit code, accessed */
ap_tramp_gdtr:
    .word 4 * 8 - 1
    .long {base} + ap_tramp_gdt - ap_trampoline_start
    .globl ap_trampoline_end
ap_trampoline_end:
    .popsection
    "#,
    base = const TRAMPOLINE,
    data = const TRAMPOLINE_DATA,
    cr3 = const DATA_CR3,
    efer = const DATA_EFER,
    stack = const DATA_STACK,
    entry = const DATA_ENTRY,
    index = const DATA_INDEX,
    options(att_syntax)
);

/// This CPU's index: 0 for the boot CPU, 1.. for APs in start-up order.
pub fn cpu_index() -> usize {
    let v: usize;
    // SAFETY: every CPU points GS at its PerCpu before anything calls this (`init_bsp`
    // first thing in kmain, `ap_entry` first thing on an AP); the load reads `index`.
    unsafe {
        asm!("mov {}, qword ptr gs:[0]", out(reg) v, options(nostack, readonly, preserves_flags))
    };
    v
}

fn set_gs_base(index: usize) {
    let p = &PER_CPU[index] as *const PerCpu as u64;
    // SAFETY: IA32_GS_BASE exists on every x86-64 CPU; the kernel uses GS for nothing
    // else, and PER_CPU is a static.
    unsafe { cpu::wrmsr(IA32_GS_BASE, p) };
}

/// Sets up the boot CPU's per-CPU data. Call first thing in `kmain`.
pub fn init_bsp() {
    set_gs_base(0);
}

/// Number of CPUs online (the boot CPU included). Their indices are `0..online()`.
pub fn online() -> usize {
    ONLINE.load(Ordering::Acquire)
}

/// APIC ID of CPU `index`.
pub fn apic_id(index: usize) -> u32 {
    APIC_IDS[index].load(Ordering::Relaxed)
}

/// The stack this CPU is running on.
pub fn current_stack() -> Range<u64> {
    match cpu_index() {
        0 => (&raw const boot::boot_stack_bottom) as u64..(&raw const boot::boot_stack_top) as u64,
        i => ap_stack(i),
    }
}

/// The stack of AP `index` (1..[`MAX_CPUS`]).
pub fn ap_stack(index: usize) -> Range<u64> {
    // SAFETY: only the address of AP `index`'s stack is taken.
    let s = unsafe { (&raw const AP_STACKS[index - 1].stack) as u64 };
    s..s + AP_STACK_SIZE as u64
}

/// What [`init`] found and did.
#[derive(Debug, Clone, Copy)]
pub struct BringUp {
    /// The MADT's CPUs, if it could be read.
    pub madt: Option<acpi::Cpus>,
    /// CPUs online.
    pub online: usize,
    /// STARTUP IPIs sent.
    pub startups: u32,
}

/// Brings every AP the MADT lists online (at most [`MAX_CPUS`] CPUs in all) and prints
/// `smp: N CPUs online`. On any problem it prints why and carries on with the CPUs
/// that are up; the SMP tests then see fewer CPUs (and the xtask fails an SMP run that
/// does not report the CPU count it asked QEMU for).
pub fn init(start_info: u64) -> BringUp {
    let mut r = BringUp {
        madt: None,
        online: 1,
        startups: 0,
    };
    if let Err(e) = apic::check_mode() {
        println!("smp: {e}");
        report(&r);
        return r;
    }
    apic::enable();
    APIC_IDS[0].store(apic::id(), Ordering::Relaxed);
    // SAFETY: no CPU receives these vectors yet (APs are halted, the boot CPU runs with
    // interrupts off).
    unsafe {
        idt::set_interrupt_handler(SYNC_VECTOR, sync_handler);
        idt::set_interrupt_handler(WAKE_VECTOR, wake_handler);
        idt::set_interrupt_handler(TIMER_VECTOR, wake_handler);
        idt::set_interrupt_handler(apic::SPURIOUS_VECTOR, spurious_handler);
    }
    let cpus = match acpi::cpus(start_info) {
        Ok(c) => c,
        Err(e) => {
            println!("smp: {e}");
            report(&r);
            return r;
        }
    };
    r.madt = Some(cpus);
    if cpus.count > 1 {
        install_trampoline();
    }
    for &id in cpus.ids() {
        if id == apic_id(0) {
            continue;
        }
        let index = online();
        if index == MAX_CPUS {
            println!("smp: more than {MAX_CPUS} CPUs; APIC id {id} and later stay halted");
            break;
        }
        match start_ap(index, id, &mut r.startups) {
            Ok(()) => {
                APIC_IDS[index].store(id, Ordering::Relaxed);
                ONLINE.store(index + 1, Ordering::Release);
            }
            Err(e) => {
                println!("smp: CPU with APIC id {id} did not start: {e}");
                break;
            }
        }
    }
    r.online = online();
    report(&r);
    r
}

fn report(r: &BringUp) {
    let mut ids = [0u32; MAX_CPUS];
    for (i, id) in ids.iter_mut().enumerate().take(r.online) {
        *id = apic_id(i);
    }
    let madt = r.madt.map_or(0, |m| m.count);
    println!(
        "smp: {} {} online (APIC ids {:?}; the MADT lists {madt}; {} STARTUP IPIs)",
        r.online,
        if r.online == 1 { "CPU" } else { "CPUs" },
        &ids[..r.online],
        r.startups
    );
    if let Some(m) = r.madt {
        println!(
            "smp: RSDP at {:#x} ({:?}), {}, local APIC at {:#x}",
            m.rsdp,
            m.source,
            if m.xsdt { "XSDT" } else { "RSDT" },
            m.lapic_address
        );
    }
}

/// Copies the trampoline to its page (still writable + NX), then makes that page
/// read-only + executable, and unmaps the AP stacks' guard pages.
fn install_trampoline() {
    let start = (&raw const ap_trampoline_start) as u64;
    let len = (&raw const ap_trampoline_end) as u64 - start;
    assert!(len <= paging::PAGE_SIZE, "trampoline is {len} bytes");
    // SAFETY: the trampoline page is identity mapped writable (paging::init maps low
    // memory as data) and used by nothing else; the source is the trampoline's bytes
    // in .rodata. Then the page becomes read-only + executable: nothing writes it again.
    unsafe {
        core::ptr::copy_nonoverlapping(start as *const u8, TRAMPOLINE as *mut u8, len as usize);
        paging::set_page(TRAMPOLINE, TRAMPOLINE | paging::PRESENT);
    }
    for index in 1..MAX_CPUS {
        let guard = ap_stack(index).start - paging::PAGE_SIZE;
        // SAFETY: the guard page below each AP stack is never used (the stack grows
        // down to it); unmapping it makes an AP stack overflow a page fault. No AP
        // runs yet.
        unsafe { paging::set_page(guard, 0) };
    }
}

fn write_data(offset: u64, v: u64) {
    // SAFETY: the parameter block is identity-mapped writable RAM used only for AP
    // start-up, which the boot CPU does one AP at a time.
    unsafe { core::ptr::write_volatile((TRAMPOLINE_DATA + offset) as *mut u64, v) };
}

fn start_ap(index: usize, id: u32, startups: &mut u32) -> Result<(), &'static str> {
    let stack_top = ap_stack(index).end;
    // SAFETY: IA32_EFER exists on every x86-64 CPU.
    let efer = unsafe { cpu::rdmsr(cpu::MSR_EFER) };
    write_data(DATA_CR3, cpu::read_cr3());
    write_data(DATA_EFER, EFER_LME | (efer & cpu::EFER_NXE));
    write_data(DATA_STACK, stack_top);
    write_data(DATA_ENTRY, ap_entry as *const () as u64);
    write_data(DATA_INDEX, index as u64);
    ALIVE.store(0, Ordering::SeqCst);

    apic::send_init(id)?;
    apic::delay_us(10_000);
    for attempt in 0..2 {
        apic::send_startup(id, (TRAMPOLINE >> 12) as u8)?;
        *startups += 1;
        // 10 ms after the first STARTUP, up to 1 s after the second.
        let polls = if attempt == 0 { 100 } else { 10_000 };
        for _ in 0..polls {
            if ALIVE.load(Ordering::Acquire) == index {
                return Ok(());
            }
            apic::delay_us(100);
        }
    }
    Err("no sign of life 1 s after the second STARTUP IPI")
}

/// Where an AP arrives from the trampoline, in long mode on its own stack.
extern "C" fn ap_entry(index: usize) -> ! {
    set_gs_base(index);
    cpu::init();
    // SAFETY: AP_TABLES[index - 1] belongs to this CPU alone (each index is started
    // once) and is static; the double-fault stack is its own.
    unsafe {
        let t = &raw mut AP_TABLES[index - 1];
        let df_top = (&raw const (*t).df_stack) as u64 + DF_STACK_SIZE as u64;
        idt::load_cpu_tables(&raw mut (*t).gdt, &raw mut (*t).tss, df_top);
    }
    apic::enable();
    ALIVE.store(index, Ordering::Release);
    park(index)
}

/// An AP's idle loop: run posted jobs, else halt with interrupts on.
fn park(index: usize) -> ! {
    loop {
        // Interrupts off between the check and `hlt`: `sti; hlt` then takes a wake-up
        // IPI that arrived in between only after halting, so it cannot be lost.
        // SAFETY: only IF changes.
        unsafe { asm!("cli", options(nomem, nostack)) };
        let seq = JOB_SEQ.load(Ordering::Acquire);
        if seq != JOB_DONE[index].load(Ordering::Relaxed) {
            // SAFETY: only IF changes; APs run with interrupts on.
            unsafe { asm!("sti", options(nomem, nostack)) };
            // The job's code may have been patched since this CPU last ran it.
            cpu::serialize();
            let job = JOB.load(Ordering::Acquire);
            if job != 0 {
                // SAFETY: JOB only ever holds a `fn(usize)` stored by `run_on_aps`.
                let job = unsafe { core::mem::transmute::<usize, fn(usize)>(job) };
                job(index);
            }
            JOB_DONE[index].store(seq, Ordering::Release);
        } else {
            // SAFETY: halts until the next interrupt; `sti` takes effect after `hlt`
            // starts (interrupt shadow).
            unsafe { asm!("sti", "hlt", options(nomem, nostack)) };
        }
    }
}

/// Posts `job` to every online AP (each runs `job(its index)` once) and wakes them.
/// Returns at once; [`wait_aps`] waits for them to finish.
pub fn run_on_aps(job: fn(usize)) {
    assert!(cpu_index() == 0, "only CPU 0 posts jobs");
    JOB.store(job as usize, Ordering::Release);
    JOB_SEQ.fetch_add(1, Ordering::AcqRel);
    for i in 1..online() {
        if let Err(e) = apic::send_ipi(apic_id(i), WAKE_VECTOR) {
            panic!("wake-up IPI to CPU {i}: {e}");
        }
    }
}

/// Waits until every online AP finished the job posted last. `Err(cpu)` names one that
/// did not within roughly `spins` polls.
pub fn wait_aps(spins: u64) -> Result<(), usize> {
    let seq = JOB_SEQ.load(Ordering::Acquire);
    for (i, done) in JOB_DONE.iter().enumerate().take(online()).skip(1) {
        let mut n = 0u64;
        while done.load(Ordering::Acquire) != seq {
            n += 1;
            if n > spins {
                return Err(i);
            }
            core::hint::spin_loop();
        }
    }
    Ok(())
}

/// Makes every online CPU execute a serializing instruction: this one directly, every
/// other one through a [`SYNC_VECTOR`] IPI whose acknowledgement this waits for. A CPU
/// that is inside an interrupt-gate handler (e.g. emulating a patched site in #BP)
/// acknowledges only after leaving it.
///
/// Panics if a CPU does not acknowledge within seconds (a hung CPU), or if called on
/// an AP (the boot CPU runs with interrupts off and could never acknowledge).
pub fn sync_all_cores() {
    cpu::serialize();
    let n = online();
    if n <= 1 {
        return;
    }
    assert!(
        cpu_index() == 0,
        "sync_all_cores called on CPU {}",
        cpu_index()
    );
    let generation = SYNC_GEN.fetch_add(1, Ordering::SeqCst) + 1;
    for i in 1..n {
        if let Err(e) = apic::send_ipi(apic_id(i), SYNC_VECTOR) {
            panic!("sync IPI to CPU {i}: {e}");
        }
    }
    // No `pause` in the wait: under QEMU's TCG it leaves the CPU loop (and takes the
    // big lock) on every iteration.
    for (i, ack) in SYNC_ACK.iter().enumerate().take(n).skip(1) {
        let mut spins = 0u64;
        while ack.load(Ordering::Acquire) < generation {
            spins += 1;
            assert!(
                spins < 1_000_000_000,
                "sync_all_cores: CPU {i} never acknowledged round {generation}"
            );
        }
    }
    SYNC_ROUNDS.fetch_add(1, Ordering::Relaxed);
}

/// Completed [`sync_all_cores`] rounds that had other CPUs to wait for.
pub fn sync_rounds() -> u64 {
    SYNC_ROUNDS.load(Ordering::Relaxed)
}

/// Sync IPIs CPU `index` handled.
pub fn sync_ipis_handled(index: usize) -> u64 {
    SYNC_IPIS[index].load(Ordering::Relaxed)
}

fn sync_handler(_: &mut TrapFrame) {
    cpu::serialize();
    let me = cpu_index();
    SYNC_IPIS[me].fetch_add(1, Ordering::Relaxed);
    SYNC_ACK[me].fetch_max(SYNC_GEN.load(Ordering::Acquire), Ordering::AcqRel);
    apic::eoi();
}

/// On an AP running a job: halts until the next interrupt (a sync or wake-up IPI) or
/// for about `us` microseconds (the APIC timer), whichever comes first. A job that
/// runs flat out would starve the host: QEMU runs each CPU on a host thread, and with
/// more CPUs than host cores a CPU that must acknowledge an IPI may not be scheduled
/// for milliseconds.
pub fn nap(us: u32) {
    // Interrupts off from arming to `hlt`: a timer that fires early stays pending and
    // ends the `hlt` at once (sti's interrupt shadow covers the `hlt`).
    // SAFETY: only IF changes; it is on again when this returns.
    unsafe { asm!("cli", options(nomem, nostack)) };
    apic::timer_oneshot(TIMER_VECTOR, us.saturating_mul(1000).max(1));
    // SAFETY: halts until the next interrupt with interrupts on.
    unsafe { asm!("sti", "hlt", options(nomem, nostack)) };
}

fn wake_handler(_: &mut TrapFrame) {
    apic::eoi();
}

fn spurious_handler(_: &mut TrapFrame) {}
