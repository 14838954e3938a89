//! The command line: `mount`, `ls`, `demo`, and `rate`, `status`, `top`,
//! `refresh` for a running mount.

mod control;
mod demo;
mod ls;
mod manual;
pub mod mount;
mod systemd;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "vmexportfs",
    version,
    about = "Mount a VM inventory read-only and export its disks through one rate limit",
    after_help = "Sources: demo://, dir:///path, hyperv:///path, http(s)://host/manifest.json, s3://, ebs://, az://, gs://, vsphere://\n\
                  Options (-o): rate=SIZE, burst=SIZE|auto, cache=SIZE, schedule=, file_rate=, priority=, fleet=, control=, metrics=, ...\n\
                  See docs/options.md."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Mount SOURCE on MOUNTPOINT (daemonizes once the mount answers)
    #[command(after_long_help = manual::MOUNT_OPTIONS_HELP)]
    Mount {
        /// The source; `-` takes it from $VMEXPORTFS_SOURCE, which keeps a
        /// signed URL out of `ps`
        source: String,
        mountpoint: PathBuf,
        /// Mount options, comma separated (may be repeated)
        #[arg(short = 'o', value_name = "OPTIONS")]
        options: Vec<String>,
        /// Stay in the foreground and log to stderr
        #[arg(short = 'f', long)]
        foreground: bool,
    },
    /// Print the inventory of SOURCE as the mount would show it; mount nothing
    Ls {
        source: String,
        #[arg(short = 'o', value_name = "OPTIONS")]
        options: Vec<String>,
    },
    /// Show or change a running mount's limit: RATE, RATE:BURST or off
    Rate {
        /// The mountpoint (or its control socket)
        mountpoint: PathBuf,
        /// New limit, e.g. 50M, 50M:5M, 400Mbit, off
        limit: Option<String>,
    },
    /// Limits, totals, and each open file with its reading process
    Status {
        /// The mountpoint (or its control socket)
        mountpoint: PathBuf,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// List the source again now: new disks appear, removed ones go
    Refresh {
        /// The mountpoint (or its control socket)
        mountpoint: PathBuf,
        /// A directory inside the mount, absolute or relative to the
        /// mountpoint (default: all of it)
        path: Option<PathBuf>,
    },
    /// The status, live, refreshed every second (q quits)
    Top {
        /// The mountpoint (or its control socket)
        mountpoint: PathBuf,
    },
    /// Mount the built-in demo inventory, copy one disk at a visible rate, unmount
    Demo {
        /// Rate of the demo copy
        #[arg(long, default_value = "32M")]
        rate: String,
        /// Disk to copy, as VM/DISK
        #[arg(long, default_value = "web-01/web-01-disk0.vmdk")]
        disk: String,
    },
}

/// Runs the command line and returns the process exit status.
pub fn main() -> i32 {
    log_panics();
    // Packaging's own command, kept out of the clap definitions so that the
    // manuals and completions made from them do not offer it.
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() == Some(std::ffi::OsStr::new(manual::GENERATE_DOCS)) {
        let result = match (args.next(), args.next()) {
            (Some(dir), None) => manual::generate(std::path::Path::new(&dir)),
            _ => Err(anyhow::anyhow!(
                "usage: vmexportfs {} DIR",
                manual::GENERATE_DOCS
            )),
        };
        return match result {
            Ok(()) => 0,
            Err(err) => {
                eprintln!("vmexportfs: {err:#}");
                1
            }
        };
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Mount {
            source,
            mountpoint,
            options,
            foreground,
        } => source_from_env(source)
            .and_then(|source| mount::run(&source, &mountpoint, &options, foreground)),
        Command::Ls { source, options } => ls::run(&source, &options),
        Command::Demo { rate, disk } => demo::run(&rate, &disk),
        Command::Rate { mountpoint, limit } => control::rate(&mountpoint, limit.as_deref()),
        Command::Status { mountpoint, json } => control::status(&mountpoint, json),
        Command::Top { mountpoint } => control::top(&mountpoint),
        Command::Refresh { mountpoint, path } => control::refresh(&mountpoint, path.as_deref()),
    };
    match result {
        Ok(()) => 0,
        Err(err) => {
            eprintln!("vmexportfs: {err:#}");
            1
        }
    }
}

/// `-` stands for the source in $VMEXPORTFS_SOURCE (set by the mount
/// helper for URLs with a query string, so signatures stay out of argv).
fn source_from_env(source: String) -> anyhow::Result<String> {
    if source != "-" {
        return Ok(source);
    }
    let from_env = std::env::var(SOURCE_ENV)
        .map_err(|_| anyhow::anyhow!("source '-' needs the source in ${SOURCE_ENV}"))?;
    // Not inherited by anything we start. (No other thread exists yet.)
    std::env::remove_var(SOURCE_ENV);
    Ok(from_env)
}

const SOURCE_ENV: &str = "VMEXPORTFS_SOURCE";

/// A panic anywhere — a FUSE thread, a fetch task, the control socket —
/// goes to the log with where it happened; the code around it contains it
/// (one request fails, the mount goes on).
fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|text| text.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        let location = info
            .location()
            .map(|at| format!("{}:{}:{}", at.file(), at.line(), at.column()))
            .unwrap_or_else(|| "unknown location".into());
        let thread = std::thread::current()
            .name()
            .unwrap_or("unnamed")
            .to_string();
        if tracing::dispatcher::has_been_set() {
            tracing::error!(%location, %thread, "panic: {message}");
        } else {
            eprintln!("vmexportfs: panic at {location} (thread {thread}): {message}");
        }
    }));
}

/// Logs to stderr at `info` unless RUST_LOG says otherwise; in the
/// journal's format when stderr is the journal (run by systemd).
pub(crate) fn init_stderr_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,fuser=error"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if systemd::stderr_is_journal() {
        builder
            .with_ansi(false)
            .event_format(systemd::JournalFormat)
            .try_init()
    } else {
        builder.try_init()
    };
}
