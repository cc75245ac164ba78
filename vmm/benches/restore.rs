//! Host-side restore time, from `Vm::restore` to vCPU 0's first `KVM_RUN`, of a snapshot of a
//! 128 MiB, 1-vCPU payload VM on tmpfs, against a cold `Vm::new` of the same VM to its first
//! `KVM_RUN`, interleaved in the same run. Runs on any KVM host, PVM included: the guest is a
//! hand-made payload that touched some memory before the snapshot.
//!
//! `cargo bench -p vmm --bench restore [-- RUNS]` (RUND_BENCH_DIR: where the snapshot goes,
//! default /dev/shm, a tmpfs as /run/rund/templates is)

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm::testing::{ms, percentile, tiny_elf, Asm, PAYLOAD_ADDR};
use vmm::{RestoreSpec, SerialOutput, Vm, VmConfig, VmHandle};

const MEM_MIB: u32 = 128;

/// Writes 4 MiB of RAM (one word per page from 8 MiB up), then halts forever.
fn payload() -> Vec<u8> {
    let mut a = Asm::new();
    for page in 0..1024u64 {
        a = a
            .mov_eax(page as u32 + 1)
            .store_eax_abs((8 << 20) + page * 4096);
    }
    a.cli().hlt().jmp_back(2).finish()
}

fn first_run(handle: &VmHandle, start: Instant) -> Duration {
    let first = loop {
        if let Some(t) = handle.first_kvm_run() {
            break t;
        }
        std::thread::yield_now();
    };
    first - start
}

fn cold(kernel: &Path) -> Duration {
    let mut config = VmConfig::new(kernel);
    config.mem_mib = MEM_MIB;
    let start = Instant::now();
    let handle = Vm::new(config).expect("Vm::new").start().expect("start");
    let d = first_run(&handle, start);
    handle.shutdown();
    handle.wait();
    d
}

fn restore(snapshot: &Path) -> Duration {
    let start = Instant::now();
    let spec = RestoreSpec {
        snapshot: snapshot.to_owned(),
        serial: SerialOutput::Sink,
        devices: Vec::new(),
    };
    let handle = Vm::restore(spec)
        .expect("Vm::restore")
        .start()
        .expect("start");
    let d = first_run(&handle, start);
    handle.shutdown();
    handle.wait();
    d
}

fn main() {
    if let Err(e) = std::fs::metadata("/dev/kvm") {
        panic!("bench restore needs /dev/kvm: {e}");
    }
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(100);
    let mut kernel = tempfile::NamedTempFile::new().unwrap();
    kernel
        .write_all(&tiny_elf(PAYLOAD_ADDR, &payload()))
        .unwrap();
    let base = std::env::var_os("RUND_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/dev/shm".into());
    let dir = tempfile::tempdir_in(&base).expect("snapshot directory");

    let mut config = VmConfig::new(kernel.path());
    config.mem_mib = MEM_MIB;
    let source = Vm::new(config).unwrap().start().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    source.pause().unwrap();
    let size = source.snapshot(dir.path()).unwrap();
    source.shutdown();
    source.wait();

    // Warm both paths, then interleave so that noise hits both alike.
    cold(kernel.path());
    restore(dir.path());
    let (mut c, mut r) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    for _ in 0..runs {
        c.push(cold(kernel.path()));
        r.push(restore(dir.path()));
    }
    c.sort();
    r.sort();
    let (r50, r99, c50, c99) = (
        percentile(&r, 0.5),
        percentile(&r, 0.99),
        percentile(&c, 0.5),
        percentile(&c, 0.99),
    );
    println!(
        "bench restore: Vm::restore to first KVM_RUN, {runs} runs, {MEM_MIB} MiB, 1 vCPU, snapshot \
         in {} ({} KiB of memory written, {} KiB of state)",
        base.display(),
        size.memory_bytes >> 10,
        size.state_bytes >> 10
    );
    println!(
        "  restore  p50 {:7.3} ms   p99 {:7.3} ms   (target: p50 <= 5 ms)",
        ms(r50),
        ms(r99)
    );
    println!(
        "  cold     p50 {:7.3} ms   p99 {:7.3} ms   (Vm::new to first KVM_RUN, same run)",
        ms(c50),
        ms(c99)
    );
    println!(
        "  ratio restore/cold: p50 {:.2}x   p99 {:.2}x",
        ms(r50) / ms(c50),
        ms(r99) / ms(c99)
    );
}
