//! The control socket: a Unix socket owned by the mount, mode 0600, that
//! speaks one JSON request per line and answers one JSON line each.
//!
//! By default it lives at `/run/vmexportfs/<mountpoint>.sock` for root and
//! under `$XDG_RUNTIME_DIR/vmexportfs/` (else `/tmp/vmexportfs-UID/`) for
//! other users, so `vmexportfs status MOUNTPOINT` finds it from the
//! mountpoint alone. With `control=PATH` the socket is at PATH and the
//! default place holds a symlink to it. Besides the file mode, every
//! connection's peer credentials are checked: only the mounting user and
//! root are served.
//!
//! The socket's directory, when it is the default one or lies where other
//! users can create files (/tmp, a runtime directory), must be the user's
//! own: a real directory (lstat, not a symlink), owned by the user, mode
//! 0700. Otherwise someone else could have put it there and would decide
//! what `vmexportfs rate` talks to. It is created so when missing.
//!
//! Every request is checked before anything changes: a line that is not
//! UTF-8, not JSON, not a known request, or names a limit the throttle
//! cannot enforce gets an error answer naming what is wrong; a line over
//! 64 KiB ends the connection.

use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::status::Status;
use super::Controller;
use crate::throttle::{Limit, LimitError};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// List the provider again now; `path` (inside the mount) must be a
    /// directory of it.
    Refresh {
        path: String,
    },
    /// A new mount limit; `None`: unlimited.
    SetRate {
        limit: Option<Limit>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum Response {
    Status(Box<Status>),
    Rate {
        limit: Option<Limit>,
        origin: String,
    },
    Refreshed {
        changes: crate::fs::refresh::Changes,
    },
    Error {
        message: String,
    },
}

/// A request line longer than this is not one of ours.
const MAX_REQUEST: usize = 64 << 10;
/// How much of a caller's text an error message quotes back.
const QUOTE_MAX: usize = 40;

impl Request {
    /// Parses one request line. The error says what is wrong, naming the
    /// field; unknown fields are refused too, so that a typo (`"brust"`)
    /// is not silently ignored.
    pub fn parse(line: &str) -> Result<Request, String> {
        let value: Value =
            serde_json::from_str(line).map_err(|err| format!("not a JSON request: {err}"))?;
        let Value::Object(mut fields) = value else {
            return Err(format!(
                "a request is a JSON object such as {{\"request\":\"status\"}}, not {}",
                kind_of(&value)
            ));
        };
        let kind = match fields.remove("request") {
            Some(Value::String(kind)) => kind,
            Some(other) => {
                return Err(format!(
                "\"request\" must be a string (\"status\", \"set_rate\" or \"refresh\"), not {}",
                kind_of(&other)
            ))
            }
            None => {
                return Err(
                    "missing \"request\": expected \"status\", \"set_rate\" or \"refresh\"".into(),
                )
            }
        };
        let request = match kind.as_str() {
            "status" => Request::Status,
            "refresh" => match fields.remove("path") {
                None => Request::Refresh { path: "/".into() },
                Some(Value::String(path)) => Request::Refresh { path },
                Some(other) => {
                    return Err(format!(
                        "refresh: \"path\" must be a string (a directory inside the mount), not {}",
                        kind_of(&other)
                    ))
                }
            },
            "set_rate" => {
                let limit = match fields.remove("limit") {
                    None => {
                        return Err("set_rate: missing \"limit\": an object \
                                    {\"rate\":BYTES_PER_SECOND,\"burst\":BYTES}, or null for no limit"
                            .into())
                    }
                    Some(Value::Null) => None,
                    Some(Value::Object(limit)) => Some(parse_limit(limit).map_err(|err| format!("set_rate: {err}"))?),
                    Some(other) => {
                        return Err(format!(
                            "set_rate: \"limit\" must be an object {{\"rate\":..,\"burst\":..}} or null, not {}",
                            kind_of(&other)
                        ))
                    }
                };
                Request::SetRate { limit }
            }
            other => {
                return Err(format!(
                    "unknown request {}: expected \"status\", \"set_rate\" or \"refresh\"",
                    quote(other)
                ))
            }
        };
        if let Some(extra) = fields.keys().next() {
            return Err(format!("{kind}: unknown field {}", quote(extra)));
        }
        Ok(request)
    }
}

/// `{"rate": N, "burst": N}`; a burst left out, null or `"auto"` is the
/// automatic depth. Checked whole ([`Limit::check`]).
fn parse_limit(mut fields: Map<String, Value>) -> Result<Limit, String> {
    let rate = match fields.remove("rate") {
        Some(value) => whole_number("rate", &value)?,
        None => return Err("limit: missing \"rate\" (bytes per second)".into()),
    };
    if rate == 0 {
        // Before `auto`, which would lift it to 1 B/s.
        return Err(LimitError::ZeroRate.to_string());
    }
    let limit = match fields.remove("burst") {
        None | Some(Value::Null) => Limit::auto(rate),
        Some(Value::String(text)) if text == "auto" => Limit::auto(rate),
        Some(value) => Limit {
            rate,
            burst: whole_number("burst", &value)?,
        },
    };
    if let Some(extra) = fields.keys().next() {
        return Err(format!(
            "limit: unknown field {} (expected \"rate\" and \"burst\")",
            quote(extra)
        ));
    }
    limit.check().map_err(|err| err.to_string())?;
    Ok(limit)
}

fn whole_number(name: &str, value: &Value) -> Result<u64, String> {
    match value {
        Value::Number(number) => number.as_u64().ok_or_else(|| {
            if number.as_i64().is_some() {
                format!("{name} {number} is negative: it must be a whole number of bytes")
            } else {
                format!("{name} {number} is not a whole number of bytes")
            }
        }),
        other => Err(format!(
            "{name} must be a whole number of bytes, not {}",
            kind_of(other)
        )),
    }
}

fn kind_of(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("{b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {}", quote(s)),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

/// `text` in quotes, cut short: an error line stays one short line.
fn quote(text: &str) -> String {
    if text.chars().count() <= QUOTE_MAX {
        return format!("{text:?}");
    }
    let cut: String = text.chars().take(QUOTE_MAX).collect();
    format!("{:?}…", cut)
}

/// Where a mount's control socket is when `control=` does not say.
pub fn default_path(mountpoint: &Path) -> PathBuf {
    // `-` doubles, `/` becomes `-`: distinct mountpoints, distinct names.
    let name = mountpoint
        .to_string_lossy()
        .trim_matches('/')
        .replace('-', "--")
        .replace('/', "-");
    let name = if name.is_empty() { "root".into() } else { name };
    runtime_dir().join(format!("{name}.sock"))
}

fn runtime_dir() -> PathBuf {
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        return PathBuf::from("/run/vmexportfs");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("vmexportfs"),
        _ => std::env::temp_dir().join(format!("vmexportfs-{uid}")),
    }
}

/// The socket file (and the symlink to it), removed when dropped.
pub struct ControlSocket {
    path: PathBuf,
    link: Option<PathBuf>,
}

impl ControlSocket {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        if let Some(link) = &self.link {
            if std::fs::read_link(link).is_ok_and(|target| target == self.path) {
                let _ = std::fs::remove_file(link);
            }
        }
    }
}

/// Whether the socket's directory must be the user's own: the default
/// one, or one where other users can create files. Returns the shared
/// directory it lies under (whose sub-directories on the way to `dir` must
/// be safe too).
fn must_be_private(dir: &Path) -> Option<PathBuf> {
    if dir == runtime_dir() {
        return dir.parent().map(Path::to_path_buf);
    }
    let mut shared: Vec<PathBuf> = vec![
        std::env::temp_dir(),
        PathBuf::from("/tmp"),
        PathBuf::from("/var/tmp"),
        PathBuf::from("/dev/shm"),
        PathBuf::from("/run/user"),
    ];
    if let Some(runtime) = std::env::var_os("XDG_RUNTIME_DIR").filter(|dir| !dir.is_empty()) {
        shared.push(PathBuf::from(runtime));
    }
    shared
        .into_iter()
        .filter(|shared| dir.starts_with(shared) && dir != shared)
        .max_by_key(|shared| shared.components().count())
}

/// The directories between `shared` and `dir` (both left out): whoever can
/// rename entries in one of them could swap `dir` for their own, so each
/// must be a real directory of this user's or root's that nobody else may
/// write to.
fn check_between(shared: &Path, dir: &Path) -> anyhow::Result<()> {
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    let mut between: Vec<&Path> = dir
        .ancestors()
        .skip(1)
        .take_while(|ancestor| *ancestor != shared)
        .collect();
    between.reverse();
    for ancestor in between {
        let Ok(meta) = std::fs::symlink_metadata(ancestor) else {
            continue; // Missing: created below, by us.
        };
        let safe = !meta.file_type().is_symlink()
            && meta.is_dir()
            && (meta.uid() == uid || meta.uid() == 0)
            && meta.mode() & 0o022 == 0;
        if !safe {
            anyhow::bail!(
                "control socket directory {}: {} is a symlink, someone else's, or writable by others: refused",
                dir.display(),
                ancestor.display()
            );
        }
    }
    Ok(())
}

/// Makes sure `dir` is the user's own: created mode 0700 if missing, else
/// (by lstat) a real directory, owned by this user, mode 0700.
pub fn ensure_private_dir(dir: &Path) -> anyhow::Result<()> {
    let what = || format!("control socket directory {}", dir.display());
    if let Some(parent) = dir.parent() {
        if !parent.as_os_str().is_empty() && !parent.exists() {
            std::fs::create_dir_all(parent).with_context(what)?;
        }
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {
            // The umask may have taken bits the check below insists on.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .with_context(what)?;
        }
        // There already: checked below, whoever made it.
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(err) => return Err(err).with_context(what),
    }
    let meta = std::fs::symlink_metadata(dir).with_context(what)?;
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    let mode = meta.mode() & 0o7777;
    if meta.file_type().is_symlink() {
        anyhow::bail!(
            "{} is a symlink: refused (it must be a directory of this user's, mode 0700)",
            what()
        );
    }
    if !meta.is_dir() {
        anyhow::bail!("{} is not a directory", what());
    }
    if meta.uid() != uid {
        anyhow::bail!(
            "{} is owned by uid {}, not by this user (uid {uid}): refused",
            what(),
            meta.uid()
        );
    }
    if mode != 0o700 {
        anyhow::bail!(
            "{} has mode {mode:04o}: it must be 0700 (chmod 700 {})",
            what(),
            dir.display()
        );
    }
    Ok(())
}

/// Binds the socket at `path` (mode 0600 in a 0700 directory we create).
/// A socket left by a mount that is gone is replaced; one that answers is
/// another mount's, and an error.
pub async fn bind(path: &Path, default: &Path) -> anyhow::Result<(UnixListener, ControlSocket)> {
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        if let Some(shared) = must_be_private(dir) {
            check_between(&shared, dir)?;
            ensure_private_dir(dir)?;
        } else if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("control socket directory {}", dir.display()))?;
        }
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            anyhow::bail!(
                "control socket {}: exists and is not a socket",
                path.display()
            );
        }
        if UnixStream::connect(path).await.is_ok() {
            anyhow::bail!(
                "control socket {} is in use by another mount",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale control socket {}", path.display()))?;
    }
    // Nobody else may connect between bind and chmod: connecting needs
    // write permission, which the umask already withholds from others.
    let listener =
        UnixListener::bind(path).with_context(|| format!("control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("control socket {}", path.display()))?;
    let mut socket = ControlSocket {
        path: path.to_path_buf(),
        link: None,
    };
    if path != default {
        // So that `vmexportfs status MOUNTPOINT` finds it; best effort.
        // The link goes in the default directory only if it is ours too.
        let made = default
            .parent()
            .map_or(Ok(()), ensure_private_dir)
            .and_then(|()| {
                let _ = std::fs::remove_file(default);
                std::os::unix::fs::symlink(path, default).map_err(anyhow::Error::from)
            });
        match made {
            Ok(()) => socket.link = Some(default.to_path_buf()),
            Err(err) => tracing::warn!(
                "cannot link {} to the control socket: {err:#}; name the socket itself to vmexportfs status/rate/top",
                default.display()
            ),
        }
    }
    Ok((listener, socket))
}

/// Serves connections until the mount ends.
pub async fn serve(listener: UnixListener, controller: Arc<Controller>) {
    // SAFETY: geteuid cannot fail.
    let owner = unsafe { libc::geteuid() };
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                tracing::warn!("control socket: accept: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let peer = stream.peer_cred().map(|cred| cred.uid());
        let controller = Arc::clone(&controller);
        tokio::spawn(async move {
            match peer {
                Ok(uid) if uid == owner || uid == 0 => serve_one(stream, &controller).await,
                Ok(uid) => {
                    tracing::warn!("control socket: refused a connection from uid {uid}");
                    refuse(stream, uid).await;
                }
                Err(err) => tracing::warn!("control socket: no peer credentials: {err}"),
            }
        });
    }
}

async fn refuse(mut stream: UnixStream, uid: u32) {
    let answer = Response::Error {
        message: format!("permission denied: uid {uid} does not own this mount"),
    };
    if let Ok(mut line) = serde_json::to_vec(&answer) {
        line.push(b'\n');
        let _ = stream.write_all(&line).await;
    }
    // Take the request before closing, so that the client's write does not
    // fail with EPIPE before it reads the refusal.
    let mut request = [0u8; 4096];
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        tokio::io::AsyncReadExt::read(&mut stream, &mut request),
    )
    .await;
}

/// One line of a connection, read without ever holding more than
/// [`MAX_REQUEST`] bytes of it.
#[derive(Debug, PartialEq)]
enum Line {
    Text(String),
    NotUtf8,
    TooLong,
}

async fn read_line<R: AsyncBufRead + Unpin>(reader: &mut R) -> std::io::Result<Option<Line>> {
    let mut line = Vec::new();
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            // The end: a last line without a newline still counts.
            if line.is_empty() {
                return Ok(None);
            }
            break;
        }
        let (part, used, done) = match available.iter().position(|&b| b == b'\n') {
            Some(end) => (&available[..end], end + 1, true),
            None => (available, available.len(), false),
        };
        if line.len() + part.len() > MAX_REQUEST {
            return Ok(Some(Line::TooLong));
        }
        line.extend_from_slice(part);
        reader.consume(used);
        if done {
            break;
        }
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Some(match String::from_utf8(line) {
        Ok(text) => Line::Text(text),
        Err(_) => Line::NotUtf8,
    }))
}

/// The answer to one request line; nothing changes unless it is valid.
async fn answer(controller: &Controller, line: &str) -> Response {
    let error = |message: String| Response::Error {
        message: format!("bad request: {message}"),
    };
    match Request::parse(line) {
        Ok(Request::Status) => Response::Status(Box::new(controller.status())),
        Ok(Request::SetRate { limit }) => match controller.set_rate(limit) {
            Ok((limit, origin)) => Response::Rate { limit, origin },
            Err(err) => error(format!("set_rate: {err}")),
        },
        Ok(Request::Refresh { path }) => match controller.core().refresh(&path).await {
            Ok(changes) => Response::Refreshed { changes },
            Err(err) => Response::Error {
                message: format!("refresh {path}: {err}"),
            },
        },
        Err(message) => error(message),
    }
}

async fn serve_one(stream: UnixStream, controller: &Controller) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    while let Ok(Some(line)) = read_line(&mut reader).await {
        let (answer, last) = match line {
            Line::Text(text) => (answer(controller, &text).await, false),
            Line::NotUtf8 => (
                Response::Error {
                    message: "bad request: not UTF-8 text".into(),
                },
                false,
            ),
            // The rest of the line would have to be read to go on: close.
            Line::TooLong => (
                Response::Error {
                    message: format!("bad request: longer than {MAX_REQUEST} bytes"),
                },
                true,
            ),
        };
        let Ok(mut out) = serde_json::to_vec(&answer) else {
            break;
        };
        out.push(b'\n');
        if write.write_all(&out).await.is_err() || last {
            break;
        }
    }
}

/// The client side: one connection, any number of requests.
pub struct Client {
    lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    write: tokio::net::unix::OwnedWriteHalf,
    path: PathBuf,
}

impl Client {
    /// Connects to the mount at `target`: a mountpoint, or a socket path.
    pub async fn connect(target: &Path) -> anyhow::Result<Client> {
        let path = socket_for(target)?;
        let stream = UnixStream::connect(&path).await.map_err(|err| {
            if err.kind() == std::io::ErrorKind::PermissionDenied {
                anyhow!(
                    "control socket {}: {err} (only the user who mounted, and root, may use it)",
                    path.display()
                )
            } else {
                anyhow!(
                    "no running vmexportfs mount answers at {} ({err})",
                    path.display()
                )
            }
        })?;
        let (read, write) = stream.into_split();
        Ok(Client {
            lines: BufReader::new(read).lines(),
            write,
            path,
        })
    }

    pub async fn request(&mut self, request: &Request) -> anyhow::Result<Response> {
        let mut line = serde_json::to_vec(request)?;
        line.push(b'\n');
        let written = self.write.write_all(&line).await;
        if let Err(err) = written {
            // A refusal may be waiting to be read.
            if let Ok(Ok(Some(answer))) =
                tokio::time::timeout(Duration::from_secs(1), self.lines.next_line()).await
            {
                if let Ok(Response::Error { message }) = serde_json::from_str(&answer) {
                    return Err(anyhow!("{message}"));
                }
            }
            return Err(err).with_context(|| format!("control socket {}", self.path.display()));
        }
        // A listing of a large inventory takes a while; anything else is
        // answered from memory.
        let patience = match request {
            Request::Refresh { .. } => Duration::from_secs(600),
            _ => Duration::from_secs(10),
        };
        let answer = tokio::time::timeout(patience, self.lines.next_line())
            .await
            .map_err(|_| anyhow!("control socket {}: no answer", self.path.display()))?
            .with_context(|| format!("control socket {}", self.path.display()))?
            .ok_or_else(|| {
                anyhow!(
                    "control socket {}: the mount closed the connection",
                    self.path.display()
                )
            })?;
        match serde_json::from_str(&answer)? {
            Response::Error { message } => Err(anyhow!("{message}")),
            response => Ok(response),
        }
    }
}

/// The socket for `target`: itself if it is a socket (or a link to one),
/// else the default place for that mountpoint.
fn socket_for(target: &Path) -> anyhow::Result<PathBuf> {
    let meta = std::fs::metadata(target).map_err(|err| anyhow!("{}: {err}", target.display()))?;
    if meta.file_type().is_socket() {
        return Ok(target.to_path_buf());
    }
    if !meta.is_dir() {
        anyhow::bail!(
            "{} is neither a mountpoint nor a control socket",
            target.display()
        );
    }
    let mountpoint = target
        .canonicalize()
        .map_err(|err| anyhow!("{}: {err}", target.display()))?;
    let path = default_path(&mountpoint);
    if !path.exists() {
        anyhow::bail!(
            "no vmexportfs control socket for {} (looked for {}); is it mounted, with control= elsewhere?",
            mountpoint.display(),
            path.display()
        );
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_mountpoints_get_distinct_sockets() {
        let a = default_path(Path::new("/mnt/a-b"));
        let b = default_path(Path::new("/mnt/a/b"));
        assert_ne!(a, b);
        assert!(a.to_string_lossy().ends_with("mnt-a--b.sock"), "{a:?}");
        assert!(b.to_string_lossy().ends_with("mnt-a-b.sock"), "{b:?}");
    }

    #[test]
    fn requests_and_answers_are_one_json_line() {
        let request = Request::SetRate {
            limit: Some(Limit {
                rate: 1000,
                burst: 100,
            }),
        };
        let text = serde_json::to_string(&request).unwrap();
        assert!(!text.contains('\n'));
        // The burst above is below the floor: what the client sends is
        // checked by the server.
        assert!(Request::parse(&text)
            .unwrap_err()
            .contains("below the minimum"));
        let request = Request::SetRate {
            limit: Some(Limit {
                rate: 1000,
                burst: 8192,
            }),
        };
        let text = serde_json::to_string(&request).unwrap();
        assert_eq!(Request::parse(&text).unwrap(), request);
        let off = Request::parse(r#"{"request":"set_rate","limit":null}"#).unwrap();
        assert_eq!(off, Request::SetRate { limit: None });
        assert_eq!(
            Request::parse(r#"{"request":"status"}"#).unwrap(),
            Request::Status
        );
    }

    #[test]
    fn a_burst_left_out_or_auto_is_the_automatic_depth() {
        for line in [
            r#"{"request":"set_rate","limit":{"rate":10485760}}"#,
            r#"{"request":"set_rate","limit":{"rate":10485760,"burst":null}}"#,
            r#"{"request":"set_rate","limit":{"rate":10485760,"burst":"auto"}}"#,
        ] {
            assert_eq!(
                Request::parse(line).unwrap(),
                Request::SetRate {
                    limit: Some(Limit::auto(10 << 20))
                },
                "{line}"
            );
        }
    }

    #[test]
    fn hostile_requests_are_refused_with_what_is_wrong() {
        let long_kind = format!(r#"{{"request":"{}"}}"#, "x".repeat(1000));
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        let cases: &[(&str, &str)] = &[
            (
                r#"{"request":"set_rate","limit":{"rate":0,"burst":0}}"#,
                "rate 0 B/s",
            ),
            (r#"{"request":"set_rate","limit":{"rate":0}}"#, "rate 0 B/s"),
            (
                r#"{"request":"set_rate","limit":{"rate":1048576,"burst":0}}"#,
                "burst 0 B is below the minimum 4096",
            ),
            (
                r#"{"request":"set_rate","limit":{"rate":1048576,"burst":4095}}"#,
                "burst 4095 B",
            ),
            (
                r#"{"request":"set_rate","limit":{"rate":-1,"burst":65536}}"#,
                "rate -1 is negative",
            ),
            (
                r#"{"request":"set_rate","limit":{"rate":1048576,"burst":-65536}}"#,
                "burst -65536 is negative",
            ),
            (
                r#"{"request":"set_rate","limit":{"rate":1.5,"burst":65536}}"#,
                "rate 1.5 is not a whole number",
            ),
            (
                r#"{"request":"set_rate","limit":{"rate":1e400}}"#,
                "not a JSON request",
            ),
            (
                r#"{"request":"set_rate","limit":{"rate":18446744073709551616}}"#,
                "not a whole number",
            ),
            (
                r#"{"request":"set_rate","limit":{"rate":18446744073709551615}}"#,
                "above the maximum",
            ),
            (
                r#"{"request":"set_rate","limit":{"rate":1048576,"burst":18446744073709551615}}"#,
                "burst 18446744073709551615 B is above the maximum",
            ),
            (
                r#"{"request":"set_rate","limit":{"rate":"10M"}}"#,
                "rate must be a whole number of bytes, not the string \"10M\"",
            ),
            (
                r#"{"request":"set_rate","limit":{"rate":true}}"#,
                "not true",
            ),
            (
                r#"{"request":"set_rate","limit":{"burst":65536}}"#,
                "missing \"rate\"",
            ),
            (
                r#"{"request":"set_rate","limit":{"rate":1048576,"brust":65536}}"#,
                "unknown field \"brust\"",
            ),
            (r#"{"request":"set_rate"}"#, "missing \"limit\""),
            (
                r#"{"request":"set_rate","limit":"off"}"#,
                "must be an object",
            ),
            (r#"{"request":"set_rate","limit":[1,2]}"#, "not an array"),
            (r#"{"request":"shutdown"}"#, "unknown request \"shutdown\""),
            (
                r#"{"request":"status","please":1}"#,
                "status: unknown field \"please\"",
            ),
            (r#"{"request":42}"#, "\"request\" must be a string"),
            (r#"{}"#, "missing \"request\""),
            (r#"[]"#, "not an array"),
            (r#""status""#, "not the string"),
            ("null", "not null"),
            ("hello", "not a JSON request"),
            ("", "not a JSON request"),
            (&long_kind, "unknown request"),
            (&deep, "not a JSON request"),
        ];
        for (line, expected) in cases {
            let err = Request::parse(line).expect_err(line);
            assert!(err.contains(expected), "{line}: {err}");
            assert!(
                err.len() < 300 && !err.contains('\n'),
                "{line}: one short line: {err}"
            );
        }
    }

    #[tokio::test]
    async fn lines_are_bounded_and_need_not_be_utf8() {
        let mut input: Vec<u8> = b"{\"request\":\"status\"}\r\n\xff\xfe\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', MAX_REQUEST + 1));
        input.extend_from_slice(b"\nnever read\n");
        // A small buffer: the long line arrives in many pieces.
        let mut reader = BufReader::with_capacity(1000, &input[..]);
        assert_eq!(
            read_line(&mut reader).await.unwrap(),
            Some(Line::Text(r#"{"request":"status"}"#.into()))
        );
        assert_eq!(read_line(&mut reader).await.unwrap(), Some(Line::NotUtf8));
        assert_eq!(read_line(&mut reader).await.unwrap(), Some(Line::TooLong));
        // Exactly the limit is still a line; the end is no line.
        let exact: Vec<u8> = std::iter::repeat_n(b'y', MAX_REQUEST).collect();
        let mut reader = BufReader::new(&exact[..]);
        assert!(
            matches!(read_line(&mut reader).await.unwrap(), Some(Line::Text(t)) if t.len() == MAX_REQUEST)
        );
        assert_eq!(read_line(&mut reader).await.unwrap(), None);
    }

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn the_socket_directory_must_be_the_users_own() {
        let work = tempfile::tempdir().unwrap();
        // Missing: created 0700 (parents too), then accepted as it is.
        let made = work.path().join("new/vmexportfs");
        ensure_private_dir(&made).unwrap();
        assert_eq!(mode(&made), 0o700);
        ensure_private_dir(&made).unwrap();

        let open = work.path().join("group-writable");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o770)).unwrap();
        let err = format!("{:#}", ensure_private_dir(&open).unwrap_err());
        assert!(err.contains("has mode 0770: it must be 0700"), "{err}");

        let readable = work.path().join("world-readable");
        std::fs::create_dir(&readable).unwrap();
        std::fs::set_permissions(&readable, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(ensure_private_dir(&readable).is_err());

        // A symlink to a perfectly private directory is still refused.
        let link = work.path().join("link");
        std::os::unix::fs::symlink(&made, &link).unwrap();
        let err = format!("{:#}", ensure_private_dir(&link).unwrap_err());
        assert!(err.contains("is a symlink"), "{err}");

        let file = work.path().join("file");
        std::fs::write(&file, b"").unwrap();
        assert!(format!("{:#}", ensure_private_dir(&file).unwrap_err()).contains("not a directory"));

        // Someone else's (only root can make one to test with).
        if unsafe { libc::geteuid() } == 0 {
            let theirs = work.path().join("theirs");
            std::fs::create_dir(&theirs).unwrap();
            std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o700)).unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
            let err = format!("{:#}", ensure_private_dir(&theirs).unwrap_err());
            assert!(err.contains("owned by uid 65534"), "{err}");
        }
    }

    #[tokio::test]
    async fn bind_refuses_a_private_directory_inside_an_open_one() {
        let work = tempfile::tempdir().unwrap();
        let open = work.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let dir = open.join("ctl");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let path = dir.join("x.sock");
        let err = format!("{:#}", bind(&path, &path).await.err().unwrap());
        assert!(err.contains("writable by others"), "{err}");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(bind(&path, &path).await.is_ok());
    }

    #[tokio::test]
    async fn bind_refuses_a_shared_directory_that_is_not_private() {
        // Under the temporary directory, where anyone may create things.
        let work = tempfile::tempdir().unwrap();
        let dir = work.path().join("ctl");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let path = dir.join("x.sock");
        let err = format!("{:#}", bind(&path, &path).await.err().unwrap());
        assert!(err.contains("must be 0700"), "{err}");
        assert!(!path.exists());
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let (_listener, socket) = bind(&path, &path).await.unwrap();
        assert_eq!(mode(socket.path()), 0o600);
    }
}
