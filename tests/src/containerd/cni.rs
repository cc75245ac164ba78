//! The CNI configuration a node needs for pods with a network namespace of their own: a bridge
//! in the root namespace with host-local addresses and the loopback plugin (Debian's
//! `containernetworking-plugins`, in `/usr/lib/cni`, where Debian's containerd looks), the
//! smallest network containerd's CRI plugin accepts. Installed before containerd starts (its CRI
//! plugin reads the configuration then); removed on drop, with the bridge and the addresses'
//! records.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

pub struct PodCni(PathBuf);

impl PodCni {
    pub const CONF_DIR: &'static str = "/etc/cni/net.d";
    pub const NETWORK: &'static str = "rund-e2e";
    /// The bridge in the root namespace; it holds the gateway's address.
    pub const BRIDGE: &'static str = "rund-e2e0";
    pub const PLUGIN_DIR: &'static str = "/usr/lib/cni";
    /// The pods' subnet (a /24) and its gateway, the bridge's address.
    pub const SUBNET: &'static str = "10.88.77.0/24";
    pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 88, 77, 1);
    /// The last address host-local gives a pod: the ones above are left for peers on the bridge
    /// that no CNI plugin configures (a benchmark's QEMU guest).
    pub const LAST_POD_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 88, 77, 239);
    /// A peer's address on the bridge, outside the pods' range.
    pub const PEER_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 88, 77, 250);

    /// `None` (a reason printed) when the plugins are missing, unless the end-to-end tests are
    /// required (`RUND_REQUIRE_E2E_TESTS=1`): then a panic.
    pub fn install(test: &str) -> Option<PodCni> {
        let missing: Vec<String> = ["bridge", "host-local", "loopback"]
            .iter()
            .map(|p| Path::new(Self::PLUGIN_DIR).join(p))
            .filter(|p| !p.is_file())
            .map(|p| p.display().to_string())
            .collect();
        if !missing.is_empty() {
            let why = format!(
                "{} missing (apt-get install containernetworking-plugins)",
                missing.join(", ")
            );
            if super::e2e_required() {
                panic!("{test}: cannot run: {why}");
            }
            eprintln!("skipping {test}: {why}");
            return None;
        }
        std::fs::create_dir_all(Self::CONF_DIR).expect("mkdir /etc/cni/net.d");
        let path = Path::new(Self::CONF_DIR).join(format!("99-{}.conflist", Self::NETWORK));
        let conf = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": Self::NETWORK,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": Self::BRIDGE,
                    "isGateway": true,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{
                            "subnet": Self::SUBNET,
                            "gateway": Self::GATEWAY.to_string(),
                            "rangeEnd": Self::LAST_POD_ADDRESS.to_string(),
                        }]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                    },
                },
                {"type": "loopback"},
            ],
        });
        std::fs::write(&path, conf.to_string()).expect("writing the CNI configuration");
        Some(PodCni(path))
    }
}

impl Drop for PodCni {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::process::Command::new("ip")
            .args(["link", "delete", Self::BRIDGE])
            .stderr(std::process::Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(Path::new("/var/lib/cni/networks").join(Self::NETWORK));
    }
}
