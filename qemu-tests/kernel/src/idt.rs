//! Exceptions: the IDT, the entry stubs, the Rust handler, recoverable probes and the
//! breakpoint hook.
//!
//! Vectors 0..=31 have stubs (generated with `.irp`) that push a dummy error code where
//! the CPU pushes none, then the vector, and jump to a common stub that saves every GPR
//! into a [`TrapFrame`] and calls [`exception_handler`]. The handler returns (`iretq`)
//! only for a fault at the instruction of a [`probe_write`] / [`probe_read`]: the
//! frame's RIP is moved to the probe's recovery address and the probe returns
//! `Err(Fault)`.
//!
//! `#BP` (vector 3) is the crate's ready entry, `kernel_loader::probe::int3_entry`, as a
//! kernel adopting ksites installs it: it runs `probe::handle_int3` (or the counting
//! hook the probe tests set with `probe::set_int3_hook`) and, for an `int3` that is not
//! a probe site's, this kernel's fallback, which calls the hook set by
//! [`set_breakpoint_hook`]. An `int3` nothing handles ends in the stub's `ud2`: a fatal
//! `#UD`.
//!
//! Everything else prints `FAULT: vector N (name) error=… rip=… cr2=… rsp=…` and a
//! frame-pointer backtrace on COM1 and exits QEMU with failure. `#DF` runs on its own
//! stack (IST1) so a stack overflow into the guard page still gets reported.
//!
//! Vectors [`FIRST_IRQ_VECTOR`]`..=255` have stubs too and go through the same path to a
//! handler registered with [`set_interrupt_handler`] (the SMP code's IPIs); vectors
//! 32..0xf0 are not present: any stray interrupt becomes a reported `#GP`/`#NP`.
//! The probe state is global: probes are for the boot CPU, one at a time.
//!
//! Every CPU shares the IDT; each has its own GDT, TSS and double-fault stack
//! ([`load_cpu_tables`] for application processors).

use core::arch::{asm, global_asm};
use core::fmt;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use kernel_loader::probe::{self, Int3Frame};

use crate::boot::{self, KERNEL_CS, TSS_SELECTOR};
use crate::cpu::read_cr2;
use crate::exit::exit_qemu;
use crate::println;

/// `#DE`.
pub const DIVIDE_ERROR: u8 = 0;
/// `#BP` (int3; a trap: the saved RIP is after the `cc`).
pub const BREAKPOINT: u8 = 3;
/// `#UD`.
pub const INVALID_OPCODE: u8 = 6;
/// `#DF`.
pub const DOUBLE_FAULT: u8 = 8;
/// `#SS`.
pub const STACK_SEGMENT_FAULT: u8 = 12;
/// `#GP`.
pub const GENERAL_PROTECTION: u8 = 13;
/// `#PF`.
pub const PAGE_FAULT: u8 = 14;

/// First vector with a stub for [`set_interrupt_handler`].
pub const FIRST_IRQ_VECTOR: u8 = 0xf0;
const IRQ_VECTORS: usize = 256 - FIRST_IRQ_VECTOR as usize;

/// `#PF` error code: the page was present (protection violation).
pub const PF_PRESENT: u64 = 1 << 0;
/// `#PF` error code: the access was a write.
pub const PF_WRITE: u64 = 1 << 1;
/// `#PF` error code: user-mode access.
pub const PF_USER: u64 = 1 << 2;
/// `#PF` error code: a reserved bit was set in a paging entry.
pub const PF_RESERVED: u64 = 1 << 3;
/// `#PF` error code: instruction fetch.
pub const PF_FETCH: u64 = 1 << 4;

const EXCEPTION_NAMES: [&str; 32] = [
    "#DE divide error",
    "#DB debug",
    "NMI",
    "#BP breakpoint",
    "#OF overflow",
    "#BR bound range",
    "#UD invalid opcode",
    "#NM device not available",
    "#DF double fault",
    "coprocessor segment overrun",
    "#TS invalid TSS",
    "#NP segment not present",
    "#SS stack fault",
    "#GP general protection",
    "#PF page fault",
    "reserved 15",
    "#MF x87 floating point",
    "#AC alignment check",
    "#MC machine check",
    "#XM SIMD floating point",
    "#VE virtualization",
    "#CP control protection",
    "reserved 22",
    "reserved 23",
    "reserved 24",
    "reserved 25",
    "reserved 26",
    "reserved 27",
    "#HV hypervisor injection",
    "#VC VMM communication",
    "#SX security",
    "reserved 31",
];

/// Name of exception `vector` ("?" past 31).
pub fn exception_name(vector: u64) -> &'static str {
    usize::try_from(vector)
        .ok()
        .and_then(|v| EXCEPTION_NAMES.get(v))
        .copied()
        .unwrap_or("?")
}

/// The registers of the interrupted code, as saved by the entry stubs (lowest address
/// first). The handler may change any field; `iretq` and the stub's pops restore them.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
#[allow(missing_docs)]
pub struct TrapFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    /// Exception vector (0..=31).
    pub vector: u64,
    /// The CPU's error code, or 0 for vectors without one.
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

// Entry stubs. The CPU aligns RSP to 16 before pushing its 5-word frame; with the
// error code, the vector and 15 GPRs (22 words in all) RSP is 16-aligned at the call.
global_asm!(
    r#"
    .pushsection .text.idt, "ax", @progbits
    .p2align 4
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
idt_stub_\n:
    .if (\n == 8) || (\n == 10) || (\n == 11) || (\n == 12) || (\n == 13) || (\n == 14) || (\n == 17) || (\n == 21) || (\n == 29) || (\n == 30)
    .else
    pushq $0
    .endif
    pushq $\n
    jmp idt_common
    .endr

    .irp n, 240,241,242,243,244,245,246,247,248,249,250,251,252,253,254,255
idt_stub_\n:
    pushq $0
    pushq $\n
    jmp idt_common
    .endr

idt_common:
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, %rdi
    cld
    call {handler}
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rbp
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rax
    addq $16, %rsp              /* vector, error code */
    iretq
    .popsection

    /* Self-relative (stub - table): no absolute address, so nothing to relocate when
       the kernel runs away from its link address (see boot.rs). */
    .pushsection .rodata.idt_stubs, "a", @progbits
    .p2align 2
    .globl idt_stub_table
idt_stub_table:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .long idt_stub_\n - idt_stub_table
    .endr
    .globl idt_irq_stub_table
idt_irq_stub_table:
    .irp n, 240,241,242,243,244,245,246,247,248,249,250,251,252,253,254,255
    .long idt_stub_\n - idt_irq_stub_table
    .endr
    .popsection
    "#,
    handler = sym exception_handler,
    options(att_syntax)
);

unsafe extern "C" {
    /// The 32 entry stubs, each as its offset from the table.
    static idt_stub_table: [i32; 32];
    /// The stubs for vectors `FIRST_IRQ_VECTOR..=255`, each as its offset from the table.
    static idt_irq_stub_table: [i32; IRQ_VECTORS];
}

#[repr(C)]
#[derive(Clone, Copy)]
struct IdtEntry {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

impl IdtEntry {
    const MISSING: IdtEntry = IdtEntry {
        offset_low: 0,
        selector: 0,
        ist: 0,
        type_attr: 0,
        offset_mid: 0,
        offset_high: 0,
        reserved: 0,
    };

    /// A present, DPL 0, 64-bit interrupt gate (IF cleared on entry).
    fn interrupt_gate(handler: u64, ist: u8) -> IdtEntry {
        IdtEntry {
            offset_low: handler as u16,
            selector: KERNEL_CS,
            ist,
            type_attr: 0x8e,
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        }
    }
}

/// The 64-bit TSS; only IST1 is used. One per CPU.
#[repr(C, packed(4))]
pub struct Tss {
    reserved0: u32,
    rsp: [u64; 3],
    reserved1: u64,
    ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    iomap_base: u16,
}

impl Tss {
    /// An empty TSS (no stacks set, no I/O bitmap).
    pub const fn new() -> Tss {
        Tss {
            reserved0: 0,
            rsp: [0; 3],
            reserved1: 0,
            ist: [0; 7],
            reserved2: 0,
            reserved3: 0,
            iomap_base: size_of::<Tss>() as u16,
        }
    }
}

impl Default for Tss {
    fn default() -> Tss {
        Tss::new()
    }
}

/// Size of a double-fault (IST1) stack.
pub const DF_STACK_SIZE: usize = 16384;

/// A double-fault stack.
#[repr(C, align(16))]
pub struct Stack(pub [u8; DF_STACK_SIZE]);

static mut IDT: [IdtEntry; 256] = [IdtEntry::MISSING; 256];
static mut TSS: Tss = Tss::new();
static mut DOUBLE_FAULT_STACK: Stack = Stack([0; DF_STACK_SIZE]);

#[repr(C, packed)]
struct DescriptorPointer {
    limit: u16,
    base: u64,
}

/// The address of entry `i` of a self-relative stub table (`.long stub - table`).
fn stub_address<const N: usize>(table: *const [i32; N], i: usize) -> u64 {
    // SAFETY: `table` is one of the two stub tables (rodata, never written); `i < N` is
    // checked by the index.
    let offset = unsafe { (*table)[i] };
    (table as u64).wrapping_add_signed(i64::from(offset))
}

/// Installs the TSS (IST1 = double-fault stack) and the IDT. Call once, early, on the
/// boot CPU.
pub fn init() {
    let df_stack_top = (&raw const DOUBLE_FAULT_STACK) as u64 + size_of::<Stack>() as u64;
    // SAFETY: init runs once on the boot CPU before anything else uses TSS, IDT or the
    // GDT's TSS slot; all writes go through raw pointers to those statics. The stubs
    // in `idt_stub_table` and `probe::int3_entry` are valid interrupt entry points;
    // vector 3 is `int3_entry` on every CPU from here on (the route it declares).
    unsafe {
        install_tss(&raw mut boot::boot_gdt, &raw mut TSS, df_stack_top);
        let idt = &raw mut IDT;
        for vector in 0..idt_stub_table.len() {
            let stub = stub_address(&raw const idt_stub_table, vector);
            let ist = if vector == usize::from(DOUBLE_FAULT) {
                1
            } else {
                0
            };
            (*idt)[vector] = IdtEntry::interrupt_gate(stub, ist);
        }
        // #BP: the crate's ready entry, as is.
        (*idt)[usize::from(BREAKPOINT)] = IdtEntry::interrupt_gate(probe::int3_entry_address(), 0);
        // SAFETY: the fallback only runs the test hooks, which leave the frame as a
        // valid continuation (they resume after their own `int3`s).
        probe::set_int3_fallback(Some(breakpoint_fallback));
        // Every CPU loads this IDT before it runs kernel code (`load_cpu_tables`), so
        // every #BP reaches `int3_entry`, which runs `handle_int3`.
        probe::declare_int3_route();
        load_idt();
    }
}

/// Points `tss`'s IST1 at `df_stack_top`, writes its descriptor into `gdt`'s TSS slot
/// and loads the task register.
///
/// # Safety
///
/// `gdt` is the GDT this CPU has loaded, `tss` is used by no other CPU, and both (and
/// the stack) live forever.
unsafe fn install_tss(gdt: *mut [u64; 5], tss: *mut Tss, df_stack_top: u64) {
    let tss_base = tss as u64;
    let tss_limit = size_of::<Tss>() as u64 - 1;
    let slot = usize::from(TSS_SELECTOR / 8);
    // SAFETY: the caller guarantees both pointers are valid and this CPU's own.
    unsafe {
        (*tss).ist[0] = df_stack_top;
        (*gdt)[slot] = (tss_limit & 0xffff)
            | ((tss_base & 0xff_ffff) << 16)
            | (0x89 << 40) // present, 64-bit available TSS
            | (((tss_limit >> 16) & 0xf) << 48)
            | (((tss_base >> 24) & 0xff) << 56);
        (*gdt)[slot + 1] = tss_base >> 32;
        asm!("ltr {0:x}", in(reg) TSS_SELECTOR, options(nostack, preserves_flags));
    }
}

/// Loads the shared IDT on this CPU.
///
/// # Safety
///
/// The IDT's present gates point at valid entry stubs ([`init`] ran).
unsafe fn load_idt() {
    let ptr = DescriptorPointer {
        limit: (size_of::<[IdtEntry; 256]>() - 1) as u16,
        base: (&raw const IDT) as u64,
    };
    // SAFETY: the IDT is a static that lives forever; the caller vouches for its gates.
    unsafe {
        asm!("lidt [{}]", in(reg) &raw const ptr, options(readonly, nostack, preserves_flags));
    }
}

/// An application processor's descriptor tables: loads `gdt` (null, code64, data, TSS,
/// like the boot GDT), reloads every segment register from it, installs `tss` with
/// IST1 = `df_stack_top` and loads the shared IDT.
///
/// # Safety
///
/// 1. Runs once per AP, on that AP, in 64-bit mode, after [`init`] on the boot CPU.
/// 2. `gdt`, `tss` and the stack belong to this CPU alone and live forever.
pub unsafe fn load_cpu_tables(gdt: *mut [u64; 5], tss: *mut Tss, df_stack_top: u64) {
    // SAFETY: (2) makes the pointers valid and private to this CPU; the descriptors
    // copied from the boot GDT are the same flat code/data segments the kernel runs
    // with, so reloading CS (far return) and the data segments changes nothing else.
    unsafe {
        let boot_gdt = &raw const boot::boot_gdt;
        for i in 0..3 {
            (*gdt)[i] = (*boot_gdt)[i];
        }
        (*gdt)[3] = 0;
        (*gdt)[4] = 0;
        let ptr = DescriptorPointer {
            limit: (size_of::<[u64; 5]>() - 1) as u16,
            base: gdt as u64,
        };
        asm!(
            "lgdt [{ptr}]",
            "push {cs}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov ds, {ds:e}",
            "mov es, {ds:e}",
            "mov ss, {ds:e}",
            ptr = in(reg) &raw const ptr,
            cs = in(reg) u64::from(KERNEL_CS),
            ds = in(reg) u32::from(boot::KERNEL_DS),
            tmp = out(reg) _,
            options(preserves_flags),
        );
        install_tss(gdt, tss, df_stack_top);
        load_idt();
    }
}

/// Handler for an interrupt vector at or above [`FIRST_IRQ_VECTOR`]: runs with
/// interrupts off on the interrupted CPU's stack; it must send the local APIC its EOI
/// itself if the interrupt needs one.
pub type InterruptHandler = fn(&mut TrapFrame);

static IRQ_HANDLERS: [AtomicUsize; IRQ_VECTORS] = [const { AtomicUsize::new(0) }; IRQ_VECTORS];

/// Routes `vector` (>= [`FIRST_IRQ_VECTOR`]) to `handler` and makes its IDT gate present.
///
/// # Safety
///
/// No CPU may be receiving `vector` while its gate is written (install handlers
/// before interrupts for them can arrive).
pub unsafe fn set_interrupt_handler(vector: u8, handler: InterruptHandler) {
    assert!(vector >= FIRST_IRQ_VECTOR, "vector {vector:#x} has no stub");
    let i = usize::from(vector - FIRST_IRQ_VECTOR);
    IRQ_HANDLERS[i].store(handler as usize, Ordering::SeqCst);
    // SAFETY: the stub is a valid entry point; per the caller, no CPU reads this gate
    // while it is written.
    unsafe {
        let stub = stub_address(&raw const idt_irq_stub_table, i);
        let idt = &raw mut IDT;
        (*idt)[usize::from(vector)] = IdtEntry::interrupt_gate(stub, 0);
    }
}

fn interrupt_handler(vector: u64) -> Option<InterruptHandler> {
    let i = usize::try_from(vector.checked_sub(u64::from(FIRST_IRQ_VECTOR))?).ok()?;
    let raw = IRQ_HANDLERS.get(i)?.load(Ordering::SeqCst);
    if raw == 0 {
        return None;
    }
    // SAFETY: the only non-zero values stored are `InterruptHandler` fn pointers.
    Some(unsafe { core::mem::transmute::<usize, InterruptHandler>(raw) })
}

/// A fault caught by [`probe_write`] or [`probe_read`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Exception vector ([`PAGE_FAULT`], [`GENERAL_PROTECTION`], …).
    pub vector: u8,
    /// The CPU's error code (see the `PF_*` bits for a page fault).
    pub error_code: u64,
    /// CR2 at the fault (meaningful for page faults).
    pub cr2: u64,
}

impl Fault {
    /// A page fault.
    pub fn is_page_fault(&self) -> bool {
        self.vector == PAGE_FAULT
    }

    /// A page fault caused by a write.
    pub fn is_write(&self) -> bool {
        self.is_page_fault() && self.error_code & PF_WRITE != 0
    }

    /// A page fault on a present page (a protection violation, not a missing page).
    pub fn is_protection(&self) -> bool {
        self.is_page_fault() && self.error_code & PF_PRESENT != 0
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "vector {} ({}) error={:#x} cr2={:#x}",
            self.vector,
            exception_name(u64::from(self.vector)),
            self.error_code,
            self.cr2
        )
    }
}

/// The armed probe: the one instruction allowed to fault and where to resume.
struct Probe {
    insn: AtomicU64,
    resume: AtomicU64,
    faulted: AtomicBool,
    vector: AtomicU64,
    error_code: AtomicU64,
    cr2: AtomicU64,
}

static PROBE: Probe = Probe {
    insn: AtomicU64::new(0),
    resume: AtomicU64::new(0),
    faulted: AtomicBool::new(false),
    vector: AtomicU64::new(0),
    error_code: AtomicU64::new(0),
    cr2: AtomicU64::new(0),
};

fn take_probe_fault() -> Result<(), Fault> {
    if !PROBE.faulted.swap(false, Ordering::SeqCst) {
        return Ok(());
    }
    Err(Fault {
        vector: PROBE.vector.load(Ordering::SeqCst) as u8,
        error_code: PROBE.error_code.load(Ordering::SeqCst),
        cr2: PROBE.cr2.load(Ordering::SeqCst),
    })
}

/// Tries to write the byte `value` at `addr`; a #PF, #GP or #SS is caught and returned
/// instead of being fatal.
///
/// # Safety
///
/// If the write succeeds it really happens, so:
/// 1. the byte at `addr` must be one whose change breaks nothing (a scratch static, or
///    text rewritten with the byte it already holds), never device memory;
/// 2. only the boot CPU probes, one probe at a time.
pub unsafe fn probe_write(addr: u64, value: u8) -> Result<(), Fault> {
    PROBE.faulted.store(false, Ordering::SeqCst);
    // SAFETY: the write's target is the caller's responsibility (see above); a faulting
    // write changes nothing. The instruction at label 2 is registered before it runs; if it faults, the handler resumes at label 3 with every
    // register restored, so the asm block's contract holds on both paths.
    unsafe {
        asm!(
            "lea {tmp}, [rip + 2f]",
            "mov qword ptr [{insn}], {tmp}",
            "lea {tmp}, [rip + 3f]",
            "mov qword ptr [{resume}], {tmp}",
            "2:",
            "mov byte ptr [{addr}], {value}",
            "3:",
            "mov qword ptr [{insn}], 0",
            addr = in(reg) addr,
            value = in(reg_byte) value,
            insn = in(reg) PROBE.insn.as_ptr(),
            resume = in(reg) PROBE.resume.as_ptr(),
            tmp = out(reg) _,
            options(nostack, preserves_flags),
        );
    }
    take_probe_fault()
}

/// Tries to read the byte at `addr`; a #PF, #GP or #SS is caught and returned instead of
/// being fatal. Must not be used on device memory whose reads have side effects; only
/// the boot CPU may probe, one probe at a time.
pub fn probe_read(addr: u64) -> Result<u8, Fault> {
    PROBE.faulted.store(false, Ordering::SeqCst);
    let value: u32;
    // SAFETY: a byte load changes no memory (a racing writer would at worst give a
    // stale byte; it is read by asm, not through a Rust reference); faults are recovered
    // as in `probe_write`.
    unsafe {
        asm!(
            "lea {tmp}, [rip + 2f]",
            "mov qword ptr [{insn}], {tmp}",
            "lea {tmp}, [rip + 3f]",
            "mov qword ptr [{resume}], {tmp}",
            "xor {value:e}, {value:e}",
            "2:",
            "movzx {value:e}, byte ptr [{addr}]",
            "3:",
            "mov qword ptr [{insn}], 0",
            addr = in(reg) addr,
            value = out(reg) value,
            insn = in(reg) PROBE.insn.as_ptr(),
            resume = in(reg) PROBE.resume.as_ptr(),
            tmp = out(reg) _,
            options(nostack),
        );
    }
    take_probe_fault().map(|()| value as u8)
}

/// Handler type for an `int3` that is not a probe site's: returns `true` if it handled
/// the trap (it may change any field of the frame, usually `rip`), `false` to make it
/// fatal.
pub type BreakpointHook = fn(&mut Int3Frame) -> bool;

static BREAKPOINT_HOOK: AtomicUsize = AtomicUsize::new(0);

/// Installs `hook` for `#BP` (vector 3), replacing any previous one.
pub fn set_breakpoint_hook(hook: BreakpointHook) {
    BREAKPOINT_HOOK.store(hook as usize, Ordering::SeqCst);
}

/// Removes the `#BP` hook: an int3 outside probe sites is fatal again.
pub fn clear_breakpoint_hook() {
    BREAKPOINT_HOOK.store(0, Ordering::SeqCst);
}

fn breakpoint_hook() -> Option<BreakpointHook> {
    let raw = BREAKPOINT_HOOK.load(Ordering::SeqCst);
    if raw == 0 {
        return None;
    }
    // SAFETY: the only non-zero values ever stored are `BreakpointHook` fn pointers
    // (set_breakpoint_hook), and fn pointers and usize have the same size.
    Some(unsafe { core::mem::transmute::<usize, BreakpointHook>(raw) })
}

/// The crate stub's fallback (`probe::set_int3_fallback`): the hook, if one is set.
fn breakpoint_fallback(frame: &mut Int3Frame) -> bool {
    breakpoint_hook().is_some_and(|hook| hook(frame))
}

/// Called by the common entry stub with the saved registers of the interrupted code.
extern "C" fn exception_handler(frame: &mut TrapFrame) {
    let vector = frame.vector as u8;
    match vector {
        PAGE_FAULT | GENERAL_PROTECTION | STACK_SEGMENT_FAULT => {
            let insn = PROBE.insn.load(Ordering::SeqCst);
            if insn != 0 && frame.rip == insn {
                let cr2 = if vector == PAGE_FAULT { read_cr2() } else { 0 };
                PROBE.vector.store(frame.vector, Ordering::SeqCst);
                PROBE.error_code.store(frame.error_code, Ordering::SeqCst);
                PROBE.cr2.store(cr2, Ordering::SeqCst);
                PROBE.faulted.store(true, Ordering::SeqCst);
                frame.rip = PROBE.resume.load(Ordering::SeqCst);
                return;
            }
        }
        _ => {
            if let Some(handler) = interrupt_handler(frame.vector) {
                handler(frame);
                return;
            }
        }
    }
    report(frame);
    exit_qemu(false)
}

fn report(frame: &TrapFrame) {
    println!(
        "FAULT: vector {} ({}) error={:#x} rip={:#x} cr2={:#x} rsp={:#x} cpu={}",
        frame.vector,
        exception_name(frame.vector),
        frame.error_code,
        frame.rip,
        read_cr2(),
        frame.rsp,
        crate::smp::cpu_index()
    );
    println!(
        "  rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x} rbp={:#x}",
        frame.rax, frame.rbx, frame.rcx, frame.rdx, frame.rsi, frame.rdi, frame.rbp
    );
    println!(
        "  r8={:#x} r9={:#x} r10={:#x} r11={:#x} r12={:#x} r13={:#x} r14={:#x} r15={:#x}",
        frame.r8, frame.r9, frame.r10, frame.r11, frame.r12, frame.r13, frame.r14, frame.r15
    );
    println!(
        "  cs={:#x} ss={:#x} rflags={:#x}",
        frame.cs, frame.ss, frame.rflags
    );
    backtrace(frame.rbp);
}

/// Follows the frame-pointer chain (the kernel is built with frame pointers) while it
/// stays inside this CPU's stack.
fn backtrace(mut rbp: u64) {
    let stack = crate::smp::current_stack();
    let (bottom, top) = (stack.start, stack.end);
    for _ in 0..32 {
        if rbp < bottom || rbp + 16 > top || !rbp.is_multiple_of(8) {
            break;
        }
        // SAFETY: rbp..rbp+16 lies inside the boot stack, which is mapped and readable.
        let (next, ret) = unsafe {
            (
                core::ptr::read_volatile(rbp as *const u64),
                core::ptr::read_volatile((rbp + 8) as *const u64),
            )
        };
        if ret == 0 {
            break;
        }
        println!("  at {ret:#x}");
        if next <= rbp {
            break;
        }
        rbp = next;
    }
}
