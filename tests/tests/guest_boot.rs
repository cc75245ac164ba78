//! Linux guests boot on the VMM: the condensed kernel (vmlinux and bzImage) and Debian's stock
//! bzImage, with 1 and 2 vCPUs. Each guest's init prints its CPU count and memory and reboots; the
//! test checks the figures, the exit reason, and that the VM left nothing in the process.
//! Needs a KVM that runs Linux guests (the testbed; see the harness's docs).

use std::sync::Mutex;

use rund_tests::initramfs::{write_busybox_initramfs, BUSYBOX, MARKER_INIT};
use rund_tests::{boot_with_retry, require_guest, GuestKernel};
use vmm::testing::ProcessFootprint;
use vmm::VmExit;

static ONE_VM_AT_A_TIME: Mutex<()> = Mutex::new(());

fn boots_and_reports(test: &str, kernel: GuestKernel, vcpus: u32, mem_mib: u32) {
    let Some(kernel) = require_guest(test, kernel) else {
        return;
    };
    let _one = ONE_VM_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("initrd.cpio");
    write_busybox_initramfs(BUSYBOX.as_ref(), MARKER_INIT, &initrd).unwrap();

    let before = ProcessFootprint::now().unwrap();
    let boot = boot_with_retry(&kernel, &initrd, vcpus, mem_mib).unwrap();
    let after = ProcessFootprint::settled_to(&before).unwrap();

    let marker = boot.marker.unwrap_or_else(|| {
        panic!(
            "{test}: no marker ({}); console:\n{}",
            boot.exit, boot.console
        )
    });
    assert_eq!(marker.nproc, vcpus, "{test}: CPUs seen by the guest");
    let configured_kib = u64::from(mem_mib) * 1024;
    assert!(
        marker.mem_total_kib <= configured_kib && marker.mem_total_kib >= configured_kib * 7 / 10,
        "{test}: MemTotal {} kB for {mem_mib} MiB",
        marker.mem_total_kib
    );
    assert_eq!(
        boot.exit,
        VmExit::GuestReset,
        "{test}: console:\n{}",
        boot.console
    );
    assert_eq!(after, before, "{test}: the VM left something behind");
    eprintln!(
        "{test}: {} CPUs, MemTotal {} kB, marker after {:?}",
        marker.nproc, marker.mem_total_kib, boot.to_marker
    );
}

#[test]
fn condensed_vmlinux_boots_with_1_vcpu() {
    boots_and_reports(
        "condensed_vmlinux_boots_with_1_vcpu",
        GuestKernel::CondensedElf,
        1,
        128,
    );
}

#[test]
fn condensed_vmlinux_boots_with_2_vcpus() {
    boots_and_reports(
        "condensed_vmlinux_boots_with_2_vcpus",
        GuestKernel::CondensedElf,
        2,
        256,
    );
}

#[test]
fn condensed_bzimage_boots_with_2_vcpus() {
    boots_and_reports(
        "condensed_bzimage_boots_with_2_vcpus",
        GuestKernel::CondensedBzImage,
        2,
        256,
    );
}

#[test]
fn stock_debian_bzimage_boots_with_1_vcpu() {
    boots_and_reports(
        "stock_debian_bzimage_boots_with_1_vcpu",
        GuestKernel::Stock,
        1,
        256,
    );
}

#[test]
fn stock_debian_bzimage_boots_with_2_vcpus() {
    boots_and_reports(
        "stock_debian_bzimage_boots_with_2_vcpus",
        GuestKernel::Stock,
        2,
        256,
    );
}
