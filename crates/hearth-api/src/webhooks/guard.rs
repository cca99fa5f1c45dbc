//! Where a webhook may send: the rule that keeps a tenant-named URL from
//! reaching inside the fleet (SSRF).
//!
//! A tenant admin names the URL and the server makes the request from
//! inside the fleet, so every address a webhook could reach is checked:
//! at create time (the URL's literal address, or every address its host
//! resolves to), and at every connect, by [`GuardedResolver`], the HTTP
//! client's only resolver, which answers only checked addresses. The
//! client connects to exactly what the resolver answered, so a host that
//! resolves to a public address when checked and a private one a moment
//! later (DNS rebinding) reaches nothing private.
//!
//! **Invariants:**
//! - Unless the operator allows it (`--webhook-allow-private`), no
//!   loopback, private, link-local, CGNAT, multicast, unspecified,
//!   reserved or documentation address, nor an IPv4-mapped, -compatible or
//!   NAT64 form of one, is ever connected to.
//! - A host with any refused address is refused whole.
//! - This module never reads the store.

use hearth_core::Error;
use reqwest::Url;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// What the operator allows webhooks to reach.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WebhookPolicy {
    /// `--webhook-allow-private`: private and loopback addresses, and plain
    /// `http://` URLs, are allowed (a receiver on the operator's own
    /// network, tests).
    pub allow_private: bool,
}

/// What the flag is called, for error messages.
const FLAG: &str = "--webhook-allow-private";

/// Why `ip` may not be reached, or `None` when it may.
pub fn refused_reason(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => refused_v4(v4),
        IpAddr::V6(v6) => refused_v6(v6),
    }
}

fn refused_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b, c) {
        _ if ip.is_unspecified() => "unspecified",
        (0, _, _) => "this-network (0.0.0.0/8)",
        (127, _, _) => "loopback",
        (10, _, _) => "private",
        (172, 16..=31, _) => "private",
        (192, 168, _) => "private",
        (169, 254, _) => "link-local",
        (100, 64..=127, _) => "carrier-grade NAT (100.64.0.0/10)",
        (192, 0, 0) => "IETF protocol assignments (192.0.0.0/24)",
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => "documentation",
        (198, 18..=19, _) => "benchmarking (198.18.0.0/15)",
        (224..=239, _, _) => "multicast",
        (240..=255, _, _) => "reserved or broadcast",
        _ => return None,
    })
}

fn refused_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let seg = ip.segments();
    if ip.is_unspecified() {
        return Some("unspecified");
    }
    if ip.is_loopback() {
        return Some("loopback");
    }
    // An IPv4 address in IPv6 clothing is judged as the IPv4 address:
    // mapped (::ffff:a.b.c.d), compatible (::a.b.c.d) and NAT64
    // (64:ff9b::a.b.c.d) all reach it.
    let inner = |seg: &[u16]| {
        Ipv4Addr::new(
            (seg[6] >> 8) as u8,
            seg[6] as u8,
            (seg[7] >> 8) as u8,
            seg[7] as u8,
        )
    };
    if seg[..5] == [0; 5] && (seg[5] == 0xffff || seg[5] == 0) {
        // A mapped public address is refused too: nothing needs it, and
        // stacks differ in how they treat it.
        return Some(refused_v4(inner(&seg)).unwrap_or("IPv4-mapped or -compatible"));
    }
    if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return refused_v4(inner(&seg));
    }
    Some(match seg[0] {
        s if s & 0xfe00 == 0xfc00 => "unique local (private)",
        s if s & 0xffc0 == 0xfe80 => "link-local",
        s if s & 0xffc0 == 0xfec0 => "site-local",
        s if s & 0xff00 == 0xff00 => "multicast",
        0x2001 if seg[1] == 0x0db8 => "documentation",
        0x0100 if seg[1..4] == [0, 0, 0] => "discard-only (100::/64)",
        _ => return None,
    })
}

/// Checks one address against `policy`: the refusal names the address and
/// why.
pub fn check_addr(ip: IpAddr, policy: WebhookPolicy) -> Result<(), String> {
    if policy.allow_private {
        return Ok(());
    }
    match refused_reason(ip) {
        None => Ok(()),
        Some(why) => Err(format!(
            "address {ip} is {why}: webhooks may not reach it (the operator allows private addresses with {FLAG})"
        )),
    }
}

/// Checks a webhook URL as given: `https` (or `http` where the operator
/// allows private addresses), a host, no credentials, and a literal
/// address allowed. Host names are checked where they are resolved
/// ([`check_url_resolves`], [`GuardedResolver`]).
pub fn check_url(text: &str, policy: WebhookPolicy) -> Result<Url, Error> {
    let url =
        Url::parse(text).map_err(|e| Error::invalid(format!("url {text:?} is not a URL: {e}")))?;
    match url.scheme() {
        "https" => {}
        "http" if policy.allow_private => {}
        "http" => {
            return Err(Error::invalid(format!(
                "url {text:?} must be https (plain http is allowed only with {FLAG})"
            )));
        }
        other => {
            return Err(Error::invalid(format!(
                "url {text:?} must be https, not {other}"
            )));
        }
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(Error::invalid(
            "url must not carry credentials (user:password@); the signature authenticates hearth",
        ));
    }
    if url.fragment().is_some() {
        return Err(Error::invalid("url must not have a #fragment"));
    }
    match literal_ip(&url) {
        Some(ip) => check_addr(ip, policy).map_err(|e| Error::invalid(format!("url: {e}")))?,
        None if url.host_str().is_none_or(str::is_empty) => {
            return Err(Error::invalid(format!("url {text:?} has no host")));
        }
        None => {}
    }
    Ok(url)
}

/// The URL's host when it is an address literal (`[::1]` unbracketed).
pub fn literal_ip(url: &Url) -> Option<IpAddr> {
    let host = url.host_str()?;
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// [`check_url`], then resolves a host name and checks every address it
/// has now (create time; [`GuardedResolver`] checks again at each connect).
pub async fn check_url_resolves(text: &str, policy: WebhookPolicy) -> Result<Url, Error> {
    let url = check_url(text, policy)?;
    if let (None, Some(host)) = (literal_ip(&url), url.host_str()) {
        let port = url.port_or_known_default().unwrap_or(443);
        // A name that does not resolve (yet) is taken: its deliveries fail
        // and are logged until it does, and every connect checks again. A
        // name that resolves to an address refused is refused now.
        if let Ok(lookup) = tokio::net::lookup_host((host, port)).await {
            for addr in lookup {
                check_addr(addr.ip(), policy)
                    .map_err(|e| Error::invalid(format!("url: host {host:?} resolves to {e}")))?;
            }
        }
    }
    Ok(url)
}

/// Every address `host` resolves to, each checked; refused whole when one
/// is refused.
async fn resolve_checked(
    host: &str,
    port: u16,
    policy: WebhookPolicy,
) -> Result<Vec<SocketAddr>, String> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("host {host:?} does not resolve: {e}"))?
        .collect();
    if addrs.is_empty() {
        return Err(format!("host {host:?} has no address"));
    }
    for addr in &addrs {
        check_addr(addr.ip(), policy).map_err(|e| format!("host {host:?} resolves to {e}"))?;
    }
    Ok(addrs)
}

/// The HTTP client's resolver: answers only checked addresses, so the
/// connection goes to what was checked.
#[derive(Debug, Clone, Copy)]
pub struct GuardedResolver {
    pub policy: WebhookPolicy,
}

/// A refusal as a resolver error.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refused(String);

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy;
        Box::pin(async move {
            let addrs = resolve_checked(name.as_str(), 0, policy)
                .await
                .map_err(|e| Box::new(Refused(e)) as Box<dyn std::error::Error + Send + Sync>)?;
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(text: &str) -> bool {
        refused_reason(text.parse().unwrap()).is_some()
    }

    #[test]
    fn inside_addresses_are_refused_in_every_form() {
        for ip in [
            "127.0.0.1",
            "127.255.0.9",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.255",
            "0.0.0.0",
            "0.1.2.3",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "::ffff:8.8.8.8",
        ] {
            assert!(refused(ip), "{ip} must be refused");
        }
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
            "64:ff9b::808:808",
        ] {
            assert!(!refused(ip), "{ip} must be allowed");
        }
        // The operator's flag allows everything.
        assert!(
            check_addr(
                "127.0.0.1".parse().unwrap(),
                WebhookPolicy {
                    allow_private: true
                }
            )
            .is_ok()
        );
    }

    #[test]
    fn urls_are_https_with_a_host_and_no_credentials() {
        let strict = WebhookPolicy::default();
        let open = WebhookPolicy {
            allow_private: true,
        };
        assert!(check_url("https://hooks.example/x", strict).is_ok());
        for (url, says) in [
            (
                "http://hooks.example/x",
                "must be https (plain http is allowed only with --webhook-allow-private)",
            ),
            ("ftp://hooks.example/x", "must be https, not ftp"),
            ("https://u:p@hooks.example/x", "must not carry credentials"),
            ("not a url", "is not a URL"),
            ("https://127.0.0.1/x", "address 127.0.0.1 is loopback"),
            ("https://[::1]/x", "address ::1 is loopback"),
            ("https://10.0.0.8/x", "address 10.0.0.8 is private"),
            (
                "https://169.254.169.254/latest",
                "address 169.254.169.254 is link-local",
            ),
            (
                "https://[::ffff:7f00:1]/x",
                "address ::ffff:127.0.0.1 is loopback",
            ),
        ] {
            let e = check_url(url, strict).unwrap_err();
            assert!(e.message.contains(says), "{url}: {}", e.message);
        }
        assert!(check_url("http://127.0.0.1:9/x", open).is_ok());
    }

    #[tokio::test]
    async fn host_names_are_checked_after_resolution() {
        let e = check_url_resolves("https://localhost:9/x", WebhookPolicy::default())
            .await
            .unwrap_err();
        assert!(
            e.message.contains("host \"localhost\" resolves to address"),
            "{}",
            e.message
        );
        assert!(
            check_url_resolves(
                "http://localhost:9/x",
                WebhookPolicy {
                    allow_private: true
                }
            )
            .await
            .is_ok()
        );
    }
}
