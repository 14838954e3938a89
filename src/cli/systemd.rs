//! What a daemon run by systemd owes it: readiness on `NOTIFY_SOCKET`
//! (sd_notify(3)) and log lines the journal can file by priority. Written
//! out here rather than through libsystemd: both are a few lines of a
//! documented wire format, and the binary must run where systemd is absent.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use tracing_subscriber::fmt::FormatFields;

/// Sends `state` (newline-separated `KEY=VALUE` lines, e.g. `READY=1`) to
/// the service manager, when one asked for it. Failing to tell it is
/// logged, never fatal: the mount itself is fine.
pub fn notify(state: &str) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let result = (|| {
        let path = socket.as_encoded_bytes();
        // `@name` is a socket in the abstract namespace.
        let address = match path.strip_prefix(b"@") {
            Some(name) => SocketAddr::from_abstract_name(name)?,
            None => SocketAddr::from_pathname(std::path::Path::new(&socket))?,
        };
        let sender = UnixDatagram::unbound()?;
        sender.send_to_addr(state.as_bytes(), &address)?;
        Ok::<_, std::io::Error>(())
    })();
    if let Err(err) = result {
        tracing::warn!(
            operation = "sd_notify",
            "telling the service manager {:?} failed: {err}",
            state.lines().next().unwrap_or("")
        );
    }
}

/// Whether stderr is the journal's stream (systemd sets `JOURNAL_STREAM`
/// to its `device:inode`; a redirected stderr no longer matches).
pub fn stderr_is_journal() -> bool {
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((device, inode)) = stream.split_once(':') else {
        return false;
    };
    let (Ok(device), Ok(inode)) = (device.parse::<u64>(), inode.parse::<u64>()) else {
        return false;
    };
    // SAFETY: fstat on fd 2 into a zeroed stat we own.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(2, &mut stat) } != 0 {
        return false;
    }
    stat.st_dev == device && stat.st_ino == inode
}

/// The syslog priority prefix journald reads off a line (sd-daemon(3)).
pub fn priority_prefix(level: &tracing::Level) -> &'static str {
    match *level {
        tracing::Level::ERROR => "<3>",
        tracing::Level::WARN => "<4>",
        tracing::Level::INFO => "<6>",
        tracing::Level::DEBUG | tracing::Level::TRACE => "<7>",
    }
}

/// Journal lines: a priority prefix, no timestamp (the journal stamps
/// every line), no colours.
pub struct JournalFormat;

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for JournalFormat
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let metadata = event.metadata();
        write!(
            writer,
            "{}{}: ",
            priority_prefix(metadata.level()),
            metadata.target()
        )?;
        ctx.format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_reaches_a_listening_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        // Process-wide, but no other unit test reads it.
        std::env::set_var("NOTIFY_SOCKET", &path);
        notify("READY=1\nSTATUS=mounted");
        std::env::remove_var("NOTIFY_SOCKET");
        let mut buf = [0u8; 64];
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=mounted");
    }

    #[test]
    fn priorities_follow_levels() {
        assert_eq!(priority_prefix(&tracing::Level::ERROR), "<3>");
        assert_eq!(priority_prefix(&tracing::Level::WARN), "<4>");
        assert_eq!(priority_prefix(&tracing::Level::INFO), "<6>");
        assert_eq!(priority_prefix(&tracing::Level::DEBUG), "<7>");
    }
}
