//! Can this host's KVM run a standard Linux guest?
//!
//! A KVM backed by PVM (`kvm_pvm`, on a CPU without vmx/svm) answers every KVM ioctl, but runs guest
//! kernel code by emulating it, about 1000x slower, and its emulator lacks instructions Linux uses: a
//! Linux guest takes minutes to reach init and then dies. Such a host is refused up front with the
//! reason, instead of a guest that hangs.

use std::path::{Path, PathBuf};

/// What the testbed command is, for the message.
pub const TESTBED_HINT: &str = "run it inside the nested testbed (`ci/testbed run -- CMD`), which has a real (nested) KVM, or on a host with hardware virtualisation";

/// Why this host cannot run Linux guests.
#[derive(Debug, thiserror::Error)]
pub enum HostCheckError {
    /// No /dev/kvm.
    #[error("{0} does not exist: KVM is not available on this host (load kvm_intel or kvm_amd); {TESTBED_HINT}")]
    NoKvm(PathBuf),
    /// /dev/kvm cannot be opened.
    #[error("{path} cannot be opened; {TESTBED_HINT}")]
    KvmAccess {
        /// The device.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// /dev/kvm is PVM-backed.
    #[error("this host's /dev/kvm is backed by PVM (kvm_pvm is loaded and the CPU has no vmx/svm flag): it emulates guest kernel code about 1000x slower and lacks instructions Linux needs, so a Linux guest would hang or crash; {TESTBED_HINT}")]
    PvmBacked,
    /// No hardware virtualisation flag.
    #[error("the CPU has no vmx or svm flag, so this KVM cannot run a standard Linux guest at usable speed; {TESTBED_HINT}")]
    NoHardwareVirtualisation,
    /// /proc/cpuinfo unreadable.
    #[error("cannot read {path}")]
    CpuInfo {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What the check found on a host that can run guests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HardwareVirtualisation {
    /// Intel VT-x.
    Vmx,
    /// AMD-V.
    Svm,
}

/// Checks the running host.
pub fn check_host() -> Result<HardwareVirtualisation, HostCheckError> {
    check_host_at(Path::new("/"))
}

/// Checks the host whose /dev, /proc and /sys are under `root` (tests give a fake tree).
pub fn check_host_at(root: &Path) -> Result<HardwareVirtualisation, HostCheckError> {
    let kvm = root.join("dev/kvm");
    if !kvm.exists() {
        return Err(HostCheckError::NoKvm(kvm));
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&kvm)
        .map_err(|source| HostCheckError::KvmAccess {
            path: kvm.clone(),
            source,
        })?;
    let cpuinfo_path = root.join("proc/cpuinfo");
    let cpuinfo =
        std::fs::read_to_string(&cpuinfo_path).map_err(|source| HostCheckError::CpuInfo {
            path: cpuinfo_path,
            source,
        })?;
    let flag = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(|l| l.split_whitespace())
        .find_map(|f| match f {
            "vmx" => Some(HardwareVirtualisation::Vmx),
            "svm" => Some(HardwareVirtualisation::Svm),
            _ => None,
        });
    let pvm = root.join("sys/module/kvm_pvm").exists();
    match (flag, pvm) {
        (Some(v), false) => Ok(v),
        (_, true) => Err(HostCheckError::PvmBacked),
        (None, false) => Err(HostCheckError::NoHardwareVirtualisation),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(flags: &str, pvm: bool, kvm: bool) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("proc")).unwrap();
        std::fs::create_dir_all(d.path().join("dev")).unwrap();
        std::fs::write(
            d.path().join("proc/cpuinfo"),
            format!("processor\t: 0\nflags\t\t: fpu sse2 {flags}\n\nprocessor\t: 1\nflags\t\t: fpu {flags}\n"),
        )
        .unwrap();
        if pvm {
            std::fs::create_dir_all(d.path().join("sys/module/kvm_pvm")).unwrap();
        }
        if kvm {
            std::fs::write(d.path().join("dev/kvm"), b"").unwrap();
        }
        d
    }

    #[test]
    fn hardware_virtualisation_passes() {
        assert_eq!(
            check_host_at(host("vmx ept", false, true).path()).unwrap(),
            HardwareVirtualisation::Vmx
        );
        assert_eq!(
            check_host_at(host("svm npt", false, true).path()).unwrap(),
            HardwareVirtualisation::Svm
        );
    }

    #[test]
    fn pvm_is_refused_with_the_reason_and_the_way_out() {
        let e = check_host_at(host("hypervisor", true, true).path()).unwrap_err();
        assert!(matches!(e, HostCheckError::PvmBacked));
        let msg = e.to_string();
        assert!(
            msg.contains("PVM") && msg.contains("ci/testbed run"),
            "{msg}"
        );
        // PVM wins even if a flag shows up: the module is what runs the guests.
        assert!(matches!(
            check_host_at(host("svm", true, true).path()),
            Err(HostCheckError::PvmBacked)
        ));
    }

    #[test]
    fn no_kvm_or_no_flag_is_refused() {
        assert!(matches!(
            check_host_at(host("svm", false, false).path()),
            Err(HostCheckError::NoKvm(_))
        ));
        assert!(matches!(
            check_host_at(host("sse4_2", false, true).path()),
            Err(HostCheckError::NoHardwareVirtualisation)
        ));
    }
}
