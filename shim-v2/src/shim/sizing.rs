//! How big a sandbox's microVM is: what the pod asks for, plus the configured overhead.
//!
//! In order: rund's own annotations (`io.rund.vcpus`, `io.rund.memory-mib`), the pod-level
//! annotations containerd's CRI plugin adds from 1.7 on (`io.kubernetes.cri.sandbox-cpu-*`,
//! `...-memory`), then the first container's own limits, then the configured defaults.

use std::collections::HashMap;

use oci_spec::runtime::Spec;

use crate::config::{GuestConfig, MIN_MEMORY_MIB};

pub const VCPUS_ANNOTATION: &str = "io.rund.vcpus";
pub const MEMORY_ANNOTATION: &str = "io.rund.memory-mib";
const CRI_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
const CRI_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
const CRI_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";

const MIB: u64 = 1 << 20;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SizingError {
    #[error("annotation {key}={value:?}: {why}")]
    Annotation {
        key: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("guest memory {total_mib} MiB ({asked_mib} MiB asked + {overhead_mib} MiB overhead) is below the {MIN_MEMORY_MIB} MiB a guest needs")]
    MemoryTooSmall {
        asked_mib: u64,
        overhead_mib: u64,
        total_mib: u64,
    },
    #[error("guest memory {0} MiB is more than a microVM takes (64 GiB)")]
    MemoryTooLarge(u64),
}

/// The microVM's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmSize {
    pub vcpus: u32,
    pub memory_mib: u32,
}

impl From<crate::config::TemplateShape> for VmSize {
    fn from(shape: crate::config::TemplateShape) -> Self {
        VmSize {
            vcpus: shape.vcpus,
            memory_mib: shape.memory_mib,
        }
    }
}

fn annotation_u64(
    annotations: &HashMap<String, String>,
    key: &'static str,
) -> Result<Option<u64>, SizingError> {
    annotations
        .get(key)
        .map(|v| {
            v.trim()
                .parse::<u64>()
                .map_err(|_| SizingError::Annotation {
                    key,
                    value: v.clone(),
                    why: "not a non-negative integer",
                })
        })
        .transpose()
}

fn cpus_from_quota(quota: i64, period: u64) -> Option<u64> {
    (quota > 0 && period > 0).then(|| (quota as u64).div_ceil(period))
}

/// The VM size for a sandbox whose first container has `spec`.
pub fn vm_size(spec: &Spec, guest: &GuestConfig) -> Result<VmSize, SizingError> {
    let empty = HashMap::new();
    let annotations = spec.annotations().as_ref().unwrap_or(&empty);
    let resources = spec.linux().as_ref().and_then(|l| l.resources().as_ref());

    let vcpus = match annotation_u64(annotations, VCPUS_ANNOTATION)? {
        Some(0) => {
            return Err(SizingError::Annotation {
                key: VCPUS_ANNOTATION,
                value: "0".into(),
                why: "a VM needs at least one vCPU",
            })
        }
        Some(n) => Some(n),
        None => {
            let quota = annotation_u64(annotations, CRI_CPU_QUOTA)?;
            let period = annotation_u64(annotations, CRI_CPU_PERIOD)?;
            match (quota, period) {
                (Some(q), Some(p)) => cpus_from_quota(q as i64, p),
                _ => resources
                    .and_then(|r| r.cpu().as_ref())
                    .and_then(|c| cpus_from_quota(c.quota()?, c.period()?)),
            }
        }
    };
    let vcpus = vcpus
        .unwrap_or(u64::from(guest.default_vcpus))
        .min(u64::from(guest.max_vcpus)) as u32;

    let overhead = u64::from(guest.memory_overhead_mib);
    let memory = match annotation_u64(annotations, MEMORY_ANNOTATION)? {
        // rund's own annotation names the whole guest: no overhead added.
        Some(m) => Some((m, 0)),
        None => annotation_u64(annotations, CRI_MEMORY)?
            .filter(|b| *b > 0)
            .or_else(|| {
                resources
                    .and_then(|r| r.memory().as_ref())
                    .and_then(|m| m.limit())
                    .filter(|l| *l > 0)
                    .map(|l| l as u64)
            })
            .map(|bytes| (bytes.div_ceil(MIB), overhead)),
    };
    let (asked, overhead) = memory.unwrap_or((u64::from(guest.default_memory_mib), overhead));
    let total = asked + overhead;
    if total < u64::from(MIN_MEMORY_MIB) {
        return Err(SizingError::MemoryTooSmall {
            asked_mib: asked,
            overhead_mib: overhead,
            total_mib: total,
        });
    }
    let memory_mib = u32::try_from(total)
        .ok()
        .filter(|m| *m <= 64 * 1024)
        .ok_or(SizingError::MemoryTooLarge(total))?;
    Ok(VmSize { vcpus, memory_mib })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(annotations: serde_json::Value, resources: serde_json::Value) -> Spec {
        serde_json::from_value(json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "annotations": annotations,
            "linux": {"resources": resources}
        }))
        .unwrap()
    }

    fn guest() -> GuestConfig {
        GuestConfig {
            default_vcpus: 1,
            max_vcpus: 4,
            default_memory_mib: 256,
            memory_overhead_mib: 64,
            ..GuestConfig::default()
        }
    }

    #[test]
    fn defaults_without_limits() {
        let size = vm_size(&spec(json!({}), json!({})), &guest()).unwrap();
        assert_eq!(
            size,
            VmSize {
                vcpus: 1,
                memory_mib: 320
            }
        );
    }

    #[test]
    fn container_limits_plus_overhead() {
        let s = spec(
            json!({}),
            json!({"cpu": {"quota": 150000, "period": 100000}, "memory": {"limit": 134217728}}),
        );
        assert_eq!(
            vm_size(&s, &guest()).unwrap(),
            VmSize {
                vcpus: 2,
                memory_mib: 192
            }
        );
        let s = spec(
            json!({}),
            json!({"cpu": {"quota": 1600000, "period": 100000}}),
        );
        assert_eq!(
            vm_size(&s, &guest()).unwrap().vcpus,
            4,
            "capped at max_vcpus"
        );
    }

    #[test]
    fn annotations_win() {
        let s = spec(
            json!({"io.rund.vcpus": "3", "io.rund.memory-mib": "512",
                   "io.kubernetes.cri.sandbox-memory": "1073741824"}),
            json!({"memory": {"limit": 134217728}}),
        );
        assert_eq!(
            vm_size(&s, &guest()).unwrap(),
            VmSize {
                vcpus: 3,
                memory_mib: 512
            }
        );
        let s = spec(
            json!({"io.kubernetes.cri.sandbox-cpu-quota": "50000",
                   "io.kubernetes.cri.sandbox-cpu-period": "100000",
                   "io.kubernetes.cri.sandbox-memory": "268435456"}),
            json!({}),
        );
        assert_eq!(
            vm_size(&s, &guest()).unwrap(),
            VmSize {
                vcpus: 1,
                memory_mib: 320
            }
        );
    }

    #[test]
    fn bad_sizes_are_refused() {
        let e = vm_size(
            &spec(json!({"io.rund.memory-mib": "32"}), json!({})),
            &guest(),
        )
        .unwrap_err();
        assert!(matches!(
            e,
            SizingError::MemoryTooSmall { total_mib: 32, .. }
        ));
        assert!(e.to_string().contains("below the 64 MiB"), "{e}");
        let e = vm_size(&spec(json!({"io.rund.vcpus": "many"}), json!({})), &guest()).unwrap_err();
        assert!(e.to_string().contains("io.rund.vcpus"), "{e}");
        let e = vm_size(&spec(json!({"io.rund.vcpus": "0"}), json!({})), &guest()).unwrap_err();
        assert!(e.to_string().contains("at least one vCPU"), "{e}");
        let e = vm_size(
            &spec(json!({"io.rund.memory-mib": "100000"}), json!({})),
            &guest(),
        )
        .unwrap_err();
        assert_eq!(e, SizingError::MemoryTooLarge(100000));
    }
}
