//! A TCP proxy that a test can cut and mend: a network partition between clients and a server,
//! with the server and its data left as they are.
//!
//! Point the clients under test at [`Gate::addr`] instead of the server. [`Gate::cut`] closes
//! every proxied connection and makes new ones close at once (the client sees a reset or an
//! early EOF, as it would from a lost network); [`Gate::mend`] lets connections through again.
//! It works for any TCP protocol (Consul's HTTP API, etcd's gRPC), and for any backend whose
//! test harness can put an address between client and server.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//! use tokio::net::{TcpListener, TcpStream};
//! use waypost_conformance::gate::Gate;
//!
//! // A server that says "hi" to everyone.
//! let server = TcpListener::bind("127.0.0.1:0").await?;
//! let target = server.local_addr()?;
//! tokio::spawn(async move {
//!     while let Ok((mut s, _)) = server.accept().await {
//!         let _ = s.write_all(b"hi").await;
//!     }
//! });
//! let gate = Gate::start(target).await?;
//!
//! let mut buf = Vec::new();
//! TcpStream::connect(gate.addr()).await?.read_to_end(&mut buf).await?;
//! assert_eq!(buf, b"hi");
//!
//! gate.cut();
//! buf.clear();
//! let _ = TcpStream::connect(gate.addr()).await?.read_to_end(&mut buf).await;
//! assert!(buf.is_empty(), "nothing gets through a cut gate");
//!
//! gate.mend();
//! buf.clear();
//! TcpStream::connect(gate.addr()).await?.read_to_end(&mut buf).await?;
//! assert_eq!(buf, b"hi");
//! # Ok(())
//! # }
//! ```

use std::io;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A cuttable TCP proxy on a free loopback port; see the [module docs](self) for what a client
/// sees. Stops when dropped.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> std::io::Result<()> {
/// use tokio::net::TcpListener;
/// use waypost_conformance::gate::Gate;
///
/// let server = TcpListener::bind("127.0.0.1:0").await?;
/// let gate = Gate::start(server.local_addr()?).await?;
/// // The clients under test get the gate's address instead of the server's.
/// assert_ne!(gate.addr(), server.local_addr()?);
/// assert!(gate.is_open());
/// gate.cut(); // a partition, until mended
/// assert!(!gate.is_open());
/// gate.mend();
/// assert!(gate.is_open());
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Gate {
    addr: SocketAddr,
    open: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Gate {
    /// Starts proxying a free port on 127.0.0.1 to `target`, open.
    pub async fn start(target: SocketAddr) -> io::Result<Gate> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (open, _) = watch::channel(true);
        let task = tokio::spawn(accept(listener, target, open.clone()));
        Ok(Gate { addr, open, task })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every open connection and closes new ones at once, until [`mend`](Self::mend).
    pub fn cut(&self) {
        self.open.send_replace(false);
    }

    /// Lets connections through again.
    pub fn mend(&self) {
        self.open.send_replace(true);
    }

    /// Whether connections get through.
    pub fn is_open(&self) -> bool {
        *self.open.borrow()
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.task.abort();
        // Ends the proxied connections too.
        self.open.send_replace(false);
    }
}

async fn accept(listener: TcpListener, target: SocketAddr, open: watch::Sender<bool>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            // Out of file descriptors, say: try again shortly rather than spin.
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        let mut is_open = open.subscribe();
        if !*is_open.borrow_and_update() {
            drop(client); // refused, as by a lost network
            continue;
        }
        tokio::spawn(async move {
            let Ok(mut server) = TcpStream::connect(target).await else {
                return;
            };
            let mut client = client;
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                _ = is_open.wait_for(|open| !*open) => {}
            }
            // Dropping both streams closes the connection on both sides.
        });
    }
}
