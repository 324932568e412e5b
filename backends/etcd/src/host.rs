//! The address a registration without a host announces.

use std::net::{IpAddr, Ipv4Addr};

/// This machine's first non-loopback IPv4 address, or `127.0.0.1` when it has none (a laptop
/// offline, a container with loopback only).
pub(crate) fn local_ipv4() -> IpAddr {
    if_addrs::get_if_addrs()
        .ok()
        .and_then(|ifaces| {
            ifaces
                .into_iter()
                .filter(|i| !i.is_loopback())
                .map(|i| i.ip())
                .find(IpAddr::is_ipv4)
        })
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
}

#[cfg(test)]
mod tests {
    #[test]
    fn is_ipv4_and_not_unspecified() {
        let ip = super::local_ipv4();
        assert!(ip.is_ipv4() && !ip.is_unspecified());
    }
}
