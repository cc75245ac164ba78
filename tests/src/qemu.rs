//! QEMU's microvm machine: the same-run peer of rund-vmm in the benchmarks, the runtime a user
//! would otherwise reach for. It is given what rund-vmm gives its guest: KVM, the host's CPU, the
//! PIC, PIT and IOAPIC, an MP table and no ACPI (the condensed kernel has none), no RTC, no option
//! ROMs, one serial port; devices are virtio-mmio, announced on the kernel command line as QEMU
//! does by itself for this machine.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The QEMU binary: RUND_QEMU_BIN, else `qemu-system-x86_64` from PATH.
pub fn qemu_bin() -> PathBuf {
    std::env::var_os("RUND_QEMU_BIN")
        .map_or_else(|| PathBuf::from("qemu-system-x86_64"), PathBuf::from)
}

/// A microvm guest as rund-vmm runs one.
#[derive(Debug, Clone)]
pub struct Microvm {
    /// The kernel (QEMU takes a bzImage).
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
    /// The kernel command line.
    pub cmdline: String,
    /// Guest RAM in MiB.
    pub mem_mib: u32,
    /// RAM as a shared memfd, which vhost-user back-ends (virtiofsd) need to map it.
    pub shared_memory: bool,
    /// Where the serial console is written.
    pub console: PathBuf,
}

impl Microvm {
    /// The command that boots it, to which device arguments may be added.
    pub fn command(&self, qemu_bin: &Path) -> Command {
        let mut machine = "microvm,x-option-roms=off,acpi=off,rtc=off".to_string();
        let mut cmd = Command::new(qemu_bin);
        if self.shared_memory {
            machine += ",memory-backend=ram";
            cmd.args([
                "-object",
                &format!(
                    "memory-backend-memfd,id=ram,size={}M,share=on",
                    self.mem_mib
                ),
            ]);
        }
        cmd.args(["-M", &machine, "-accel", "kvm", "-cpu", "host", "-smp", "1"])
            .args(["-m", &format!("{}M", self.mem_mib)])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .arg("-no-reboot")
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&self.initrd)
            .args(["-append", &self.cmdline, "-serial"])
            .arg(format!("file:{}", self.console.display()));
        cmd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(cmd: &Command) -> Vec<String> {
        cmd.get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    fn guest(shared_memory: bool) -> Microvm {
        Microvm {
            kernel: "/k/bzImage".into(),
            initrd: "/k/initrd".into(),
            cmdline: "console=ttyS0 quiet".into(),
            mem_mib: 256,
            shared_memory,
            console: "/tmp/console.log".into(),
        }
    }

    #[test]
    fn private_memory_by_default() {
        let a = args(&guest(false).command(Path::new("qemu")));
        assert!(a.contains(&"microvm,x-option-roms=off,acpi=off,rtc=off".to_string()));
        assert!(!a.iter().any(|x| x.contains("memory-backend")));
        assert!(a
            .windows(2)
            .any(|w| w[0] == "-append" && w[1] == "console=ttyS0 quiet"));
        assert!(a.contains(&"file:/tmp/console.log".to_string()));
    }

    #[test]
    fn shared_memory_is_a_memfd_backend_of_the_guest_size() {
        let a = args(&guest(true).command(Path::new("qemu")));
        assert!(a.contains(&"memory-backend-memfd,id=ram,size=256M,share=on".to_string()));
        assert!(a.contains(
            &"microvm,x-option-roms=off,acpi=off,rtc=off,memory-backend=ram".to_string()
        ));
    }
}
