//! The VM network: one host bridge for every `egress` VM of both drivers,
//! the nftables tables that confine it, and the IP leases.
//!
//! A VM with `network: egress` gets one port on the bridge (a veth whose
//! peer is the sandbox's `eth0`, or a qemu tap) and one address of the
//! bridge's subnet; the bridge's first address is the gateway. What it
//! reaches is decided by two nftables tables of hearth's own, both named
//! after the bridge (so that a test's bridge never touches a server's):
//!
//! - `bridge <name>`: a frame from a VM port must be IPv4 or ARP (IPv6 and
//!   every other protocol are dropped) and carry the port's own MAC and
//!   leased address as its sources, so a VM cannot take another's address
//!   or answer ARP for it;
//! - `inet <name>`: from the bridge, the host itself accepts only replies
//!   and what the `prerouting` chain translated from the gateway: TCP to
//!   `<gateway>:<port>` for the VM's `allow_host_ports`, to
//!   `127.0.0.1:<port>`, and DNS to `<gateway>:53`, to the host's first
//!   IPv4 resolver (which may be on loopback). Forwarded traffic from the
//!   bridge goes to the host's non-loopback resolvers on port 53, and to
//!   anything but
//!   private, loopback, link-local, CGNAT, multicast and reserved ranges
//!   and the networks the host sits on (the gateway's DNS translation
//!   aside), never back into the bridge, and is masqueraded. Nothing
//!   enters the bridge but replies. Refused traffic is rejected (ICMP
//!   admin-prohibited), so a VM's connection fails at once rather than
//!   hanging.
//!
//! Bridge ports are `isolated on` (no frame from one VM port reaches
//! another), learn nothing and flood no unknown unicast; each VM's MAC is a
//! static entry of its own port, so the host's frames for a VM reach that
//! VM alone.
//! IPv6 is off on the bridge and the host's ends of the ports, and dropped
//! from VM ports.
//!
//! Leases: one file per address under `lease_dir` (`<address>`, created
//! exclusively, holding the VM id and its allowed ports; by default
//! `/run/hearth-net/<bridge>/`), so addresses stay unique across drivers,
//! servers sharing the bridge, and restarts; the
//! tables' sets are never flushed by a restart, and `detach` removes a VM's
//! elements, its port and its lease.
//!
//! The host tools are iproute2's `ip` and `nft` (nftables); every call is
//! one batch, so attaching a VM costs a handful of process spawns.
//!
//! **Invariants:**
//! - a VM port carries traffic only once its address is in the tables (the
//!   elements are added before the port exists);
//! - the module never touches a table, bridge or port it did not name;
//! - `detach` is idempotent and leaves no element, port or lease behind.

use hearth_core::ids::VmId;
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::fs;
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The bridge's name when none is configured.
pub const DEFAULT_BRIDGE: &str = "hearth0";
/// The VM subnet when none is configured (unlikely to collide with a LAN).
pub const DEFAULT_SUBNET: &str = "10.199.0.0/16";
/// Destinations an egress VM never reaches (beyond the host's own networks).
pub const BLOCKED_RANGES: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/3",
];
/// Where the host's resolvers are listed.
const RESOLV_CONF: &str = "/etc/resolv.conf";

/// A network error, naming what failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("invalid network setting: {0}")]
    Config(String),
    #[error("{0}")]
    Host(String),
    #[error("no free address left in {0}")]
    Exhausted(Ipv4Net),
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

type Result<T, E = NetError> = std::result::Result<T, E>;

/// How the VM network is set up.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// The host bridge (also the name of the nftables tables).
    pub bridge: String,
    /// The VMs' subnet; its first address is the gateway.
    pub subnet: Ipv4Net,
    /// Where leases are kept ([`default_lease_dir`]).
    pub lease_dir: PathBuf,
}

impl NetConfig {
    /// The default bridge and subnet, leases in [`default_lease_dir`].
    pub fn new() -> Self {
        NetConfig::for_bridge(
            DEFAULT_BRIDGE,
            DEFAULT_SUBNET.parse().expect("the default subnet parses"),
        )
    }

    /// `bridge` over `subnet`, leases in [`default_lease_dir`].
    pub fn for_bridge(bridge: &str, subnet: Ipv4Net) -> Self {
        NetConfig {
            bridge: bridge.into(),
            subnet,
            lease_dir: default_lease_dir(bridge),
        }
    }
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig::new()
    }
}

/// Where the leases of `bridge` are kept: `/run/hearth-net/<bridge>`. A
/// bridge is a host-wide thing shared by every server and driver of the
/// host, so its leases are too; they live as long as the bridge and the
/// VMs on it (until the host reboots), across restarts of the servers.
pub fn default_lease_dir(bridge: &str) -> PathBuf {
    Path::new("/run/hearth-net").join(bridge)
}

/// Checks a bridge name: a Linux interface name usable as an nftables
/// table name.
pub fn validate_bridge_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(NetError::Config(format!(
            "bridge name {name:?}: use 1 to 15 letters, digits or '_', starting with a letter"
        )))
    }
}

/// Parses a VM subnet (`a.b.c.d/n`, a network of 8 to 28 prefix bits).
pub fn parse_subnet(text: &str) -> Result<Ipv4Net> {
    let net: Ipv4Net = text
        .parse()
        .map_err(|_| NetError::Config(format!("subnet {text:?}: expected a.b.c.d/n")))?;
    if !(8..=28).contains(&net.prefix_len()) {
        return Err(NetError::Config(format!(
            "subnet {text}: the prefix must be between /8 and /28"
        )));
    }
    if net.trunc() != net {
        return Err(NetError::Config(format!(
            "subnet {text}: host bits are set (did you mean {}?)",
            net.trunc()
        )));
    }
    Ok(net)
}

/// One VM's place on the bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// The host's end of the port (veth or tap).
    pub port: String,
    /// The VM's address.
    pub address: Ipv4Addr,
    /// The subnet's prefix length.
    pub prefix_len: u8,
    /// The gateway: the VM's route out, its DNS server, and where its
    /// allowed host ports are.
    pub gateway: Ipv4Addr,
    /// The MAC address the VM's interface has (set by the driver for a
    /// qemu NIC); frames from its port with any other are dropped.
    pub mac: String,
}

impl Attachment {
    /// `address/prefix`.
    pub fn cidr(&self) -> String {
        format!("{}/{}", self.address, self.prefix_len)
    }
}

/// What a lease file holds.
#[derive(Debug, Serialize, Deserialize)]
struct Lease {
    vm: VmId,
    port: String,
    allow_host_ports: Vec<u16>,
}

/// The VM network of one bridge; see the module docs.
pub struct Net {
    config: NetConfig,
    /// Whether the bridge and tables were set up by this process.
    ready: Mutex<bool>,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net").field("config", &self.config).finish()
    }
}

/// The host's end of VM `id`'s port: `<prefix><12 hex digits of the id>`.
fn port_name(prefix: &str, id: VmId) -> String {
    format!("{prefix}{}", crate::sandbox::short_id(id))
}

/// Runs a host tool with `input` on stdin; errors carry its stderr.
fn run(program: &str, args: &[&str], input: Option<&str>) -> Result<String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| NetError::Host(format!("cannot run {program}: {e}")))?;
    if let Some(input) = input
        && let Some(mut stdin) = child.stdin.take()
    {
        stdin.write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(NetError::Host(format!(
            "{program} {}: {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Deletes the host-side port `port` if it is there (a veth takes its peer
/// with it). A sandbox's veth dies with its namespace, maybe meanwhile:
/// gone is success.
fn remove_port(port: &str) -> Result<()> {
    let path = Path::new("/sys/class/net").join(port);
    if !path.exists() {
        return Ok(());
    }
    match run("ip", &["link", "del", "dev", port], None) {
        Ok(_) => Ok(()),
        Err(_) if !path.exists() => Ok(()),
        Err(e) => Err(e),
    }
}

/// The MAC address of the VM holding `address`: locally administered,
/// unique on the bridge because the address is.
fn mac_of(address: Ipv4Addr) -> String {
    let o = address.octets();
    format!("52:54:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
}

fn sysctl(path: &str, value: &str) -> Result<()> {
    fs::write(path, value)
        .map_err(|e| NetError::Host(format!("cannot write {value} to {path}: {e}")))
}

/// The IPv4 nameservers of `/etc/resolv.conf`.
fn host_resolvers() -> Vec<Ipv4Addr> {
    let text = fs::read_to_string(RESOLV_CONF).unwrap_or_default();
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse().ok())
        .collect()
}

/// The IPv4 networks of the host's interfaces other than `bridge`.
fn host_networks(bridge: &str) -> Result<Vec<Ipv4Net>> {
    let out = run("ip", &["-4", "-o", "addr", "show"], None)?;
    let mut nets = Vec::new();
    for line in out.lines() {
        let mut words = line.split_whitespace();
        let ifname = words.nth(1).unwrap_or_default();
        if ifname == bridge || ifname == "lo" {
            continue;
        }
        if let Some(net) = words
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|cidr| cidr.parse::<Ipv4Net>().ok())
        {
            nets.push(net.trunc());
        }
    }
    Ok(nets)
}

impl Net {
    pub fn new(config: NetConfig) -> Result<Self> {
        validate_bridge_name(&config.bridge)?;
        if config.subnet.trunc() != config.subnet || !(8..=28).contains(&config.subnet.prefix_len())
        {
            return Err(NetError::Config(format!(
                "subnet {}: expected a network of /8 to /28",
                config.subnet
            )));
        }
        Ok(Net {
            config,
            ready: Mutex::new(false),
        })
    }

    pub fn config(&self) -> &NetConfig {
        &self.config
    }

    /// The bridge's own address: the gateway of every VM.
    pub fn gateway(&self) -> Ipv4Addr {
        self.config
            .subnet
            .hosts()
            .next()
            .expect("a /28 or larger subnet has hosts")
    }

    /// Creates the bridge and the tables when they are missing, and
    /// (re)writes the tables' rules, keeping their sets: a restarted server
    /// keeps its VMs' elements. Turns on IPv4 forwarding.
    pub fn ensure(&self) -> Result<()> {
        let mut ready = self.ready.lock().unwrap_or_else(|e| e.into_inner());
        if *ready {
            return Ok(());
        }
        let bridge = &self.config.bridge;
        let gateway = self.gateway();
        let subnet = self.config.subnet;
        if !Path::new("/sys/class/net").join(bridge).exists() {
            run(
                "ip",
                &["link", "add", "name", bridge, "type", "bridge"],
                None,
            )
            .or_else(|e| {
                // Another server (or test) sharing the name made it meanwhile.
                if Path::new("/sys/class/net").join(bridge).exists() {
                    Ok(String::new())
                } else {
                    Err(e)
                }
            })?;
        }
        sysctl(
            &format!("/proc/sys/net/ipv6/conf/{bridge}/disable_ipv6"),
            "1",
        )?;
        sysctl(
            &format!("/proc/sys/net/ipv4/conf/{bridge}/route_localnet"),
            "1",
        )?;
        let cidr = format!("{gateway}/{}", subnet.prefix_len());
        let addrs = run("ip", &["-4", "-o", "addr", "show", "dev", bridge], None)?;
        if !addrs.contains(&format!(" {cidr} ")) {
            run("ip", &["addr", "add", &cidr, "dev", bridge], None).or_else(|e| {
                // Another server sharing the bridge added it meanwhile.
                let again = run("ip", &["-4", "-o", "addr", "show", "dev", bridge], None)?;
                if again.contains(&format!(" {cidr} ")) {
                    Ok(String::new())
                } else {
                    Err(e)
                }
            })?;
        }
        run("ip", &["link", "set", bridge, "up"], None)?;
        sysctl("/proc/sys/net/ipv4/ip_forward", "1")?;
        run("nft", &["-f", "-"], Some(&self.ruleset()?))?;
        *ready = true;
        Ok(())
    }

    /// The tables' definition: sets declared (kept when they exist), chains
    /// flushed and written again.
    fn ruleset(&self) -> Result<String> {
        let t = &self.config.bridge;
        let b = format!("\"{t}\"");
        let gw = self.gateway();
        let subnet = self.config.subnet;
        let mut host_nets: Vec<String> = host_networks(t)?
            .into_iter()
            .filter(|n| !n.contains(&gw))
            .map(|n| n.to_string())
            .collect();
        host_nets.sort();
        host_nets.dedup();
        let blocked = BLOCKED_RANGES.join(", ");
        let resolvers = host_resolvers();
        let dns = match resolvers.first() {
            Some(resolver) => format!(
                "iifname {b} ip daddr {gw} meta l4proto {{ tcp, udp }} th dport 53 dnat ip to {resolver}"
            ),
            None => {
                tracing::warn!(
                    "no IPv4 nameserver in {RESOLV_CONF}: VMs on the bridge have no DNS"
                );
                String::new()
            }
        };
        // VMs that read the host's resolv.conf (sandboxes over the host's
        // root) ask its resolvers directly; loopback ones only through the
        // gateway.
        let direct: Vec<String> = resolvers
            .iter()
            .filter(|r| !r.is_loopback())
            .map(|r| r.to_string())
            .collect();
        let direct_dns = if direct.is_empty() {
            String::new()
        } else {
            format!(
                "iifname {b} ip daddr {{ {} }} meta l4proto {{ tcp, udp }} th dport 53 accept",
                direct.join(", ")
            )
        };
        let mut s = String::new();
        let _ = write!(
            s,
            r#"table bridge {t} {{
  set ports {{ type ifname . ipv4_addr; }}
  set port_macs {{ type ifname . ether_addr; }}
  set port_names {{ type ifname; }}
  chain prerouting {{ type filter hook prerouting priority filter; policy accept; }}
}}
flush chain bridge {t} prerouting
table bridge {t} {{
  chain prerouting {{
    iifname @port_names ether type != {{ ip, arp }} drop
    iifname @port_names iifname . ether saddr != @port_macs drop
    iifname @port_names ether type ip iifname . ip saddr != @ports drop
    iifname @port_names ether type arp iifname . arp saddr ip != @ports drop
  }}
}}
table inet {t} {{
  set allowed {{ type ipv4_addr . inet_service; }}
  set host_nets {{ type ipv4_addr; flags interval; }}
  chain prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}
  chain input {{ type filter hook input priority filter; policy accept; }}
  chain forward {{ type filter hook forward priority filter; policy accept; }}
  chain postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}
}}
flush set inet {t} host_nets
flush chain inet {t} prerouting
flush chain inet {t} input
flush chain inet {t} forward
flush chain inet {t} postrouting
table inet {t} {{
  chain prerouting {{
    {dns}
    iifname {b} ip daddr {gw} ip saddr . tcp dport @allowed dnat ip to 127.0.0.1
  }}
  chain input {{
    iifname {b} ct state established,related accept
    iifname {b} ct status dnat ct original ip daddr {gw} accept
    iifname {b} reject with icmpx admin-prohibited
  }}
  chain forward {{
    oifname {b} ct state established,related accept
    oifname {b} drop
    iifname {b} meta nfproto != ipv4 drop
    iifname {b} ct status dnat ct original ip daddr {gw} accept
    {direct_dns}
    iifname {b} ip daddr {{ {blocked} }} reject with icmpx admin-prohibited
    iifname {b} ip daddr @host_nets reject with icmpx admin-prohibited
    iifname {b} accept
  }}
  chain postrouting {{
    ip saddr {subnet} oifname != {b} masquerade
  }}
}}
"#
        );
        if !host_nets.is_empty() {
            let _ = writeln!(
                s,
                "add element inet {t} host_nets {{ {} }}",
                host_nets.join(", ")
            );
        }
        Ok(s)
    }

    /// Takes an address for `id` (the one it holds already, if any),
    /// recording its port and allowed host ports.
    fn lease(&self, id: VmId, port: &str, allow_host_ports: &[u16]) -> Result<Ipv4Addr> {
        if let Some((address, _)) = self.find_lease(id)? {
            return Ok(address);
        }
        fs::create_dir_all(&self.config.lease_dir)?;
        let lease = serde_json::to_vec(&Lease {
            vm: id,
            port: port.to_owned(),
            allow_host_ports: allow_host_ports.to_vec(),
        })
        .map_err(|e| NetError::Host(format!("lease of {id}: {e}")))?;
        let gateway = self.gateway();
        for address in self.config.subnet.hosts().filter(|a| *a != gateway) {
            let path = self.config.lease_dir.join(address.to_string());
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut file) => {
                    file.write_all(&lease)?;
                    file.sync_all()?;
                    return Ok(address);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(NetError::Exhausted(self.config.subnet))
    }

    /// The address and lease VM `id` holds.
    fn find_lease(&self, id: VmId) -> Result<Option<(Ipv4Addr, Lease)>> {
        let entries = match fs::read_dir(&self.config.lease_dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        for entry in entries {
            let entry = entry?;
            let Some(address) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            // A lease being written is empty for an instant: not ours.
            let Ok(lease) = serde_json::from_slice::<Lease>(&fs::read(entry.path())?) else {
                continue;
            };
            if lease.vm == id {
                return Ok(Some((address, lease)));
            }
        }
        Ok(None)
    }

    /// The address VM `id` holds, if any.
    pub fn address_of(&self, id: VmId) -> Result<Option<Ipv4Addr>> {
        Ok(self.find_lease(id)?.map(|(a, _)| a))
    }

    /// Leases an address and adds the VM's elements to the tables.
    fn admit(&self, id: VmId, prefix: &str, allow_host_ports: &[u16]) -> Result<Attachment> {
        self.ensure()?;
        let port = port_name(prefix, id);
        let address = self.lease(id, &port, allow_host_ports)?;
        let mac = mac_of(address);
        let t = &self.config.bridge;
        let mut batch = format!(
            "add element bridge {t} ports {{ \"{port}\" . {address} }}\n\
             add element bridge {t} port_macs {{ \"{port}\" . {mac} }}\n\
             add element bridge {t} port_names {{ \"{port}\" }}\n"
        );
        if !allow_host_ports.is_empty() {
            let elements: Vec<String> = allow_host_ports
                .iter()
                .map(|p| format!("{address} . {p}"))
                .collect();
            let _ = writeln!(
                batch,
                "add element inet {t} allowed {{ {} }}",
                elements.join(", ")
            );
        }
        run("nft", &["-f", "-"], Some(&batch))?;
        Ok(Attachment {
            port,
            address,
            prefix_len: self.config.subnet.prefix_len(),
            gateway: self.gateway(),
            mac,
        })
    }

    /// Puts a new host-side port on the bridge: isolated from the other
    /// ports, learning nothing and flooding no unknown unicast, its VM's
    /// MAC a static entry. So frames for a VM go to its port alone, and no
    /// VM can draw another's frames to itself by sending with its MAC.
    /// `create` (the `ip` command making the port, if any) runs in the
    /// same batch.
    fn enslave(&self, attachment: &Attachment, create: Option<&str>) -> Result<()> {
        let bridge = &self.config.bridge;
        let port = &attachment.port;
        // `addrgenmode none` before `up`: the host's end never gets an IPv6
        // address (and IPv6 is then switched off on it altogether).
        let batch = format!(
            "{}link set dev {port} master {bridge}\n\
             link set dev {port} type bridge_slave isolated on learning off flood off mcast_flood off\n\
             link set dev {port} addrgenmode none\n\
             link set dev {port} up\n",
            create.map(|c| format!("{c}\n")).unwrap_or_default()
        );
        run("ip", &["-batch", "-"], Some(&batch))?;
        sysctl(&format!("/proc/sys/net/ipv6/conf/{port}/disable_ipv6"), "1")?;
        let mac = &attachment.mac;
        run(
            "bridge",
            &["fdb", "replace", mac, "dev", port, "master", "static"],
            None,
        )?;
        Ok(())
    }

    /// Puts the sandbox whose network namespace is `/proc/<pid>/ns/net` on
    /// the bridge: a veth pair whose peer is the sandbox's `eth0`, addressed
    /// and routed through the gateway, `lo` up.
    pub fn attach_sandbox(
        &self,
        id: VmId,
        pid: i32,
        allow_host_ports: &[u16],
    ) -> Result<Attachment> {
        let attachment = self.admit(id, "hv", allow_host_ports)?;
        let port = &attachment.port;
        // A relaunched sandbox (seal, reset) gets the port name it had: the
        // old pair dies with the old namespace, which the kernel frees
        // asynchronously, so it may still be there ("File exists").
        remove_port(port)?;
        let create = format!(
            "link add name {port} type veth peer name eth0 address {} netns {pid}",
            attachment.mac
        );
        self.enslave(&attachment, Some(&create))?;
        let inside = format!(
            "link set dev lo up\n\
             addr add {} dev eth0\n\
             link set dev eth0 up\n\
             route add default via {}\n",
            attachment.cidr(),
            attachment.gateway
        );
        // IPv6 off inside too (the bridge drops it anyway): resolvers and
        // clients then never wait on an address family that cannot work.
        let netns = format!("--net=/proc/{pid}/ns/net");
        run(
            "nsenter",
            &[
                &netns,
                "sh",
                "-c",
                "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6 2>/dev/null; exec ip -batch -",
            ],
            Some(&inside),
        )?;
        Ok(attachment)
    }

    /// Creates a tap device on the bridge for qemu VM `id` (qemu opens it
    /// by name with `-netdev tap,ifname=…,script=no,downscript=no`).
    pub fn attach_tap(&self, id: VmId, allow_host_ports: &[u16]) -> Result<Attachment> {
        let attachment = self.admit(id, "ht", allow_host_ports)?;
        let port = &attachment.port;
        let create = (!Path::new("/sys/class/net").join(port).exists())
            .then(|| format!("tuntap add dev {port} mode tap vnet_hdr"));
        self.enslave(&attachment, create.as_deref())?;
        Ok(attachment)
    }

    /// Removes VM `id`'s port (if it is still there), its elements and its
    /// lease. Idempotent.
    pub fn detach(&self, id: VmId) -> Result<()> {
        let Some((address, lease)) = self.find_lease(id)? else {
            return Ok(());
        };
        remove_port(&lease.port)?;
        let t = &self.config.bridge;
        let port = &lease.port;
        // `destroy element` would fail on a missing one; delete each in its
        // own batch line after an `add`, which makes it present.
        let mac = mac_of(address);
        let mut batch = format!(
            "add element bridge {t} ports {{ \"{port}\" . {address} }}\n\
             delete element bridge {t} ports {{ \"{port}\" . {address} }}\n\
             add element bridge {t} port_macs {{ \"{port}\" . {mac} }}\n\
             delete element bridge {t} port_macs {{ \"{port}\" . {mac} }}\n\
             add element bridge {t} port_names {{ \"{port}\" }}\n\
             delete element bridge {t} port_names {{ \"{port}\" }}\n"
        );
        for p in &lease.allow_host_ports {
            let _ = write!(
                batch,
                "add element inet {t} allowed {{ {address} . {p} }}\n\
                 delete element inet {t} allowed {{ {address} . {p} }}\n"
            );
        }
        if self.tables_exist() {
            run("nft", &["-f", "-"], Some(&batch))?;
        }
        match fs::remove_file(self.config.lease_dir.join(address.to_string())) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn tables_exist(&self) -> bool {
        let t = &self.config.bridge;
        run("nft", &["list", "table", "inet", t], None).is_ok()
            && run("nft", &["list", "table", "bridge", t], None).is_ok()
    }

    /// Removes the bridge, both tables and every lease (tests; an operator
    /// retiring a bridge). Every VM on it must be gone first.
    pub fn teardown(&self) -> Result<()> {
        let t = &self.config.bridge;
        for family in ["inet", "bridge"] {
            if run("nft", &["list", "table", family, t], None).is_ok() {
                run("nft", &["delete", "table", family, t], None)?;
            }
        }
        if Path::new("/sys/class/net").join(t).exists() {
            run("ip", &["link", "del", "dev", t], None)?;
        }
        match fs::remove_dir_all(&self.config.lease_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        *self.ready.lock().unwrap_or_else(|e| e.into_inner()) = false;
        Ok(())
    }
}

/// Waits until process `pid` is in a network namespace other than this
/// process's (a sandbox launcher after its `unshare`), while `alive` says
/// it may still get there.
pub fn wait_for_netns(pid: i32, limit: Duration, alive: impl Fn() -> bool) -> Result<()> {
    let own = fs::read_link("/proc/self/ns/net")?;
    let deadline = Instant::now() + limit;
    loop {
        match fs::read_link(format!("/proc/{pid}/ns/net")) {
            Ok(ns) if ns != own => return Ok(()),
            _ => {}
        }
        if !alive() {
            return Err(NetError::Host(format!(
                "process {pid} exited before it had a network namespace"
            )));
        }
        if Instant::now() >= deadline {
            return Err(NetError::Host(format!(
                "process {pid} had no network namespace of its own after {limit:?}"
            )));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridge_names_and_subnets_are_checked() {
        validate_bridge_name("hearth0").unwrap();
        validate_bridge_name("ht_1a").unwrap();
        for bad in ["", "0abc", "a-b", "a b", "abcdefghijklmnop", "x;y"] {
            assert!(validate_bridge_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            parse_subnet("10.199.0.0/16").unwrap(),
            "10.199.0.0/16".parse::<Ipv4Net>().unwrap()
        );
        let err = parse_subnet("10.199.0.1/16").unwrap_err().to_string();
        assert!(err.contains("did you mean 10.199.0.0/16"), "{err}");
        assert!(parse_subnet("10.0.0.0/30").is_err());
        assert!(parse_subnet("nonsense").is_err());
    }

    #[test]
    fn leases_are_exclusive_kept_and_released() {
        let dir = tempfile::tempdir().unwrap();
        let net = Net::new(NetConfig {
            bridge: "hunit0".into(),
            subnet: parse_subnet("10.200.0.0/28").unwrap(),
            lease_dir: dir.path().join("leases"),
        })
        .unwrap();
        assert_eq!(net.gateway(), Ipv4Addr::new(10, 200, 0, 1));
        let ids: Vec<VmId> = (0..13).map(|_| VmId::new()).collect();
        let mut seen = std::collections::BTreeSet::new();
        for id in &ids {
            let a = net.lease(*id, "p", &[]).unwrap();
            assert_ne!(a, net.gateway());
            assert!(seen.insert(a), "{a} leased twice");
            assert_eq!(net.lease(*id, "p", &[]).unwrap(), a, "a lease is kept");
        }
        let full = net.lease(VmId::new(), "p", &[]).unwrap_err();
        assert!(matches!(full, NetError::Exhausted(_)), "{full}");
        // Released (no tables exist here, so only the lease goes).
        let freed = net.address_of(ids[3]).unwrap().unwrap();
        net.detach(ids[3]).unwrap();
        net.detach(ids[3]).unwrap();
        assert_eq!(net.address_of(ids[3]).unwrap(), None);
        assert_eq!(net.lease(VmId::new(), "p", &[]).unwrap(), freed);
    }
}
