//! A template made from a real (payload) VM through the store and restored from it: the store's
//! directory holds a snapshot the VMM restores, and a restore is counted. Needs /dev/kvm (any
//! KVM, PVM included); without it the test prints why and returns.

use std::io::Write;
use std::time::Duration;

use templates::{FileIdentity, TemplateInputs, TemplateStore};
use vmm::testing::{tiny_elf, Asm, PAYLOAD_ADDR};
use vmm::{RestoreSpec, SerialOutput, Vm, VmConfig, VmExit};

#[test]
fn a_template_made_from_a_vm_restores() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipping a_template_made_from_a_vm_restores: /dev/kvm is absent on this host");
        return;
    }
    let mut kernel = tempfile::NamedTempFile::new().unwrap();
    let code = Asm::new().print(b"up").cli().hlt().jmp_back(2).finish();
    kernel.write_all(&tiny_elf(PAYLOAD_ADDR, &code)).unwrap();
    let root = tempfile::tempdir().unwrap();
    let store = TemplateStore::open(root.path().join("templates")).unwrap();
    let inputs = TemplateInputs {
        kernel: FileIdentity::of(kernel.path()).unwrap(),
        initrd: None,
        cmdline: String::new(),
        vmm_build: vmm::snapshot::build_id().into(),
        vcpus: 1,
        mem_mib: 64,
        devices: vec![],
    };
    let template = store
        .get_or_make(&inputs, true, |dir| {
            let mut config = VmConfig::new(kernel.path());
            config.mem_mib = inputs.mem_mib;
            let source = Vm::new(config)?.start()?;
            std::thread::sleep(Duration::from_millis(100));
            source.pause()?;
            let size = source.snapshot(dir)?;
            source.shutdown();
            source.wait();
            Ok(size.memory_bytes)
        })
        .unwrap()
        .unwrap();
    assert!(template.info.memory_bytes > 0);
    let spec = RestoreSpec {
        snapshot: template.dir.clone(),
        serial: SerialOutput::Sink,
        devices: vec![],
    };
    let handle = Vm::restore(spec).unwrap().start().unwrap();
    template.record_restore().unwrap();
    handle.shutdown();
    assert_eq!(handle.wait(), VmExit::HostRequest);
    assert_eq!(store.find(&inputs).unwrap().unwrap().restores(), 1);
}
