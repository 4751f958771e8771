//! riscv64 module relocations: placeholder until the module-relocation work lands (it replaces this file).
