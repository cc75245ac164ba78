//! The agent's containers and their processes, by id.
//!
//! An id is reserved before its container is built, so that two concurrent CreateContainer calls with
//! one id cannot both go ahead; the entry appears once the container exists.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::reaper::ExitWatch;
use crate::stdio::Stdio;

/// Live exec'd processes kept per container; past this, exited ones are forgotten first.
pub const MAX_EXECS: usize = 1024;

/// Errors of the registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// No such container.
    #[error("container {0:?} not found")]
    NoContainer(String),
    /// No such process.
    #[error("process {exec:?} of container {container:?} not found")]
    NoProcess {
        /// The container.
        container: String,
        /// The exec id.
        exec: String,
    },
    /// The id is taken.
    #[error("{what} {id:?} already exists")]
    Exists {
        /// Container or process.
        what: &'static str,
        /// The id.
        id: String,
    },
    /// Too many live processes.
    #[error("container {0:?} has {MAX_EXECS} live exec'd processes")]
    TooManyExecs(String),
}

/// A process the agent started: a container's init or an exec'd process.
pub struct ProcessEntry {
    /// Its pid (in the agent's pid namespace).
    pub pid: i32,
    /// Its exit status, once it exited.
    pub exit: ExitWatch,
    /// Its stdio.
    pub stdio: Stdio,
}

impl ProcessEntry {
    /// The exit status, if it exited.
    pub fn exited(&self) -> Option<i32> {
        *self.exit.borrow()
    }

    /// Waits for the exit status.
    pub async fn wait(&self) -> i32 {
        let mut rx = self.exit.clone();
        // An error means the reaper is gone: only when the agent shuts down.
        let status = rx
            .wait_for(|s| s.is_some())
            .await
            .map(|s| s.unwrap_or(-1))
            .unwrap_or(-1);
        status
    }
}

/// A container.
pub struct ContainerEntry {
    /// Its id.
    pub id: String,
    /// Its cgroup path.
    pub cgroup_path: PathBuf,
    /// Its init process.
    pub init: Arc<ProcessEntry>,
    /// Its exec'd processes.
    pub execs: Mutex<HashMap<String, Arc<ProcessEntry>>>,
    /// Storages it holds a reference on.
    pub storages: Vec<String>,
    /// The overlay root the agent mounted for it.
    pub rootfs_mount: Option<PathBuf>,
    /// OOM kills already reported.
    pub oom_seen: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ContainerEntry {
    /// Process `exec_id` ("" for init).
    pub fn process(&self, exec_id: &str) -> Result<Arc<ProcessEntry>, RegistryError> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        lock(&self.execs)
            .get(exec_id)
            .cloned()
            .ok_or_else(|| RegistryError::NoProcess {
                container: self.id.clone(),
                exec: exec_id.to_owned(),
            })
    }

    /// Checks that `exec_id` is free and there is room for one more process.
    pub fn check_exec(&self, exec_id: &str) -> Result<(), RegistryError> {
        let mut execs = lock(&self.execs);
        if execs.contains_key(exec_id) {
            return Err(RegistryError::Exists {
                what: "process",
                id: exec_id.to_owned(),
            });
        }
        if execs.len() >= MAX_EXECS {
            execs.retain(|_, p| p.exited().is_none());
            if execs.len() >= MAX_EXECS {
                return Err(RegistryError::TooManyExecs(self.id.clone()));
            }
        }
        Ok(())
    }

    /// Adds an exec'd process.
    pub fn add_exec(&self, exec_id: &str, process: Arc<ProcessEntry>) -> Result<(), RegistryError> {
        let mut execs = lock(&self.execs);
        if execs.contains_key(exec_id) {
            return Err(RegistryError::Exists {
                what: "process",
                id: exec_id.to_owned(),
            });
        }
        execs.insert(exec_id.to_owned(), process);
        Ok(())
    }
}

/// Containers by id.
#[derive(Default)]
pub struct Registry {
    containers: Mutex<HashMap<String, Arc<ContainerEntry>>>,
    reserved: Mutex<HashSet<String>>,
}

/// An id reserved for a container being built; released when dropped.
pub struct Reservation<'a> {
    registry: &'a Registry,
    id: String,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        lock(&self.registry.reserved).remove(&self.id);
    }
}

impl Registry {
    /// Reserves `id` for a new container.
    pub fn reserve(&self, id: &str) -> Result<Reservation<'_>, RegistryError> {
        let containers = lock(&self.containers);
        let mut reserved = lock(&self.reserved);
        if containers.contains_key(id) || !reserved.insert(id.to_owned()) {
            return Err(RegistryError::Exists {
                what: "container",
                id: id.to_owned(),
            });
        }
        Ok(Reservation {
            registry: self,
            id: id.to_owned(),
        })
    }

    /// Adds the container built under `reservation`.
    pub fn insert(&self, reservation: Reservation<'_>, entry: Arc<ContainerEntry>) {
        lock(&self.containers).insert(reservation.id.clone(), entry);
    }

    /// Container `id`.
    pub fn get(&self, id: &str) -> Result<Arc<ContainerEntry>, RegistryError> {
        lock(&self.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| RegistryError::NoContainer(id.to_owned()))
    }

    /// Forgets container `id`.
    pub fn remove(&self, id: &str) -> Option<Arc<ContainerEntry>> {
        lock(&self.containers).remove(id)
    }

    /// Every container.
    pub fn all(&self) -> Vec<Arc<ContainerEntry>> {
        lock(&self.containers).values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str) -> Arc<ContainerEntry> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _g = rt.enter();
        let (stdio, _child) = Stdio::pipes().unwrap();
        Arc::new(ContainerEntry {
            id: id.into(),
            cgroup_path: PathBuf::new(),
            init: Arc::new(ProcessEntry {
                pid: 1,
                exit: tokio::sync::watch::channel(None).1,
                stdio,
            }),
            execs: Mutex::default(),
            storages: vec![],
            rootfs_mount: None,
            oom_seen: AtomicU64::new(0),
        })
    }

    #[test]
    fn duplicate_ids_are_refused_while_building_and_after() {
        let registry = Registry::default();
        let r = registry.reserve("a").unwrap();
        assert!(registry.reserve("a").is_err());
        registry.insert(r, entry("a"));
        assert!(registry.reserve("a").is_err());
        assert!(registry.get("a").is_ok());
        registry.remove("a");
        assert!(registry.reserve("a").is_ok());
    }

    #[test]
    fn dropped_reservation_frees_the_id() {
        let registry = Registry::default();
        drop(registry.reserve("b").unwrap());
        assert!(registry.reserve("b").is_ok());
        assert!(matches!(
            registry.get("b"),
            Err(RegistryError::NoContainer(_))
        ));
    }
}
