//! What a test harness for a real server needs, whatever the server: free loopback ports, a
//! guard that kills the server process when the test ends, and waiting until it answers.
//!
//! The Consul and etcd harnesses (feature `servers`) are built from these; a third-party
//! backend's tests can start their own server the same way.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), String> {
//! use std::time::Duration;
//! use waypost_conformance::harness::{free_ports, wait_for_tcp, ProcessGuard};
//!
//! let ports = free_ports(2, false);
//! assert_ne!(ports[0], ports[1]);
//!
//! // A "server": anything that listens. Here a listener of this process.
//! let listener = tokio::net::TcpListener::bind(("127.0.0.1", ports[0]))
//!     .await
//!     .map_err(|e| e.to_string())?;
//! wait_for_tcp(listener.local_addr().map_err(|e| e.to_string())?, Duration::from_secs(5)).await?;
//!
//! // A process killed (and waited for) when the guard goes.
//! let guard = ProcessGuard::spawn(std::process::Command::new("sleep").arg("30"))
//!     .map_err(|e| e.to_string())?;
//! assert!(guard.exited().is_none());
//! drop(guard); // kills `sleep`
//! # Ok(())
//! # }
//! ```

use std::io;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::process::{Child, Command, ExitStatus};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

/// A free TCP port on 127.0.0.1 (bound and released: another process may take it before the
/// server does, so a harness retries a start that fails on a taken port).
///
/// ```
/// assert_ne!(waypost_conformance::harness::free_port(), 0);
/// ```
pub fn free_port() -> u16 {
    free_ports(1, false)[0]
}

/// `n` distinct free ports on 127.0.0.1, free for TCP and, with `udp_too`, for UDP as well (a
/// DNS server or a gossip port needs both). Every listener is held until all are chosen, so
/// the system cannot hand out one port twice.
///
/// # Panics
/// When the system has no free port to give.
pub fn free_ports(n: usize, udp_too: bool) -> Vec<u16> {
    let mut held = Vec::with_capacity(n);
    let mut ports = Vec::with_capacity(n);
    let mut tries = 0;
    while ports.len() < n {
        tries += 1;
        assert!(tries < 10_000, "no free loopback port found");
        let Ok(listener) = TcpListener::bind("127.0.0.1:0") else {
            continue;
        };
        let Ok(port) = listener.local_addr().map(|a| a.port()) else {
            continue;
        };
        if udp_too {
            match UdpSocket::bind(("127.0.0.1", port)) {
                Ok(socket) => held.push((listener, Some(socket))),
                Err(_) => continue,
            }
        } else {
            held.push((listener, None));
        }
        ports.push(port);
    }
    ports
}

/// A child process that is killed, and waited for, when the guard is dropped (or on
/// [`kill`](Self::kill)): a failing test leaves no server behind.
///
/// ```
/// use std::process::Command;
/// use std::time::Duration;
/// use waypost_conformance::harness::ProcessGuard;
///
/// let server = ProcessGuard::spawn(Command::new("sleep").arg("30"))?;
/// assert!(server.id().is_some() && server.exited().is_none());
/// server.kill(); // what dropping the guard does: no `sleep` is left behind
/// assert_eq!(server.id(), None);
///
/// // A process that ends by itself: the guard reports how.
/// let quick = ProcessGuard::spawn(Command::new("sh").args(["-c", "exit 3"]))?;
/// let mut status = None;
/// for _ in 0..500 {
///     status = quick.exited();
///     if status.is_some() {
///         break;
///     }
///     std::thread::sleep(Duration::from_millis(10));
/// }
/// assert_eq!(status.and_then(|s| s.code()), Some(3));
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Debug)]
pub struct ProcessGuard {
    child: Mutex<Option<Child>>,
}

impl ProcessGuard {
    /// Spawns `command` under the guard.
    pub fn spawn(command: &mut Command) -> io::Result<ProcessGuard> {
        let child = command.spawn()?;
        Ok(ProcessGuard {
            child: Mutex::new(Some(child)),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The process id, while it runs under the guard.
    pub fn id(&self) -> Option<u32> {
        self.lock().as_ref().map(Child::id)
    }

    /// Kills the process and waits for it to exit. Idempotent.
    pub fn kill(&self) {
        if let Some(mut child) = self.lock().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The exit status, if the process has exited by itself.
    pub fn exited(&self) -> Option<ExitStatus> {
        self.lock()
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until `addr` accepts a TCP connection, for at most `bound`.
pub async fn wait_for_tcp(addr: SocketAddr, bound: Duration) -> Result<(), String> {
    let until = Instant::now() + bound;
    let mut last = String::new();
    while Instant::now() < until {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(_) => return Ok(()),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(format!(
        "{addr} did not accept a connection within {bound:?}: {last}"
    ))
}
