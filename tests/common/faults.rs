//! A fault-injecting HTTP proxy between a mount and a stand-in: it passes
//! requests through, or answers them with the faults providers really show
//! (dropped connections, 500/503, bodies cut short, bodies that stall).
//! One request per connection, so each request can be judged on its own.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Close the connection without answering.
    Drop,
    /// Answer with this status and no body.
    Status(u16),
    /// Forward the answer but close after half of the body.
    CutBody,
    /// Forward the head and a little body, then send nothing for `STALL`.
    Stall,
    /// Forward the request without its Range header (`Range`, Azure's
    /// `x-ms-range`), as a proxy that ignores ranges does: upstream answers
    /// 200 with the whole object.
    StripRange,
    /// Forward the answer with one byte of its body flipped, as a
    /// corrupting middlebox or a bad disk would.
    CorruptBody,
}

const STALL: Duration = Duration::from_secs(6);

#[derive(Debug, Clone)]
pub enum Plan {
    PassThrough,
    /// Every `every`-th request gets the next fault of the cycle.
    Every {
        every: u64,
        faults: Vec<Fault>,
    },
    /// Every request gets this fault.
    Always(Fault),
    /// Requests whose request line contains this text get the fault.
    WhenPath {
        contains: String,
        fault: Fault,
    },
}

pub struct FaultProxy {
    pub port: u16,
    plan: Arc<Mutex<Plan>>,
    pub requests: Arc<AtomicU64>,
    /// Each request's head (request line and headers), in arrival order.
    pub heads: Arc<Mutex<Vec<String>>>,
    pub faults_injected: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl FaultProxy {
    pub fn start(upstream_port: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let plan = Arc::new(Mutex::new(Plan::PassThrough));
        let requests = Arc::new(AtomicU64::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let faults_injected = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, r, h, f, s) = (
            plan.clone(),
            requests.clone(),
            heads.clone(),
            faults_injected.clone(),
            stop.clone(),
        );
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(client) = client else { continue };
                let (p, r, h, f) = (p.clone(), r.clone(), h.clone(), f.clone());
                std::thread::spawn(move || {
                    let _ = handle(client, upstream_port, &p, &r, &h, &f);
                });
            }
        });
        FaultProxy {
            port,
            plan,
            requests,
            heads,
            faults_injected,
            stop,
        }
    }

    pub fn set(&self, plan: Plan) {
        *self.plan.lock().unwrap() = plan;
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn read_head(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push(byte[0]);
    }
    Ok(head)
}

fn handle(
    mut client: TcpStream,
    upstream_port: u16,
    plan: &Mutex<Plan>,
    requests: &AtomicU64,
    heads: &Mutex<Vec<String>>,
    faults_injected: &AtomicU64,
) -> std::io::Result<()> {
    let head = read_head(&mut client)?;
    heads
        .lock()
        .unwrap()
        .push(String::from_utf8_lossy(&head).into_owned());
    let n = requests.fetch_add(1, Ordering::SeqCst) + 1;
    let fault = match &*plan.lock().unwrap() {
        Plan::PassThrough => None,
        Plan::Always(fault) => Some(*fault),
        Plan::Every { every, faults } if n.is_multiple_of(*every) => {
            Some(faults[((n / every - 1) % faults.len() as u64) as usize])
        }
        Plan::Every { .. } => None,
        Plan::WhenPath { contains, fault } => text_line(&head)
            .contains(contains.as_str())
            .then_some(*fault),
    };
    if fault.is_some() {
        faults_injected.fetch_add(1, Ordering::SeqCst);
    }
    match fault {
        Some(Fault::Drop) => return client.shutdown(Shutdown::Both),
        Some(Fault::Status(code)) => {
            let reason = if code == 503 {
                "Service Unavailable"
            } else {
                "Internal Server Error"
            };
            write!(
                client,
                "HTTP/1.1 {code} {reason}\r\nContent-Length: 0\r\nConnection: close\r\nRetry-After: 0\r\n\r\n"
            )?;
            return client.shutdown(Shutdown::Both);
        }
        _ => {}
    }
    // One request per connection: ask upstream to close after answering.
    let text = String::from_utf8_lossy(&head);
    let mut forwarded: String = text
        .split("\r\n")
        .filter(|line| {
            let lower = line.to_ascii_lowercase();
            let strip_range = fault == Some(Fault::StripRange)
                && (lower.starts_with("range:") || lower.starts_with("x-ms-range:"));
            !(lower.starts_with("connection:") || strip_range)
        })
        .take_while(|line| !line.is_empty())
        .map(|line| format!("{line}\r\n"))
        .collect();
    forwarded.push_str("Connection: close\r\n\r\n");
    // A request body (EC2's form-encoded calls) follows the head as is.
    let mut body = vec![0u8; content_length(&text)];
    client.read_exact(&mut body)?;
    let mut upstream = TcpStream::connect(("127.0.0.1", upstream_port))?;
    upstream.write_all(forwarded.as_bytes())?;
    upstream.write_all(&body)?;
    let mut answer = Vec::new();
    upstream.read_to_end(&mut answer)?;
    match fault {
        Some(Fault::CutBody) => {
            let body_at = answer
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map_or(0, |p| p + 4);
            let cut = body_at + (answer.len() - body_at) / 2;
            client.write_all(&answer[..cut])?;
            client.shutdown(Shutdown::Both)
        }
        Some(Fault::Stall) => {
            let body_at = answer
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map_or(0, |p| p + 4);
            client.write_all(&answer[..(body_at + 1000).min(answer.len())])?;
            std::thread::sleep(STALL);
            client.shutdown(Shutdown::Both)
        }
        Some(Fault::CorruptBody) => {
            let body_at = answer
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map_or(0, |p| p + 4);
            if body_at < answer.len() {
                let middle = body_at + (answer.len() - body_at) / 2;
                answer[middle] ^= 0x01;
            }
            client.write_all(&answer)
        }
        _ => client.write_all(&answer),
    }
}

/// The request line of a request head.
pub fn text_line(head: &[u8]) -> String {
    String::from_utf8_lossy(head)
        .split("\r\n")
        .next()
        .unwrap_or("")
        .to_string()
}

/// The Content-Length of a request head, 0 when there is none.
fn content_length(head: &str) -> usize {
    head.split("\r\n")
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse().ok())
        .unwrap_or(0)
}

/// Every kind of transient fault, in turn.
pub const EVERY_KIND: [Fault; 5] = [
    Fault::Drop,
    Fault::Status(503),
    Fault::Status(500),
    Fault::CutBody,
    Fault::Stall,
];

/// `cp` of `file` while every `every`-th request through `proxy` meets a
/// fault: the copy must equal `original`.
pub fn assert_copy_survives_faults(
    proxy: &FaultProxy,
    every: u64,
    file: &std::path::Path,
    original: &[u8],
) {
    proxy.set(Plan::Every {
        every,
        faults: EVERY_KIND.to_vec(),
    });
    let out = tempfile::tempdir().unwrap();
    super::sh(&format!(
        "cp '{}' '{}/'",
        file.display(),
        out.path().display()
    ));
    let copy = std::fs::read(out.path().join(file.file_name().unwrap())).unwrap();
    assert!(copy == original, "{file:?} differs from the source");
    let injected = proxy.faults_injected.load(Ordering::SeqCst);
    assert!(injected >= 5, "only {injected} faults injected");
    proxy.set(Plan::PassThrough);
}

/// With every request failing 503, a read of `file` at `offset` is EIO
/// within a bounded time, not a hang; returns how long it took.
pub fn assert_permanent_fault_is_eio(
    proxy: &FaultProxy,
    file: &std::path::Path,
    offset: u64,
) -> std::time::Duration {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(file).unwrap();
    proxy.set(Plan::Always(Fault::Status(503)));
    let started = std::time::Instant::now();
    let mut buf = vec![0u8; 4096];
    let err = file
        .read_exact_at(&mut buf, offset)
        .expect_err("every request fails");
    let elapsed = started.elapsed();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(
        elapsed < std::time::Duration::from_secs(60),
        "gave up only after {elapsed:?}"
    );
    elapsed
}
