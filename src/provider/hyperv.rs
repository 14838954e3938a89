//! `hyperv:///path`: a Hyper-V `Export-VM` tree, e.g. on an SMB share.
//!
//! An export is `<root>/<VM>/Virtual Hard Disks/*.vhdx|vhd|avhdx` beside
//! `Virtual Machines/` and `Snapshots/`. Each VM becomes a directory holding
//! its disks and nothing else. A root that is itself one VM's export folder
//! (it holds `Virtual Hard Disks/`) is shown as that single VM.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::local::{component, data_ranges_blocking, pin_blocking, read_blocking, LocalTree};
use super::{DiskEntry, Inventory, Pinned, Provider, ProviderError};

const DISK_FOLDER: &str = "virtual hard disks";
const DISK_EXTENSIONS: &[&str] = &["vhdx", "vhd", "avhdx", "avhd"];

pub struct HyperVProvider {
    tree: Arc<LocalTree>,
}

impl HyperVProvider {
    pub fn new(root: PathBuf) -> Result<Self, ProviderError> {
        Ok(HyperVProvider {
            tree: Arc::new(LocalTree::open(root)?),
        })
    }
}

/// Finds a child directory of `parent` (below the root) by name the way
/// Windows does: case-insensitively. Returns its path below the root.
fn child_dir(tree: &LocalTree, parent: &Path, wanted: &str) -> std::io::Result<Option<PathBuf>> {
    for entry in std::fs::read_dir(tree.root().join(parent))? {
        let entry = entry?;
        if entry.file_type()?.is_dir()
            && entry
                .file_name()
                .to_string_lossy()
                .eq_ignore_ascii_case(wanted)
        {
            return Ok(Some(parent.join(entry.file_name())));
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

fn add_vm(
    tree: &LocalTree,
    vm_name: String,
    disks_dir: &Path,
    out: &mut Inventory,
) -> std::io::Result<()> {
    let mut entries: Vec<_> =
        std::fs::read_dir(tree.root().join(disks_dir))?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|entry| entry.file_name());
    let before = out.disks.len();
    for entry in entries {
        let name = component(&entry.file_name());
        if entry.file_type()?.is_file() && is_disk(&name) {
            out.disks.push(tree.entry(
                vec![vm_name.clone(), name],
                &disks_dir.join(entry.file_name()),
                &entry.metadata()?,
            ));
        }
    }
    if out.disks.len() == before {
        out.empty_dirs.push(vec![vm_name]);
    }
    Ok(())
}

fn list_export(tree: &LocalTree) -> std::io::Result<Inventory> {
    let mut inventory = Inventory::default();
    let top = Path::new("");
    if let Some(disks_dir) = child_dir(tree, top, DISK_FOLDER)? {
        let vm_name = tree
            .root()
            .file_name()
            .map(component)
            .unwrap_or_else(|| "vm".into());
        add_vm(tree, vm_name, &disks_dir, &mut inventory)?;
        return Ok(inventory);
    }
    let mut vms: Vec<_> = std::fs::read_dir(tree.root())?.collect::<Result<_, _>>()?;
    vms.sort_by_key(|entry| entry.file_name());
    for vm in vms {
        if !vm.file_type()?.is_dir() {
            continue;
        }
        let vm_dir = Path::new(vm.file_name().as_os_str()).to_path_buf();
        // One unreadable VM folder must not hide the others.
        let listed = child_dir(tree, &vm_dir, DISK_FOLDER).and_then(|disks_dir| match disks_dir {
            Some(disks_dir) => add_vm(tree, component(&vm.file_name()), &disks_dir, &mut inventory),
            None => Ok(()),
        });
        if let Err(err) = listed {
            tracing::warn!(directory = %vm.path().display(), "skipping an unreadable VM folder: {err}");
        }
    }
    Ok(inventory)
}

#[async_trait]
impl Provider for HyperVProvider {
    async fn list(&self) -> Result<Inventory, ProviderError> {
        let tree = Arc::clone(&self.tree);
        let inventory = tokio::task::spawn_blocking(move || {
            let root = tree.root();
            list_export(&tree).map_err(|err| {
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
                self.tree.root().display()
            )));
        }
        Ok(inventory)
    }

    async fn pin(&self, disk: &DiskEntry) -> Result<Pinned, ProviderError> {
        pin_blocking(&self.tree, disk).await
    }

    async fn data_ranges(
        &self,
        _disk: &DiskEntry,
        pinned: &Pinned,
    ) -> Result<Option<Vec<std::ops::Range<u64>>>, ProviderError> {
        data_ranges_blocking(pinned).await
    }

    async fn read(
        &self,
        _disk: &DiskEntry,
        pinned: &Pinned,
        offset: u64,
        len: usize,
    ) -> Result<Bytes, ProviderError> {
        read_blocking(pinned, offset, len).await
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
        let tree = LocalTree::open(root.path().to_path_buf()).unwrap();
        let inventory = list_export(&tree).unwrap();
        assert_eq!(inventory.disks.len(), 1);
        assert_eq!(inventory.disks[0].path, vec!["web01", "web01.vhdx"]);
        assert_eq!(inventory.disks[0].size, 3);
        assert_eq!(inventory.empty_dirs, vec![vec!["empty".to_string()]]);
    }
}
