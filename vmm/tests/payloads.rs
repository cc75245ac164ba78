//! The VMM on real KVM with hand-made long-mode payloads (no Linux): they run on any KVM host,
//! including a PVM-backed one. Each test checks the exit reason and that the VM left nothing behind:
//! no fd, thread or guest-memory mapping.
//!
//! Needs /dev/kvm; without it each test prints why and returns.

use std::io::Write;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmm::testing::{tiny_elf, Asm, ConsoleBuffer, ProcessFootprint, PAYLOAD_ADDR};
use vmm::{SerialOutput, Vm, VmConfig, VmExit, VmHandle};

/// fd, thread and mapping counts are process-wide: one VM test at a time.
static SERIAL_TESTS: Mutex<()> = Mutex::new(());

fn kvm_or_skip(test: &str) -> Option<MutexGuard<'static, ()>> {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipping {test}: /dev/kvm is absent on this host");
        return None;
    }
    Some(SERIAL_TESTS.lock().unwrap_or_else(|e| e.into_inner()))
}

fn footprint() -> ProcessFootprint {
    ProcessFootprint::now().unwrap()
}

fn footprint_after(before: &ProcessFootprint) -> ProcessFootprint {
    ProcessFootprint::settled_to(before).unwrap()
}

struct Guest {
    handle: VmHandle,
    console: ConsoleBuffer,
    _kernel: tempfile::NamedTempFile,
}

fn boot(code: &[u8], vcpus: u32) -> Guest {
    let mut kernel = tempfile::NamedTempFile::new().unwrap();
    kernel.write_all(&tiny_elf(PAYLOAD_ADDR, code)).unwrap();
    let console = ConsoleBuffer::default();
    let mut config = VmConfig::new(kernel.path());
    config.vcpus = vcpus;
    config.mem_mib = 32;
    config.serial = SerialOutput::Writer(Box::new(console.clone()));
    let handle = Vm::new(config).unwrap().start().unwrap();
    Guest {
        handle,
        console,
        _kernel: kernel,
    }
}

/// Waits for the end; a guest still running after a minute is a failure (and is stopped).
fn wait(mut g: Guest) -> (VmExit, Vec<u8>) {
    match g.handle.wait_timeout(Duration::from_secs(60)) {
        Some(exit) => (exit, g.console.bytes()),
        None => {
            g.handle.shutdown();
            panic!(
                "guest still running after 60 s; console: {:?}",
                String::from_utf8_lossy(&g.console.bytes())
            );
        }
    }
}

fn run_and_check_leaks(code: &[u8], vcpus: u32) -> (VmExit, Vec<u8>) {
    let before = footprint();
    let result = wait(boot(code, vcpus));
    assert_eq!(
        footprint_after(&before),
        before,
        "the VM left something behind"
    );
    result
}

#[test]
fn serial_output_then_i8042_reset() {
    let Some(_g) = kvm_or_skip("serial_output_then_i8042_reset") else {
        return;
    };
    let code = Asm::new()
        .print(b"hello from the guest\n")
        .i8042_reset()
        .hlt()
        .finish();
    let (exit, out) = run_and_check_leaks(&code, 1);
    assert_eq!(exit, VmExit::GuestReset);
    assert_eq!(out, b"hello from the guest\n");
}

#[test]
fn two_vcpus_boot_and_the_waiting_ap_is_stopped() {
    let Some(_g) = kvm_or_skip("two_vcpus_boot_and_the_waiting_ap_is_stopped") else {
        return;
    };
    // vCPU 1 waits for INIT/SIPI inside KVM_RUN; teardown must still get it out.
    let code = Asm::new().print(b"bsp\n").i8042_reset().hlt().finish();
    let (exit, out) = run_and_check_leaks(&code, 2);
    assert_eq!(exit, VmExit::GuestReset);
    assert_eq!(out, b"bsp\n");
}

#[test]
fn triple_fault_ends_the_vm() {
    let Some(_g) = kvm_or_skip("triple_fault_ends_the_vm") else {
        return;
    };
    // The boot IDT is empty: #DE -> #GP -> #DF -> shutdown.
    let code = Asm::new().print(b"x").divide_by_zero().hlt().finish();
    let (exit, out) = run_and_check_leaks(&code, 1);
    let VmExit::TripleFault { vcpu: 0, registers } = &exit else {
        panic!("not a triple fault of vCPU 0: {exit:?}");
    };
    // Where it stood, for the guest's System.map: long mode (EFER.LMA) with paging on.
    assert!(registers.starts_with("rip 0x"), "{registers}");
    assert!(registers.ends_with(" efer 0x500"), "{registers}");
    assert!(
        exit.to_string()
            .starts_with("triple fault on vCPU 0 (rip 0x"),
        "{exit}"
    );
    assert_eq!(out, b"x");
}

#[test]
fn unmapped_mmio_reads_all_ones_and_the_guest_goes_on() {
    let Some(_g) = kvm_or_skip("unmapped_mmio_reads_all_ones_and_the_guest_goes_on") else {
        return;
    };
    // No device at the MMIO gap's start: the load reads 0xffffffff, the store is dropped.
    let code = Asm::new()
        .mov_eax(0x1234_5678)
        .store_eax_abs(0xd000_0010)
        .mov_eax(0)
        .load_eax_abs(0xd000_0000)
        .out_serial_al()
        .print(b"ok")
        .i8042_reset()
        .hlt()
        .finish();
    let (exit, out) = run_and_check_leaks(&code, 1);
    assert_eq!(exit, VmExit::GuestReset);
    assert_eq!(out, b"\xffok");
}

/// The vCPU report once `settled` holds for it, or the last one after 10 s: on a loaded host a
/// vCPU thread may enter KVM_RUN late, and a register sample may miss the report's 200 ms wait.
fn settled_vcpu_report(handle: &VmHandle, settled: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let report = handle.vcpu_report();
        if settled(&report) || Instant::now() >= deadline {
            return report;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_halted_guest_is_stopped_by_the_host() {
    let Some(_g) = kvm_or_skip("a_halted_guest_is_stopped_by_the_host") else {
        return;
    };
    let before = footprint();
    let mut g = boot(
        &Asm::new().print(b"halt").cli().hlt().jmp_back(2).finish(),
        1,
    );
    // Give it time to halt; it must not end by itself.
    assert_eq!(g.handle.wait_timeout(Duration::from_millis(500)), None);
    assert_eq!(g.handle.exit_reason(), None);
    let report = settled_vcpu_report(&g.handle, |r| r.contains("interrupts off, halted; 4 exits"));
    assert!(
        report.contains("interrupts off, halted; 4 exits"),
        "{report}"
    );
    g.handle.shutdown();
    let (exit, out) = wait(g);
    assert_eq!(exit, VmExit::HostRequest);
    assert_eq!(out, b"halt");
    assert_eq!(
        footprint_after(&before),
        before,
        "the VM left something behind"
    );
}

#[test]
fn a_report_says_where_each_vcpu_is() {
    let Some(_g) = kvm_or_skip("a_report_says_where_each_vcpu_is") else {
        return;
    };
    let before = footprint();
    // The BSP spins at a known address; the AP waits for a start-up IPI that never comes.
    let prologue = Asm::new().print(b"spin");
    let loop_at = PAYLOAD_ADDR + prologue.len() as u64;
    let g = boot(&prologue.jmp_back(0).finish(), 2);
    while g.console.bytes() != b"spin" {
        std::thread::sleep(Duration::from_millis(10));
    }
    // The payload runs identity-mapped: rip is its own guest-physical address.
    let bsp_where = format!(", at rip {loop_at:#x} (guest-physical {loop_at:#x}), rsp 0x");
    let bsp_at = "interrupts off, runnable; 4 exits, the last an I/O write to port 0x3f8";
    let ap_waits = "interrupts off, waiting for its start-up IPI; 0 exits, the last none";
    // The AP's thread may not have entered KVM_RUN yet when the BSP has printed.
    let report = settled_vcpu_report(&g.handle, |r| {
        r.lines()
            .next()
            .is_some_and(|l| l.contains(&bsp_where) && l.contains(bsp_at))
            && r.lines().nth(1).is_some_and(|l| l.contains(ap_waits))
    });
    let lines: Vec<&str> = report.lines().collect();
    assert_eq!(lines.len(), 2, "{report}");
    assert!(
        lines[0].starts_with("vCPU 0: in the guest for "),
        "{report}"
    );
    assert!(lines[0].contains(&bsp_where), "{report}");
    assert!(lines[0].contains(bsp_at), "{report}");
    assert!(lines[1].contains(ap_waits), "{report}");
    // The kicks that took the samples are neither the guest's exits nor the end of its stay in
    // the guest, and the guest goes on.
    std::thread::sleep(Duration::from_millis(300));
    let report = g.handle.vcpu_report();
    assert!(report.contains("; 4 exits,"), "{report}");
    let stay: f64 = report
        .strip_prefix("vCPU 0: in the guest for ")
        .and_then(|r| r.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no stay in the guest in: {report}"));
    assert!(stay >= 0.3, "{report}");
    assert_eq!(g.handle.exit_reason(), None);
    // Paused vCPUs say so; the full report adds the (here absent) devices.
    g.handle.pause().unwrap();
    let report = g.handle.report();
    assert!(
        report.starts_with("vCPUs:\nvCPU 0: paused for "),
        "{report}"
    );
    assert!(report.contains("\nvCPU 1: paused for "), "{report}");
    assert!(report.ends_with("virtio devices:\n"), "{report}");
    let status = g.handle.status_report();
    assert!(
        status.starts_with("the microVM runs; its vCPUs:\nvCPU 0: paused for "),
        "{status}"
    );
    g.handle.resume().unwrap();
    g.handle.shutdown();
    let (exit, _) = wait(g);
    assert_eq!(exit, VmExit::HostRequest);
    assert_eq!(
        footprint_after(&before),
        before,
        "the VM left something behind"
    );
}

#[test]
fn pause_save_restore_resume() {
    let Some(_g) = kvm_or_skip("pause_save_restore_resume") else {
        return;
    };
    let before = footprint();
    // Spins in a tight loop at a known address.
    let prologue = Asm::new().print(b"spin");
    let loop_at = PAYLOAD_ADDR + prologue.len() as u64;
    let g = boot(&prologue.jmp_back(0).finish(), 2);
    std::thread::sleep(Duration::from_millis(200));
    g.handle.pause().unwrap();
    let state = g.handle.save_state().unwrap();
    assert_eq!(state.vcpus.len(), 2);
    assert_eq!(
        state.vcpus[0].regs.rip, loop_at,
        "the BSP is parked in its loop"
    );
    assert_eq!(state.irqchips.len(), 3);
    assert!(!state.vcpus[0].msrs.is_empty());
    // The state survives a trip through JSON and goes back in.
    let json = serde_json::to_string(&state).unwrap();
    let back: vmm::VmState = serde_json::from_str(&json).unwrap();
    g.handle.restore_state(back).unwrap();
    g.handle.resume().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(g.handle.exit_reason(), None, "still running after resume");
    // Pausing twice is harmless; the state needs a pause.
    g.handle.pause().unwrap();
    g.handle.pause().unwrap();
    g.handle.resume().unwrap();
    assert!(matches!(
        g.handle.save_state(),
        Err(vmm::VmError::NotPaused)
    ));
    g.handle.shutdown();
    let (exit, out) = wait(g);
    assert_eq!(exit, VmExit::HostRequest);
    assert_eq!(out, b"spin");
    assert_eq!(
        footprint_after(&before),
        before,
        "the VM left something behind"
    );
}

#[test]
fn commands_to_an_ended_vm_are_refused() {
    let Some(_g) = kvm_or_skip("commands_to_an_ended_vm_are_refused") else {
        return;
    };
    let mut g = boot(&Asm::new().i8042_reset().hlt().finish(), 1);
    let exit = g.handle.wait_timeout(Duration::from_secs(60));
    assert_eq!(exit, Some(VmExit::GuestReset));
    assert!(matches!(g.handle.pause(), Err(vmm::VmError::NotRunning)));
    assert_eq!(
        g.handle.status_report(),
        format!("the microVM stopped ({})", VmExit::GuestReset)
    );
}

#[test]
fn an_instruction_kvm_cannot_emulate_ends_the_vm() {
    let Some(_g) = kvm_or_skip("an_instruction_kvm_cannot_emulate_ends_the_vm") else {
        return;
    };
    // popcnt eax, ecx. A PVM-backed KVM emulates guest kernel code and has no popcnt: the VM must
    // end with an emulation failure, not spin. With hardware virtualisation it simply runs.
    let code = Asm::new()
        .print(b"a")
        .raw(&[0xf3, 0x0f, 0xb8, 0xc1])
        .print(b"b")
        .i8042_reset()
        .hlt()
        .finish();
    let pvm = vmm::host_check::check_host().is_err()
        && std::path::Path::new("/sys/module/kvm_pvm").exists();
    let (exit, out) = run_and_check_leaks(&code, 1);
    if pvm {
        assert!(
            matches!(exit, VmExit::EmulationFailure { vcpu: 0, .. }),
            "{exit:?}"
        );
        assert_eq!(out, b"a");
    } else {
        assert_eq!(exit, VmExit::GuestReset);
        assert_eq!(out, b"ab");
    }
}

#[test]
fn bad_configs_fail_before_any_vm_exists() {
    let Some(_g) = kvm_or_skip("bad_configs_fail_before_any_vm_exists") else {
        return;
    };
    let mut kernel = tempfile::NamedTempFile::new().unwrap();
    kernel.write_all(&tiny_elf(PAYLOAD_ADDR, &[0xf4])).unwrap();
    let before = footprint();
    let mut c = VmConfig::new("/nonexistent/vmlinux");
    c.vcpus = 1;
    let e = Vm::new(c).err().unwrap().to_string();
    assert!(e.contains("/nonexistent/vmlinux"), "{e}");
    let mut c = VmConfig::new(kernel.path());
    c.vcpus = 100_000;
    assert!(Vm::new(c)
        .err()
        .unwrap()
        .to_string()
        .starts_with("vcpus: 100000"));
    assert_eq!(footprint_after(&before), before);
}

/// Where the counting payload keeps its count (3 MiB: in RAM, clear of the code and page tables).
const COUNTER: u64 = 0x30_0000;

/// Prints `count` once, then increments the 32-bit word at [`COUNTER`] forever.
fn counting_payload() -> Vec<u8> {
    let body = Asm::new()
        .load_eax_abs(COUNTER)
        .raw(&[0xff, 0xc0]) // inc eax
        .store_eax_abs(COUNTER);
    let back = body.len() as u8;
    let mut code = Asm::new().print(b"count").finish();
    code.extend_from_slice(&body.jmp_back(back).finish());
    code
}

/// The count in a snapshot's memory file.
fn count_in(dir: &std::path::Path) -> u32 {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(dir.join(vmm::snapshot::MEMORY_FILE)).unwrap();
    let mut word = [0u8; 4];
    f.read_exact_at(&mut word, COUNTER).unwrap();
    u32::from_le_bytes(word)
}

fn restored(dir: &std::path::Path) -> Guest {
    let console = ConsoleBuffer::default();
    let spec = vmm::RestoreSpec {
        snapshot: dir.to_owned(),
        serial: SerialOutput::Writer(Box::new(console.clone())),
        devices: Vec::new(),
    };
    running(Vm::restore(spec).unwrap(), console)
}

/// `vm` running, its console on `console`.
fn running(vm: Vm, console: ConsoleBuffer) -> Guest {
    Guest {
        handle: vm.start().unwrap(),
        console,
        _kernel: tempfile::NamedTempFile::new().unwrap(),
    }
}

/// Resumes and stops a paused restored guest: it ends as asked, and without printing (a
/// rebooted payload would print again).
fn stop_restored(g: Guest) {
    g.handle.resume().unwrap();
    g.handle.shutdown();
    let (exit, out) = wait(g);
    assert_eq!(exit, VmExit::HostRequest);
    assert_eq!(out, b"", "a restored VM does not start over");
}

/// How many of this process's mappings map `file`.
fn mappings_of(file: &std::path::Path) -> usize {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let name = file.to_str().unwrap();
    maps.lines().filter(|l| l.ends_with(name)).count()
}

#[test]
fn a_snapshot_restores_into_vms_that_go_on_apart() {
    let Some(_g) = kvm_or_skip("a_snapshot_restores_into_vms_that_go_on_apart") else {
        return;
    };
    let before = footprint();
    let template = tempfile::tempdir().unwrap();
    let source = boot(&counting_payload(), 1);
    std::thread::sleep(Duration::from_millis(200));
    // A running VM is not snapshotted.
    assert!(matches!(
        source.handle.snapshot(template.path()),
        Err(vmm::VmError::NotPaused)
    ));
    source.handle.pause().unwrap();
    let size = source.handle.snapshot(template.path()).unwrap();
    source.handle.shutdown();
    let (_, out) = wait(source);
    assert_eq!(out, b"count");
    let memory = template.path().join(vmm::snapshot::MEMORY_FILE);
    // All of RAM by length, only what holds data on disk: code, page tables, boot data, count.
    assert_eq!(std::fs::metadata(&memory).unwrap().len(), 32 << 20);
    assert!(
        size.memory_bytes > 0 && size.memory_bytes < 256 << 10,
        "{size:?}"
    );
    let on_disk =
        std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&memory).unwrap()) * 512;
    assert!(
        on_disk <= size.memory_bytes + (64 << 10),
        "{on_disk} bytes allocated for {size:?}"
    );
    let counted = count_in(template.path());
    assert!(counted > 0, "the source VM counted");

    // Two clones go on from the same count, each on its own copy of the pages it writes.
    let a = restored(template.path());
    let b = restored(template.path());
    b.handle.pause().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    a.handle.pause().unwrap();
    assert_eq!(
        mappings_of(&memory),
        2,
        "each clone maps the template's memory file"
    );
    let (snap_a, snap_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    a.handle.snapshot(snap_a.path()).unwrap();
    b.handle.snapshot(snap_b.path()).unwrap();
    let (count_a, count_b) = (count_in(snap_a.path()), count_in(snap_b.path()));
    assert!(
        count_b >= counted && count_a > count_b,
        "template {counted}, a {count_a}, b {count_b}: each goes on from the template's count \
         and sees only its own writes"
    );
    assert_eq!(
        count_in(template.path()),
        counted,
        "the template file never changes"
    );
    for g in [a, b] {
        stop_restored(g);
    }
    assert_eq!(mappings_of(&memory), 0);
    assert_eq!(
        footprint_after(&before),
        before,
        "the VMs left something behind"
    );
}

/// A snapshot of a 1-vCPU counting payload that counted a while, its source VM gone.
fn counting_template() -> tempfile::TempDir {
    let template = tempfile::tempdir().unwrap();
    let source = boot(&counting_payload(), 1);
    std::thread::sleep(Duration::from_millis(100));
    source.handle.pause().unwrap();
    source.handle.snapshot(template.path()).unwrap();
    source.handle.shutdown();
    wait(source);
    template
}

/// A sandbox prepares its restore before its backends exist: the prepared half maps the
/// template and holds the KVM VM, and either finishes into a VM that goes on from the template
/// or, dropped (the sandbox failed meanwhile), leaves nothing.
#[test]
fn a_prepared_restore_finishes_or_leaves_nothing() {
    let Some(_g) = kvm_or_skip("a_prepared_restore_finishes_or_leaves_nothing") else {
        return;
    };
    // Before the template's source VM: its threads may still be ending once it is waited for.
    let before = footprint();
    let template = counting_template();
    let memory = template.path().join(vmm::snapshot::MEMORY_FILE);
    let counted = count_in(template.path());

    let dropped = Vm::prepare_restore(template.path(), vmm::TemplatePages::OnTouch).unwrap();
    let kept = Vm::prepare_restore(template.path(), vmm::TemplatePages::MapAhead).unwrap();
    assert_eq!(kept.snapshot_dir(), template.path());
    assert_eq!(
        mappings_of(&memory),
        2,
        "each prepared restore maps the template"
    );
    drop(dropped);
    assert_eq!(mappings_of(&memory), 1, "a dropped one unmaps it");

    let console = ConsoleBuffer::default();
    let vm = kept
        .finish(SerialOutput::Writer(Box::new(console.clone())), Vec::new())
        .unwrap();
    let g = running(vm, console);
    std::thread::sleep(Duration::from_millis(200));
    g.handle.pause().unwrap();
    let snap = tempfile::tempdir().unwrap();
    g.handle.snapshot(snap.path()).unwrap();
    assert!(
        count_in(snap.path()) > counted,
        "the finished restore went on counting from the template's {counted}"
    );
    stop_restored(g);
    assert_eq!(mappings_of(&memory), 0);
    assert_eq!(
        footprint_after(&before),
        before,
        "the prepared restores left something behind"
    );

    // A bad snapshot is refused at preparation, by name.
    let missing = tempfile::tempdir().unwrap();
    let e = vmm::error_chain(
        &Vm::prepare_restore(missing.path(), vmm::TemplatePages::OnTouch).unwrap_err(),
    );
    assert!(e.contains("state"), "{e}");
}

#[test]
fn a_bad_snapshot_is_refused_by_name() {
    let Some(_g) = kvm_or_skip("a_bad_snapshot_is_refused_by_name") else {
        return;
    };
    let template = tempfile::tempdir().unwrap();
    // Before the source VM: its threads may still be ending once it is waited for.
    let before = footprint();
    let source = boot(&counting_payload(), 2);
    std::thread::sleep(Duration::from_millis(100));
    source.handle.pause().unwrap();
    source.handle.snapshot(template.path()).unwrap();
    // A directory is written once.
    let again = source
        .handle
        .snapshot(template.path())
        .unwrap_err()
        .to_string();
    assert!(again.ends_with("memory: cannot create"), "{again}");
    source.handle.shutdown();
    wait(source);

    let attempt = |dir: &std::path::Path, devices: Vec<vmm::config::VirtioDeviceHandle>| {
        let spec = vmm::RestoreSpec {
            snapshot: dir.to_owned(),
            serial: SerialOutput::Sink,
            devices,
        };
        match Vm::restore(spec) {
            Ok(_) => panic!("a bad snapshot was restored"),
            Err(e) => vmm::error_chain(&e),
        }
    };
    let copy = |name: &str| {
        let dir = tempfile::tempdir().unwrap();
        for f in [vmm::snapshot::MEMORY_FILE, vmm::snapshot::STATE_FILE] {
            std::fs::copy(template.path().join(f), dir.path().join(f)).unwrap();
        }
        eprintln!("bad snapshot: {name}");
        dir
    };
    // A device the snapshot does not have.
    let disk = tempfile::NamedTempFile::new().unwrap();
    disk.as_file().set_len(1 << 20).unwrap();
    let blk = vmm::devices::virtio::block::Block::new(disk.path(), false).unwrap();
    let e = attempt(
        template.path(),
        vec![std::sync::Arc::new(std::sync::Mutex::new(blk))],
    );
    assert_eq!(
        e,
        "the snapshot holds the devices []; the restore was given [blk]"
    );
    drop(disk);
    // A truncated memory file.
    let dir = copy("truncated memory");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join(vmm::snapshot::MEMORY_FILE))
        .unwrap();
    f.set_len(16 << 20).unwrap();
    drop(f);
    let e = attempt(dir.path(), vec![]);
    assert!(
        e.ends_with("16777216 bytes of memory; the state says 33554432 (truncated?)"),
        "{e}"
    );
    // A corrupt state.
    let dir = copy("corrupt state");
    let state = dir.path().join(vmm::snapshot::STATE_FILE);
    let mut bytes = std::fs::read(&state).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 1;
    std::fs::write(&state, &bytes).unwrap();
    assert!(attempt(dir.path(), vec![]).ends_with("checksum mismatch: the state is corrupt"));
    // No snapshot at all.
    let empty = tempfile::tempdir().unwrap();
    let e = attempt(empty.path(), vec![]);
    assert!(e.contains("state: cannot open"), "{e}");
    assert_eq!(
        footprint_after(&before),
        before,
        "a refused restore left something"
    );
}
