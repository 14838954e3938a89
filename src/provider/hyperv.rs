//! `hyperv:///path`: a Hyper-V `Export-VM` tree, e.g. on an SMB share.
//!
//! An export is `<root>/<VM>/Virtual Hard Disks/*.vhdx|vhd|avhdx` beside
//! `Virtual Machines/` and `Snapshots/`. Each VM becomes a directory holding
//! its disks and nothing else. A root that is itself one VM's export folder
//! (it holds `Virtual Hard Disks/`) is shown as that single VM.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;

use super::dir::{check_root, data_ranges_blocking, entry_for, read_blocking, stat_file};
use super::{DiskEntry, Inventory, Provider, ProviderError, Version};

const DISK_FOLDER: &str = "virtual hard disks";
const DISK_EXTENSIONS: &[&str] = &["vhdx", "vhd", "avhdx", "avhd"];

pub struct HyperVProvider {
    root: PathBuf,
}

impl HyperVProvider {
    pub fn new(root: PathBuf) -> Result<Self, ProviderError> {
        check_root(&root)?;
        Ok(HyperVProvider { root })
    }
}

/// Finds a child directory by name the way Windows does: case-insensitively.
fn child_dir(parent: &Path, wanted: &str) -> std::io::Result<Option<PathBuf>> {
    for entry in std::fs::read_dir(parent)? {
        let entry = entry?;
        if entry.file_type()?.is_dir()
            && entry
                .file_name()
                .to_string_lossy()
                .eq_ignore_ascii_case(wanted)
        {
            return Ok(Some(entry.path()));
        }
    }
    Ok(None)
}

fn is_disk(name: &str) -> bool {
    name.rsplit_once('.').is_some_and(|(_, ext)| {
        DISK_EXTENSIONS
            .iter()
            .any(|known| known.eq_ignore_ascii_case(ext))
    })
}

fn add_vm(vm_name: String, disks_dir: &Path, out: &mut Inventory) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(disks_dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|entry| entry.file_name());
    let before = out.disks.len();
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.file_type()?.is_file() && is_disk(&name) {
            out.disks.push(entry_for(
                vec![vm_name.clone(), name],
                &entry.path(),
                &entry.metadata()?,
            ));
        }
    }
    if out.disks.len() == before {
        out.empty_dirs.push(vec![vm_name]);
    }
    Ok(())
}

fn list_export(root: &Path) -> std::io::Result<Inventory> {
    let mut inventory = Inventory::default();
    if let Some(disks_dir) = child_dir(root, DISK_FOLDER)? {
        let vm_name = root
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|| "vm".into());
        add_vm(vm_name, &disks_dir, &mut inventory)?;
        return Ok(inventory);
    }
    let mut vms: Vec<_> = std::fs::read_dir(root)?.collect::<Result<_, _>>()?;
    vms.sort_by_key(|entry| entry.file_name());
    for vm in vms {
        if !vm.file_type()?.is_dir() {
            continue;
        }
        if let Some(disks_dir) = child_dir(&vm.path(), DISK_FOLDER)? {
            add_vm(
                vm.file_name().to_string_lossy().into_owned(),
                &disks_dir,
                &mut inventory,
            )?;
        }
    }
    Ok(inventory)
}

#[async_trait]
impl Provider for HyperVProvider {
    async fn list(&self) -> Result<Inventory, ProviderError> {
        let root = self.root.clone();
        let inventory = tokio::task::spawn_blocking(move || {
            list_export(&root).map_err(|err| {
                ProviderError::Io(std::io::Error::new(
                    err.kind(),
                    format!("listing Hyper-V export {}: {err}", root.display()),
                ))
            })
        })
        .await
        .map_err(|err| ProviderError::Io(std::io::Error::other(err)))??;
        if inventory.disks.is_empty() && inventory.empty_dirs.is_empty() {
            return Err(ProviderError::NotFound(format!(
                "{} holds no Hyper-V export (no '<VM>/Virtual Hard Disks/' folder)",
                self.root.display()
            )));
        }
        Ok(inventory)
    }

    async fn stat(&self, disk: &DiskEntry) -> Result<(u64, Version), ProviderError> {
        stat_file(&disk.locator).await
    }

    async fn data_ranges(
        &self,
        disk: &DiskEntry,
        version: &Version,
        _size: u64,
    ) -> Result<Option<Vec<std::ops::Range<u64>>>, ProviderError> {
        data_ranges_blocking(&disk.locator, version).await
    }

    async fn read(
        &self,
        disk: &DiskEntry,
        version: &Version,
        offset: u64,
        len: usize,
    ) -> Result<Bytes, ProviderError> {
        read_blocking(&disk.locator, version, offset, len).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_extensions_are_case_insensitive() {
        assert!(is_disk("a.vhdx"));
        assert!(is_disk("A.VHD"));
        assert!(is_disk("snap_1234.avhdx"));
        assert!(!is_disk("vm.vmcx"));
        assert!(!is_disk("vhdx"));
    }

    #[test]
    fn lists_vms_and_only_their_disks() {
        let root = tempfile::tempdir().unwrap();
        let vm = root.path().join("web01");
        std::fs::create_dir_all(vm.join("Virtual Hard Disks")).unwrap();
        std::fs::create_dir_all(vm.join("Virtual Machines")).unwrap();
        std::fs::write(vm.join("Virtual Hard Disks/web01.vhdx"), b"abc").unwrap();
        std::fs::write(vm.join("Virtual Hard Disks/notes.txt"), b"x").unwrap();
        std::fs::write(vm.join("Virtual Machines/cfg.vmcx"), b"x").unwrap();
        std::fs::create_dir_all(root.path().join("empty/virtual hard disks")).unwrap();
        std::fs::create_dir_all(root.path().join("not-a-vm")).unwrap();
        let inventory = list_export(root.path()).unwrap();
        assert_eq!(inventory.disks.len(), 1);
        assert_eq!(inventory.disks[0].path, vec!["web01", "web01.vhdx"]);
        assert_eq!(inventory.disks[0].size, 3);
        assert_eq!(inventory.empty_dirs, vec![vec!["empty".to_string()]]);
    }
}
