//! x86-64 probe sites: disabled/enabled bytes of each probe form, the int3 protocol and
//! trap emulation.
