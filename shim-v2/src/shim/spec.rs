//! The container's OCI spec as containerd wrote it for the host, turned into the spec the agent
//! runs in the guest.
//!
//! The guest is the pod: host paths, host namespaces and host hooks mean nothing there. The root
//! becomes the overlay the agent mounts, bind mounts (volumes) become paths on the sandbox's
//! virtio-fs shares, namespaces given by host path are dropped (the container shares the VM's,
//! which is the pod's: network, IPC, UTS) but for the PID namespace, which becomes the pod's
//! shared one in the guest (a pod with `shareProcessNamespace`; the agent holds it), and the
//! network namespace is the VM's own.

use std::path::{Path, PathBuf};

use agent_protocol::POD_PID_NAMESPACE;
use oci_spec::runtime::{LinuxNamespaceType, Mount, MountBuilder, Spec};

/// Mount types the guest kernel provides itself; their sources are not host paths.
const GUEST_FILESYSTEMS: &[&str] = &[
    "proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2",
];

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("mount {destination}: type {kind:?} is not supported in a microVM (bind mounts and {GUEST_FILESYSTEMS:?} are)")]
    UnsupportedMount { destination: PathBuf, kind: String },
    #[error(
        "mount {destination}: a bind mount needs an absolute host source, got {source_path:?}"
    )]
    BindSource {
        destination: PathBuf,
        source_path: Option<PathBuf>,
    },
    #[error("mount {destination}: sharing {source_path} with the guest: {why}")]
    Volume {
        destination: PathBuf,
        source_path: PathBuf,
        why: String,
    },
    #[error("linux.devices: host device {0} cannot be passed into a microVM")]
    Device(PathBuf),
    #[error("the spec has no {0}")]
    Missing(&'static str),
    #[error("building the guest mount for {destination}: {why}")]
    Build { destination: PathBuf, why: String },
}

/// Shares a host path with the guest: `(source, read_only)` to the guest path of the shared copy.
pub trait VolumeSharer {
    fn share(&mut self, source: &Path, read_only: bool) -> Result<PathBuf, String>;
}

impl<F: FnMut(&Path, bool) -> Result<PathBuf, String>> VolumeSharer for F {
    fn share(&mut self, source: &Path, read_only: bool) -> Result<PathBuf, String> {
        self(source, read_only)
    }
}

fn is_bind(mount: &Mount) -> bool {
    mount.typ().as_deref() == Some("bind")
        || mount
            .options()
            .iter()
            .flatten()
            .any(|o| o == "bind" || o == "rbind")
}

fn is_read_only(mount: &Mount) -> bool {
    mount.options().iter().flatten().any(|o| o == "ro")
}

/// The guest's `/dev/shm`: the pod's shared memory lives in the VM, not on the host.
fn guest_shm(mount: &Mount) -> Result<Mount, SpecError> {
    MountBuilder::default()
        .destination(mount.destination().clone())
        .typ("tmpfs")
        .source("shm")
        .options(vec![
            "nosuid".into(),
            "noexec".into(),
            "nodev".into(),
            "mode=1777".into(),
            "size=65536k".into(),
        ])
        .build()
        .map_err(|e| SpecError::Build {
            destination: mount.destination().clone(),
            why: e.to_string(),
        })
}

fn guest_mount(mount: &Mount, volumes: &mut dyn VolumeSharer) -> Result<Mount, SpecError> {
    let destination = mount.destination();
    if !is_bind(mount) {
        let kind = mount.typ().clone().unwrap_or_default();
        if GUEST_FILESYSTEMS.contains(&kind.as_str()) {
            return Ok(mount.clone());
        }
        return Err(SpecError::UnsupportedMount {
            destination: destination.clone(),
            kind,
        });
    }
    if destination == Path::new("/dev/shm") {
        return guest_shm(mount);
    }
    let source = match mount.source() {
        Some(s) if s.is_absolute() => s.clone(),
        other => {
            return Err(SpecError::BindSource {
                destination: destination.clone(),
                source_path: other.clone(),
            })
        }
    };
    let guest_source =
        volumes
            .share(&source, is_read_only(mount))
            .map_err(|why| SpecError::Volume {
                destination: destination.clone(),
                source_path: source.clone(),
                why,
            })?;
    let mut guest = mount.clone();
    guest.set_source(Some(guest_source));
    guest.set_typ(Some("bind".into()));
    Ok(guest)
}

/// The spec the agent runs for `spec`: see the module's documentation.
pub fn guest_spec(spec: &Spec, volumes: &mut dyn VolumeSharer) -> Result<Spec, SpecError> {
    let mut guest = spec.clone();
    let mut root = spec.root().clone().ok_or(SpecError::Missing("root"))?;
    root.set_path(PathBuf::from("rootfs"));
    guest.set_root(Some(root));

    let mounts = spec
        .mounts()
        .iter()
        .flatten()
        .map(|m| guest_mount(m, volumes))
        .collect::<Result<Vec<_>, _>>()?;
    guest.set_mounts(Some(mounts));
    guest.set_hooks(None);

    if let Some(process) = guest.process_mut() {
        process.set_apparmor_profile(None);
        process.set_selinux_label(None);
    }
    let linux = guest
        .linux_mut()
        .as_mut()
        .ok_or(SpecError::Missing("linux"))?;
    if let Some(device) = linux.devices().iter().flatten().next() {
        return Err(SpecError::Device(device.path().clone()));
    }
    let namespaces = linux.namespaces().clone().map(|list| {
        list.into_iter()
            .filter_map(|mut ns| match (ns.typ(), ns.path()) {
                (LinuxNamespaceType::Network, _) => None,
                // The pod's shared PID namespace (`shareProcessNamespace`): the agent holds it.
                (LinuxNamespaceType::Pid, Some(_)) => {
                    ns.set_path(Some(PathBuf::from(POD_PID_NAMESPACE)));
                    Some(ns)
                }
                (_, Some(_)) => None,
                (_, None) => Some(ns),
            })
            .collect()
    });
    linux.set_namespaces(namespaces);
    // The agent names the container's cgroup inside the guest; the host's path is not the guest's.
    linux.set_cgroups_path(None);
    linux.set_mount_label(None);
    Ok(guest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(extra_mounts: serde_json::Value, namespaces: serde_json::Value) -> Spec {
        let mut mounts = vec![
            json!({"destination": "/proc", "type": "proc", "source": "proc"}),
            json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]}),
        ];
        mounts.extend(extra_mounts.as_array().unwrap().iter().cloned());
        serde_json::from_value(json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0},
                        "apparmorProfile": "cri-containerd.apparmor.d"},
            "root": {"path": "/run/containerd/io.containerd.runtime.v2.task/default/c1/rootfs"},
            "mounts": mounts,
            "hooks": {"prestart": [{"path": "/usr/bin/hook"}]},
            "linux": {"namespaces": namespaces, "cgroupsPath": "/default/c1"}
        }))
        .unwrap()
    }

    fn no_volumes(_: &Path, _: bool) -> Result<PathBuf, String> {
        Err("no volumes here".into())
    }

    #[test]
    fn host_paths_go_and_guest_filesystems_stay() {
        let s = spec(
            json!([]),
            json!([{"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1"},
                   {"type": "ipc", "path": "/proc/42/ns/ipc"}, {"type": "mount"}, {"type": "network"}]),
        );
        let g = guest_spec(&s, &mut no_volumes).unwrap();
        assert_eq!(g.root().as_ref().unwrap().path(), Path::new("rootfs"));
        assert!(g.hooks().is_none());
        assert!(g.process().as_ref().unwrap().apparmor_profile().is_none());
        let linux = g.linux().as_ref().unwrap();
        assert!(linux.cgroups_path().is_none());
        let kinds: Vec<_> = linux
            .namespaces()
            .iter()
            .flatten()
            .map(|n| n.typ())
            .collect();
        assert_eq!(
            kinds,
            vec![LinuxNamespaceType::Pid, LinuxNamespaceType::Mount]
        );
        assert!(linux
            .namespaces()
            .iter()
            .flatten()
            .all(|n| n.path().is_none()));
        assert_eq!(g.mounts(), s.mounts());
    }

    #[test]
    fn a_shared_pid_namespace_is_the_pods_in_the_guest() {
        let s = spec(
            json!([]),
            json!([{"type": "pid", "path": "/proc/42/ns/pid"}, {"type": "ipc", "path": "/proc/42/ns/ipc"},
                   {"type": "uts", "path": "/proc/42/ns/uts"}, {"type": "mount"}]),
        );
        let g = guest_spec(&s, &mut no_volumes).unwrap();
        let ns: Vec<_> = g
            .linux()
            .as_ref()
            .unwrap()
            .namespaces()
            .iter()
            .flatten()
            .map(|n| (n.typ(), n.path().clone()))
            .collect();
        assert_eq!(
            ns,
            vec![
                (
                    LinuxNamespaceType::Pid,
                    Some(PathBuf::from(POD_PID_NAMESPACE))
                ),
                (LinuxNamespaceType::Mount, None)
            ]
        );
    }

    #[test]
    fn volumes_are_shared_with_their_mode() {
        let s = spec(
            json!([
                {"destination": "/data", "type": "bind", "source": "/srv/data", "options": ["rbind", "rw"]},
                {"destination": "/etc/hosts", "source": "/var/lib/hosts", "options": ["rbind", "ro"]},
                {"destination": "/dev/shm", "type": "bind", "source": "/run/containerd/shm", "options": ["rbind"]}
            ]),
            json!([]),
        );
        let mut seen = Vec::new();
        let mut share = |src: &Path, ro: bool| {
            seen.push((src.to_owned(), ro));
            Ok(PathBuf::from("/guest").join(src.file_name().unwrap()))
        };
        let g = guest_spec(&s, &mut share).unwrap();
        assert_eq!(
            seen,
            vec![
                (PathBuf::from("/srv/data"), false),
                (PathBuf::from("/var/lib/hosts"), true)
            ]
        );
        let mounts = g.mounts().as_ref().unwrap();
        assert_eq!(
            mounts[2].source().as_deref(),
            Some(Path::new("/guest/data"))
        );
        assert_eq!(mounts[2].typ().as_deref(), Some("bind"));
        assert_eq!(
            mounts[3].source().as_deref(),
            Some(Path::new("/guest/hosts"))
        );
        assert_eq!(mounts[4].typ().as_deref(), Some("tmpfs"));
    }

    #[test]
    fn bad_mounts_and_devices_are_refused_by_name() {
        let cases = [
            (
                json!([{"destination": "/x", "type": "nfs", "source": "srv:/x"}]),
                "nfs",
            ),
            (
                json!([{"destination": "/y", "type": "bind", "source": "rel/dir"}]),
                "absolute host source",
            ),
            (
                json!([{"destination": "/z", "type": "bind", "source": "/srv/z"}]),
                "no volumes here",
            ),
        ];
        for (mounts, want) in cases {
            let e = guest_spec(&spec(mounts, json!([])), &mut no_volumes)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{e}");
        }
        let mut s = spec(json!([]), json!([]));
        let dev: oci_spec::runtime::LinuxDevice = serde_json::from_value(
            json!({"path": "/dev/sda", "type": "b", "major": 8, "minor": 0}),
        )
        .unwrap();
        s.linux_mut().as_mut().unwrap().set_devices(Some(vec![dev]));
        let e = guest_spec(&s, &mut no_volumes).unwrap_err().to_string();
        assert!(e.contains("/dev/sda"), "{e}");
    }
}
