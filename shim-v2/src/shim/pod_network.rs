//! The pod's network, carried into its microVM as Kata's "tcfilter" model does: in the pod's
//! network namespace (the one the CNI plugin configured), a tap beside the CNI's interface, the
//! two joined by tc ingress qdiscs whose mirred filters redirect every frame of one to the
//! other. The VMM serves the tap; the guest's NIC takes the interface's MAC, MTU, addresses and
//! routes from the agent, so the pod's peers see the same interface they would under runc.
//!
//! The CNI's interface keeps its addresses and routes; it only gains an ingress qdisc, which
//! teardown removes (the tap goes with the last descriptor on it). Work in the namespace runs on a
//! thread of its own that enters it and ends after: the shim's other threads never leave theirs.

use std::fs::File;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use agent_protocol::agent::{
    ARPNeighbor, AddARPNeighborsRequest, IPAddress, Interface, Route, UpdateInterfaceRequest,
    UpdateRoutesRequest,
};
use futures_util::TryStreamExt;
use oci_spec::runtime::{LinuxNamespaceType, Spec};
use rtnetlink::packet_route::address::{AddressAttribute, AddressScope};
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol};
use rtnetlink::packet_route::tc::{TcHandle, TcMessage};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use serde::{Deserialize, Serialize};
use vmm::devices::virtio::net::{MacAddr, Tap, TapError, MAX_MTU};

/// The tap rund makes in the pod's namespace (one pod per namespace, so one name does).
pub const TAP_NAME: &str = "rund-tap0";
/// The MAC every sandbox's NIC is made with, a template's too; the agent finds the NIC by it and
/// gives it the pod interface's MAC.
pub const NIC_DEVICE_MAC: MacAddr = MacAddr([0x02, 0x72, 0x75, 0x6e, 0x64, 0x00]);
/// The MTU the NIC announces: the largest the guest may set (the pod's is set by the agent).
pub const NIC_MTU: u16 = MAX_MTU;
/// Interface kinds a redirect can join: what CNI plugins make in a pod's namespace.
const JOINABLE: &[&str] = &["veth", "macvlan", "ipvlan", "vlan"];
/// Bounds on what is carried from the namespace (the agent's own bounds are the same).
const MAX_ADDRESSES: usize = 64;
const MAX_ROUTES: usize = 256;
const MAX_NEIGHBORS: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum PodNetworkError {
    #[error("the pod's network namespace {path}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("entering the pod's network namespace {path} (is it one?)")]
    Enter { path: PathBuf, source: nix::Error },
    #[error("the pod's network namespace {0} has no interface but lo: the CNI plugin made none")]
    Empty(PathBuf),
    #[error("the pod's network namespace {path} has {} interfaces ({}); rund joins one", .names.len(), .names.join(", "))]
    TooMany { path: PathBuf, names: Vec<String> },
    #[error("interface {name} is of kind {kind:?}; rund joins {JOINABLE:?} interfaces")]
    Unjoinable { name: String, kind: String },
    #[error("interface {name} has an ingress qdisc already; rund's redirect would replace it")]
    IngressTaken { name: String },
    #[error("interface {name}: {what}")]
    Unusable { name: String, what: String },
    #[error("{TAP_NAME} exists in the pod's network namespace already")]
    TapExists,
    #[error("{0} is the host's network namespace (the shim's own): joining it would redirect the host's traffic into the VM")]
    HostNamespace(PathBuf),
    #[error("the tap")]
    Tap(#[source] TapError),
    #[error("netlink: {0}")]
    Netlink(String, #[source] rtnetlink::Error),
    #[error("starting the namespace thread's runtime")]
    Runtime(#[source] std::io::Error),
    #[error("the thread in the pod's network namespace panicked")]
    Thread,
    #[error("before joining the pod's network")]
    BeforeWiring(#[source] Box<dyn std::error::Error + Send + Sync>),
}

type Result<T> = std::result::Result<T, PodNetworkError>;

fn netlink(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> PodNetworkError {
    let op = op.into();
    move |e| PodNetworkError::Netlink(op, e)
}

/// The network namespace a spec names by path: a CRI pod's, made by the CNI plugin.
pub fn netns_path(spec: &Spec) -> Option<PathBuf> {
    spec.linux()
        .as_ref()?
        .namespaces()
        .iter()
        .flatten()
        .find(|ns| ns.typ() == LinuxNamespaceType::Network)?
        .path()
        .clone()
}

/// What a sandbox's record keeps of its network, for a `delete` after the shim was killed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRecord {
    pub netns: PathBuf,
    /// The CNI's interface that holds rund's ingress qdisc.
    pub interface: String,
}

/// The CNI's interface as found in the pod's namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInterface {
    pub name: String,
    pub index: u32,
    pub mac: [u8; 6],
    pub mtu: u32,
    pub addresses: Vec<(IpAddr, u8)>,
}

/// A route on the pod's interface that the kernel did not make for its addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRoute {
    pub destination: Option<(IpAddr, u8)>,
    pub gateway: Option<IpAddr>,
    pub source: Option<IpAddr>,
    pub scope: u8,
}

/// What the pod's namespace holds for the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodNetwork {
    pub netns: PathBuf,
    pub interface: PodInterface,
    pub routes: Vec<PodRoute>,
    /// Permanent neighbour entries on the interface: address and MAC.
    pub neighbors: Vec<(IpAddr, [u8; 6])>,
}

/// Whether `netns` names the network namespace this process is in (a spec may name
/// `/proc/1/ns/net`, as `ctr run --with-ns` lets it; runc would give the container the host's
/// network, rund would take the host's interface away from it).
fn is_own_namespace(netns: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (
        std::fs::metadata(netns),
        std::fs::metadata("/proc/thread-self/ns/net"),
    ) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Runs `f` on a thread of its own inside the network namespace at `netns`, with a netlink
/// connection opened there.
fn in_netns<T, F, Fut>(netns: &Path, f: F) -> Result<T>
where
    T: Send,
    F: FnOnce(Handle) -> Fut + Send,
    Fut: std::future::Future<Output = Result<T>>,
{
    let file = File::open(netns).map_err(|source| PodNetworkError::Open {
        path: netns.to_owned(),
        source,
    })?;
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|source| {
                PodNetworkError::Enter {
                    path: netns.to_owned(),
                    source,
                }
            })?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
                .map_err(PodNetworkError::Runtime)?;
            rt.block_on(async {
                // The socket belongs to the namespace of the thread that opens it: this one's.
                let (conn, handle, _) =
                    rtnetlink::new_connection().map_err(PodNetworkError::Runtime)?;
                tokio::spawn(conn);
                f(handle).await
            })
        })
        .join()
        .map_err(|_| PodNetworkError::Thread)?
    })
}

fn name_of(link: &LinkMessage) -> String {
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        })
        .unwrap_or_else(|| format!("#{}", link.header.index))
}

fn kind_of(link: &LinkMessage) -> Option<String> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(match k {
                InfoKind::Other(s) => s.clone(),
                k => k.to_string(),
            }),
            _ => None,
        }),
        _ => None,
    })
}

async fn links(handle: &Handle) -> Result<Vec<LinkMessage>> {
    handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(netlink("listing the links"))
}

async fn ingress_qdisc(handle: &Handle, index: u32) -> Result<bool> {
    let qdiscs: Vec<TcMessage> = handle
        .qdisc()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(netlink("listing the qdiscs"))?;
    Ok(qdiscs
        .iter()
        .any(|q| q.header.index == index as i32 && q.header.parent == TcHandle::INGRESS))
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// The route as the agent adds it, or `None` for one the guest's kernel makes itself.
fn pod_route(r: &RouteMessage, index: u32) -> Option<PodRoute> {
    let on_interface = r
        .attributes
        .iter()
        .any(|a| matches!(a, RouteAttribute::Oif(i) if *i == index));
    if !on_interface
        || r.header.table != libc::RT_TABLE_MAIN
        || r.header.protocol == RouteProtocol::Kernel
    {
        return None;
    }
    let mut route = PodRoute {
        destination: None,
        gateway: None,
        source: None,
        scope: u8::from(r.header.scope),
    };
    for a in &r.attributes {
        match a {
            RouteAttribute::Destination(d) => {
                route.destination = route_ip(d).map(|ip| (ip, r.header.destination_prefix_length))
            }
            RouteAttribute::Gateway(g) => route.gateway = route_ip(g),
            RouteAttribute::PrefSource(s) => route.source = route_ip(s),
            _ => {}
        }
    }
    // A default route ("0.0.0.0/0") comes with no destination attribute.
    let link_local_v6 =
        matches!(route.destination, Some((IpAddr::V6(d), _)) if d.segments()[0] & 0xffc0 == 0xfe80);
    (route.destination.is_some() || route.gateway.is_some())
        .then_some(route)
        .filter(|_| !link_local_v6)
}

async fn discover_in(handle: Handle, netns: PathBuf) -> Result<PodNetwork> {
    let all = links(&handle).await?;
    if all.iter().any(|l| name_of(l) == TAP_NAME) {
        return Err(PodNetworkError::TapExists);
    }
    let candidates: Vec<&LinkMessage> = all
        .iter()
        .filter(|l| !l.header.flags.contains(LinkFlags::Loopback))
        .collect();
    let link = match candidates.as_slice() {
        [] => return Err(PodNetworkError::Empty(netns)),
        [one] => *one,
        many => {
            let mut names: Vec<String> = many.iter().map(|l| name_of(l)).collect();
            names.sort();
            return Err(PodNetworkError::TooMany { path: netns, names });
        }
    };
    let name = name_of(link);
    let kind = kind_of(link).unwrap_or_else(|| "none".into());
    if !JOINABLE.contains(&kind.as_str()) {
        return Err(PodNetworkError::Unjoinable { name, kind });
    }
    let unusable = |what: String| PodNetworkError::Unusable {
        name: name.clone(),
        what,
    };
    let index = link.header.index;
    let mac: [u8; 6] = link
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Address(m) => m.as_slice().try_into().ok(),
            _ => None,
        })
        .ok_or_else(|| unusable("it has no Ethernet address".into()))?;
    let mtu = link
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        })
        .unwrap_or(1500);
    if mtu > u32::from(NIC_MTU) {
        return Err(unusable(format!(
            "its MTU {mtu} is above the guest NIC's {NIC_MTU}"
        )));
    }
    if ingress_qdisc(&handle, index).await? {
        return Err(PodNetworkError::IngressTaken { name });
    }

    let mut addresses = Vec::new();
    let found: Vec<_> = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(netlink(format!("listing {name}'s addresses")))?;
    for a in found {
        // The guest makes its own link-local addresses.
        if a.header.scope == AddressScope::Link || a.header.scope == AddressScope::Host {
            continue;
        }
        if let Some(ip) = a.attributes.iter().find_map(|x| match x {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        }) {
            addresses.push((ip, a.header.prefix_len));
        }
    }
    let mut routes = Vec::new();
    for family in [
        RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
        RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
    ] {
        let wanted = family.header.address_family;
        let found: Vec<RouteMessage> = handle
            .route()
            .get(family)
            .execute()
            .try_collect()
            .await
            .map_err(netlink("listing the routes"))?;
        routes.extend(
            found
                .iter()
                .filter(|r| r.header.address_family == wanted)
                .filter_map(|r| pod_route(r, index)),
        );
    }
    let mut neighbors = Vec::new();
    let found: Vec<_> = handle
        .neighbours()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(netlink("listing the neighbours"))?;
    for n in found {
        if n.header.ifindex != index || n.header.state != NeighbourState::Permanent {
            continue;
        }
        let ip = n.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => Some(IpAddr::V4(*v4)),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => Some(IpAddr::V6(*v6)),
            _ => None,
        });
        let lladdr = n.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::LinkLayerAddress(m) => <[u8; 6]>::try_from(m.as_slice()).ok(),
            _ => None,
        });
        if let (Some(ip), Some(mac)) = (ip, lladdr) {
            neighbors.push((ip, mac));
        }
    }
    if addresses.len() > MAX_ADDRESSES
        || routes.len() > MAX_ROUTES
        || neighbors.len() > MAX_NEIGHBORS
    {
        return Err(unusable(format!(
            "{} addresses, {} routes, {} neighbours: more than rund carries ({MAX_ADDRESSES}, {MAX_ROUTES}, {MAX_NEIGHBORS})",
            addresses.len(),
            routes.len(),
            neighbors.len()
        )));
    }
    Ok(PodNetwork {
        netns,
        interface: PodInterface {
            name,
            index,
            mac,
            mtu,
            addresses,
        },
        routes,
        neighbors,
    })
}

/// `tc qdisc add dev <index> ingress`.
async fn add_ingress(handle: &Handle, index: u32, name: &str) -> Result<()> {
    handle
        .qdisc()
        .add(index as i32)
        .ingress()
        .execute()
        .await
        .map_err(netlink(format!("adding an ingress qdisc to {name}")))
}

/// `tc filter add dev <from> parent ffff: protocol all u32 match u8 0 0 action mirred egress
/// redirect dev <to>`.
async fn redirect(handle: &Handle, from: u32, to: u32, what: &str) -> Result<()> {
    let eth_p_all = (libc::ETH_P_ALL as u16).to_be();
    handle
        .traffic_filter(from as i32)
        .add()
        .parent(u32::from(TcHandle::INGRESS.major) << 16)
        .protocol(eth_p_all)
        .redirect(to)
        .map_err(netlink(format!("building the redirect {what}")))?
        .execute()
        .await
        .map_err(netlink(format!("redirecting {what}")))
}

async fn del_ingress(handle: &Handle, index: u32, name: &str) -> Result<()> {
    let mut req = handle.qdisc().del(index as i32);
    req.message_mut().header.parent = TcHandle::INGRESS;
    req.message_mut().header.handle = TcHandle {
        major: TcHandle::INGRESS.major,
        minor: 0,
    };
    match req.execute().await {
        Ok(()) => Ok(()),
        // None there (EINVAL, ENOENT): nothing to undo.
        Err(rtnetlink::Error::NetlinkError(e))
            if matches!(e.raw_code().abs(), libc::EINVAL | libc::ENOENT) =>
        {
            Ok(())
        }
        Err(e) => Err(netlink(format!("removing {name}'s ingress qdisc"))(e)),
    }
}

async fn wire_in(handle: Handle, pod: PodNetwork) -> Result<Tap> {
    let iface = &pod.interface;
    let tap = Tap::open(TAP_NAME).map_err(PodNetworkError::Tap)?;
    let tap_index = links(&handle)
        .await?
        .iter()
        .find(|l| name_of(l) == TAP_NAME)
        .map(|l| l.header.index)
        .ok_or_else(|| PodNetworkError::Unusable {
            name: TAP_NAME.into(),
            what: "made, but not listed".into(),
        })?;
    let joined = async {
        handle
            .link()
            .set(
                LinkUnspec::new_with_index(tap_index)
                    .mtu(iface.mtu)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(netlink(format!("bringing {TAP_NAME} up")))?;
        add_ingress(&handle, tap_index, TAP_NAME).await?;
        add_ingress(&handle, iface.index, &iface.name).await?;
        redirect(
            &handle,
            iface.index,
            tap_index,
            &format!("{} to {TAP_NAME}", iface.name),
        )
        .await?;
        redirect(
            &handle,
            tap_index,
            iface.index,
            &format!("{TAP_NAME} to {}", iface.name),
        )
        .await
    };
    match joined.await {
        Ok(()) => Ok(tap),
        Err(e) => {
            // The tap and its qdisc go with `tap`; the interface's qdisc is ours to remove.
            if let Err(undo) = del_ingress(&handle, iface.index, &iface.name).await {
                log::warn!("undoing the redirect: {undo}");
            }
            Err(e)
        }
    }
}

async fn unwire_in(handle: Handle, interface: String) -> Result<()> {
    let all = links(&handle).await?;
    if let Some(link) = all.iter().find(|l| name_of(l) == interface) {
        del_ingress(&handle, link.header.index, &interface).await?;
    }
    // Gone with its last descriptor, unless someone else holds one: then it goes now.
    if let Some(tap) = all.iter().find(|l| name_of(l) == TAP_NAME) {
        handle
            .link()
            .del(tap.header.index)
            .execute()
            .await
            .map_err(netlink(format!("removing {TAP_NAME}")))?;
    }
    Ok(())
}

impl PodNetwork {
    /// Reads the CNI's interface, its addresses, routes and permanent neighbours in `netns`,
    /// refusing one rund cannot join. Blocking; changes nothing.
    pub fn discover(netns: &Path) -> Result<PodNetwork> {
        if is_own_namespace(netns) {
            return Err(PodNetworkError::HostNamespace(netns.to_owned()));
        }
        let path = netns.to_owned();
        in_netns(netns, move |h| discover_in(h, path))
    }

    /// [`Self::discover`] then [`Self::wire`] in one visit to the namespace (one thread, one
    /// runtime, one netlink connection: each visit costs milliseconds of a start in the nested
    /// testbed), running `before_wiring` between them: the sandbox records the namespace there,
    /// before anything in it changes. Blocking. On failure nothing is left.
    pub fn join<F>(netns: &Path, before_wiring: F) -> Result<(PodNetwork, Tap)>
    where
        F: FnOnce(&PodNetwork) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>
            + Send,
    {
        if is_own_namespace(netns) {
            return Err(PodNetworkError::HostNamespace(netns.to_owned()));
        }
        let path = netns.to_owned();
        in_netns(netns, move |h| async move {
            let pod = discover_in(h.clone(), path).await?;
            before_wiring(&pod).map_err(PodNetworkError::BeforeWiring)?;
            let tap = wire_in(h, pod.clone()).await?;
            Ok((pod, tap))
        })
    }

    /// Makes the tap and joins it to the interface. Blocking. On failure nothing is left.
    pub fn wire(&self) -> Result<Tap> {
        let pod = self.clone();
        in_netns(&self.netns, move |h| wire_in(h, pod))
    }

    pub fn record(&self) -> NetworkRecord {
        NetworkRecord {
            netns: self.netns.clone(),
            interface: self.interface.name.clone(),
        }
    }

    /// The agent's requests that give the guest's NIC this network.
    pub fn agent_requests(
        &self,
    ) -> (
        UpdateInterfaceRequest,
        UpdateRoutesRequest,
        AddARPNeighborsRequest,
    ) {
        let name = &self.interface.name;
        let mut iface = Interface::new();
        iface.device_mac = NIC_DEVICE_MAC.0.to_vec();
        iface.name = name.clone();
        iface.hw_addr = self.interface.mac.to_vec();
        iface.mtu = self.interface.mtu;
        iface.addresses = self
            .interface
            .addresses
            .iter()
            .map(|(ip, len)| {
                let mut a = IPAddress::new();
                a.address = ip.to_string();
                a.prefix_len = u32::from(*len);
                a
            })
            .collect();
        let mut update = UpdateInterfaceRequest::new();
        update.interface = protobuf::MessageField::some(iface);

        // Link routes first: a gateway must be reachable when the route through it is added.
        let mut routes: Vec<&PodRoute> = self.routes.iter().collect();
        routes.sort_by_key(|r| r.gateway.is_some());
        let mut routes_req = UpdateRoutesRequest::new();
        routes_req.routes = routes
            .iter()
            .map(|r| {
                let mut x = Route::new();
                x.destination = r
                    .destination
                    .map(|(a, l)| format!("{a}/{l}"))
                    .unwrap_or_default();
                x.gateway = r.gateway.map(|g| g.to_string()).unwrap_or_default();
                x.source = r.source.map(|s| s.to_string()).unwrap_or_default();
                x.device = name.clone();
                x.scope = u32::from(r.scope);
                x
            })
            .collect();
        let mut neighbors = AddARPNeighborsRequest::new();
        neighbors.neighbors = self
            .neighbors
            .iter()
            .map(|(ip, mac)| {
                let mut n = ARPNeighbor::new();
                n.address = ip.to_string();
                n.hw_addr = mac.to_vec();
                n.device = name.clone();
                n
            })
            .collect();
        (update, routes_req, neighbors)
    }
}

impl NetworkRecord {
    /// Removes rund's qdisc from the interface and the tap, if they are still there. A
    /// namespace already gone (the CNI's teardown ran) has nothing left to undo. Blocking.
    pub fn unwire(&self) -> Result<()> {
        if !self.netns.exists() {
            return Ok(());
        }
        let interface = self.interface.clone();
        in_netns(&self.netns, move |h| unwire_in(h, interface))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::time::{Duration, Instant};

    fn root() -> bool {
        // SAFETY: geteuid has no preconditions and touches no memory.
        let ok = unsafe { libc::geteuid() } == 0 && Path::new("/dev/net/tun").exists();
        if !ok {
            eprintln!("skipped: needs root and /dev/net/tun (network namespaces, a tap)");
        }
        ok
    }

    fn sh(script: &str) -> String {
        let out = Command::new("sh").args(["-ec", script]).output().unwrap();
        assert!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Named network namespaces (`ip netns`), removed at the end.
    struct Netns(Vec<String>);

    impl Netns {
        fn new(tag: &str, count: usize) -> Netns {
            let names: Vec<String> = (0..count)
                .map(|i| format!("rund-{tag}-{}-{i}", std::process::id()))
                .collect();
            for n in &names {
                sh(&format!("ip netns add {n}"));
            }
            Netns(names)
        }

        fn path(&self, i: usize) -> PathBuf {
            Path::new("/run/netns").join(&self.0[i])
        }

        fn exec(&self, i: usize, cmd: &str) -> String {
            sh(&format!("ip netns exec {} {cmd}", self.0[i]))
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            for n in &self.0 {
                let _ = Command::new("ip").args(["netns", "del", n]).status();
            }
        }
    }

    /// A pod's namespace (0) as the bridge CNI plugin leaves it: eth0, a veth whose peer is in
    /// the "host" namespace (1) holding the gateway's address.
    fn cni_pod(tag: &str) -> Netns {
        let ns = Netns::new(tag, 2);
        sh(&format!(
            "ip link add eth0 netns {pod} address 0a:58:0a:63:00:05 type veth peer name gw0 netns {host}
             ip -n {pod} addr add 10.99.0.5/24 dev eth0
             ip -n {pod} link set eth0 up
             ip -n {pod} link set lo up
             ip -n {pod} route add default via 10.99.0.1
             ip -n {pod} route add 10.100.0.0/16 via 10.99.0.1 src 10.99.0.5
             ip -n {pod} neigh add 10.99.0.9 lladdr 02:00:00:00:00:09 dev eth0 nud permanent
             ip -n {host} addr add 10.99.0.1/24 dev gw0
             ip -n {host} link set gw0 up",
            pod = ns.0[0],
            host = ns.0[1]
        ));
        ns
    }

    /// An ARP request for 10.99.0.1 from the pod's MAC, as the guest sends it (virtio-net
    /// header first).
    fn arp_request() -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&[0x0a, 0x58, 0x0a, 0x63, 0, 5]);
        f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&[0x0a, 0x58, 0x0a, 0x63, 0, 5, 10, 99, 0, 5]);
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&[10, 99, 0, 1]);
        f
    }

    #[test]
    fn a_cni_interface_is_read_joined_to_a_tap_and_left_as_it_was() {
        if !root() {
            return;
        }
        let ns = cni_pod("join");
        let before = ns.exec(
            0,
            "sh -c 'ip -o addr; ip route; ip neigh; tc qdisc show dev eth0'",
        );
        let pod = PodNetwork::discover(&ns.path(0)).unwrap();
        assert_eq!(pod.interface.name, "eth0");
        assert_eq!(pod.interface.mac, [0x0a, 0x58, 0x0a, 0x63, 0, 5]);
        assert_eq!(pod.interface.mtu, 1500);
        assert_eq!(
            pod.interface.addresses,
            vec![("10.99.0.5".parse().unwrap(), 24)]
        );
        let gw: IpAddr = "10.99.0.1".parse().unwrap();
        assert!(pod.routes.contains(&PodRoute {
            destination: None,
            gateway: Some(gw),
            source: None,
            scope: 0
        }));
        assert!(pod.routes.iter().any(|r| r.destination
            == Some(("10.100.0.0".parse().unwrap(), 16))
            && r.source == Some("10.99.0.5".parse().unwrap())));
        // The kernel's own link route for 10.99.0.0/24 is the guest kernel's to make.
        assert_eq!(pod.routes.len(), 2, "{:?}", pod.routes);
        assert_eq!(
            pod.neighbors,
            vec![("10.99.0.9".parse().unwrap(), [2, 0, 0, 0, 0, 9])]
        );
        let (iface, routes, neighbors) = pod.agent_requests();
        assert_eq!(iface.interface.device_mac, NIC_DEVICE_MAC.0.to_vec());
        assert_eq!(iface.interface.addresses[0].address, "10.99.0.5");
        assert_eq!(routes.routes[0].gateway, "10.99.0.1");
        assert_eq!(routes.routes[0].device, "eth0");
        assert_eq!(neighbors.neighbors[0].address, "10.99.0.9");

        let tap = pod.wire().unwrap();
        let filters = ns.exec(0, "tc filter show dev eth0 ingress");
        assert!(filters.contains("protocol all"), "{filters}");
        assert!(
            filters.contains(&format!("Egress Redirect to device {TAP_NAME}")),
            "{filters}"
        );
        let filters = ns.exec(0, &format!("tc filter show dev {TAP_NAME} ingress"));
        assert!(
            filters.contains("Egress Redirect to device eth0"),
            "{filters}"
        );
        // A second join of the same namespace is refused, changing nothing.
        let e = PodNetwork::discover(&ns.path(0)).unwrap_err();
        assert!(matches!(e, PodNetworkError::TapExists), "{e}");

        // The guest's frame leaves through eth0; the gateway's answer comes back to the tap.
        tap.write_frame(&arp_request()).unwrap();
        let mut buf = vec![0u8; 2048];
        let deadline = Instant::now() + Duration::from_secs(5);
        let reply = loop {
            match tap.read_frame(&mut buf) {
                Ok(n) if n >= 12 + 42 && buf[12 + 12..12 + 14] == [0x08, 0x06] => {
                    break buf[12..n].to_vec()
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(
                        Instant::now() < deadline,
                        "no ARP reply through the redirect"
                    );
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("reading the tap: {e}"),
            }
        };
        assert_eq!(
            &reply[0..6],
            &[0x0a, 0x58, 0x0a, 0x63, 0, 5],
            "to the pod's MAC"
        );
        assert_eq!(&reply[20..22], &[0, 2], "an ARP reply");
        assert_eq!(&reply[28..32], &[10, 99, 0, 1], "from the gateway");

        drop(tap);
        pod.record().unwire().unwrap();
        let after = ns.exec(
            0,
            "sh -c 'ip -o addr; ip route; ip neigh; tc qdisc show dev eth0'",
        );
        assert_eq!(before, after);
        assert!(!ns.exec(0, "ip -o link").contains(TAP_NAME));
        // Twice, and on a namespace gone: nothing to do.
        pod.record().unwire().unwrap();
        let gone = NetworkRecord {
            netns: "/run/netns/rund-no-such-netns".into(),
            interface: "eth0".into(),
        };
        gone.unwire().unwrap();
    }

    #[test]
    fn a_killed_shims_join_is_undone_from_its_record() {
        if !root() {
            return;
        }
        let ns = cni_pod("kill");
        let unchanged = || {
            !ns.exec(0, "ip -o link").contains(TAP_NAME)
                && !ns.exec(0, "tc qdisc show dev eth0").contains("ingress")
        };
        // What fails before the wiring (the record) leaves the namespace as it was.
        let e = PodNetwork::join(&ns.path(0), |_| Err("no record".into())).unwrap_err();
        assert!(
            matches!(e, PodNetworkError::BeforeWiring(ref why) if why.to_string() == "no record"),
            "{e}"
        );
        assert!(unchanged());
        // The record is written while nothing has changed yet.
        let mut recorded_early = false;
        let (pod, tap) = PodNetwork::join(&ns.path(0), |pod| {
            recorded_early = unchanged() && pod.interface.name == "eth0";
            Ok(())
        })
        .unwrap();
        assert!(recorded_early);
        // As after a `kill -9`: the redirects stay while another holder keeps the tap open.
        let record = pod.record();
        let text = serde_json::to_string(&record).unwrap();
        let read: NetworkRecord = serde_json::from_str(&text).unwrap();
        read.unwire().unwrap();
        assert!(!ns.exec(0, "tc qdisc show dev eth0").contains("ingress"));
        assert!(!ns.exec(0, "ip -o link").contains(TAP_NAME));
        drop(tap);
    }

    #[test]
    fn what_rund_cannot_join_is_refused_by_name_and_left_alone() {
        if !root() {
            return;
        }
        let missing = PodNetwork::discover(Path::new("/run/netns/rund-no-such-netns")).unwrap_err();
        assert!(
            missing
                .to_string()
                .starts_with("the pod's network namespace /run/netns/rund-no-such-netns"),
            "{missing}"
        );
        let e = PodNetwork::discover(Path::new("/proc/self/ns/uts")).unwrap_err();
        assert!(matches!(e, PodNetworkError::Enter { .. }), "{e}");
        // The host's own namespace, however it is named: refused before it is entered.
        for host in ["/proc/self/ns/net", "/proc/thread-self/ns/net"] {
            let e = PodNetwork::discover(Path::new(host)).unwrap_err();
            assert!(
                matches!(e, PodNetworkError::HostNamespace(_)),
                "{host}: {e}"
            );
        }

        let ns = Netns::new("bad", 4);
        let e = PodNetwork::discover(&ns.path(0)).unwrap_err();
        assert!(
            e.to_string()
                .ends_with("has no interface but lo: the CNI plugin made none"),
            "{e}"
        );

        sh(&format!(
            "ip link add a0 netns {n} type veth peer name b0 netns {n}",
            n = ns.0[1]
        ));
        let e = PodNetwork::discover(&ns.path(1)).unwrap_err();
        assert!(
            e.to_string()
                .ends_with("has 2 interfaces (a0, b0); rund joins one"),
            "{e}"
        );

        ns.exec(2, "ip tuntap add tun9 mode tun");
        let e = PodNetwork::discover(&ns.path(2)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "interface tun9 is of kind \"tun\"; rund joins [\"veth\", \"macvlan\", \"ipvlan\", \"vlan\"] interfaces"
        );

        sh(&format!(
            "ip link add eth0 netns {n} type veth peer name p0 netns {h}
             ip netns exec {n} tc qdisc add dev eth0 ingress",
            n = ns.0[3],
            h = ns.0[2]
        ));
        let e = PodNetwork::discover(&ns.path(3)).unwrap_err();
        assert!(matches!(e, PodNetworkError::IngressTaken { .. }), "{e}");
        // Refused before anything was made: the CNI's qdisc is still there, no tap.
        assert!(ns.exec(3, "tc qdisc show dev eth0").contains("ingress"));
        assert!(!ns.exec(3, "ip -o link").contains(TAP_NAME));
    }

    #[test]
    fn the_spec_names_the_pods_namespace() {
        let spec: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "linux": {"namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1"}]}
        }))
        .unwrap();
        assert_eq!(
            netns_path(&spec),
            Some(PathBuf::from("/var/run/netns/cni-1"))
        );
        let spec: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "linux": {"namespaces": [{"type": "network"}]}
        }))
        .unwrap();
        assert_eq!(netns_path(&spec), None);
    }
}
