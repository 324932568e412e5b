//! The TCP connections this process holds to a server, read from Linux's `/proc`: for tests
//! and measurements that bound how many connections a client opens.
//!
//! `/proc/self/net/tcp` (and `tcp6`) list every socket of the network namespace, other
//! processes' and the server's own ends included; only the sockets among this process's open
//! file descriptors are counted here.
//!
//! ```
//! use std::net::{TcpListener, TcpStream};
//! use waypost_conformance::sockets::established_to;
//!
//! let server = TcpListener::bind("127.0.0.1:0")?;
//! let port = server.local_addr()?.port();
//! let before = established_to(port)?;
//! let client = TcpStream::connect(("127.0.0.1", port))?;
//! let (_accepted, _) = server.accept()?;
//! // The client's end is counted; the accepted end (its remote port is the client's) is not.
//! assert_eq!(established_to(port)?.difference(&before).count(), 1);
//! drop(client);
//! assert!(established_to(port)?.is_subset(&before));
//! # Ok::<(), std::io::Error>(())
//! ```

use std::collections::BTreeSet;
use std::fs;
use std::io;

/// The established TCP connections of this process whose remote port is `port` (IPv4 and
/// IPv6), as socket inode numbers.
///
/// Inodes rather than a count: a process may hold connections to the port that are not the
/// ones under test (a harness's health-check client keeps one open), so a test takes the set
/// before it starts the client and counts the [difference](BTreeSet::difference) after.
///
/// # Errors
/// When `/proc/self/fd` or `/proc/self/net/tcp` cannot be read (not Linux, or no `/proc`).
pub fn established_to(port: u16) -> io::Result<BTreeSet<u64>> {
    let mine = own_socket_inodes()?;
    let mut found = BTreeSet::new();
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        let text = match fs::read_to_string(table) {
            Ok(text) => text,
            // A kernel without IPv6 has no tcp6 table.
            Err(e) if e.kind() == io::ErrorKind::NotFound && table.ends_with('6') => continue,
            Err(e) => return Err(io::Error::new(e.kind(), format!("{table}: {e}"))),
        };
        found.extend(
            established_in(&text, port)
                .into_iter()
                .filter(|inode| mine.contains(inode)),
        );
    }
    Ok(found)
}

/// The inodes of the sockets among this process's file descriptors.
fn own_socket_inodes() -> io::Result<BTreeSet<u64>> {
    let mut inodes = BTreeSet::new();
    let dir = fs::read_dir("/proc/self/fd")
        .map_err(|e| io::Error::new(e.kind(), format!("/proc/self/fd: {e}")))?;
    for entry in dir {
        // A descriptor closed while the directory is read has no link any more: not ours now.
        let Ok(target) = entry.and_then(|e| fs::read_link(e.path())) else {
            continue;
        };
        let target = target.to_string_lossy();
        if let Some(inode) = target
            .strip_prefix("socket:[")
            .and_then(|rest| rest.strip_suffix(']'))
            .and_then(|n| n.parse().ok())
        {
            inodes.insert(inode);
        }
    }
    Ok(inodes)
}

/// The inodes of the ESTABLISHED rows of a `/proc/net/tcp{,6}` table whose remote port is
/// `port`.
fn established_in(table: &str, port: u16) -> Vec<u64> {
    // Columns: sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ...
    // Addresses are `<hex address>:<hex port>`; state 01 is ESTABLISHED.
    const ESTABLISHED: &str = "01";
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let remote_port = cols.get(2)?.rsplit_once(':')?.1;
            let remote_port = u16::from_str_radix(remote_port, 16).ok()?;
            (remote_port == port && *cols.get(3)? == ESTABLISHED)
                .then(|| cols.get(9)?.parse().ok())
                .flatten()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_established_rows_by_remote_port() {
        // Two rows of a real table (loopback, port 0x1F90 = 8080): the client's end, established,
        // and the server's end of the same connection, whose remote port is the client's.
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:C350 0100007F:1F90 01 00000000:00000000 00:00000000 00000000  1000        0 4242 1 0000000000000000 20 4 30 10 -1
   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000  1000        0 4343 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:C351 0100007F:1F90 06 00000000:00000000 03:00000000 00000000     0        0 0 3 0000000000000000
   3: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4444 1 0000000000000000 100 0 0 10 0";
        assert_eq!(established_in(table, 8080), vec![4242]);
        assert_eq!(established_in(table, 0xC350), vec![4343]);
        assert!(established_in(table, 9090).is_empty());
        assert!(established_in("garbage\nnot a row", 8080).is_empty());
    }
}
