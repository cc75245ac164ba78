//! How big a sandbox's microVM is: what the pod asks for, plus the configured overhead.
//!
//! In order: rund's own annotations (`io.rund.vcpus`, `io.rund.memory-mib`), the pod-level
//! annotations containerd's CRI plugin adds from 1.7 on (`io.kubernetes.cri.sandbox-cpu-*`,
//! `...-memory`), then the first container's own limits, then the configured defaults.
//!
//! rund's annotations are the pod author's word and the host cgroup's limit follows the guest's
//! size, so they choose only within the pod's limits (the CRI's, else the container's) and the
//! operator's bounds (`guest.max_vcpus`, `guest.max_memory_mib`): never above.

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
    #[error("annotation {key}={value}: above {limit}")]
    AboveLimit {
        key: &'static str,
        value: u64,
        limit: String,
    },
    #[error("guest memory {total_mib} MiB is above guest.max_memory_mib ({max_mib} MiB)")]
    MemoryTooLarge { total_mib: u64, max_mib: u32 },
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

/// The pod's own limits: the CRI's pod-level annotations, else the first container's.
struct PodLimits {
    vcpus: Option<u64>,
    memory_mib: Option<u64>,
}

fn pod_limits(
    spec: &Spec,
    annotations: &HashMap<String, String>,
) -> Result<PodLimits, SizingError> {
    let resources = spec.linux().as_ref().and_then(|l| l.resources().as_ref());
    let quota = annotation_u64(annotations, CRI_CPU_QUOTA)?;
    let period = annotation_u64(annotations, CRI_CPU_PERIOD)?;
    let vcpus = match (quota, period) {
        (Some(q), Some(p)) => cpus_from_quota(i64::try_from(q).unwrap_or(i64::MAX), p),
        _ => resources
            .and_then(|r| r.cpu().as_ref())
            .and_then(|c| cpus_from_quota(c.quota()?, c.period()?)),
    };
    let memory_mib = annotation_u64(annotations, CRI_MEMORY)?
        .filter(|b| *b > 0)
        .or_else(|| {
            resources
                .and_then(|r| r.memory().as_ref())
                .and_then(|m| m.limit())
                .filter(|l| *l > 0)
                .map(|l| l as u64)
        })
        .map(|bytes| bytes.div_ceil(MIB));
    Ok(PodLimits { vcpus, memory_mib })
}

/// The VM size for a sandbox whose first container has `spec`.
pub fn vm_size(spec: &Spec, guest: &GuestConfig) -> Result<VmSize, SizingError> {
    let empty = HashMap::new();
    let annotations = spec.annotations().as_ref().unwrap_or(&empty);
    let pod = pod_limits(spec, annotations)?;
    let max_vcpus = u64::from(guest.max_vcpus);

    let vcpus = match annotation_u64(annotations, VCPUS_ANNOTATION)? {
        Some(0) => {
            return Err(SizingError::Annotation {
                key: VCPUS_ANNOTATION,
                value: "0".into(),
                why: "a VM needs at least one vCPU",
            })
        }
        Some(n) => {
            let above = |limit| SizingError::AboveLimit {
                key: VCPUS_ANNOTATION,
                value: n,
                limit,
            };
            if let Some(limit) = pod.vcpus.filter(|l| n > *l) {
                return Err(above(format!("the pod's CPU limit ({limit} CPUs)")));
            }
            if n > max_vcpus {
                return Err(above(format!("guest.max_vcpus ({max_vcpus})")));
            }
            n
        }
        // A pod's limit above the bound gets fewer vCPUs, never more than it may use.
        None => pod
            .vcpus
            .unwrap_or(u64::from(guest.default_vcpus))
            .min(max_vcpus),
    };

    let overhead = u64::from(guest.memory_overhead_mib);
    let max_memory = u64::from(guest.max_memory_mib);
    let (asked, overhead) = match annotation_u64(annotations, MEMORY_ANNOTATION)? {
        // rund's own annotation names the whole guest: no overhead added.
        Some(m) => {
            let above = |limit| SizingError::AboveLimit {
                key: MEMORY_ANNOTATION,
                value: m,
                limit,
            };
            if let Some(limit) = pod.memory_mib.filter(|l| m > l.saturating_add(overhead)) {
                return Err(above(format!(
                    "the pod's memory limit ({limit} MiB) plus the guest's overhead \
                     ({overhead} MiB, guest.memory_overhead_mib)"
                )));
            }
            if m > max_memory {
                return Err(above(format!("guest.max_memory_mib ({max_memory} MiB)")));
            }
            (m, 0)
        }
        None => (
            pod.memory_mib
                .unwrap_or(u64::from(guest.default_memory_mib)),
            overhead,
        ),
    };
    let total = asked.saturating_add(overhead);
    if total < u64::from(MIN_MEMORY_MIB) {
        return Err(SizingError::MemoryTooSmall {
            asked_mib: asked,
            overhead_mib: overhead,
            total_mib: total,
        });
    }
    let memory_mib = u32::try_from(total)
        .ok()
        .filter(|m| *m <= guest.max_memory_mib)
        .ok_or(SizingError::MemoryTooLarge {
            total_mib: total,
            max_mib: guest.max_memory_mib,
        })?;
    Ok(VmSize {
        vcpus: vcpus as u32,
        memory_mib,
    })
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
        assert_eq!(
            e.to_string(),
            "annotation io.rund.memory-mib=100000: above guest.max_memory_mib (65536 MiB)"
        );
        // A pod whose own limit is above the bound is refused, not cut down.
        let e = vm_size(
            &spec(
                json!({"io.kubernetes.cri.sandbox-memory": "137438953472"}),
                json!({}),
            ),
            &guest(),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "guest memory 131136 MiB is above guest.max_memory_mib (65536 MiB)"
        );
    }

    #[test]
    fn annotations_cannot_lift_the_pods_limits() {
        let limited = json!({"cpu": {"quota": 100000, "period": 100000},
                             "memory": {"limit": 134217728}});
        // Within the pod's limits: chosen as asked (the whole guest, overhead included).
        let s = spec(
            json!({"io.rund.vcpus": "1", "io.rund.memory-mib": "192"}),
            limited.clone(),
        );
        assert_eq!(
            vm_size(&s, &guest()).unwrap(),
            VmSize {
                vcpus: 1,
                memory_mib: 192
            }
        );
        let s = spec(json!({"io.rund.memory-mib": "96"}), limited.clone());
        assert_eq!(vm_size(&s, &guest()).unwrap().memory_mib, 96);

        let e = vm_size(
            &spec(json!({"io.rund.memory-mib": "65536"}), limited.clone()),
            &guest(),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "annotation io.rund.memory-mib=65536: above the pod's memory limit (128 MiB) plus \
             the guest's overhead (64 MiB, guest.memory_overhead_mib)"
        );
        let e = vm_size(
            &spec(json!({"io.rund.memory-mib": "193"}), limited.clone()),
            &guest(),
        )
        .unwrap_err();
        assert!(
            matches!(e, SizingError::AboveLimit { value: 193, .. }),
            "{e}"
        );
        let e = vm_size(
            &spec(json!({"io.rund.vcpus": "4"}), limited.clone()),
            &guest(),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "annotation io.rund.vcpus=4: above the pod's CPU limit (1 CPUs)"
        );
        // The CRI's pod-level limits count over the container's.
        let s = spec(
            json!({"io.rund.memory-mib": "1088", "io.rund.vcpus": "2",
                   "io.kubernetes.cri.sandbox-memory": "1073741824",
                   "io.kubernetes.cri.sandbox-cpu-quota": "200000",
                   "io.kubernetes.cri.sandbox-cpu-period": "100000"}),
            limited,
        );
        assert_eq!(
            vm_size(&s, &guest()).unwrap(),
            VmSize {
                vcpus: 2,
                memory_mib: 1088
            }
        );
        // No pod limit: the operator's bounds.
        let e = vm_size(&spec(json!({"io.rund.vcpus": "5"}), json!({})), &guest()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "annotation io.rund.vcpus=5: above guest.max_vcpus (4)"
        );
        let bounded = GuestConfig {
            max_memory_mib: 1024,
            ..guest()
        };
        let e = vm_size(
            &spec(json!({"io.rund.memory-mib": "2048"}), json!({})),
            &bounded,
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .ends_with("above guest.max_memory_mib (1024 MiB)"),
            "{e}"
        );
        assert_eq!(
            vm_size(
                &spec(json!({"io.rund.memory-mib": "1024"}), json!({})),
                &bounded
            )
            .unwrap()
            .memory_mib,
            1024
        );
    }
}
