//! The address a registration that names no host announces.

use std::net::{IpAddr, Ipv4Addr};

/// This machine's first IPv4 address that other machines can reach: not loopback
/// (`127.0.0.0/8`), not link-local (`169.254.0.0/16`, which a host assigns itself when DHCP
/// fails and which routers never forward), not unspecified; `127.0.0.1` when there is none (a
/// laptop offline, a container with loopback only).
///
/// The Consul and etcd backends register this for a [`Registration`](crate::Registration)
/// without a host, unless they are configured with a default host of their own. Reads the
/// interfaces on every call.
///
/// ```
/// let ip = waypost_core::local_ipv4();
/// assert!(!ip.is_unspecified() && !ip.is_link_local());
/// // Loopback only when the machine has nothing better.
/// assert!(!ip.is_loopback() || ip == std::net::Ipv4Addr::LOCALHOST);
/// ```
pub fn local_ipv4() -> Ipv4Addr {
    let addrs = if_addrs::get_if_addrs().unwrap_or_default();
    first_routable_ipv4(addrs.iter().map(|i| i.ip())).unwrap_or(Ipv4Addr::LOCALHOST)
}

/// The first address in `addrs` that [`local_ipv4`] may announce.
fn first_routable_ipv4(addrs: impl IntoIterator<Item = IpAddr>) -> Option<Ipv4Addr> {
    addrs.into_iter().find_map(|ip| match ip {
        IpAddr::V4(v4) if !v4.is_loopback() && !v4.is_link_local() && !v4.is_unspecified() => {
            Some(v4)
        }
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn loopback_link_local_unspecified_and_ipv6_are_skipped() {
        let found = first_routable_ipv4(ips(&[
            "127.0.0.1",
            "127.0.1.1",
            "::1",
            "fe80::1",
            "169.254.10.20",
            "0.0.0.0",
            "2001:db8::5",
            "10.1.2.3",
            "192.168.0.9",
        ]));
        assert_eq!(found, Some(Ipv4Addr::new(10, 1, 2, 3)));
    }

    #[test]
    fn nothing_routable_is_none_and_the_helper_falls_back_to_localhost() {
        assert_eq!(
            first_routable_ipv4(ips(&["127.0.0.1", "169.254.1.1", "::1"])),
            None
        );
        assert_eq!(first_routable_ipv4(Vec::new()), None);
        let ip = local_ipv4();
        assert!(!ip.is_link_local() && !ip.is_unspecified(), "{ip}");
    }
}
