//! Network attacks, run for real as root inside real sandboxes and real
//! qemu microVMs on a real bridge with real nftables tables, each beside
//! the legitimate path that must still work: an `egress` VM reaches the
//! internet, DNS and its allowed host ports (a real `git clone` from a
//! `git daemon` on the host's loopback) and nothing else of the host, of
//! other VMs or of private ranges; a `none` VM reaches nothing.
//!
//! **Requirements:** root on Linux with bridges, veths, taps and nftables
//! (`nft`, iproute2's `ip`, `nsenter`), `git`, `socat`, PostgreSQL on
//! 127.0.0.1:5432 (the host service attacked besides a listener of the
//! test's own), outbound TCP to the package mirror named in the host's apt
//! sources, and for the qemu half `qemu-system-x86_64` and the test image
//! `tests/qemu.rs` bakes.
//!
//! **Isolation:** each test makes a bridge, a pair of nftables tables and
//! a /24 subnet of its own (`hn<8 hex digits>`, never a server's
//! `hearth0`), and a [`Lab`] guard destroys its VMs and removes the
//! bridge, the tables, the leases and its folders when dropped.

mod support;

use hearth_core::ids::{TenantId, VmId};
use hearth_drivers::net::{Net, NetConfig};
use hearth_drivers::qemu::{Accel, QemuConfig, QemuDriver};
use hearth_drivers::sandbox::{SandboxConfig, SandboxDriver};
use hearth_drivers::{Driver, ExecRequest, ImageSpec, NetworkSpec, Stream, VmSpec};
use hearth_image::{BakeOptions, BakedImage, FileDigest, Manifest};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use std::{fs, io};
use support::*;
use tokio::sync::mpsc;

/// How long a qemu VM may take from `create` to a healthy agent (TCG on a
/// loaded two-core machine is slow).
const QEMU_HEALTH_TIMEOUT: Duration = Duration::from_secs(120);

/// The qemu test image (the one `tests/qemu.rs` bakes and keeps, or a
/// fresh bake of it).
fn qemu_image() -> ImageSpec {
    static IMAGE: OnceLock<BakedImage> = OnceLock::new();
    let image = IMAGE.get_or_init(|| {
        assert!(
            Command::new("qemu-system-x86_64")
                .arg("--version")
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
            "the qemu attacks need qemu-system-x86_64 (apt-get install qemu-system-x86 qemu-utils)"
        );
        let agent = agent_binary();
        let images = target_tmp().join("hearth-qemu-images");
        let agent_sha = FileDigest::of_bytes(&fs::read(&agent).unwrap()).sha256;
        if let Ok(Some(latest)) = BakedImage::latest(&images, "test-minimal")
            && Manifest::read(&latest.dir).is_ok_and(|m| {
                m.inputs.get("agent").is_some_and(|a| a.sha256 == agent_sha)
                    && hearth_image::kernel::GUEST_MODULES
                        .iter()
                        .all(|wanted| m.modules.iter().any(|have| have == wanted))
            })
        {
            return latest;
        }
        let opts = BakeOptions::new(
            &images,
            "test-minimal",
            &agent,
            target_tmp().join("hearth-image-cache"),
        );
        hearth_image::bake(&opts, |m| eprintln!("bake: {m}")).expect("bake the test image")
    });
    ImageSpec {
        root_dir: None,
        kernel: Some(image.kernel.clone()),
        initrd: Some(image.initrd.clone()),
        disk: image.disk.clone(),
        ..Default::default()
    }
}

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the network attacks need root (bridges, namespaces, nftables)"
    );
}

fn ip_lines(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A /24 no interface or route of the host uses.
fn free_subnet(tag: u32) -> String {
    let routes = ip_lines(&["-4", "route", "show", "table", "all"]);
    (0..200u32)
        .map(|i| {
            let n = (tag.wrapping_add(i * 7919)) % (50 * 256);
            format!("10.{}.{}.0/24", 200 + n / 256, n % 256)
        })
        .find(|net| !routes.contains(net.trim_end_matches(".0/24")))
        .expect("a free /24 under 10.200.0.0/13")
}

/// The host's main IPv4 address (the interface of its default route).
fn host_address() -> Ipv4Addr {
    let route = ip_lines(&["-4", "route", "get", "1.1.1.1"]);
    let src = route
        .split_whitespace()
        .skip_while(|w| *w != "src")
        .nth(1)
        .expect("the host has a default route with a source address");
    src.parse().unwrap()
}

/// The package mirror of the host's apt sources: an internet host this
/// machine reaches on port 80 (read at run time, never written here).
fn mirror_host() -> String {
    let mut text = String::new();
    for dir in ["/etc/apt/sources.list.d", "/etc/apt"] {
        for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_file() {
                text.push_str(&fs::read_to_string(path).unwrap_or_default());
            }
        }
    }
    text.lines()
        .map(str::trim)
        .filter(|l| l.starts_with("URIs:") || l.starts_with("deb "))
        .flat_map(str::split_whitespace)
        .find_map(|w| w.strip_prefix("http://"))
        .and_then(|rest| rest.split('/').next())
        .map(str::to_owned)
        .expect("an http:// mirror in the host's apt sources")
}

/// A listener of the test's own on the host; `accepted()` says whether a
/// connection ever arrived.
struct HostListener {
    listener: TcpListener,
    port: u16,
}

impl HostListener {
    fn bind(address: &str) -> Self {
        let listener = TcpListener::bind((address, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        HostListener { listener, port }
    }

    fn accepted(&self) -> bool {
        match self.listener.accept() {
            Ok(_) => true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// A real `git daemon` on the host's loopback serving one repository.
struct GitDaemon {
    root: tempfile::TempDir,
    port: u16,
    daemon: Child,
}

impl GitDaemon {
    fn start() -> Self {
        let root = tempfile::tempdir().unwrap();
        let repo = root.path().join("repo");
        fs::create_dir_all(&repo).unwrap();
        let git = |args: &[&str]| {
            let out = Command::new("git")
                .args([
                    "-c",
                    "user.name=hearth",
                    "-c",
                    "user.email=hearth@localhost",
                ])
                .args(["-c", "init.defaultBranch=main"])
                .args(args)
                .current_dir(&repo)
                .output()
                .unwrap();
            assert!(out.status.success(), "git {args:?}: {out:?}");
        };
        git(&["init", "-q"]);
        fs::write(repo.join("README"), "cloned through the gateway\n").unwrap();
        git(&["add", "-A"]);
        git(&["commit", "-q", "-m", "first"]);
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let daemon = Command::new("git")
            .args([
                "daemon",
                "--reuseaddr",
                "--export-all",
                "--listen=127.0.0.1",
            ])
            .arg(format!("--port={port}"))
            .arg(format!("--base-path={}", root.path().display()))
            .arg(root.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("git daemon starts");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "git daemon never listened");
            std::thread::sleep(Duration::from_millis(10));
        }
        GitDaemon { root, port, daemon }
    }
}

impl Drop for GitDaemon {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(self.daemon.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.daemon.wait();
        let _ = &self.root;
    }
}

/// A test's own bridge, tables and subnet, with the drivers on it.
struct Lab {
    net: Arc<Net>,
    sandbox: SandboxDriver,
    qemu: QemuDriver,
    base: PathBuf,
}

impl Lab {
    fn new() -> Self {
        require_root();
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let base = Path::new("/var/tmp/hearth-tests").join(format!("hn-{}", &tag[..10]));
        fs::create_dir_all(&base).unwrap();
        let subnet = free_subnet(u32::from_str_radix(&tag[..6], 16).unwrap());
        let net = Arc::new(
            Net::new(NetConfig {
                bridge: format!("hn{}", &tag[..8]),
                subnet: hearth_drivers::net::parse_subnet(&subnet).unwrap(),
                lease_dir: base.join("leases"),
            })
            .unwrap(),
        );
        let mut sandbox = SandboxConfig::new(base.join("sandboxes"), agent_binary());
        sandbox.cgroup_root_name = format!("hearth-test-{tag}");
        sandbox.net = Some(net.clone());
        // The host's root as the sandboxes' image (a weaker setting, chosen
        // here explicitly): the attacks need socat, ip, getent and git.
        sandbox.default_root = Some("/".into());
        let mut qemu = QemuConfig::new(base.join("qemu"));
        qemu.net = Some(net.clone());
        qemu.accel = match std::env::var("HEARTH_TEST_ACCEL").as_deref() {
            Ok("kvm") => Accel::Kvm,
            Ok("tcg") => Accel::Tcg,
            _ => Accel::Auto,
        };
        Lab {
            net,
            sandbox: SandboxDriver::new(sandbox),
            qemu: QemuDriver::new(qemu),
            base,
        }
    }

    fn spec(&self, network: NetworkSpec, image: ImageSpec) -> VmSpec {
        VmSpec {
            id: VmId::new(),
            tenant: TenantId::new(),
            workspace: "web".into(),
            cpus: 1,
            memory_mib: 256,
            image,
            network,
            disk_mib: 0,
        }
    }

    async fn sandbox(&self, network: NetworkSpec) -> VmId {
        let spec = self.spec(network, ImageSpec::default());
        self.sandbox.create(&spec).await.expect("create a sandbox");
        wait_healthy(&self.sandbox, spec.id, Duration::from_secs(10)).await;
        spec.id
    }

    async fn qemu_vm(&self, network: NetworkSpec) -> VmId {
        let spec = self.spec(network, qemu_image());
        self.qemu.create(&spec).await.expect("create a qemu VM");
        wait_healthy(&self.qemu, spec.id, QEMU_HEALTH_TIMEOUT).await;
        spec.id
    }

    fn address(&self, id: VmId) -> Ipv4Addr {
        self.net
            .address_of(id)
            .unwrap()
            .expect("the VM has a lease")
    }

    fn bridge(&self) -> &str {
        &self.net.config().bridge
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let sandbox = self.sandbox.clone();
        let qemu = self.qemu.clone();
        let net = self.net.clone();
        let base = self.base.clone();
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                for driver in [&sandbox as &dyn Driver, &qemu as &dyn Driver] {
                    for vm in driver.list().await.unwrap_or_default() {
                        if let Err(e) = driver.destroy(vm.id).await {
                            eprintln!("cleanup: destroy {}: {e}", vm.id);
                        }
                    }
                }
            });
            for root in sandbox.cgroup_roots() {
                let _ = fs::remove_dir(root);
            }
            if let Err(e) = net.teardown() {
                eprintln!("cleanup: the test network: {e}");
            }
            let _ = fs::remove_dir_all(base);
        });
        let _ = cleanup.join();
    }
}

async fn wait_healthy(driver: &dyn Driver, id: VmId, limit: Duration) {
    let started = Instant::now();
    loop {
        match driver.health(id).await {
            Ok(_) => return,
            Err(e) if started.elapsed() > limit => panic!("VM {id} never became healthy: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// Runs `command` as root in the VM; (exit code, stdout, stderr).
async fn run(driver: &dyn Driver, id: VmId, command: &str) -> (i32, String, String) {
    let mut request = ExecRequest::new(command);
    // Generous: apt-get under TCG on a loaded machine is slow; attacks
    // bound themselves with `timeout`.
    request.timeout = Duration::from_secs(900);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let result = driver
        .exec(id, &request, Some(tx))
        .await
        .unwrap_or_else(|e| panic!("exec {command:?}: {e}"));
    let (mut out, mut err) = (String::new(), String::new());
    while let Some(chunk) = rx.recv().await {
        match chunk.stream {
            Stream::Stdout => out.push_str(&chunk.data),
            Stream::Stderr => err.push_str(&chunk.data),
        }
    }
    (result.exit_code, out, err)
}

/// Whether a TCP connection from the sandbox to `host:port` opens (bash's
/// `/dev/tcp`, bounded by `timeout`, for refusals that are silent drops).
async fn sandbox_connects(lab: &Lab, id: VmId, host: &str, port: u16) -> bool {
    let (code, out, err) = run(
        &lab.sandbox,
        id,
        &format!(
            "timeout 5 bash -c 'exec 3<>/dev/tcp/{host}/{port}' && echo reached || echo refused"
        ),
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    match out.trim() {
        "reached" => true,
        "refused" => false,
        other => panic!("unexpected answer {other:?} ({err})"),
    }
}

/// The same from a qemu guest (busybox `nc`).
async fn guest_connects(lab: &Lab, id: VmId, host: &str, port: u16) -> bool {
    let (code, out, err) = run(
        &lab.qemu,
        id,
        &format!("if timeout 5 nc {host} {port} </dev/null >/dev/null 2>&1; then echo reached; else echo refused; fi"),
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    match out.trim() {
        "reached" => true,
        "refused" => false,
        other => panic!("unexpected answer {other:?} ({err})"),
    }
}

/// Every address through which a VM might hope to reach the host.
fn host_addresses(lab: &Lab) -> Vec<String> {
    vec![
        lab.net.gateway().to_string(),
        host_address().to_string(),
        "10.0.2.2".into(),
        "127.0.0.1".into(),
        // The subnet's broadcast address, answered by the bridge if anything.
        lab.net.config().subnet.broadcast().to_string(),
    ]
}

#[tokio::test]
async fn egress_sandboxes_reach_the_internet_dns_and_allowed_ports_and_nothing_of_the_host() {
    let lab = Lab::new();
    let git = GitDaemon::start();
    // A service of the host that no VM may reach, on every host address.
    let api = HostListener::bind("0.0.0.0");
    let loopback_only = HostListener::bind("127.0.0.1");

    let started = Instant::now();
    let id = lab.sandbox(NetworkSpec::egress(vec![git.port])).await;
    eprintln!(
        "egress sandbox boot + attach + first health: {:?}",
        started.elapsed()
    );
    let gateway = lab.net.gateway().to_string();

    // Legitimate: a real git clone from the host's loopback, through the
    // gateway, of the one allowed port.
    let (code, out, err) = run(
        &lab.sandbox,
        id,
        &format!(
            "git clone -q git://{gateway}:{}/repo /home/repo && cat /home/repo/README",
            git.port
        ),
    )
    .await;
    assert_eq!(
        (code, out.as_str()),
        (0, "cloned through the gateway\n"),
        "{err}"
    );
    // Legitimate: DNS resolves and TCP to an internet host on 80 opens
    // and speaks HTTP.
    let mirror = mirror_host();
    let (code, out, err) = run(&lab.sandbox, id, &format!("getent ahostsv4 {mirror}")).await;
    assert_eq!(code, 0, "DNS inside an egress sandbox: {out}{err}");
    let (code, out, err) = run(
        &lab.sandbox,
        id,
        &format!(
            "timeout 20 bash -c 'exec 3<>/dev/tcp/{mirror}/80; printf \"HEAD / HTTP/1.0\\r\\nHost: {mirror}\\r\\n\\r\\n\" >&3; head -n 1 <&3'"
        ),
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("HTTP/1."), "{out:?}");

    // Attacks: the host's services through every address that might reach
    // the host — the API-like listener, PostgreSQL, a loopback-only
    // listener, and the allowed port through anything but the gateway.
    for host in host_addresses(&lab) {
        for (what, port) in [
            ("a host service", api.port),
            ("PostgreSQL", 5432),
            ("a loopback-only service", loopback_only.port),
        ] {
            assert!(
                !sandbox_connects(&lab, id, &host, port).await,
                "the sandbox reached {what} at {host}:{port}"
            );
        }
        if host != gateway {
            assert!(
                !sandbox_connects(&lab, id, &host, git.port).await,
                "the sandbox reached the allowed port at {host}, not the gateway"
            );
        }
    }
    // The cloud metadata address, a private range (the host's resolver
    // network on other ports), and a host port not allowed.
    assert!(!sandbox_connects(&lab, id, "169.254.169.254", 80).await);
    assert!(!sandbox_connects(&lab, id, "10.255.255.53", 80).await);
    assert!(!sandbox_connects(&lab, id, &gateway, git.port + 1).await);
    assert!(
        !api.accepted(),
        "a host listener got a connection from the sandbox"
    );
    assert!(!loopback_only.accepted());

    // IPv6 is no way around: root turns it on, takes an address and a
    // route, and tries the host's global and link-local addresses.
    let host_v6: Vec<String> = ip_lines(&["-6", "-o", "addr", "show"])
        .lines()
        .filter(|l| !l.contains(" lo "))
        .filter_map(|l| {
            l.split_whitespace()
                .nth(3)
                .map(|a| a.split('/').next().unwrap().to_owned())
        })
        .collect();
    let api6 = TcpListener::bind("[::]:0").unwrap();
    api6.set_nonblocking(true).unwrap();
    let port6 = api6.local_addr().unwrap().port();
    let mut tries = String::from(
        "echo 0 > /proc/sys/net/ipv6/conf/eth0/disable_ipv6; ip -6 addr add fd77::5/64 dev eth0; \
         ip -6 route add default dev eth0 2>/dev/null; ",
    );
    for addr in host_v6
        .iter()
        .chain([&"fe80::1".to_owned(), &"ff02::1".to_owned()])
    {
        let target = if addr.starts_with("fe80") || addr.starts_with("ff02") {
            format!("[{addr}%eth0]")
        } else {
            format!("[{addr}]")
        };
        tries.push_str(&format!(
            "timeout 4 socat -T2 - TCP6:{target}:{port6},connect-timeout=2 </dev/null >/dev/null 2>&1 && echo reached {addr}; "
        ));
    }
    tries.push_str("echo done");
    let (_, out, err) = run(&lab.sandbox, id, &tries).await;
    assert_eq!(out, "done\n", "IPv6 reached the host: {out}{err}");
    assert!(api6.accept().is_err(), "an IPv6 listener got a connection");
}

#[tokio::test]
async fn sandboxes_cannot_reach_or_impersonate_each_other() {
    let lab = Lab::new();
    let git = GitDaemon::start();
    // b may reach the git daemon; a may not, and tries to pass for b.
    let a = lab.sandbox(NetworkSpec::egress(vec![])).await;
    let b = lab.sandbox(NetworkSpec::egress(vec![git.port])).await;
    let (addr_a, addr_b) = (lab.address(a), lab.address(b));
    assert_ne!(addr_a, addr_b);
    let gateway = lab.net.gateway().to_string();

    // b serves a port on its own address; it answers b itself (legit).
    run(
        &lab.sandbox,
        b,
        "setsid socat TCP-LISTEN:8080,fork,reuseaddr SYSTEM:'echo from-b' </dev/null >/dev/null 2>&1 &",
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sandbox_connects(&lab, b, &addr_b.to_string(), 8080).await {
        assert!(
            Instant::now() < deadline,
            "b's own listener never answered b"
        );
    }
    // Attack: a connects to its neighbour.
    assert!(
        !sandbox_connects(&lab, a, &addr_b.to_string(), 8080).await,
        "a reached its neighbour b"
    );
    // Legit: b reaches its allowed port; a does not.
    assert!(sandbox_connects(&lab, b, &gateway, git.port).await);
    assert!(!sandbox_connects(&lab, a, &gateway, git.port).await);

    // Attack: a takes b's address (its ARP then claims b's address) and tries
    // b's allowed port and b's own listener from there. Root in a sandbox
    // has no CAP_NET_ADMIN over its network namespace (it belongs to the
    // host's user namespace), so `ip` is refused at least in part; whatever
    // it managed, the bridge's filter (also tested with qemu guests, which
    // can change their NIC) keeps it from gaining anything.
    let prefix = lab.net.config().subnet.prefix_len();
    let (code, out, err) = run(
        &lab.sandbox,
        a,
        &format!(
            "ip addr flush dev eth0 && ip addr add {addr_b}/{prefix} dev eth0 && \
             ip route add default via {gateway} && ip neigh flush all; echo spoofed"
        ),
    )
    .await;
    assert!(
        err.contains("Operation not permitted"),
        "root in a sandbox reconfigured its network freely: {code} {out:?} {err:?}"
    );
    assert!(
        !sandbox_connects(&lab, a, &gateway, git.port).await,
        "a reached b's allowed port with b's address"
    );
    // …and b's MAC too, to draw the bridge's frames for b to itself.
    let o = addr_b.octets();
    let mac_b = format!("52:54:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3]);
    let (_, mac_now, _) = run(&lab.sandbox, b, "cat /sys/class/net/eth0/address").await;
    assert_eq!(mac_now.trim(), mac_b, "b's MAC is the one its port admits");
    let (code, _, err) = run(
        &lab.sandbox,
        a,
        &format!(
            "ip link set dev eth0 down && ip link set dev eth0 address {mac_b} && ip link set dev eth0 up && \
             ip route replace default via {gateway}"
        ),
    )
    .await;
    assert!(
        err.contains("Operation not permitted"),
        "root in a sandbox changed its MAC freely: {code} {err:?}"
    );
    assert!(
        !sandbox_connects(&lab, a, &gateway, git.port).await,
        "a reached b's allowed port with b's address and MAC"
    );
    // b is unharmed: it still reaches its allowed port and the gateway.
    assert!(
        sandbox_connects(&lab, b, &gateway, git.port).await,
        "b lost its network to a's impersonation"
    );
}

#[tokio::test]
async fn a_none_sandbox_reaches_nothing_and_a_host_sandbox_is_the_operators_choice() {
    let lab = Lab::new();
    let api = HostListener::bind("0.0.0.0");
    let id = lab.sandbox(NetworkSpec::none()).await;
    let (_, out, _) = run(&lab.sandbox, id, "ip -o link show | grep -v ' lo:' | wc -l").await;
    assert_eq!(
        out.trim(),
        "0",
        "a none sandbox has an interface besides lo"
    );
    for host in host_addresses(&lab)
        .into_iter()
        .chain(["169.254.169.254".to_owned(), "10.255.255.53".to_owned()])
    {
        assert!(!sandbox_connects(&lab, id, &host, api.port).await, "{host}");
        assert!(!sandbox_connects(&lab, id, &host, 5432).await, "{host}");
    }
    assert!(!sandbox_connects(&lab, id, &mirror_host(), 80).await);
    assert!(!api.accepted());
    assert_eq!(
        lab.net.address_of(id).unwrap(),
        None,
        "a none sandbox holds no lease"
    );

    // `host` (only an operator may write it) shares the host's network.
    let host = lab.sandbox(NetworkSpec::host()).await;
    assert!(sandbox_connects(&lab, host, "127.0.0.1", api.port).await);
}

#[tokio::test]
async fn destroy_removes_the_port_elements_and_lease_and_attach_is_measured() {
    let lab = Lab::new();
    // Measure: none (no attach) against egress (veth + addresses + rules).
    let mut none_ms = Vec::new();
    let mut egress_ms = Vec::new();
    let mut ids = Vec::new();
    for round in 0..6 {
        for egress in [false, true] {
            let network = if egress {
                NetworkSpec::egress(vec![9418])
            } else {
                NetworkSpec::none()
            };
            let spec = lab.spec(network, ImageSpec::default());
            let started = Instant::now();
            lab.sandbox.create(&spec).await.unwrap();
            let took = started.elapsed().as_secs_f64() * 1000.0;
            // The first round warms the tables and caches.
            if round > 0 {
                if egress {
                    egress_ms.push(took)
                } else {
                    none_ms.push(took)
                }
            }
            ids.push((spec.id, egress));
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let (none, egress) = (median(&mut none_ms), median(&mut egress_ms));
    eprintln!(
        "sandbox create, median of 5: none {none:.1} ms, egress {egress:.1} ms (attach {:.1} ms)",
        egress - none
    );
    // A figure for the report, not an assertion: timings on a shared
    // machine say nothing about correctness.

    let bridge = lab.bridge().to_owned();
    let ruleset = |family: &str| {
        let out = Command::new("nft")
            .args(["list", "table", family, &bridge])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for (id, egress) in ids {
        let address = lab.net.address_of(id).unwrap();
        assert_eq!(address.is_some(), egress);
        let port = format!("hv{}", hearth_drivers::sandbox::short_id(id));
        if let Some(address) = address {
            assert!(Path::new("/sys/class/net").join(&port).exists());
            assert!(ruleset("bridge").contains(&format!("\"{port}\" . {address}")));
            assert!(ruleset("inet").contains(&format!("{address} . 9418")));
        }
        lab.sandbox.destroy(id).await.unwrap();
        lab.sandbox.destroy(id).await.unwrap();
        assert_eq!(
            lab.net.address_of(id).unwrap(),
            None,
            "the lease of {id} remains"
        );
        assert!(
            !Path::new("/sys/class/net").join(&port).exists(),
            "{port} remains"
        );
        if let Some(address) = address {
            assert!(
                !ruleset("bridge").contains(&address.to_string()),
                "{address} remains in the bridge table"
            );
            assert!(
                !ruleset("inet").contains(&format!("{address} . ")),
                "{address} remains in the inet table"
            );
        }
    }
}

#[tokio::test]
async fn a_restarted_driver_keeps_leases_and_rules_of_its_vms() {
    let lab = Lab::new();
    let git = GitDaemon::start();
    let id = lab.sandbox(NetworkSpec::egress(vec![git.port])).await;
    let address = lab.address(id);
    // A restarted server: a new network handle and driver on the same state.
    let net = Arc::new(Net::new(lab.net.config().clone()).unwrap());
    net.ensure().unwrap();
    let mut config = lab.sandbox.config().clone();
    config.net = Some(net.clone());
    let restarted = SandboxDriver::new(config);
    assert_eq!(net.address_of(id).unwrap(), Some(address));
    let other = lab.spec(NetworkSpec::egress(vec![]), ImageSpec::default());
    restarted.create(&other).await.unwrap();
    assert_ne!(
        net.address_of(other.id).unwrap(),
        Some(address),
        "an address was leased twice"
    );
    // The adopted VM still reaches its allowed port after the rules were
    // written again.
    assert!(sandbox_connects(&lab, id, &lab.net.gateway().to_string(), git.port).await);
    restarted.destroy(other.id).await.unwrap();
}

#[tokio::test]
async fn qemu_guests_reach_the_internet_and_allowed_ports_and_nothing_of_the_host() {
    let lab = Lab::new();
    let git = GitDaemon::start();
    let api = HostListener::bind("0.0.0.0");
    let loopback_only = HostListener::bind("127.0.0.1");
    let (a, b) = tokio::join!(
        lab.qemu_vm(NetworkSpec::egress(vec![git.port])),
        lab.qemu_vm(NetworkSpec::egress(vec![]))
    );
    let gateway = lab.net.gateway().to_string();

    // Legitimate: the git daemon on the host's loopback answers a real
    // upload-pack request through the gateway (the image has no git).
    // A pkt-line: four hex digits of length, then the request; the pipe
    // stays open until the daemon has answered and hung up.
    let request = "git-upload-pack /repo\\0host=localhost\\0";
    let (code, out, err) = run(
        &lab.qemu,
        a,
        &format!(
            "(printf '{:04x}{request}'; sleep 5) | timeout 10 nc {gateway} {} | head -c 300",
            4 + "git-upload-pack /repo".len() + 1 + "host=localhost".len() + 1,
            git.port
        ),
    )
    .await;
    if !out.contains("refs/heads/main") {
        let (_, dbg, e) = run(&lab.qemu, a, &format!("ip addr; ip route; cat /etc/resolv.conf; timeout 5 nc -z {gateway} {} && echo connects", git.port)).await;
        eprintln!("{dbg}{e}");
    }
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("refs/heads/main"),
        "no ref advertisement: {out:?}"
    );
    // Legitimate: DNS through the gateway and TCP to the internet on 80.
    let mirror = mirror_host();
    let (code, out, err) = run(
        &lab.qemu,
        a,
        &format!("nslookup {mirror} || getent hosts {mirror}"),
    )
    .await;
    assert_eq!(code, 0, "DNS inside a qemu guest: {out}{err}");
    // The internet is outside this machine: a slow answer is retried (a
    // refusal by the filter would be the same every time).
    let mut answer = (0, String::new(), String::new());
    for _ in 0..3 {
        answer = run(
            &lab.qemu,
            a,
            &format!("printf 'HEAD / HTTP/1.0\\r\\nHost: {mirror}\\r\\n\\r\\n' | timeout 20 nc {mirror} 80 | head -n 1"),
        )
        .await;
        if answer.1.starts_with("HTTP/1.") {
            break;
        }
    }
    let (code, out, err) = answer;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("HTTP/1."), "{out:?}");

    // Attacks: every address that might reach the host, 10.0.2.2 (user
    // networking's host alias) above all.
    for host in host_addresses(&lab) {
        for (what, port) in [
            ("a host service", api.port),
            ("PostgreSQL", 5432),
            ("a loopback-only service", loopback_only.port),
        ] {
            assert!(
                !guest_connects(&lab, a, &host, port).await,
                "the guest reached {what} at {host}:{port}"
            );
        }
    }
    assert!(!guest_connects(&lab, a, "10.0.2.2", git.port).await);
    assert!(!guest_connects(&lab, a, "169.254.169.254", 80).await);
    assert!(!guest_connects(&lab, a, &gateway, git.port + 1).await);
    // The neighbour, and b's lack of a's allowed port.
    let (_, _, _) = run(
        &lab.qemu,
        b,
        "(nc -lk -p 8080 -e echo from-b </dev/null >/dev/null 2>&1 &) ; true",
    )
    .await;
    assert!(
        !guest_connects(&lab, a, &lab.address(b).to_string(), 8080).await,
        "a reached b"
    );
    assert!(
        !guest_connects(&lab, b, &gateway, git.port).await,
        "b reached a's allowed port"
    );
    // Impersonation: b takes a's address and tries a's allowed port.
    let prefix = lab.net.config().subnet.prefix_len();
    let (code, out, err) = run(
        &lab.qemu,
        b,
        &format!(
            "ip addr flush dev eth1 && ip addr add {}/{prefix} dev eth1 && ip route add default via {gateway} dev eth1; echo spoofed",
            lab.address(a)
        ),
    )
    .await;
    assert_eq!((code, out.trim()), (0, "spoofed"), "{err}");
    assert!(
        !guest_connects(&lab, b, &gateway, git.port).await,
        "b reached a's port with a's address"
    );
    assert!(
        guest_connects(&lab, a, &gateway, git.port).await,
        "a lost its allowed port"
    );
    assert!(
        !api.accepted() && !loopback_only.accepted(),
        "a host listener got a connection"
    );

    // The secret is on no command line.
    let secret = fs::read_to_string(lab.qemu.vm_dir(a).join("secret")).unwrap();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = fs::read(entry.path().join("cmdline")) {
            assert!(!String::from_utf8_lossy(&cmdline).contains(secret.trim()));
        }
    }

    // Destroy removes the taps and the leases.
    for id in [a, b] {
        let port = format!("ht{}", hearth_drivers::sandbox::short_id(id));
        assert!(Path::new("/sys/class/net").join(&port).exists());
        lab.qemu.destroy(id).await.unwrap();
        assert!(
            !Path::new("/sys/class/net").join(&port).exists(),
            "{port} remains"
        );
        assert_eq!(lab.net.address_of(id).unwrap(), None);
    }
}

#[tokio::test]
async fn a_none_qemu_guest_reaches_nothing_and_host_is_refused() {
    let lab = Lab::new();
    let api = HostListener::bind("0.0.0.0");
    let id = lab.qemu_vm(NetworkSpec::none()).await;
    for host in host_addresses(&lab)
        .into_iter()
        .chain(["169.254.169.254".to_owned()])
    {
        assert!(!guest_connects(&lab, id, &host, api.port).await, "{host}");
        assert!(!guest_connects(&lab, id, &host, 5432).await, "{host}");
    }
    // Not even DNS through user networking's resolver (a tunnel out).
    let (_, out, _) = run(
        &lab.qemu,
        id,
        &format!(
            "timeout 10 nslookup {} 10.0.2.3 >/dev/null 2>&1 && echo resolved || echo refused",
            mirror_host()
        ),
    )
    .await;
    assert_eq!(
        out.trim(),
        "refused",
        "a none guest resolved a name through 10.0.2.3"
    );
    assert!(!api.accepted());
    assert_eq!(lab.net.address_of(id).unwrap(), None);

    let spec = lab.spec(NetworkSpec::host(), qemu_image());
    let err = lab.qemu.create(&spec).await.unwrap_err().to_string();
    assert!(
        err.contains("network: host is not available for qemu VMs"),
        "{err}"
    );
    assert!(
        lab.qemu
            .list()
            .await
            .unwrap()
            .iter()
            .all(|vm| vm.id != spec.id)
    );
}

/// A Debian root image (debootstrap minbase, iproute2 and procps) for the
/// apt-get test, baked once and reused while the agent is unchanged.
fn debian_image() -> ImageSpec {
    static IMAGE: OnceLock<BakedImage> = OnceLock::new();
    let image = IMAGE.get_or_init(|| {
        qemu_image();
        let agent = agent_binary();
        let images = target_tmp().join("hearth-qemu-images");
        let agent_sha = FileDigest::of_bytes(&fs::read(&agent).unwrap()).sha256;
        if let Ok(Some(latest)) = BakedImage::latest(&images, "test-debian-net")
            && Manifest::read(&latest.dir)
                .is_ok_and(|m| m.inputs.get("agent").is_some_and(|a| a.sha256 == agent_sha))
        {
            return latest;
        }
        let mut opts = BakeOptions::new(
            &images,
            "test-debian-net",
            &agent,
            target_tmp().join("hearth-image-cache"),
        );
        opts.rootfs = hearth_image::RootfsKind::Debian;
        opts.debian_packages = vec!["iproute2".into(), "procps".into()];
        opts.disk_free_mib = 512;
        let baked = hearth_image::bake(&opts, |m| eprintln!("bake: {m}"))
            .expect("bake the Debian test image");
        for version in hearth_image::versions(&images.join("test-debian-net")).unwrap_or_default() {
            if version != baked.version {
                let _ =
                    fs::remove_dir_all(images.join("test-debian-net").join(version.to_string()));
            }
        }
        baked
    });
    ImageSpec {
        root_dir: None,
        kernel: Some(image.kernel.clone()),
        initrd: Some(image.initrd.clone()),
        disk: image.disk.clone(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_debian_qemu_guest_with_egress_installs_a_package_with_apt() {
    let lab = Lab::new();
    let mut spec = lab.spec(NetworkSpec::egress(vec![]), debian_image());
    spec.memory_mib = 512;
    lab.qemu
        .create(&spec)
        .await
        .expect("create a Debian qemu VM");
    wait_healthy(&lab.qemu, spec.id, QEMU_HEALTH_TIMEOUT).await;
    // The legitimate path setup commands rely on: the package mirror by
    // name, through DNS at the gateway and egress to the internet.
    let (code, out, err) = run(
        &lab.qemu,
        spec.id,
        "export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && \
         apt-get install -y -qq --no-install-recommends tree >/dev/null && tree --version",
    )
    .await;
    assert_eq!(code, 0, "apt-get inside an egress qemu VM: {out}{err}");
    assert!(out.starts_with("tree v"), "{out:?}");
    // And still nothing of the host.
    let api = HostListener::bind("0.0.0.0");
    let (_, out, _) = run(
        &lab.qemu,
        spec.id,
        &format!(
            "timeout 5 bash -c 'exec 3<>/dev/tcp/{}/{}' && echo reached || echo refused",
            lab.net.gateway(),
            api.port
        ),
    )
    .await;
    assert_eq!(out.trim(), "refused");
    assert!(!api.accepted());
}

/// The network namespace of a process of sandbox `id` (one in its cgroup
/// or naming it in its arguments), held open: while it is, the
/// namespace and the veth pair in it outlive every process of the VM, as
/// the kernel's asynchronous teardown of a dead namespace makes them for
/// a moment after a relaunch.
fn hold_netns(lab: &Lab, id: VmId) -> fs::File {
    let vm = id.to_string();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let of_vm = |file: &str| {
            fs::read(format!("/proc/{pid}/{file}"))
                .is_ok_and(|text| String::from_utf8_lossy(&text).contains(&vm))
        };
        if (of_vm("cgroup") || of_vm("cmdline"))
            && let Ok(ns) = fs::File::open(format!("/proc/{pid}/ns/net"))
        {
            let host = fs::metadata("/proc/self/ns/net").unwrap();
            let held = ns.metadata().unwrap();
            use std::os::unix::fs::MetadataExt;
            if held.ino() != host.ino() {
                return ns;
            }
        }
    }
    panic!("no process of sandbox {id} under {}", lab.base.display());
}

/// A relaunched sandbox (seal, reset) gets its old port name again while
/// the old pair may still exist: its namespace dies asynchronously. Here
/// the old namespace is held open across each relaunch, so the old pair
/// is certainly there; the relaunch must replace it and the VM keep its
/// network (before the fix: "RTNETLINK answers: File exists").
#[tokio::test]
async fn a_relaunched_sandbox_replaces_the_port_its_old_namespace_still_holds() {
    let lab = Lab::new();
    let git = GitDaemon::start();
    let id = lab.sandbox(NetworkSpec::egress(vec![git.port])).await;
    let gateway = lab.net.gateway().to_string();
    assert!(sandbox_connects(&lab, id, &gateway, git.port).await);
    let old = hold_netns(&lab, id);
    lab.sandbox
        .seal(id)
        .await
        .expect("seal with the old pair still there");
    wait_healthy(&lab.sandbox, id, Duration::from_secs(10)).await;
    assert!(sandbox_connects(&lab, id, &gateway, git.port).await);
    drop(old);
    let old = hold_netns(&lab, id);
    lab.sandbox
        .reset(id)
        .await
        .expect("reset with the old pair still there");
    wait_healthy(&lab.sandbox, id, Duration::from_secs(10)).await;
    assert!(sandbox_connects(&lab, id, &gateway, git.port).await);
    drop(old);
}
