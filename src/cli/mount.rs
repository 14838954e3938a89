//! `vmexportfs mount`: check everything that can be checked, mount, answer,
//! then serve until unmounted.
//!
//! Without `--foreground` the process forks before any thread exists. The
//! child builds the provider, lists the inventory, mounts and checks that
//! the mount answers; only then does the parent exit 0. Any failure before
//! that reaches the parent through a pipe and becomes one line on stderr and
//! a non-zero exit, with nothing left mounted.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use fuser::{MountOption, SessionACL};

use crate::control::socket::{self, ControlSocket};
use crate::control::{describe_limit, metrics, Controller};
use crate::fs::{FsCore, Ownership};
use crate::fuse::kernel_mount::{self, KernelMount, MountRequest, Unmounted};
use crate::fuse::FuseAdapter;
use crate::options::{Control, MountOptions};
use crate::provider::{open_source, redact_url};
use crate::read::retry::RetryPolicy;
use crate::read::{ReadConfig, ReadPath};
use crate::size::HumanBytes;
use crate::throttle::fleet::Fleet;
use crate::throttle::Throttle;

const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;
/// Kernel read-ahead for the mount: large enough that the kernel sends
/// 1 MiB requests and keeps several in flight.
const KERNEL_READ_AHEAD_KB: u32 = 4096;
/// Removing a snapshot consolidates what the VM wrote meanwhile, which can
/// take minutes on a busy datastore; the mount waits that long at most.
const PROVIDER_CLOSE_TIMEOUT: Duration = Duration::from_secs(600);
/// fuser request loops, each with its own /dev/fuse clone.
const FUSE_THREADS: usize = 2;

/// FUSE request loops: [`FUSE_THREADS`], or 1 to 8 from
/// `VMEXPORTFS_FUSE_THREADS` (the bench compares them side by side).
fn fuse_threads() -> usize {
    std::env::var("VMEXPORTFS_FUSE_THREADS")
        .ok()
        .and_then(|value| value.parse::<usize>().ok())
        .filter(|threads| (1..=8).contains(threads))
        .unwrap_or(FUSE_THREADS)
}

/// A live mount: the FUSE session and the core behind it.
pub struct Mounted {
    session: Option<fuser::BackgroundSession>,
    /// Our own mount(2), when we made it; `None` when fuser mounted
    /// through fusermount3 and unmounts it with the session.
    kernel_mount: Option<KernelMount>,
    core: Arc<FsCore>,
    controller: Option<Arc<Controller>>,
    /// Removed when the mount goes.
    control_socket: Option<ControlSocket>,
    mountpoint: PathBuf,
    summary: String,
}

impl Mounted {
    /// One line with the effective settings, bytes per second spelled out.
    pub fn summary(&self) -> &str {
        &self.summary
    }

    /// The session ended on its own (someone ran `umount`).
    pub fn is_finished(&self) -> bool {
        self.session
            .as_ref()
            .is_none_or(|session| session.guard.is_finished())
    }

    /// Stops every fetch and unmounts, lazily if the mount is busy; then
    /// lets the provider clean up on its side (snapshots, sessions).
    pub fn unmount(mut self, runtime: &tokio::runtime::Handle) -> anyhow::Result<()> {
        self.control_socket.take();
        self.core.shutdown();
        let kernel_mount = self.kernel_mount.take();
        let result = match self.session.take() {
            None => Ok(()),
            // Unmounted from outside (umount, systemd's idle timeout).
            Some(session) if session.guard.is_finished() => {
                match kernel_mount {
                    Some(kernel_mount) => {
                        kernel_mount.forget();
                        let _ = session.join();
                    }
                    // fuser 0.18 takes a gone connection (POLLERR) for a
                    // live one and would unmount the path again, taking
                    // down what lies below (an autofs trigger); its thread
                    // has ended, so there is nothing to join.
                    None => std::mem::forget(session),
                }
                Ok(())
            }
            Some(session) => match kernel_mount {
                Some(kernel_mount) => match kernel_mount.unmount() {
                    Ok(Unmounted::Clean) => {
                        let _ = session.join();
                        Ok(())
                    }
                    // The session lasts until the last user lets go; the
                    // kernel ends it when this process exits.
                    Ok(Unmounted::Detached) => {
                        tracing::warn!(mountpoint = %self.mountpoint.display(), "unmount: busy; detached");
                        Ok(())
                    }
                    Err(err) => Err(anyhow!(err)),
                },
                None => match session.umount_and_join() {
                    Ok(()) => Ok(()),
                    Err(err) => {
                        tracing::warn!(mountpoint = %self.mountpoint.display(), "unmount: {err}; detaching");
                        lazy_unmount(&self.mountpoint)
                    }
                },
            },
        };
        let core = Arc::clone(&self.core);
        if runtime
            .block_on(async { tokio::time::timeout(PROVIDER_CLOSE_TIMEOUT, core.finish()).await })
            .is_err()
        {
            tracing::error!(
                "the provider did not finish cleaning up within {PROVIDER_CLOSE_TIMEOUT:?}"
            );
        }
        result
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        self.core.shutdown();
    }
}

fn lazy_unmount(mountpoint: &Path) -> anyhow::Result<()> {
    let path = CString::new(mountpoint.as_os_str().as_encoded_bytes())?;
    // SAFETY: a valid NUL-terminated path; umount2 touches nothing else.
    if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINVAL) {
            return Err(err).context(format!("unmounting {}", mountpoint.display()));
        }
    }
    Ok(())
}

/// The filesystem type our mounts show in /proc/mounts.
const FSTYPE: &str = "fuse.vmexportfs";
/// An automount trigger (`x-systemd.automount`, autofs maps): we mount on
/// top of it, as systemd or automount(8) expect.
const AUTOFS: &str = "autofs";
/// How long a mount already there may take to answer before it is taken
/// for live (a stopped daemon hangs every request).
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Canonical mountpoint, refused when missing, not a directory or in use.
/// A dead vmexportfs mount there (its daemon killed: every access gets
/// ENOTCONN) is cleared first, so that a restart loop recovers; what was
/// cleared goes into `notes`, for the log once it is open.
pub fn check_mountpoint(mountpoint: &Path, notes: &mut Vec<String>) -> anyhow::Result<PathBuf> {
    let shown = mountpoint.display();
    // An autofs trigger is taken as it is, and before canonicalize: any
    // look at it (realpath, stat) would wait for the mount we are to make.
    // Only a canonical path can match a mountinfo line.
    if let Ok(absolute) = std::path::absolute(mountpoint) {
        if mounted_type(&absolute)?.as_deref() == Some(AUTOFS) {
            return Ok(absolute);
        }
    }
    let canonical = match mountpoint.canonicalize() {
        Ok(canonical) => canonical,
        // The path itself is a dead FUSE mount: resolve its parent.
        Err(err) if err.raw_os_error() == Some(libc::ENOTCONN) => {
            let absolute = std::path::absolute(mountpoint)
                .map_err(|err| anyhow!("mountpoint {shown}: {err}"))?;
            let (Some(parent), Some(name)) = (absolute.parent(), absolute.file_name()) else {
                bail!("mountpoint {shown}: {err}");
            };
            parent
                .canonicalize()
                .map_err(|err| anyhow!("mountpoint {shown}: {err}"))?
                .join(name)
        }
        Err(err) => bail!("mountpoint {shown}: {err}"),
    };
    if let Some(fstype) = mounted_type(&canonical)? {
        if fstype == AUTOFS {
            return Ok(canonical);
        }
        match probe(&canonical) {
            Probe::Dead if fstype == FSTYPE => {
                lazy_unmount(&canonical)?;
                notes.push(format!(
                    "cleared a dead vmexportfs mount on {} (its daemon was gone)",
                    canonical.display()
                ));
                // A second dead mount stacked below it is cleared too.
                return check_mountpoint(&canonical, notes);
            }
            Probe::Dead => bail!(
                "mountpoint {shown} holds a dead {fstype} mount that is not vmexportfs': unmount it first"
            ),
            Probe::Live => bail!(
                "mountpoint {shown} is already in use ({fstype} is mounted there)"
            ),
            Probe::Hung => bail!(
                "mountpoint {shown} is already in use ({fstype} is mounted there and does not answer)"
            ),
        }
    }
    let meta = std::fs::metadata(&canonical).map_err(|err| anyhow!("mountpoint {shown}: {err}"))?;
    if !meta.is_dir() {
        bail!("mountpoint {shown} is not a directory");
    }
    Ok(canonical)
}

/// The type of the filesystem mounted at `path` (the topmost), if any.
fn mounted_type(path: &Path) -> anyhow::Result<Option<String>> {
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(topmost_mount(&mountinfo, &path.to_string_lossy()).map(|mount| mount.fstype))
}

/// One line of /proc/self/mountinfo, the fields we use.
#[derive(Debug, PartialEq, Eq)]
struct MountEntry {
    /// `major:minor`
    device: String,
    fstype: String,
}

/// In mountinfo, field 3 is the device, field 5 the mountpoint, and the
/// type follows the ` - ` separator; later lines are mounted on top of
/// earlier ones.
fn topmost_mount(mountinfo: &str, wanted: &str) -> Option<MountEntry> {
    mountinfo
        .lines()
        .filter(|line| line.split(' ').nth(4).map(unescape_mountinfo).as_deref() == Some(wanted))
        .filter_map(|line| {
            let device = line.split(' ').nth(2)?.to_owned();
            let (_, after) = line.split_once(" - ")?;
            let fstype = after.split(' ').next().map(unescape_mountinfo)?;
            Some(MountEntry { device, fstype })
        })
        .next_back()
}

enum Probe {
    Live,
    /// ENOTCONN: the daemon that served it is gone.
    Dead,
    Hung,
}

fn probe(path: &Path) -> Probe {
    let Ok(c_path) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return Probe::Live;
    };
    let (sender, answer) = std::sync::mpsc::channel();
    // A thread of its own: statfs on a stopped daemon's mount never returns.
    let prober = std::thread::Builder::new()
        .name("mount-probe".into())
        .spawn(move || {
            // SAFETY: statfs writes into the zeroed struct and nothing else.
            let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
            let result = unsafe { libc::statfs(c_path.as_ptr(), &mut stat) };
            let errno = std::io::Error::last_os_error().raw_os_error();
            let _ = sender.send((result, errno));
        });
    let Ok(prober) = prober else {
        return Probe::Live;
    };
    let answer = answer.recv_timeout(PROBE_TIMEOUT);
    if answer.is_ok() {
        // Gone before the fork that may follow: a forked child must come
        // from a process with one thread.
        let _ = prober.join();
    }
    match answer {
        Ok((-1, Some(libc::ENOTCONN))) => Probe::Dead,
        Ok(_) => Probe::Live,
        Err(_) => Probe::Hung,
    }
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value =
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Builds the provider, lists the inventory and mounts; returns once the
/// mount answers. On error nothing is left mounted.
pub fn mount(
    source: &str,
    mountpoint: &Path,
    options: &MountOptions,
    option_groups: &[String],
    runtime: &tokio::runtime::Handle,
) -> anyhow::Result<Mounted> {
    if options.rw_requested {
        tracing::warn!("option 'rw' ignored: vmexportfs mounts are always read-only");
    }
    let throttle = {
        let _runtime = runtime.enter();
        Throttle::new(options.rate_limit())
    };
    // The fleet first: an unreachable Redis fails the mount before the
    // provider is even asked.
    let fleet = match &options.fleet {
        Some(config) => Some(runtime.block_on(Fleet::start(config.clone(), &throttle))?),
        None => None,
    };
    let provider = runtime.block_on(open_source(source, options))?;
    let read_path = ReadPath::new(
        provider.clone(),
        Arc::clone(&throttle),
        ReadConfig {
            memory: options.cache,
            retry: RetryPolicy {
                timeout: options.timeout,
                ..RetryPolicy::default()
            },
            ..ReadConfig::default()
        },
    );
    crate::read::trim::spawn(&read_path);
    let mut owner = Ownership::current();
    owner.uid = options.uid.unwrap_or(owner.uid);
    owner.gid = options.gid.unwrap_or(owner.gid);
    owner.umask = options.umask.unwrap_or(owner.umask);
    let core = runtime
        .block_on(FsCore::new(provider, read_path, owner, options.refresh))
        .map_err(|err| anyhow!("{}: {err}", redact_url(source)))?;
    let core = Arc::new(core);

    let mut config = fuser::Config::default();
    config.mount_options = vec![
        MountOption::FSName(redact_url(source)),
        MountOption::CUSTOM("subtype=vmexportfs".into()),
        MountOption::RO,
        MountOption::NoSuid,
        MountOption::NoDev,
    ];
    // Other users must get exactly what uid=/gid=/umask= allow: without
    // default_permissions the kernel would let them read 0400 files.
    if options.allow_other && !options.default_permissions {
        tracing::info!("allow_other: turning default_permissions on, so that uid=, gid= and umask= apply to other users");
    }
    if options.default_permissions || options.allow_other {
        config.mount_options.push(MountOption::DefaultPermissions);
    }
    config.acl = if options.allow_other {
        SessionACL::All
    } else if options.allow_root {
        SessionACL::RootAndOwner
    } else {
        SessionACL::Owner
    };
    // Two request loops, each on its own clone of /dev/fuse: while one
    // thread copies a 1 MiB reply into the kernel, the other reads the
    // next request (measured on 2 cores, one sequential reader: 15-25%
    // more from nginx in three pairs, inside the noise; demo:// the same).
    // The work itself runs on the tokio runtime.
    let threads = fuse_threads();
    config.n_threads = Some(threads);
    config.clone_fd = threads > 1;
    let adapter = FuseAdapter::new(Arc::clone(&core), runtime.clone());
    let mount_error = |err: std::io::Error| {
        if err.kind() == std::io::ErrorKind::PermissionDenied {
            anyhow!(
                "mounting {}: {err} (FUSE mounts need root or the fuse3 package's fusermount3)",
                mountpoint.display()
            )
        } else {
            anyhow!("mounting {}: {err}", mountpoint.display())
        }
    };
    let fsname = redact_url(source);
    let request = MountRequest {
        mountpoint,
        fsname: &fsname,
        subtype: "vmexportfs",
        allow_other: config.acl != SessionACL::Owner,
        default_permissions: config
            .mount_options
            .contains(&MountOption::DefaultPermissions),
    };
    let (session, kernel_mount) = match kernel_mount::mount(&request).map_err(mount_error)? {
        Some((fuse_fd, kernel_mount)) => {
            let acl = config.acl;
            // A failed handshake drops `kernel_mount`, which detaches it.
            let session = fuser::Session::from_fd(adapter, fuse_fd, acl, config)
                .and_then(fuser::Session::spawn)
                .map_err(mount_error)?;
            (session, Some(kernel_mount))
        }
        None => (
            fuser::spawn_mount(adapter, mountpoint, &config).map_err(mount_error)?,
            None,
        ),
    };
    core.set_kernel_cache(Box::new(crate::fuse::KernelNotifier(session.notifier())));
    let mut mounted = Mounted {
        session: Some(session),
        kernel_mount,
        core: Arc::clone(&core),
        controller: None,
        control_socket: None,
        mountpoint: mountpoint.to_path_buf(),
        summary: String::new(),
    };
    if let Err(err) = check_answers(mountpoint) {
        let _ = mounted.unmount(runtime);
        return Err(err);
    }
    raise_kernel_read_ahead(mountpoint);
    let controller = Controller::new(
        redact_url(source),
        mountpoint.to_path_buf(),
        core,
        fleet,
        options.clone(),
        option_groups.to_vec(),
    );
    mounted.controller = Some(Arc::clone(&controller));
    let served = runtime.block_on(serve_control(&controller, mountpoint, options));
    let endpoints = match served {
        Ok((socket, endpoints)) => {
            mounted.control_socket = socket;
            endpoints
        }
        Err(err) => {
            let _ = mounted.unmount(runtime);
            return Err(err);
        }
    };
    let summary = summary_line(source, mountpoint, options, &throttle, &endpoints);
    tracing::info!("{summary}");
    mounted.summary = summary;
    Ok(mounted)
}

/// Starts the controller's tasks, the control socket and the metrics
/// endpoint; returns the socket and a note of where they listen.
async fn serve_control(
    controller: &Arc<Controller>,
    mountpoint: &Path,
    options: &MountOptions,
) -> anyhow::Result<(Option<ControlSocket>, String)> {
    controller.spawn_tasks();
    let mut endpoints = String::new();
    let default = socket::default_path(mountpoint);
    let socket = match &options.control {
        Control::Off => None,
        Control::At(path) => Some(socket::bind(path, &default).await?),
        Control::Default => match socket::bind(&default, &default).await {
            Ok(bound) => Some(bound),
            Err(err) => {
                tracing::warn!("{err:#}; vmexportfs rate/status/top will not reach this mount");
                None
            }
        },
    };
    let socket = socket.map(|(listener, socket)| {
        tokio::spawn(socket::serve(listener, Arc::clone(controller)));
        endpoints.push_str(&format!(", control {}", socket.path().display()));
        socket
    });
    if let Some(addr) = options.metrics {
        let listener = metrics::bind(addr).await?;
        endpoints.push_str(&format!(", metrics http://{addr}/metrics"));
        tokio::spawn(metrics::serve(listener, Arc::clone(controller)));
    }
    Ok((socket, endpoints))
}

fn summary_line(
    source: &str,
    mountpoint: &Path,
    options: &MountOptions,
    throttle: &Throttle,
    endpoints: &str,
) -> String {
    let mut limit = format!("rate {}", describe_limit(throttle.limit()));
    if let Some(schedule) = &options.schedule {
        limit.push_str(&format!(" (timetable: {schedule})"));
    }
    if let Some(file_rate) = options.file_rate {
        limit.push_str(&format!(
            ", each file at most {file_rate} B/s ({}/s)",
            HumanBytes(file_rate)
        ));
    }
    if let Some(fleet) = &options.fleet {
        limit.push_str(&format!(
            ", fleet '{}' {} B/s ({}/s) at {}",
            fleet.key,
            fleet.rate,
            HumanBytes(fleet.rate),
            fleet.url
        ));
    }
    format!(
        "mounted {} on {} read-only: {limit}, cache {} B ({}){endpoints}",
        redact_url(source),
        mountpoint.display(),
        options.cache,
        HumanBytes(options.cache)
    )
}

fn check_answers(mountpoint: &Path) -> anyhow::Result<()> {
    let path = CString::new(mountpoint.as_os_str().as_encoded_bytes())?;
    // SAFETY: statfs writes into the zeroed struct we pass and nothing else.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error()).context(format!(
            "the mount at {} does not answer",
            mountpoint.display()
        ));
    }
    if stat.f_type as i64 != FUSE_SUPER_MAGIC {
        bail!(
            "{} is not a FUSE mount after mounting",
            mountpoint.display()
        );
    }
    std::fs::read_dir(mountpoint)
        .with_context(|| format!("the mount at {} does not answer", mountpoint.display()))?;
    Ok(())
}

/// The kernel reads a FUSE file in 128 KiB requests unless the mount's
/// backing device allows more read-ahead; KernelConfig can only lower it.
/// The device comes from mountinfo, not a stat of the mountpoint, which
/// on an autofs trigger would wait for systemd (see `mount`).
fn raise_kernel_read_ahead(mountpoint: &Path) {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let Some(device) = topmost_mount(&mountinfo, &mountpoint.to_string_lossy())
        .filter(|mount| mount.fstype == FSTYPE)
        .map(|mount| mount.device)
    else {
        return;
    };
    let knob = format!("/sys/class/bdi/{device}/read_ahead_kb");
    if let Err(err) = std::fs::write(&knob, KERNEL_READ_AHEAD_KB.to_string()) {
        tracing::debug!("cannot raise kernel read-ahead at {knob}: {err}");
    }
}

/// Serves until unmounted or told to stop (SIGTERM, SIGINT); SIGHUP
/// re-reads the config file.
async fn serve_until_done(mounted: &Mounted) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut hangup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: unmounting"); return Ok(()) }
            _ = interrupt.recv() => { tracing::info!("SIGINT: unmounting"); return Ok(()) }
            _ = hangup.recv() => {
                if let Some(controller) = &mounted.controller {
                    controller.reload();
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                if mounted.is_finished() {
                    tracing::info!("unmounted");
                    return Ok(());
                }
            }
        }
    }
}

fn build_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8)))
        .thread_name("vmexportfs")
        .enable_all()
        .build()
        .context("starting the runtime")
}

pub fn run(
    source: &str,
    mountpoint: &Path,
    option_groups: &[String],
    foreground: bool,
) -> anyhow::Result<()> {
    let options = MountOptions::parse(option_groups.iter().map(String::as_str))?;
    // Limits past what the throttle accepts (rate=2T) are refused here with
    // one line rather than clamped later.
    crate::control::check_options(&options).map_err(|err| anyhow!("{err}"))?;
    let mut notes = Vec::new();
    let mountpoint = check_mountpoint(mountpoint, &mut notes)?;
    if foreground {
        super::init_stderr_logging();
        log_notes(&notes);
        let runtime = build_runtime()?;
        let mounted = mount(
            source,
            &mountpoint,
            &options,
            option_groups,
            runtime.handle(),
        )?;
        super::systemd::notify(&format!("READY=1\nSTATUS={}", mounted.summary()));
        let served = runtime.block_on(serve_until_done(&mounted));
        super::systemd::notify("STOPPING=1");
        mounted.unmount(runtime.handle())?;
        return served;
    }
    let log_path = options
        .log
        .clone()
        .unwrap_or_else(|| default_log_path(&mountpoint));
    let (read_end, write_end) = pipe()?;
    // SAFETY: no thread has been started yet, so the child is a faithful
    // copy; it goes on to build its own runtime.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()).context("fork"),
        0 => {
            drop(read_end);
            let mut ready = std::fs::File::from(write_end);
            let status = match run_daemon(
                &notes,
                source,
                &mountpoint,
                &options,
                option_groups,
                &log_path,
                &mut ready,
            ) {
                Ok(()) => 0,
                Err(err) => {
                    let _ = writeln!(ready, "ERR {}", one_line(&format!("{err:#}")));
                    tracing::error!("{err:#}");
                    1
                }
            };
            std::process::exit(status);
        }
        _child => {
            drop(write_end);
            let mut answer = String::new();
            std::fs::File::from(read_end)
                .read_to_string(&mut answer)
                .context("waiting for the mount")?;
            let first = answer.lines().next().unwrap_or("");
            if let Some(summary) = first.strip_prefix("OK ") {
                eprintln!("vmexportfs: {summary}");
                Ok(())
            } else if let Some(err) = first.strip_prefix("ERR ") {
                Err(anyhow!("{err}"))
            } else {
                Err(anyhow!(
                    "the mount process ended before the mount answered (see {})",
                    log_path.display()
                ))
            }
        }
    }
}

fn log_notes(notes: &[String]) {
    for note in notes {
        tracing::warn!("{note}");
    }
}

fn run_daemon(
    notes: &[String],
    source: &str,
    mountpoint: &Path,
    options: &MountOptions,
    option_groups: &[String],
    log_path: &Path,
    ready: &mut std::fs::File,
) -> anyhow::Result<()> {
    // Run by systemd (a mount unit, a service): the journal has stderr, and
    // keeps it for the daemon's life, unless log= names a file.
    let to_journal = options.log.is_none() && super::systemd::stderr_is_journal();
    if to_journal {
        super::init_stderr_logging();
    } else {
        init_file_logging(log_path)?;
    }
    log_notes(notes);
    detach_stdio(to_journal)?;
    let runtime = build_runtime()?;
    let mounted = mount(source, mountpoint, options, option_groups, runtime.handle())?;
    // Our own session only once mounted: an autofs trigger lets the
    // process group that serves it (systemd's, which mount(8) and we are
    // in until here) mount on it, and makes every other process wait.
    // SAFETY: a plain process-state syscall.
    unsafe {
        libc::setsid();
    }
    writeln!(ready, "OK {}", mounted.summary())?;
    drop(std::mem::replace(ready, std::fs::File::open("/dev/null")?));
    // The daemon is not the process systemd started: name it (its units
    // need NotifyAccess=all for this; --foreground needs nothing).
    super::systemd::notify(&format!(
        "READY=1\nMAINPID={}\nSTATUS={}",
        std::process::id(),
        mounted.summary()
    ));
    let result = runtime.block_on(serve_until_done(&mounted));
    super::systemd::notify("STOPPING=1");
    mounted.unmount(runtime.handle())?;
    result
}

fn one_line(text: &str) -> String {
    text.replace('\n', " ")
}

fn pipe() -> anyhow::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds that we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("pipe");
    }
    // SAFETY: both fds were just created and are owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Standard descriptors to /dev/null, stderr kept when it is the log.
fn detach_stdio(keep_stderr: bool) -> anyhow::Result<()> {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    use std::os::fd::AsRawFd;
    for fd in 0..if keep_stderr { 2 } else { 3 } {
        // SAFETY: dup2 onto the standard descriptors, which we own.
        unsafe {
            libc::dup2(null.as_raw_fd(), fd);
        }
    }
    let _ = std::env::set_current_dir("/");
    Ok(())
}

/// `/var/log/vmexportfs/<mountpoint with / as ->.log`, or under /tmp for
/// users who cannot write /var/log.
fn default_log_path(mountpoint: &Path) -> PathBuf {
    let name = mountpoint
        .to_string_lossy()
        .trim_matches('/')
        .replace('/', "-");
    let name = if name.is_empty() { "root".into() } else { name };
    // SAFETY: geteuid cannot fail.
    let dir = if unsafe { libc::geteuid() } == 0 {
        PathBuf::from("/var/log/vmexportfs")
    } else {
        std::env::temp_dir().join(format!("vmexportfs-{}", unsafe { libc::geteuid() }))
    };
    dir.join(format!("{name}.log"))
}

fn init_file_logging(path: &Path) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("log directory {}", dir.display()))?;
    }
    use std::os::unix::fs::OpenOptionsExt;
    // Never through a symlink someone planted in a shared directory, and
    // readable by the mounting user only: paths and errors are in it.
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("log file {}", path.display()))?;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,fuser=error"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(file))
        .try_init();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_gives_the_topmost_type() {
        let mountinfo = "22 1 0:21 / /mnt/a rw - ext4 /dev/vda rw\n\
                         40 22 0:40 / /mnt/a\\040b ro,nosuid - fuse.vmexportfs demo:// ro\n\
                         41 22 0:41 / /mnt/a ro - fuse.vmexportfs dir:///x ro\n";
        let entry = |device: &str, fstype: &str| MountEntry {
            device: device.into(),
            fstype: fstype.into(),
        };
        assert_eq!(
            topmost_mount(mountinfo, "/mnt/a"),
            Some(entry("0:41", "fuse.vmexportfs"))
        );
        assert_eq!(
            topmost_mount(mountinfo, "/mnt/a b"),
            Some(entry("0:40", "fuse.vmexportfs"))
        );
        assert_eq!(topmost_mount(mountinfo, "/mnt"), None);
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/x\\134y"), "/x\\y");
    }

    #[test]
    fn log_names_follow_the_mountpoint() {
        let path = default_log_path(Path::new("/mnt/vms/a"));
        assert!(path.to_string_lossy().ends_with("mnt-vms-a.log"));
    }
}
