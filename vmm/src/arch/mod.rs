//! x86_64 specifics: memory layout, CPUID, boot registers, the MP table and the zero page.

pub mod boot_params;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod regs;
