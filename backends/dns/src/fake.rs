//! A small authoritative DNS server for the unit tests: UDP and TCP on one loopback port,
//! answers from a zone the test changes as it goes, and the failures a real server shows
//! (SERVFAIL, REFUSED, silence, truncation, closed connections).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use hickory_resolver::proto::op::{Edns, Message, MessageType, ResponseCode};
use hickory_resolver::proto::rr::rdata::{A, AAAA, SRV};
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;

/// What the server says to a question.
#[derive(Clone, Debug)]
pub enum Reply {
    /// NOERROR with these records.
    Records {
        answers: Vec<Record>,
        additionals: Vec<Record>,
    },
    /// An empty answer with this code.
    Code(ResponseCode),
    /// No answer at all.
    Silence,
}

#[derive(Default)]
struct State {
    zone: Mutex<HashMap<(String, RecordType), Reply>>,
    questions: AtomicUsize,
    /// UDP answers with records come back truncated and empty (TCP answers in full).
    udp_truncates: AtomicBool,
    /// TCP connections are closed after each answer (as servers close idle connections).
    tcp_one_shot: AtomicBool,
    /// Every question gets no answer.
    silent: AtomicBool,
}

/// A running fake server; stops when dropped.
pub struct FakeDns {
    addr: SocketAddr,
    state: Arc<State>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for FakeDns {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn name(s: &str) -> Name {
    let mut n = Name::from_ascii(s).expect("a test name");
    n.set_fqdn(true);
    n
}

/// An SRV record `name` → `target:port`.
pub fn srv(owner: &str, priority: u16, weight: u16, port: u16, target: &str) -> Record {
    Record::from_rdata(
        name(owner),
        0,
        RData::SRV(SRV::new(priority, weight, port, name(target))),
    )
}

/// An A or AAAA record.
pub fn addr(owner: &str, ip: IpAddr) -> Record {
    let data = match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    };
    Record::from_rdata(name(owner), 0, data)
}

impl FakeDns {
    /// Starts a server on a free loopback port (UDP and TCP).
    pub async fn start() -> FakeDns {
        let (udp, tcp) = loop {
            let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind tcp");
            let port = tcp.local_addr().expect("tcp addr").port();
            if let Ok(udp) = UdpSocket::bind(("127.0.0.1", port)).await {
                break (udp, tcp);
            }
        };
        let addr = tcp.local_addr().expect("tcp addr");
        let state = Arc::new(State::default());
        let udp = Arc::new(udp);
        let tasks = vec![
            tokio::spawn(serve_udp(udp, state.clone())),
            tokio::spawn(serve_tcp(tcp, state.clone())),
        ];
        FakeDns { addr, state, tasks }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sets the reply to `name`/`rtype`.
    pub fn set(&self, owner: &str, rtype: RecordType, reply: Reply) {
        self.state
            .zone
            .lock()
            .expect("zone lock")
            .insert((key(owner), rtype), reply);
    }

    /// Sets the SRV answer of `owner` and its additional section.
    pub fn set_srv(&self, owner: &str, answers: Vec<Record>, additionals: Vec<Record>) {
        self.set(
            owner,
            RecordType::SRV,
            Reply::Records {
                answers,
                additionals,
            },
        );
    }

    /// Removes `owner`: NXDOMAIN for every type.
    pub fn remove(&self, owner: &str) {
        self.state
            .zone
            .lock()
            .expect("zone lock")
            .retain(|(n, _), _| *n != key(owner));
    }

    pub fn questions(&self) -> usize {
        self.state.questions.load(Ordering::SeqCst)
    }

    pub fn udp_truncates(&self, on: bool) {
        self.state.udp_truncates.store(on, Ordering::SeqCst);
    }

    pub fn tcp_one_shot(&self, on: bool) {
        self.state.tcp_one_shot.store(on, Ordering::SeqCst);
    }

    pub fn silent(&self, on: bool) {
        self.state.silent.store(on, Ordering::SeqCst);
    }
}

/// The answer to `request`, or `None` to stay silent.
fn answer(state: &State, request: &[u8], udp: bool) -> Option<Vec<u8>> {
    let request = Message::from_vec(request).ok()?;
    state.questions.fetch_add(1, Ordering::SeqCst);
    if state.silent.load(Ordering::SeqCst) {
        return None;
    }
    let query = request.queries().first()?.clone();
    let reply = state
        .zone
        .lock()
        .ok()?
        .get(&(key(&query.name().to_ascii()), query.query_type()))
        .cloned();
    let name_exists = state
        .zone
        .lock()
        .ok()?
        .keys()
        .any(|(n, _)| *n == key(&query.name().to_ascii()));
    let mut resp = Message::new();
    resp.set_id(request.id())
        .set_message_type(MessageType::Response)
        .set_op_code(request.op_code())
        .set_recursion_desired(request.recursion_desired())
        .set_authoritative(true)
        .add_query(query);
    if request.extensions().is_some() {
        resp.set_edns(Edns::new());
    }
    match reply {
        Some(Reply::Silence) => return None,
        Some(Reply::Code(code)) => {
            resp.set_response_code(code);
        }
        Some(Reply::Records {
            answers,
            additionals,
        }) => {
            if udp && state.udp_truncates.load(Ordering::SeqCst) && !answers.is_empty() {
                resp.set_truncated(true);
            } else {
                resp.add_answers(answers).add_additionals(additionals);
            }
        }
        // The name exists with other types: NOERROR without answers; else NXDOMAIN.
        None if name_exists => {}
        None => {
            resp.set_response_code(ResponseCode::NXDomain);
        }
    }
    resp.to_vec().ok()
}

async fn serve_udp(socket: Arc<UdpSocket>, state: Arc<State>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        if let Some(bytes) = answer(&state, &buf[..n], true) {
            let _ = socket.send_to(&bytes, from).await;
        }
    }
}

async fn serve_tcp(listener: TcpListener, state: Arc<State>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(serve_conn(stream, state.clone()));
    }
}

async fn serve_conn(mut stream: TcpStream, state: Arc<State>) {
    loop {
        let mut len = [0u8; 2];
        if stream.read_exact(&mut len).await.is_err() {
            return;
        }
        let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if stream.read_exact(&mut msg).await.is_err() {
            return;
        }
        if let Some(bytes) = answer(&state, &msg, false) {
            let Ok(n) = u16::try_from(bytes.len()) else {
                return;
            };
            if stream.write_all(&n.to_be_bytes()).await.is_err()
                || stream.write_all(&bytes).await.is_err()
            {
                return;
            }
        }
        if state.tcp_one_shot.load(Ordering::SeqCst) {
            return;
        }
    }
}
