//! The legacy devices a Linux guest expects on port I/O: a 16550 UART as its console (COM1, IRQ 4) and
//! the i8042 keyboard controller, kept only because its reset command is how the guest reboots.

use std::io::{LineWriter, Write};
use std::sync::Arc;

use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;
use crate::exit::{ExitSignal, VmExit};

/// Raises an interrupt line by writing its irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Ends the VM with [`VmExit::GuestReset`] when the guest resets the machine.
pub struct ResetTrigger(pub Arc<ExitSignal>);

impl Trigger for ResetTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.raise(VmExit::GuestReset);
        Ok(())
    }
}

/// COM1: a 16550 whose output goes, a line at a time, to the configured writer.
pub struct SerialConsole {
    uart: Serial<IrqTrigger, vm_superio::serial::NoEvents, LineWriter<Box<dyn Write + Send>>>,
}

impl SerialConsole {
    /// A UART raising `irq` and writing to `out`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        SerialConsole {
            uart: Serial::new(IrqTrigger(irq), LineWriter::new(out)),
        }
    }

    /// Pushes out any partial line.
    pub fn flush(&mut self) {
        // A console that cannot be written is not worth failing the VM for.
        let _ = self.uart.writer_mut().flush();
    }

    /// A UART raising `irq` and writing to `out`, its registers as `state` left them (a
    /// restored guest's driver goes on with the interrupts it had enabled). Fails only if the
    /// interrupt the state has pending cannot be raised.
    pub fn restored(
        irq: EventFd,
        out: Box<dyn Write + Send>,
        state: &SerialState,
    ) -> std::io::Result<Self> {
        let uart = Serial::from_state(
            &state.into(),
            IrqTrigger(irq),
            vm_superio::serial::NoEvents,
            LineWriter::new(out),
        )
        .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        Ok(SerialConsole { uart })
    }

    /// The UART's registers, for snapshots.
    pub fn state(&self) -> SerialState {
        SerialState::from(&self.uart.state())
    }
}

/// The 16550's registers as a snapshot keeps them (vm-superio's own state type is not
/// serialisable). Guest input not yet read is dropped: a template has none worth keeping.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialState {
    /// Divisor latch, low and high byte.
    pub baud_divisor: [u8; 2],
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// SCR.
    pub scratch: u8,
}

impl From<&vm_superio::serial::SerialState> for SerialState {
    fn from(s: &vm_superio::serial::SerialState) -> Self {
        SerialState {
            baud_divisor: [s.baud_divisor_low, s.baud_divisor_high],
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
        }
    }
}

impl From<&SerialState> for vm_superio::serial::SerialState {
    fn from(s: &SerialState) -> Self {
        vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor[0],
            baud_divisor_high: s.baud_divisor[1],
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: Vec::new(),
        }
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (data.len(), u8::try_from(offset)) {
            (1, Ok(off)) => data[0] = self.uart.read(off),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (1, Ok(off)) = (data.len(), u8::try_from(offset)) {
            if let Err(e) = self.uart.write(off, data[0]) {
                crate::guest_warn!("serial console: {e:?}");
            }
        }
    }
}

impl Drop for SerialConsole {
    fn drop(&mut self) {
        self.flush();
    }
}

/// The i8042 at ports 0x60 (offset 0) and 0x64 (offset 4).
pub struct ResetController {
    i8042: I8042Device<ResetTrigger>,
}

impl ResetController {
    /// A controller that ends the VM through `exit` on reset.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        ResetController {
            i8042: I8042Device::new(ResetTrigger(exit)),
        }
    }
}

impl BusDevice for ResetController {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (data.len(), u8::try_from(offset)) {
            (1, Ok(off)) => data[0] = self.i8042.read(off),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (1, Ok(off)) = (data.len(), u8::try_from(offset)) {
            // The trigger cannot fail; other writes are keyboard traffic nobody listens to.
            let _ = self.i8042.write(off, data[0]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn serial_writes_lines_and_raises_its_irq() {
        let out = Shared::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = SerialConsole::new(irq.try_clone().unwrap(), Box::new(out.clone()));
        s.write(1, &[0x02]); // IER: THR empty interrupt
        for b in b"hi\n" {
            s.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
        assert!(irq.read().unwrap() >= 1);
        // Wide accesses are not UART accesses.
        let mut wide = [0u8; 2];
        s.read(5, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
        s.write(0, b"x");
        drop(s);
        assert_eq!(&*out.0.lock().unwrap(), b"hi\nx", "flushed on drop");
    }

    #[test]
    fn i8042_reset_raises_guest_reset() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut c = ResetController::new(exit.clone());
        c.write(0, &[0x00]);
        assert_eq!(exit.reason(), None);
        c.write(4, &[0xfe]);
        assert_eq!(exit.reason(), Some(VmExit::GuestReset));
    }
}
