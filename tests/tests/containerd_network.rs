//! Pod networking through containerd, on the node as `rund install` leaves it, with Debian's CNI
//! plugins (a bridge, host-local addresses, loopback) in containerd's CRI plugin:
//! - a rund pod gets the address its CNI gave it (PodSandboxStatus says so); a container in it
//!   serves `busybox httpd`, and the root namespace fetches the page from the pod's address; a
//!   rund pod and a runc pod on the same bridge reach each other both ways; `hostname`,
//!   `/etc/resolv.conf` and `/etc/hosts` inside are the files the CRI plugin wrote for the pod;
//!   two containers of the pod meet on `localhost` and share a hostname;
//! - `ctr run --with-ns network:<path>` joins a namespace made as a CNI plugin makes one; after the
//!   container ends, and after its shim was killed with `kill -9` and containerd deleted the
//!   task, the namespace holds what it held before and nothing of rund's;
//! - bad input: a namespace path that does not exist, a namespace with no interface, one whose
//!   interface rund cannot join: a clear error at `ctr`, nothing left behind.
//!
//! Runs in the testbed (`ci/test`); needs what tests/tests/containerd_ctr.rs needs and
//! `containernetworking-plugins`; `RUND_REQUIRE_E2E_TESTS=1` makes a skip a failure.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_cri::v1::DnsConfig;
use rund_tests::containerd::cni::PodCni;
use rund_tests::containerd::{
    start_for_test, Containerd, Runtime, BUSYBOX_IMAGE, COMMAND_TIMEOUT, CRI_NAMESPACE,
    CTR_NAMESPACE,
};
use rund_tests::cri::{container_config, pod_network_pod_config, CriClient};

/// What serves the page: the pod's hostname at `/`, on port 80.
const WEB: &str = "mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 80 -h /www";

fn start(test: &str) -> Option<Containerd> {
    let cd = start_for_test(test)?;
    if !cd.runtimes().contains(&Runtime::Rund) {
        eprintln!("skipping {test}: rund is not among the runtimes under test");
        return None;
    }
    Some(cd)
}

/// `GET /` from this (the root) namespace, tried until `timeout` (the server starts beside).
fn http_get(addr: SocketAddr, timeout: Duration) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        let got = (|| -> std::io::Result<String> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(b"GET / HTTP/1.0\r\nHost: pod\r\n\r\n")?;
            let mut body = String::new();
            s.read_to_string(&mut body)?;
            Ok(body)
        })();
        match got {
            Ok(body) if body.starts_with("HTTP/1.") => return Ok(body),
            Ok(body) => last = format!("not HTTP: {body:?}"),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(format!("no page from {addr} within {timeout:?}: {last}"))
}

/// A shell script that prints the body of `GET /` from `ip`:80, tried for 30 s. With `nc`: the
/// static busybox's `wget` crashes (glibc's NSS in a static binary, even for a numeric address).
fn http_get_script(ip: &str) -> String {
    format!(
        "for i in $(seq 30); do \
           out=$(printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {ip} 80) && [ -n \"$out\" ] && \
             {{ printf '%s\\n' \"$out\" | tail -n 1; exit 0; }}; sleep 1; \
         done; exit 1"
    )
}

async fn exec_ok(cri: &mut CriClient, test: &str, cid: &str, script: &str) -> String {
    let out = cri
        .exec_sync(cid, &["sh", "-c", script], COMMAND_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{test}: {script}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.exit_code,
        0,
        "{test}: {script}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

struct Pod {
    id: String,
    ip: String,
    /// The container serving [`WEB`], and one beside it.
    web: String,
    side: String,
}

async fn run_pod(cd: &Containerd, cri: &mut CriClient, test: &str, rt: Runtime) -> Pod {
    let name = cd.unique_id("net", rt);
    let log_dir = cd.dir().join(format!("logs-{name}"));
    std::fs::create_dir_all(&log_dir).expect("mkdir");
    let mut pod = pod_network_pod_config(&name, &name, &log_dir, &format!("web-{}", rt.name()));
    pod.dns_config = Some(DnsConfig {
        servers: vec!["10.88.77.53".into()],
        searches: vec!["svc.rund.test".into()],
        options: vec!["ndots:2".into()],
    });
    let id = cri
        .run_pod_sandbox(&pod, rt.name())
        .await
        .unwrap_or_else(|e| panic!("{test}: {rt:?}: {e}\n{}", cd.log_tail(30)));
    let status = cri
        .pod_sandbox_status(&id)
        .await
        .unwrap_or_else(|e| panic!("{test}: {e}"));
    let ip = status.network.map(|n| n.ip).unwrap_or_default();
    assert!(!ip.is_empty(), "{test}: {rt:?}: the pod has no IP");
    let mut containers = Vec::new();
    for (cname, cmd) in [("web", WEB), ("side", "exec sleep 1000")] {
        let c = container_config(
            cname,
            BUSYBOX_IMAGE,
            &["sh", "-c", cmd],
            &format!("{cname}.log"),
        );
        let cid = cri
            .create_container(&id, &c, &pod)
            .await
            .unwrap_or_else(|e| panic!("{test}: {rt:?}: {e}"));
        cri.start_container(&cid)
            .await
            .unwrap_or_else(|e| panic!("{test}: {rt:?}: {e}"));
        containers.push(cid);
    }
    let side = containers.pop().expect("side");
    let web = containers.pop().expect("web");
    Pod { id, ip, web, side }
}

/// The file the CRI plugin wrote for the pod (`<root>/io.containerd.grpc.v1.cri/sandboxes/<id>/`).
fn sandbox_file(cd: &Containerd, pod: &str, name: &str) -> String {
    let path = cd
        .root()
        .join("io.containerd.grpc.v1.cri/sandboxes")
        .join(pod)
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rund_pod_is_on_its_cni_network_as_a_runc_pod_is() {
    let test = "a_rund_pod_is_on_its_cni_network_as_a_runc_pod_is";
    let Some(_cni) = rund_tests::containerd::node::allowed(test)
        .then(|| PodCni::install(test))
        .flatten()
    else {
        return;
    };
    let Some(cd) = start(test) else {
        return;
    };
    let mut cri = CriClient::connect(cd.socket(), Duration::from_secs(120))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let rund = run_pod(&cd, &mut cri, test, Runtime::Rund).await;
    eprintln!("rund pod {} at {}", rund.id, rund.ip);

    // The guest's NIC is the pod's interface: its address, the CNI's routes.
    let ip_out = exec_ok(&mut cri, test, &rund.side, "ip -o -4 addr show; ip route").await;
    assert!(
        ip_out.contains(&format!("inet {}/24", rund.ip)),
        "{test}: {ip_out}"
    );
    assert!(
        ip_out.contains(&format!("default via {} dev eth0", PodCni::GATEWAY)),
        "{test}: {ip_out}"
    );

    // From the root namespace to the pod's address.
    let addr: SocketAddr = format!("{}:80", rund.ip).parse().expect("the pod's IP");
    let page = http_get(addr, Duration::from_secs(60)).unwrap_or_else(|e| panic!("{test}: {e}"));
    assert!(page.ends_with("web-rund\n"), "{test}: {page}");

    // Inside: the pod's hostname, DNS and hosts as the CRI plugin wrote them, in both containers;
    // the two meet on localhost.
    for cid in [&rund.web, &rund.side] {
        let host = exec_ok(&mut cri, test, cid, "hostname").await;
        assert_eq!(host.trim(), "web-rund", "{test}");
        for (file, name) in [
            ("/etc/resolv.conf", "resolv.conf"),
            ("/etc/hosts", "hosts"),
            ("/etc/hostname", "hostname"),
        ] {
            let inside = exec_ok(&mut cri, test, cid, &format!("cat {file}")).await;
            assert_eq!(inside, sandbox_file(&cd, &rund.id, name), "{test}: {file}");
        }
    }
    let resolv = sandbox_file(&cd, &rund.id, "resolv.conf");
    assert!(
        resolv.contains("nameserver 10.88.77.53") && resolv.contains("search svc.rund.test"),
        "{test}: {resolv}"
    );
    let local = exec_ok(&mut cri, test, &rund.side, &http_get_script("127.0.0.1")).await;
    assert_eq!(local, "web-rund\n", "{test}");

    // A runc pod on the same bridge: each reaches the other.
    if cd.runtimes().contains(&Runtime::Runc) {
        let runc = run_pod(&cd, &mut cri, test, Runtime::Runc).await;
        eprintln!("runc pod {} at {}", runc.id, runc.ip);
        let get = |ip: &str| http_get_script(ip);
        let from_rund = exec_ok(&mut cri, test, &rund.side, &get(&runc.ip)).await;
        assert_eq!(from_rund, "web-runc\n", "{test}: rund to runc");
        let from_runc = exec_ok(&mut cri, test, &runc.side, &get(&rund.ip)).await;
        assert_eq!(from_runc, "web-rund\n", "{test}: runc to rund");
        for pod in [&runc.id] {
            cri.stop_pod_sandbox(pod)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            cri.remove_pod_sandbox(pod)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }
    cri.stop_pod_sandbox(&rund.id)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    cri.remove_pod_sandbox(&rund.id)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    cd.wait_until_clean(CRI_NAMESPACE)
        .unwrap_or_else(|e| panic!("{test}: {e}"));
    let links = sh("ip -o link");
    assert!(
        !links.contains("rund-tap"),
        "{test}: a tap in the root namespace: {links}"
    );
}

fn sh(script: &str) -> String {
    let out = Command::new("sh")
        .args(["-ec", script])
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace under /run/netns, made as a CNI plugin makes one (`eth0`, a veth whose
/// peer is in the root namespace), or with `setup` run in it instead; removed on drop.
struct Netns {
    name: String,
    peer: Option<String>,
}

impl Netns {
    const POD_IP: &'static str = "10.66.0.2";

    fn veth(tag: &str) -> Netns {
        let name = format!("rund-{tag}-{}", std::process::id());
        let peer = format!("rv{}", std::process::id() % 100_000);
        sh(&format!(
            "ip netns add {name}
             ip link add eth0 netns {name} type veth peer name {peer}
             ip -n {name} addr add {pod}/24 dev eth0
             ip -n {name} link set eth0 up
             ip -n {name} link set lo up
             ip -n {name} route add default via 10.66.0.1
             ip addr add 10.66.0.1/24 dev {peer}
             ip link set {peer} up",
            pod = Self::POD_IP
        ));
        Netns {
            name,
            peer: Some(peer),
        }
    }

    fn with(tag: &str, setup: &str) -> Netns {
        let name = format!("rund-{tag}-{}", std::process::id());
        sh(&format!("ip netns add {name}"));
        if !setup.is_empty() {
            sh(&format!("ip netns exec {name} sh -ec '{setup}'"));
        }
        Netns { name, peer: None }
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Everything a join could change: links, addresses, routes, neighbours, qdiscs, filters
    /// (not whether IPv6's duplicate address detection is still going on).
    fn state(&self) -> String {
        sh(&format!(
            "ip netns exec {n} sh -c 'ip -o link | sed \"s/ state [A-Z]*//\"; ip -o addr | sed \"s/ tentative//\"; ip route; \
             ip neigh show nud permanent; tc qdisc show; for d in $(ls /sys/class/net); do \
             tc filter show dev $d ingress 2>/dev/null; done; true'",
            n = self.name
        ))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        if let Some(p) = &self.peer {
            let _ = Command::new("ip")
                .args(["link", "del", p])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

fn ctr_run(
    cd: &Containerd,
    id: &str,
    netns: &Path,
    detach: bool,
    cmd: &[&str],
) -> (bool, String, String) {
    let with_ns = format!("network:{}", netns.display());
    let mut args = vec!["run"];
    args.push(if detach { "-d" } else { "--rm" });
    args.extend([
        "--runtime",
        Runtime::Rund.runtime_type(),
        "--with-ns",
        &with_ns,
    ]);
    args.extend([BUSYBOX_IMAGE, id]);
    args.extend(cmd);
    eprintln!("$ ctr {}", args.join(" "));
    let out = cd.ctr(&args).unwrap_or_else(|e| panic!("{e}"));
    (out.success(), out.stdout, out.stderr)
}

#[test]
fn a_named_netns_is_joined_and_left_as_its_cni_made_it() {
    let test = "a_named_netns_is_joined_and_left_as_its_cni_made_it";
    if !rund_tests::containerd::node::allowed(test) {
        return;
    }
    let Some(cd) = start(test) else {
        return;
    };
    let ns = Netns::veth("join");
    let before = ns.state();

    // A container that ends: it saw the namespace's address and route, and the namespace is
    // as it was.
    let id = cd.unique_id("netrm", Runtime::Rund);
    let (ok, out, err) = ctr_run(
        &cd,
        &id,
        &ns.path(),
        false,
        &["sh", "-c", "ip -o -4 addr show eth0; ip route"],
    );
    assert!(ok, "{test}: {out}{err}\n{}", cd.log_tail(30));
    assert!(
        out.contains(&format!("inet {}/24", Netns::POD_IP)),
        "{test}: {out}"
    );
    assert!(
        out.contains("default via 10.66.0.1 dev eth0"),
        "{test}: {out}"
    );
    cd.wait_until_clean(CTR_NAMESPACE)
        .unwrap_or_else(|e| panic!("{test}: {e}"));
    assert_eq!(ns.state(), before, "{test}: after the container ended");

    // A server, reached from the root namespace; then its shim is killed.
    let id = cd.unique_id("netkill", Runtime::Rund);
    let (ok, out, err) = ctr_run(&cd, &id, &ns.path(), true, &["sh", "-c", WEB]);
    assert!(ok, "{test}: {out}{err}");
    let addr: SocketAddr = format!("{}:80", Netns::POD_IP).parse().unwrap();
    let page = http_get(addr, Duration::from_secs(60)).unwrap_or_else(|e| panic!("{test}: {e}"));
    assert!(
        page.contains("HTTP/1.") && page.lines().count() > 1,
        "{test}: {page}"
    );
    let during = ns.state();
    assert!(
        during.contains("rund-tap0") && during.contains("ingress"),
        "{test}: {during}"
    );
    cd.kill_shim(CTR_NAMESPACE, &id)
        .unwrap_or_else(|e| panic!("{test}: {e}"));
    cd.ctr_ok(&["container", "delete", &id]).unwrap();
    cd.wait_until_clean(CTR_NAMESPACE)
        .unwrap_or_else(|e| panic!("{test}: {e}"));
    assert_eq!(ns.state(), before, "{test}: after kill -9 and delete");
}

#[test]
fn a_netns_rund_cannot_join_is_refused_by_name() {
    let test = "a_netns_rund_cannot_join_is_refused_by_name";
    if !rund_tests::containerd::node::allowed(test) {
        return;
    }
    let Some(cd) = start(test) else {
        return;
    };
    let missing = PathBuf::from("/run/netns/rund-no-such-netns");
    let empty = Netns::with("empty", "");
    let tun = Netns::with("tun", "ip tuntap add tun7 mode tun");
    let cases: [(&str, &Path, Vec<String>); 3] = [
        ("nsmissing", &missing, vec![missing.display().to_string()]),
        (
            "nsempty",
            &empty.path(),
            vec!["has no interface but lo".into()],
        ),
        (
            "nstun",
            &tun.path(),
            vec!["interface tun7".into(), "\"tun\"".into()],
        ),
    ];
    for (scenario, path, wants) in cases {
        let before = Path::new(path).exists().then(|| {
            sh(&format!(
                "ip netns exec $(basename {}) ip -o link",
                path.display()
            ))
        });
        let id = cd.unique_id(scenario, Runtime::Rund);
        let (ok, out, err) = ctr_run(&cd, &id, path, false, &["true"]);
        assert!(!ok, "{test}: {scenario}: started: {out}");
        for want in &wants {
            assert!(err.contains(want.as_str()), "{test}: {scenario}: {err}");
        }
        let _ = cd.ctr(&["container", "delete", &id]);
        cd.wait_until_clean(CTR_NAMESPACE)
            .unwrap_or_else(|e| panic!("{test}: {scenario}: {e}"));
        if let Some(before) = before {
            let after = sh(&format!(
                "ip netns exec $(basename {}) ip -o link",
                path.display()
            ));
            assert_eq!(after, before, "{test}: {scenario}: the namespace changed");
        }
    }
}
