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

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::status::Status;
use super::Controller;
use crate::throttle::Limit;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    Status,
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
    Error {
        message: String,
    },
}

/// A request line longer than this is not one of ours.
const MAX_REQUEST: usize = 64 << 10;

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

/// Binds the socket at `path` (mode 0600 in a 0700 directory we create).
/// A socket left by a mount that is gone is replaced; one that answers is
/// another mount's, and an error.
pub async fn bind(path: &Path, default: &Path) -> anyhow::Result<(UnixListener, ControlSocket)> {
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("control socket directory {}", dir.display()))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
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
        let made = default
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| {
                let _ = std::fs::remove_file(default);
                std::os::unix::fs::symlink(path, default)
            });
        match made {
            Ok(()) => socket.link = Some(default.to_path_buf()),
            Err(err) => tracing::warn!(
                "cannot link {} to the control socket: {err}; name the socket itself to vmexportfs status/rate/top",
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

async fn serve_one(stream: UnixStream, controller: &Controller) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if line.len() > MAX_REQUEST {
            break;
        }
        let answer = match serde_json::from_str::<Request>(&line) {
            Ok(Request::Status) => Response::Status(Box::new(controller.status())),
            Ok(Request::SetRate { limit }) => {
                let (limit, origin) = controller.set_rate(limit);
                Response::Rate { limit, origin }
            }
            Err(err) => Response::Error {
                message: format!("bad request: {err}"),
            },
        };
        let Ok(mut out) = serde_json::to_vec(&answer) else {
            break;
        };
        out.push(b'\n');
        if write.write_all(&out).await.is_err() {
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
        let answer = tokio::time::timeout(Duration::from_secs(10), self.lines.next_line())
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
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), request);
        let off: Request = serde_json::from_str(r#"{"request":"set_rate","limit":null}"#).unwrap();
        assert_eq!(off, Request::SetRate { limit: None });
    }
}
