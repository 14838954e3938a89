//! `vmexportfs ls SOURCE`: the inventory as the mount would show it.

use anyhow::Context;

use crate::fs::names::valid_name;
use crate::options::MountOptions;
use crate::provider::open_source;
use crate::size::HumanBytes;

pub fn run(source: &str, option_groups: &[String]) -> anyhow::Result<()> {
    let options = MountOptions::parse(option_groups.iter().map(String::as_str))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let inventory = runtime.block_on(async {
        let provider = open_source(source, &options).await?;
        provider.list().await
    })?;
    let mut rows: Vec<(String, u64)> = inventory
        .disks
        .iter()
        .map(|disk| {
            let path: Vec<String> = disk
                .path
                .iter()
                .map(|p| valid_name(p).into_owned())
                .collect();
            (path.join("/"), disk.size)
        })
        .collect();
    rows.sort();
    let mut total = 0;
    for (path, size) in &rows {
        println!("{size:>16}  {:>10}  {path}", HumanBytes(*size).to_string());
        total += size;
    }
    println!(
        "{} disks, {total} bytes ({})",
        rows.len(),
        HumanBytes(total)
    );
    Ok(())
}
