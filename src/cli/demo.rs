//! `vmexportfs demo`: the main job on the built-in inventory. Mounts
//! `demo://` in a temporary directory, copies one disk through the mount at
//! a visible rate with a live progress line, checks the copy, prints the
//! achieved rate and unmounts.

use std::io::{Read, Write};
use std::time::Instant;

use anyhow::{anyhow, bail, Context};
use indicatif::{ProgressBar, ProgressStyle};

use super::mount::{check_mountpoint, mount};
use crate::options::MountOptions;
use crate::provider::demo::{expected_bytes, DEMO_DISKS};
use crate::size::HumanBytes;

pub fn run(rate: &str, disk: &str) -> anyhow::Result<()> {
    // A small bucket, so that the achieved rate shown is the limit itself
    // rather than the limit plus the initial burst spread over the copy.
    // The demo's mountpoint is temporary: no control socket for it.
    let options = MountOptions::parse([format!("rate={rate},burst=1M,control=off").as_str()])?;
    let (vm, name) = disk
        .split_once('/')
        .ok_or_else(|| anyhow!("--disk wants VM/DISK, e.g. web-01/web-01-disk0.vmdk"))?;
    let &(_, _, size) = DEMO_DISKS
        .iter()
        .find(|(v, d, _)| *v == vm && *d == name)
        .ok_or_else(|| {
            let known: Vec<String> = DEMO_DISKS
                .iter()
                .map(|(v, d, _)| format!("{v}/{d}"))
                .collect();
            anyhow!(
                "no demo disk {disk}; the demo disks are: {}",
                known.join(", ")
            )
        })?;

    let workdir = tempfile::Builder::new()
        .prefix("vmexportfs-demo-")
        .tempdir()
        .context("making a temporary directory")?;
    let mountpoint = workdir.path().join("mnt");
    std::fs::create_dir(&mountpoint)?;
    // A fresh directory: nothing is mounted there to clear.
    let mountpoint = check_mountpoint(&mountpoint, &mut Vec::new())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mounted = mount("demo://", &mountpoint, &options, &[], runtime.handle())?;
    println!("{}", mounted.summary());
    let copy = workdir.path().join(name);
    let result = copy_with_progress(&mountpoint.join(vm).join(name), &copy, size);
    let unmounted = mounted.unmount(runtime.handle());
    let (copied, seconds) = result?;
    unmounted?;
    check_copy(&copy, name, size)?;
    let achieved = copied as f64 / seconds;
    let target = options.rate.unwrap_or(0) as f64;
    println!(
        "copied {vm}/{name}: {copied} bytes in {seconds:.2} s = {:.0} B/s ({}/s){}; contents verified",
        achieved,
        HumanBytes(achieved as u64),
        if target > 0.0 {
            format!(", {:.1}% of the {} B/s limit", achieved / target * 100.0, target as u64)
        } else {
            String::new()
        }
    );
    println!("unmounted {}", mountpoint.display());
    Ok(())
}

fn copy_with_progress(
    from: &std::path::Path,
    to: &std::path::Path,
    size: u64,
) -> anyhow::Result<(u64, f64)> {
    let mut input =
        std::fs::File::open(from).with_context(|| format!("opening {}", from.display()))?;
    let mut output =
        std::fs::File::create(to).with_context(|| format!("creating {}", to.display()))?;
    let bar = ProgressBar::new(size);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} {bytes:>10} / {total_bytes} • {binary_bytes_per_sec} • ETA {eta}",
        )
        .expect("valid template"),
    );
    bar.set_message(
        from.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    );
    let started = Instant::now();
    let mut buf = vec![0u8; 1 << 20];
    let mut copied = 0u64;
    loop {
        let n = input.read(&mut buf).context("reading from the mount")?;
        if n == 0 {
            break;
        }
        output.write_all(&buf[..n])?;
        copied += n as u64;
        bar.set_position(copied);
    }
    let seconds = started.elapsed().as_secs_f64();
    bar.finish();
    if copied != size {
        bail!("copied {copied} bytes, expected {size}");
    }
    Ok((copied, seconds))
}

fn check_copy(copy: &std::path::Path, name: &str, size: u64) -> anyhow::Result<()> {
    let mut file = std::fs::File::open(copy)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    while offset < size {
        let len = (size - offset).min(buf.len() as u64) as usize;
        file.read_exact(&mut buf[..len])?;
        if buf[..len] != expected_bytes(name, offset, len)[..] {
            bail!("the copy differs from the demo disk near offset {offset}");
        }
        offset += len as u64;
    }
    Ok(())
}
