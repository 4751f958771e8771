//! x86-64 ELF relocations: the machine number and the relocation types a module may use.
