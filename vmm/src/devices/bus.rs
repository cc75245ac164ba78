//! Address-range dispatch of guest port I/O and MMIO accesses to devices.
//!
//! A bus is filled while the VM is built and only read afterwards, from every vCPU thread; each device
//! has its own lock, so vCPUs touching different devices do not wait for each other.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on a bus: it sees offsets relative to the base it was inserted at.
pub trait BusDevice: Send {
    /// A guest read of `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors inserting a device.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range is empty or wraps around.
    #[error("bus range at {base:#x} of length {len:#x} is empty or wraps")]
    BadRange {
        /// Base.
        base: u64,
        /// Length.
        len: u64,
    },
    /// The range overlaps a device already there.
    #[error("bus range at {base:#x} of length {len:#x} overlaps another device")]
    Overlap {
        /// Base.
        base: u64,
        /// Length.
        len: u64,
    },
}

struct Range {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// One address space (port I/O or MMIO).
#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Range>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.ranges.iter().map(|(b, r)| (*b, r.len)))
            .finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len })?;
        let before = self.ranges.range(..end).next_back();
        if let Some((b, r)) = before {
            if b + r.len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.ranges.insert(base, Range { len, device });
        Ok(())
    }

    fn resolve(&self, addr: u64, size: usize) -> Option<(u64, &Range)> {
        let (base, range) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        let last = offset.checked_add(size as u64)?;
        (last <= range.len).then_some((offset, range))
    }

    /// Dispatches a read; `false` when no device covers the whole access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, range)) => {
                lock(&range.device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; `false` when no device covers the whole access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, range)) => {
                lock(&range.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering it if a previous holder panicked: a device's registers stay usable, and
/// a panic already reported itself.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last: Vec<(u64, Vec<u8>)>,
    }
    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_with_offsets() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(a.clone(), 0x100, 0x10).unwrap();
        let mut d = [0u8; 2];
        assert!(bus.read(0x104, &mut d));
        assert_eq!(d, [4, 4]);
        assert!(bus.write(0x10f, &[9]));
        assert_eq!(a.lock().unwrap().last, vec![(0xf, vec![9])]);
        // Outside, or straddling the end.
        assert!(!bus.read(0xff, &mut d));
        assert!(!bus.read(0x10f, &mut d));
        assert!(!bus.write(0x110, &[1]));
    }

    #[test]
    fn overlaps_and_bad_ranges_are_refused() {
        let mut bus = Bus::new();
        let dev = || Arc::new(Mutex::new(Recorder::default()));
        bus.insert(dev(), 0x100, 0x10).unwrap();
        assert_eq!(
            bus.insert(dev(), 0x10f, 1),
            Err(BusError::Overlap {
                base: 0x10f,
                len: 1
            })
        );
        assert_eq!(
            bus.insert(dev(), 0xf8, 0x10),
            Err(BusError::Overlap {
                base: 0xf8,
                len: 0x10
            })
        );
        assert!(matches!(
            bus.insert(dev(), 0x200, 0),
            Err(BusError::BadRange { .. })
        ));
        assert!(matches!(
            bus.insert(dev(), u64::MAX, 2),
            Err(BusError::BadRange { .. })
        ));
        bus.insert(dev(), 0x110, 0x10).unwrap();
        bus.insert(dev(), 0xf0, 0x10).unwrap();
    }
}
