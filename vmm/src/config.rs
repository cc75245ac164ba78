//! What a microVM is made of, and the checks that refuse a bad description before anything is built.

use std::fmt;
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::arch::layout::{
    CMDLINE_MAX_SIZE, FIRST_DEVICE_IRQ, IOAPIC_PINS, MMIO_GAP_START, VIRTIO_MMIO_WINDOW,
};
use crate::devices::virtio::VirtioDevice;
use crate::loader::{probe_kernel, KernelInfo, LoaderError};

/// The highest vCPU count this VMM builds: APIC IDs and the IOAPIC's ID must fit the MP table's 8 bits.
pub const MAX_VCPUS_MP_TABLE: u32 = 254;
/// Guest RAM the VMM refuses to go below, whatever the kernel: page tables, zero page, MP table.
pub const MIN_MEM_MIB: u32 = 16;
/// Guest RAM above this is refused as a typo rather than attempted.
pub const MAX_MEM_MIB: u32 = 1 << 20;

/// Errors in a [`VmConfig`]; each names the field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// vcpus is 0 or above the limit.
    #[error("vcpus: {value} is out of range: 1 to {max} on this host")]
    Vcpus {
        /// Requested.
        value: u32,
        /// Highest allowed here.
        max: u32,
    },
    /// Memory below the VMM's floor or above its ceiling.
    #[error("mem_mib: {value} MiB is out of range: {MIN_MEM_MIB} to {MAX_MEM_MIB} MiB")]
    MemoryOutOfRange {
        /// Requested.
        value: u32,
    },
    /// Memory too small for the kernel and initrd.
    #[error(
        "mem_mib: {value} MiB cannot hold the kernel and initrd: at least {needed} MiB needed"
    )]
    MemoryTooSmall {
        /// Requested.
        value: u32,
        /// What the kernel and initrd need.
        needed: u64,
    },
    /// The kernel file is missing or malformed.
    #[error("kernel: {0}")]
    Kernel(#[source] LoaderError),
    /// The initrd file is missing.
    #[error("initrd: {path}: cannot read")]
    Initrd {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The command line, with the devices the VMM adds, is longer than the kernel accepts.
    #[error(
        "cmdline: {len} bytes with the VMM's device entries; the kernel accepts at most {max}"
    )]
    CmdlineTooLong {
        /// Length including the VMM's additions and the NUL.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The command line contains a NUL or a newline.
    #[error("cmdline: contains a NUL or newline character")]
    CmdlineInvalid,
    /// More devices than free interrupt lines.
    #[error("devices: {count} virtio devices; at most {max} fit the IOAPIC")]
    TooManyDevices {
        /// Requested.
        count: usize,
        /// Limit.
        max: usize,
    },
    /// The serial output file cannot be opened.
    #[error("serial: {path}: cannot open for writing")]
    SerialFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Where the guest's serial console goes.
pub enum SerialOutput {
    /// Discarded.
    Sink,
    /// The VMM process's standard output.
    Stdout,
    /// A file, created or truncated.
    File(PathBuf),
    /// Any writer: a pipe, a log, a buffer.
    Writer(Box<dyn Write + Send>),
}

impl fmt::Debug for SerialOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SerialOutput::Sink => f.write_str("Sink"),
            SerialOutput::Stdout => f.write_str("Stdout"),
            SerialOutput::File(p) => write!(f, "File({})", p.display()),
            SerialOutput::Writer(_) => f.write_str("Writer"),
        }
    }
}

impl SerialOutput {
    /// Opens the output.
    pub fn open(self) -> Result<Box<dyn Write + Send>, ConfigError> {
        Ok(match self {
            SerialOutput::Sink => Box::new(std::io::sink()),
            SerialOutput::Stdout => Box::new(std::io::stdout()),
            SerialOutput::File(path) => Box::new(
                File::create(&path).map_err(|source| ConfigError::SerialFile { path, source })?,
            ),
            SerialOutput::Writer(w) => w,
        })
    }
}

/// A virtio device to attach, shared between the VMM's event loop and its transport.
pub type VirtioDeviceHandle = Arc<Mutex<dyn VirtioDevice>>;

/// Everything a microVM is made of.
pub struct VmConfig {
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest RAM in MiB.
    pub mem_mib: u32,
    /// A vmlinux ELF or a bzImage.
    pub kernel: PathBuf,
    /// An initramfs, if any.
    pub initrd: Option<PathBuf>,
    /// The kernel command line; the VMM appends its device entries.
    pub cmdline: String,
    /// Where the serial console goes.
    pub serial: SerialOutput,
    /// Virtio devices, each on its own virtio-mmio window and interrupt line.
    pub devices: Vec<VirtioDeviceHandle>,
}

impl fmt::Debug for VmConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VmConfig")
            .field("vcpus", &self.vcpus)
            .field("mem_mib", &self.mem_mib)
            .field("kernel", &self.kernel)
            .field("initrd", &self.initrd)
            .field("cmdline", &self.cmdline)
            .field("serial", &self.serial)
            .field("devices", &self.devices.len())
            .finish()
    }
}

/// Where a virtio-mmio device sits: its window and its interrupt line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioSlot {
    /// Guest physical base of its register window.
    pub base: u64,
    /// Its GSI / IOAPIC pin.
    pub irq: u32,
}

impl MmioSlot {
    /// The slot of the `index`th device.
    pub fn nth(index: usize) -> Self {
        MmioSlot {
            base: MMIO_GAP_START + index as u64 * VIRTIO_MMIO_WINDOW,
            irq: FIRST_DEVICE_IRQ + index as u32,
        }
    }

    /// The kernel command-line entry announcing the device.
    pub fn cmdline_entry(&self) -> String {
        format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            VIRTIO_MMIO_WINDOW / 1024,
            self.base,
            self.irq
        )
    }
}

/// The checked facts about a configuration that building the VM needs.
#[derive(Clone, Debug)]
pub struct ValidatedConfig {
    /// The kernel's format and extent.
    pub kernel: KernelInfo,
    /// The full command line, device entries appended.
    pub cmdline: String,
    /// One slot per device, in order.
    pub slots: Vec<MmioSlot>,
}

/// How many devices fit: one IOAPIC pin each, from [`FIRST_DEVICE_IRQ`].
pub const MAX_DEVICES: usize = (IOAPIC_PINS - FIRST_DEVICE_IRQ) as usize;

impl VmConfig {
    /// A configuration with defaults: 1 vCPU, 128 MiB, no initrd, serial to nowhere, no devices.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            vcpus: 1,
            mem_mib: 128,
            kernel: kernel.into(),
            initrd: None,
            cmdline: String::new(),
            serial: SerialOutput::Sink,
            devices: Vec::new(),
        }
    }

    /// Checks every field; `max_vcpus` is what KVM allows on this host.
    pub fn validate(&self, max_vcpus: u32) -> Result<ValidatedConfig, ConfigError> {
        let max = max_vcpus.min(MAX_VCPUS_MP_TABLE);
        if self.vcpus == 0 || self.vcpus > max {
            return Err(ConfigError::Vcpus {
                value: self.vcpus,
                max,
            });
        }
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&self.mem_mib) {
            return Err(ConfigError::MemoryOutOfRange {
                value: self.mem_mib,
            });
        }
        if self.devices.len() > MAX_DEVICES {
            return Err(ConfigError::TooManyDevices {
                count: self.devices.len(),
                max: MAX_DEVICES,
            });
        }
        let kernel = probe_kernel(&self.kernel).map_err(ConfigError::Kernel)?;
        let initrd_size = match &self.initrd {
            Some(path) => std::fs::metadata(path)
                .map_err(|source| ConfigError::Initrd {
                    path: path.clone(),
                    source,
                })?
                .len(),
            None => 0,
        };
        let needed = kernel
            .end
            .saturating_add(initrd_size)
            .saturating_add(0xfffff)
            >> 20;
        let low_mib = u64::from(self.mem_mib).min(MMIO_GAP_START >> 20);
        if needed > low_mib {
            return Err(ConfigError::MemoryTooSmall {
                value: self.mem_mib,
                needed,
            });
        }
        if self.cmdline.contains(['\0', '\n']) {
            return Err(ConfigError::CmdlineInvalid);
        }
        let slots: Vec<MmioSlot> = (0..self.devices.len()).map(MmioSlot::nth).collect();
        let mut cmdline = self.cmdline.trim().to_string();
        for slot in &slots {
            if !cmdline.is_empty() {
                cmdline.push(' ');
            }
            cmdline.push_str(&slot.cmdline_entry());
        }
        if cmdline.len() + 1 > CMDLINE_MAX_SIZE {
            return Err(ConfigError::CmdlineTooLong {
                len: cmdline.len() + 1,
                max: CMDLINE_MAX_SIZE,
            });
        }
        Ok(ValidatedConfig {
            kernel,
            cmdline,
            slots,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{tiny_elf, PAYLOAD_ADDR};

    fn kernel_file() -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&tiny_elf(PAYLOAD_ADDR, &[0xf4; 64])).unwrap();
        f
    }

    #[test]
    fn a_good_config_passes() {
        let k = kernel_file();
        let mut c = VmConfig::new(k.path());
        c.cmdline = "console=ttyS0".into();
        let v = c.validate(8).unwrap();
        assert_eq!(v.cmdline, "console=ttyS0");
        assert!(v.slots.is_empty());
    }

    #[test]
    fn vcpus_are_bounded() {
        let k = kernel_file();
        let mut c = VmConfig::new(k.path());
        c.vcpus = 0;
        let e = c.validate(8).unwrap_err().to_string();
        assert!(e.starts_with("vcpus: 0"), "{e}");
        c.vcpus = 9;
        assert!(matches!(
            c.validate(8),
            Err(ConfigError::Vcpus { value: 9, max: 8 })
        ));
        c.vcpus = 255;
        assert!(matches!(
            c.validate(1024),
            Err(ConfigError::Vcpus { max: 254, .. })
        ));
    }

    #[test]
    fn memory_is_bounded() {
        let k = kernel_file();
        let mut c = VmConfig::new(k.path());
        c.mem_mib = 4;
        assert!(c
            .validate(8)
            .unwrap_err()
            .to_string()
            .starts_with("mem_mib: 4 MiB"));
        c.mem_mib = MAX_MEM_MIB + 1;
        assert!(matches!(
            c.validate(8),
            Err(ConfigError::MemoryOutOfRange { .. })
        ));
    }

    #[test]
    fn memory_must_hold_kernel_and_initrd() {
        let k = kernel_file();
        let mut initrd = tempfile::NamedTempFile::new().unwrap();
        initrd.write_all(&vec![0u8; 20 << 20]).unwrap();
        let mut c = VmConfig::new(k.path());
        c.mem_mib = 16;
        c.initrd = Some(initrd.path().to_path_buf());
        let e = c.validate(8).unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::MemoryTooSmall {
                    value: 16,
                    needed: 23
                }
            ),
            "{e}"
        );
        c.mem_mib = 32;
        c.validate(8).unwrap();
    }

    #[test]
    fn kernel_must_exist_and_be_a_kernel() {
        let c = VmConfig::new("/nonexistent/vmlinux");
        let e = c.validate(8).unwrap_err().to_string();
        assert!(
            e.starts_with("kernel: kernel /nonexistent/vmlinux: cannot read"),
            "{e}"
        );
        let mut bad = tempfile::NamedTempFile::new().unwrap();
        bad.write_all(b"#!/bin/sh\necho not a kernel\n").unwrap();
        bad.write_all(&[0u8; 200]).unwrap();
        let c = VmConfig::new(bad.path());
        assert!(c
            .validate(8)
            .unwrap_err()
            .to_string()
            .contains("neither an ELF"));
    }

    #[test]
    fn initrd_must_exist() {
        let k = kernel_file();
        let mut c = VmConfig::new(k.path());
        c.initrd = Some("/nonexistent/initrd".into());
        assert!(c
            .validate(8)
            .unwrap_err()
            .to_string()
            .starts_with("initrd: /nonexistent/initrd"));
    }

    #[test]
    fn cmdline_is_bounded_and_clean() {
        let k = kernel_file();
        let mut c = VmConfig::new(k.path());
        c.cmdline = "a".repeat(CMDLINE_MAX_SIZE - 1);
        c.validate(8).unwrap();
        c.cmdline = "a".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(
            c.validate(8),
            Err(ConfigError::CmdlineTooLong {
                len: 2049,
                max: 2048
            })
        ));
        c.cmdline = "console=ttyS0\ninit=/x".into();
        assert!(matches!(c.validate(8), Err(ConfigError::CmdlineInvalid)));
    }

    #[test]
    fn device_slots_follow_each_other() {
        assert_eq!(
            MmioSlot::nth(0).cmdline_entry(),
            "virtio_mmio.device=4K@0xd0000000:5"
        );
        assert_eq!(
            MmioSlot::nth(2).cmdline_entry(),
            "virtio_mmio.device=4K@0xd0002000:7"
        );
        assert_eq!(MAX_DEVICES, 19);
    }
}
