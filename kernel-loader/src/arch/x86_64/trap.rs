//! x86-64 #BP entry: the `int3_entry!` macro that defines the naked interrupt entry a
//! kernel installs in IDT vector 3 as is. It builds an [`Int3Frame`](super::probe::Int3Frame)
//! from the registers and the CPU's interrupt frame, calls the generic trap function
//! (`crate::probe`'s, named by the macro's argument, so this module imports nothing),
//! writes the frame back and returns with `iretq`.
//!
//! # The stub's stack
//!
//! On a #BP (a trap: no error code) the CPU aligns RSP down to 16 and pushes SS, RSP,
//! RFLAGS, CS, RIP. The stub first copies those five words 40 bytes lower (Linux's
//! int3 "gap"), and returns through the copy: an emulated `call` (an ifunc site trapped
//! mid-retarget, `super::emulate`) pushes its return address just below the interrupted
//! RSP, which is where the CPU's own frame lies, now dead. It then pushes RBP (its frame
//! base, `rbp` below) and r11, r10, RFLAGS, r9, r8, rcx, rdx, rsi, rdi, rax, the
//! interrupted RSP and RIP: the last ten words, lowest address first, are an
//! `Int3Frame` (rip, rsp, rax, rdi, rsi, rdx, rcx, r8, r9, rflags). It aligns RSP to 16
//! for the call (whatever the entry alignment), clears DF and calls
//! `trap(&mut Int3Frame) -> bool`.
//!
//! | address | word |
//! |---|---|
//! | `rbp + 48 ..= rbp + 80` | the CPU's frame (dead once copied) |
//! | `rbp + 40` | SS (copy) |
//! | `rbp + 32` | RSP (interrupted, copy) |
//! | `rbp + 24` | RFLAGS (copy) |
//! | `rbp + 16` | CS (copy) |
//! | `rbp + 8` | RIP (after the `int3`, copy) |
//! | `rbp` | saved RBP |
//! | `rbp - 8`, `- 16` | r11, r10 |
//! | `rbp - 96 ..= rbp - 24` | the `Int3Frame`: rip, rsp, rax, rdi, rsi, rdx, rcx, r8, r9, rflags |
//!
//! After the call the frame fields are written back: RIP and RSP into the copied frame
//! (`iretq` loads them), rax and the six argument registers into their registers
//! (`rflags` is not written back). The emulation may raise RSP (a `ret` pops the
//! interrupted stack's top, which lies above every frame of the stub) or lower it by
//! one word (a `call`'s push, which lands at most 8 bytes below the CPU's aligned
//! frame top, inside the dead original); either way `iretq` lands on the emulated RSP.
//!
//! If `trap` returns `false` (no one handled the `int3`), the stub restores every
//! register (with whatever a declining hook or fallback left in the frame's fields) and
//! executes `ud2`: the kernel's #UD handler reports it
//! with the #BP's frame (RIP = the `int3` + 1, the copy) on top of its interrupted stack.

/// Defines `pub extern "C" fn int3_entry()`: the #BP entry stub described in this
/// module, calling `$trap: extern "C" fn(&mut Int3Frame) -> bool`. A macro, so the
/// generic probe code names its function without this module importing it.
#[cfg(target_arch = "x86_64")]
macro_rules! int3_entry {
    ($trap:path) => {
        /// The ready #BP (IDT vector 3) entry: install its address
        /// ([`int3_entry_address`]) as a 64-bit interrupt gate (type 0xE) in vector 3, as
        /// is, then call [`declare_int3_route`].
        ///
        /// It saves the caller-saved registers, builds an [`Int3Frame`] from them and the
        /// CPU's interrupt frame, runs [`handle_int3`] (or the hook set by
        /// [`set_int3_hook`]) and, for an `int3` that is not a probe site's, the fallback
        /// set by [`set_int3_fallback`]; it writes every frame field back (rip and rsp
        /// into the CPU's frame) and returns with `iretq`. If nothing handled the trap,
        /// it restores the registers and executes `ud2` (a #UD in this stub, with the
        /// #BP's frame on top of the stack).
        ///
        /// What the kernel must provide: a stack with room for the stub's 18 words and
        /// the Rust code it calls (a gate with IST 0: the stub is re-entered when a
        /// handler reaches a site mid-patch or an enabled C tail site, and a nested #BP
        /// on an IST stack would overwrite the outer frame); code built
        /// without a red zone and without SSE/AVX in the trap path (the stub saves no
        /// vector registers: a soft-float kernel target such as `x86_64-unknown-none`);
        /// and, for a gate with DPL 3, its own GS handling (the stub never runs
        /// `swapgs`).
        ///
        /// # Safety
        ///
        /// Not a function to call: only a CPU delivering #BP may enter it.
        #[unsafe(naked)]
        pub unsafe extern "C" fn int3_entry() {
            core::arch::naked_asm!(
                // The gap: the CPU's five words, 40 bytes lower.
                "push qword ptr [rsp + 32]",
                "push qword ptr [rsp + 32]",
                "push qword ptr [rsp + 32]",
                "push qword ptr [rsp + 32]",
                "push qword ptr [rsp + 32]",
                "push rbp",
                "mov rbp, rsp",
                "push r11",
                "push r10",
                "push qword ptr [rbp + 24]",
                "push r9",
                "push r8",
                "push rcx",
                "push rdx",
                "push rsi",
                "push rdi",
                "push rax",
                "push qword ptr [rbp + 32]",
                "push qword ptr [rbp + 8]",
                "mov rdi, rsp",
                "and rsp, -16",
                "cld",
                "call {trap}",
                "lea rsp, [rbp - 96]",
                // `test` sets ZF for the end; nothing below changes the flags.
                "test al, al",
                "pop rax",
                "mov [rbp + 8], rax",
                "pop rax",
                "mov [rbp + 32], rax",
                "pop rax",
                "pop rdi",
                "pop rsi",
                "pop rdx",
                "pop rcx",
                "pop r8",
                "pop r9",
                // Past RFLAGS (`lea` keeps ZF).
                "lea rsp, [rsp + 8]",
                "pop r10",
                "pop r11",
                "pop rbp",
                "jz 2f",
                "iretq",
                "2:",
                "ud2",
                trap = sym $trap,
            )
        }
    };
}
#[cfg(target_arch = "x86_64")]
pub(crate) use int3_entry;
