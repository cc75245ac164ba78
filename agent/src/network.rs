//! The pod's network in the guest. The shim names the NIC that stands for the pod's interface
//! (by the MAC its device was made with) and says what it carries: name, MAC, MTU, addresses,
//! routes, static neighbours. Each request is checked whole before anything is set, then set over
//! rtnetlink in the guest's network namespace (the one every container of the pod shares).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use agent_protocol::agent::{ARPNeighbor, IPAddress, Interface, Route};
use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::AddressMessage;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::neighbour::NeighbourState;
use rtnetlink::packet_route::route::{RouteAttribute, RouteMessage, RouteProtocol, RouteScope};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

/// Bounds on one request: a pod has a handful of each; the shim is not trusted to stay small.
pub const MAX_ADDRESSES: usize = 64;
pub const MAX_ROUTES: usize = 256;
pub const MAX_NEIGHBORS: usize = 256;
/// The kernel's limits on an Ethernet MTU (ETH_MIN_MTU, ETH_MAX_MTU).
const MIN_MTU: u32 = 68;
const MAX_MTU: u32 = 65535;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("{field} {value} is not {what}")]
    Invalid {
        field: &'static str,
        value: String,
        what: &'static str,
    },
    #[error("{count} {what} in one request; at most {max}")]
    TooMany {
        what: &'static str,
        count: usize,
        max: usize,
    },
    #[error("no NIC has the device MAC {0}")]
    NoSuchNic(String),
    #[error("no interface is named {0:?}")]
    NoSuchDevice(String),
    #[error("cannot open a netlink socket")]
    Socket(#[source] std::io::Error),
    #[error("netlink: {0}")]
    Netlink(String, #[source] rtnetlink::Error),
}

type Result<T> = std::result::Result<T, NetworkError>;

fn invalid(field: &'static str, value: impl std::fmt::Debug, what: &'static str) -> NetworkError {
    NetworkError::Invalid {
        field,
        value: format!("{value:?}"),
        what,
    }
}

fn netlink(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    let op = op.into();
    move |e| NetworkError::Netlink(op, e)
}

/// `aa:bb:cc:dd:ee:ff`, for messages.
fn mac_text(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn mac(field: &'static str, bytes: &[u8]) -> Result<[u8; 6]> {
    let mac: [u8; 6] = bytes
        .try_into()
        .map_err(|_| invalid(field, mac_text(bytes), "a MAC (6 bytes)"))?;
    if mac[0] & 1 != 0 || mac == [0; 6] {
        return Err(invalid(field, mac_text(&mac), "a unicast MAC"));
    }
    Ok(mac)
}

/// An interface name as the kernel's `dev_valid_name` takes it.
fn interface_name(field: &'static str, name: &str) -> Result<String> {
    let ok = !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace());
    if !ok {
        return Err(invalid(field, name, "an interface name"));
    }
    Ok(name.to_owned())
}

fn ip(field: &'static str, text: &str) -> Result<IpAddr> {
    text.parse()
        .map_err(|_| invalid(field, text, "an IPv4 or IPv6 address"))
}

fn prefix(field: &'static str, addr: IpAddr, len: u32) -> Result<u8> {
    let max = if addr.is_ipv4() { 32 } else { 128 };
    u8::try_from(len)
        .ok()
        .filter(|l| u32::from(*l) <= max)
        .ok_or_else(|| invalid(field, len, "a prefix length of the address's family"))
}

/// An `address/prefix` ("10.88.0.0/16").
fn cidr(field: &'static str, text: &str) -> Result<(IpAddr, u8)> {
    let (addr, len) = text
        .split_once('/')
        .ok_or_else(|| invalid(field, text, "an address/prefix"))?;
    let addr = ip(field, addr)?;
    let len = len
        .parse::<u32>()
        .map_err(|_| invalid(field, text, "an address/prefix"))?;
    Ok((addr, prefix(field, addr, len)?))
}

fn at_most<T>(what: &'static str, items: &[T], max: usize) -> Result<()> {
    if items.len() > max {
        return Err(NetworkError::TooMany {
            what,
            count: items.len(),
            max,
        });
    }
    Ok(())
}

/// An [`Interface`] checked.
#[derive(Debug, PartialEq, Eq)]
pub struct InterfaceSpec {
    pub device_mac: [u8; 6],
    pub name: String,
    pub mac: [u8; 6],
    pub mtu: u32,
    pub addresses: Vec<(IpAddr, u8)>,
}

impl InterfaceSpec {
    pub fn parse(iface: &Interface) -> Result<InterfaceSpec> {
        at_most("addresses", &iface.addresses, MAX_ADDRESSES)?;
        if !(MIN_MTU..=MAX_MTU).contains(&iface.mtu) {
            return Err(invalid("mtu", iface.mtu, "an MTU from 68 to 65535"));
        }
        let address = |a: &IPAddress| {
            let addr = ip("address", &a.address)?;
            Ok((addr, prefix("prefix_len", addr, a.prefix_len)?))
        };
        Ok(InterfaceSpec {
            device_mac: mac("device_mac", &iface.device_mac)?,
            name: interface_name("name", &iface.name)?,
            mac: mac("hw_addr", &iface.hw_addr)?,
            mtu: iface.mtu,
            addresses: iface.addresses.iter().map(address).collect::<Result<_>>()?,
        })
    }
}

/// A [`Route`] checked.
#[derive(Debug, PartialEq, Eq)]
pub struct RouteSpec {
    /// `None`: the default route of the gateway's family.
    pub destination: Option<(IpAddr, u8)>,
    pub gateway: Option<IpAddr>,
    pub device: String,
    pub source: Option<IpAddr>,
    pub scope: u8,
}

impl RouteSpec {
    pub fn parse(route: &Route) -> Result<RouteSpec> {
        let optional = |field, text: &str| (!text.is_empty()).then(|| ip(field, text)).transpose();
        let destination = (!route.destination.is_empty())
            .then(|| cidr("destination", &route.destination))
            .transpose()?;
        let gateway = optional("gateway", &route.gateway)?;
        let source = optional("source", &route.source)?;
        if destination.is_none() && gateway.is_none() {
            return Err(invalid(
                "destination",
                "",
                "given (a default route needs a gateway)",
            ));
        }
        let family = |a: &IpAddr| a.is_ipv4();
        let families: Vec<bool> = [destination.map(|d| d.0), gateway, source]
            .iter()
            .flatten()
            .map(family)
            .collect();
        if families.windows(2).any(|w| w[0] != w[1]) {
            return Err(invalid(
                "route",
                &route.destination,
                "of one address family throughout",
            ));
        }
        let scope = u8::try_from(route.scope)
            .map_err(|_| invalid("scope", route.scope, "a route scope (0-255)"))?;
        Ok(RouteSpec {
            destination,
            gateway,
            device: interface_name("device", &route.device)?,
            source,
            scope,
        })
    }

    fn is_ipv4(&self) -> bool {
        self.destination
            .map(|d| d.0)
            .or(self.gateway)
            .is_some_and(|a| a.is_ipv4())
    }

    fn message(&self, index: u32) -> RouteMessage {
        let scope = RouteScope::from(self.scope);
        if self.is_ipv4() {
            let v4 = |a: IpAddr| match a {
                IpAddr::V4(a) => a,
                IpAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
            };
            let (dest, len) = self
                .destination
                .map_or((Ipv4Addr::UNSPECIFIED, 0), |(a, l)| (v4(a), l));
            let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(dest, len)
                .output_interface(index)
                .scope(scope);
            if let Some(g) = self.gateway {
                b = b.gateway(v4(g));
            }
            if let Some(s) = self.source {
                b = b.pref_source(v4(s));
            }
            b.build()
        } else {
            let v6 = |a: IpAddr| match a {
                IpAddr::V6(a) => a,
                IpAddr::V4(_) => Ipv6Addr::UNSPECIFIED,
            };
            let (dest, len) = self
                .destination
                .map_or((Ipv6Addr::UNSPECIFIED, 0), |(a, l)| (v6(a), l));
            let mut b = RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(dest, len)
                .output_interface(index)
                .scope(scope);
            if let Some(g) = self.gateway {
                b = b.gateway(v6(g));
            }
            if let Some(s) = self.source {
                b = b.pref_source(v6(s));
            }
            b.build()
        }
    }
}

/// An [`ARPNeighbor`] checked.
#[derive(Debug, PartialEq, Eq)]
pub struct NeighborSpec {
    pub address: IpAddr,
    pub mac: [u8; 6],
    pub device: String,
}

impl NeighborSpec {
    pub fn parse(n: &ARPNeighbor) -> Result<NeighborSpec> {
        Ok(NeighborSpec {
            address: ip("address", &n.address)?,
            mac: mac("hw_addr", &n.hw_addr)?,
            device: interface_name("device", &n.device)?,
        })
    }
}

/// Checks a whole request's routes.
pub fn parse_routes(routes: &[Route]) -> Result<Vec<RouteSpec>> {
    at_most("routes", routes, MAX_ROUTES)?;
    routes.iter().map(RouteSpec::parse).collect()
}

/// Checks a whole request's neighbours.
pub fn parse_neighbors(neighbors: &[ARPNeighbor]) -> Result<Vec<NeighborSpec>> {
    at_most("neighbours", neighbors, MAX_NEIGHBORS)?;
    neighbors.iter().map(NeighborSpec::parse).collect()
}

/// An rtnetlink connection in the network namespace of the thread that opened it.
#[derive(Clone)]
pub struct Network {
    handle: Handle,
}

fn link_attr<'a>(link: &'a LinkMessage, want: impl Fn(&'a LinkAttribute) -> bool) -> bool {
    link.attributes.iter().any(want)
}

impl Network {
    /// Opens the connection; its task runs on the current tokio runtime.
    pub fn connect() -> Result<Network> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetworkError::Socket)?;
        tokio::spawn(conn);
        Ok(Network { handle })
    }

    async fn links(&self) -> Result<Vec<LinkMessage>> {
        self.handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(netlink("listing the links"))
    }

    async fn index_of(&self, name: &str) -> Result<u32> {
        Ok(self.indexes_of([name]).await?[0])
    }

    /// The indexes of the links named `names`, in order, from one listing.
    async fn indexes_of<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Result<Vec<u32>> {
        let links = self.links().await?;
        names
            .into_iter()
            .map(|name| {
                links
                    .iter()
                    .find(|l| link_attr(l, |a| matches!(a, LinkAttribute::IfName(n) if n == name)))
                    .map(|l| l.header.index)
                    .ok_or_else(|| NetworkError::NoSuchDevice(name.to_owned()))
            })
            .collect()
    }

    /// The NIC whose permanent address (what its driver read from the device) is `mac`, so
    /// that it is found again after its MAC changed; a link without one (a veth) by its MAC.
    async fn nic_with_device_mac(&self, mac: &[u8; 6]) -> Result<u32> {
        let links = self.links().await?;
        let by_perm = |l: &&LinkMessage| {
            link_attr(
                l,
                |a| matches!(a, LinkAttribute::PermAddress(m) if m == mac),
            )
        };
        let by_mac = |l: &&LinkMessage| {
            !link_attr(l, |a| matches!(a, LinkAttribute::PermAddress(_)))
                && link_attr(l, |a| matches!(a, LinkAttribute::Address(m) if m == mac))
        };
        links
            .iter()
            .find(by_perm)
            .or_else(|| links.iter().find(by_mac))
            .map(|l| l.header.index)
            .ok_or_else(|| NetworkError::NoSuchNic(mac_text(mac)))
    }

    async fn set_link(&self, what: &str, message: LinkMessage) -> Result<()> {
        self.handle
            .link()
            .set(message)
            .execute()
            .await
            .map_err(netlink(what))
    }

    /// Brings the loopback interface up: two containers of a pod meet on `localhost`.
    pub async fn loopback_up(&self) -> Result<()> {
        let lo = self.index_of("lo").await?;
        self.set_link(
            "bringing lo up",
            LinkUnspec::new_with_index(lo).up().build(),
        )
        .await
    }

    /// Makes the NIC of `spec.device_mac` the pod's interface: down, renamed, its MAC and MTU
    /// set, its addresses replaced, up.
    pub async fn update_interface(&self, spec: &InterfaceSpec) -> Result<()> {
        let index = self.nic_with_device_mac(&spec.device_mac).await?;
        let name = &spec.name;
        self.set_link(
            &format!("taking NIC {index} down"),
            LinkUnspec::new_with_index(index).down().build(),
        )
        .await?;
        self.set_link(
            &format!("naming NIC {index} {name}, MAC {}", mac_text(&spec.mac)),
            LinkUnspec::new_with_index(index)
                .name(name.clone())
                .address(spec.mac.to_vec())
                .mtu(spec.mtu)
                .build(),
        )
        .await?;
        let old: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(netlink(format!("listing {name}'s addresses")))?;
        for a in old {
            self.handle
                .address()
                .del(a)
                .execute()
                .await
                .map_err(netlink(format!("removing an address of {name}")))?;
        }
        for (addr, len) in &spec.addresses {
            self.handle
                .address()
                .add(index, *addr, *len)
                .execute()
                .await
                .map_err(netlink(format!("adding {addr}/{len} to {name}")))?;
        }
        self.set_link(
            &format!("bringing {name} up"),
            LinkUnspec::new_with_index(index).up().build(),
        )
        .await
    }

    /// Replaces the routes on the devices `routes` name (all but those the kernel made for the
    /// devices' addresses), then adds `routes` in order.
    pub async fn update_routes(&self, routes: &[RouteSpec]) -> Result<()> {
        let indexes = self
            .indexes_of(routes.iter().map(|r| r.device.as_str()))
            .await?;
        let mut devices = indexes.clone();
        devices.sort_unstable();
        devices.dedup();
        // Only the families asked for: a guest kernel without IPv6 answers an IPv6 dump with
        // every family's routes.
        let mut families = Vec::new();
        if routes.iter().any(RouteSpec::is_ipv4) {
            families.push(RouteMessageBuilder::<Ipv4Addr>::new().build());
        }
        if routes.iter().any(|r| !r.is_ipv4()) {
            families.push(RouteMessageBuilder::<Ipv6Addr>::new().build());
        }
        for family in families {
            let wanted = family.header.address_family;
            let existing: Vec<RouteMessage> = self
                .handle
                .route()
                .get(family)
                .execute()
                .try_collect()
                .await
                .map_err(netlink("listing the routes"))?;
            for r in existing
                .into_iter()
                .filter(|r| r.header.address_family == wanted)
            {
                let on_device = r
                    .attributes
                    .iter()
                    .any(|a| matches!(a, RouteAttribute::Oif(i) if devices.contains(i)));
                let main = r.header.table == libc::RT_TABLE_MAIN;
                if on_device && main && r.header.protocol != RouteProtocol::Kernel {
                    self.handle
                        .route()
                        .del(r)
                        .execute()
                        .await
                        .map_err(netlink("removing an old route"))?;
                }
            }
        }
        for (r, index) in routes.iter().zip(indexes) {
            self.handle
                .route()
                .add(r.message(index))
                .replace()
                .execute()
                .await
                .map_err(netlink(format!("adding {}", describe_route(r))))?;
        }
        Ok(())
    }

    /// Adds (or replaces) permanent neighbour entries.
    pub async fn add_neighbors(&self, neighbors: &[NeighborSpec]) -> Result<()> {
        let indexes = self
            .indexes_of(neighbors.iter().map(|n| n.device.as_str()))
            .await?;
        for (n, index) in neighbors.iter().zip(indexes) {
            self.handle
                .neighbours()
                .add(index, n.address)
                .link_layer_address(&n.mac)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(netlink(format!(
                    "adding neighbour {} ({}) on {}",
                    n.address,
                    mac_text(&n.mac),
                    n.device
                )))?;
        }
        Ok(())
    }
}

fn describe_route(r: &RouteSpec) -> String {
    let dest = r
        .destination
        .map_or_else(|| "default".to_owned(), |(a, l)| format!("{a}/{l}"));
    match r.gateway {
        Some(g) => format!("route {dest} via {g} dev {}", r.device),
        None => format!("route {dest} dev {}", r.device),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(mtu: u32, addrs: &[(&str, u32)]) -> Interface {
        let mut i = Interface::new();
        i.device_mac = vec![0x02, 0x72, 0x75, 0x6e, 0x64, 0];
        i.name = "eth0".into();
        i.hw_addr = vec![0x0a, 0x58, 0x0a, 0x58, 0, 5];
        i.mtu = mtu;
        i.addresses = addrs
            .iter()
            .map(|(a, l)| {
                let mut x = IPAddress::new();
                x.address = (*a).into();
                x.prefix_len = *l;
                x
            })
            .collect();
        i
    }

    fn route(dest: &str, gw: &str, dev: &str) -> Route {
        let mut r = Route::new();
        r.destination = dest.into();
        r.gateway = gw.into();
        r.device = dev.into();
        r
    }

    #[test]
    fn an_interface_is_checked_whole() {
        let spec =
            InterfaceSpec::parse(&iface(1450, &[("10.88.0.5", 16), ("fd00::5", 64)])).unwrap();
        assert_eq!(spec.mtu, 1450);
        assert_eq!(
            spec.addresses,
            vec![
                ("10.88.0.5".parse().unwrap(), 16),
                ("fd00::5".parse().unwrap(), 64)
            ]
        );
        let bad = [
            (iface(67, &[]), "mtu"),
            (iface(1500, &[("10.88.0.5", 33)]), "prefix_len"),
            (iface(1500, &[("fd00::5", 129)]), "prefix_len"),
            (iface(1500, &[("10.88.0", 16)]), "\"10.88.0\""),
        ];
        for (i, want) in bad {
            let e = InterfaceSpec::parse(&i).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        let mut i = iface(1500, &[]);
        i.hw_addr = vec![1, 2, 3, 4, 5, 6];
        let e = InterfaceSpec::parse(&i).unwrap_err().to_string();
        assert_eq!(e, "hw_addr \"01:02:03:04:05:06\" is not a unicast MAC");
        i.hw_addr = vec![2, 0, 0];
        let e = InterfaceSpec::parse(&i).unwrap_err().to_string();
        assert_eq!(e, "hw_addr \"02:00:00\" is not a MAC (6 bytes)");
        for name in ["", "a/b", "eth0:1", "x y", "sixteen-chars-xx", ".."] {
            let mut i = iface(1500, &[]);
            i.name = name.into();
            let e = InterfaceSpec::parse(&i).unwrap_err().to_string();
            assert!(e.ends_with("is not an interface name"), "{e}");
        }
        let many: Vec<(&str, u32)> = vec![("10.0.0.1", 8); MAX_ADDRESSES + 1];
        let e = InterfaceSpec::parse(&iface(1500, &many))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "65 addresses in one request; at most 64");
    }

    #[test]
    fn routes_are_checked_whole() {
        let routes = parse_routes(&[
            route("10.88.0.0/16", "", "eth0"),
            route("", "10.88.0.1", "eth0"),
            route("", "fd00::1", "eth0"),
        ])
        .unwrap();
        assert_eq!(
            routes[0].destination,
            Some(("10.88.0.0".parse().unwrap(), 16))
        );
        assert!(routes[1].is_ipv4() && !routes[2].is_ipv4());
        assert_eq!(
            describe_route(&routes[1]),
            "route default via 10.88.0.1 dev eth0"
        );
        let bad = [
            (route("", "", "eth0"), "a default route needs a gateway"),
            (route("10.0.0.0", "", "eth0"), "address/prefix"),
            (route("10.0.0.0/8", "fd00::1", "eth0"), "one address family"),
            (route("10.0.0.0/8", "", "bad/dev"), "interface name"),
        ];
        for (r, want) in bad {
            let e = parse_routes(&[r]).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        let many = vec![route("", "10.0.0.1", "eth0"); MAX_ROUTES + 1];
        assert!(matches!(
            parse_routes(&many),
            Err(NetworkError::TooMany { count: 257, .. })
        ));
    }

    #[test]
    fn neighbours_are_checked() {
        let mut n = ARPNeighbor::new();
        n.address = "10.88.0.1".into();
        n.hw_addr = vec![2, 0, 0, 0, 0, 1];
        n.device = "eth0".into();
        assert_eq!(
            parse_neighbors(&[n.clone()]).unwrap()[0].mac,
            [2, 0, 0, 0, 0, 1]
        );
        n.address = "gateway".into();
        let e = parse_neighbors(&[n]).unwrap_err().to_string();
        assert_eq!(e, "address \"gateway\" is not an IPv4 or IPv6 address");
    }

    /// Root: a veth pair in a private network namespace stands for the guest's NIC.
    #[test]
    fn a_nic_becomes_the_pods_interface() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root (a private network namespace)");
            return;
        }
        let result = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let net = Network::connect().unwrap();
                net.loopback_up().await.unwrap();
                let device_mac = [0x02, 0x72, 0x75, 0x6e, 0x64, 0];
                net.handle
                    .link()
                    .add(
                        rtnetlink::LinkVeth::new("nic0", "peer0")
                            .address(device_mac.to_vec())
                            .build(),
                    )
                    .execute()
                    .await
                    .unwrap();
                let spec = InterfaceSpec::parse(&iface(1400, &[("10.88.0.5", 16)])).unwrap();
                net.update_interface(&spec).await.unwrap();
                let routes = parse_routes(&[route("", "10.88.0.1", "eth0")]).unwrap();
                net.update_routes(&routes).await.unwrap();
                let mut n = ARPNeighbor::new();
                n.address = "10.88.0.1".into();
                n.hw_addr = vec![2, 0, 0, 0, 0, 1];
                n.device = "eth0".into();
                net.add_neighbors(&parse_neighbors(&[n]).unwrap())
                    .await
                    .unwrap();
                let e = net
                    .update_routes(&parse_routes(&[route("", "10.0.0.1", "eth9")]).unwrap())
                    .await
                    .unwrap_err();
                assert_eq!(e.to_string(), "no interface is named \"eth9\"");
                let mut other = iface(1400, &[]);
                other.device_mac = vec![2, 9, 9, 9, 9, 9];
                let e = net
                    .update_interface(&InterfaceSpec::parse(&other).unwrap())
                    .await
                    .unwrap_err();
                assert_eq!(e.to_string(), "no NIC has the device MAC 02:09:09:09:09:09");
            });
            let ip = |args: &[&str]| {
                let out = std::process::Command::new("ip")
                    .args(args)
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&out.stdout).into_owned()
            };
            (
                ip(&["-o", "link", "show", "eth0"]),
                ip(&["-o", "addr", "show", "eth0"]),
                ip(&["route", "show"]),
                ip(&["neigh", "show", "dev", "eth0"]),
                ip(&["-o", "link", "show", "lo"]),
            )
        })
        .join();
        let (link, addr, routes, neigh, lo) = result.expect("the netns thread");
        assert!(link.contains("mtu 1400"), "{link}");
        assert!(link.contains("link/ether 0a:58:0a:58:00:05"), "{link}");
        assert!(addr.contains("inet 10.88.0.5/16"), "{addr}");
        assert_eq!(addr.matches("inet ").count(), 1, "{addr}");
        assert!(
            routes.contains("default via 10.88.0.1 dev eth0"),
            "{routes}"
        );
        assert!(
            neigh.contains("10.88.0.1 lladdr 02:00:00:00:00:01 PERMANENT"),
            "{neigh}"
        );
        assert!(lo.contains("UP") || lo.contains("UNKNOWN"), "{lo}");
    }
}
