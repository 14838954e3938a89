//! The vSphere stand-in: govmomi's vCenter simulator wrapped by our own
//! `vmexportfs-vcsim` (tests/vcsim/main.go), over TLS with a test CA's leaf,
//! plus a small vSphere API client (vim_rs) to check what the mount did.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use vim_rs::core::client::{Client, ClientBuilder, TransportMode};
use vim_rs::core::pc_retrieve::ObjectRetriever;
use vim_rs::core::tasks::TaskTracker;
use vim_rs::mo::VirtualMachine;
use vim_rs::types::structs::{ManagedObjectReference, VirtualMachineSnapshotTree};
use vim_rs::vim_retrievable;

use super::tls::TestCa;
use super::{free_port, random_bytes, require_tool};

pub const USER: &str = "administrator@vsphere.local";
pub const PASSWORD: &str = "Sim-Pass-42";

#[derive(Debug, Clone, serde::Deserialize)]
pub struct SimDisk {
    /// `[LocalDS_0] DC0_H0_VM0/disk1.vmdk`
    pub file: String,
    pub capacity: u64,
}

#[derive(Debug, Clone, serde::Deserialize)]
pub struct SimVm {
    pub name: String,
    /// Inventory path, e.g. `/DC0/vm/team-b/DC0_H0_VM0`.
    pub path: String,
    pub disks: Vec<SimDisk>,
}

#[derive(Debug, serde::Deserialize)]
struct Startup {
    url: String,
    datastores: std::collections::HashMap<String, String>,
    vms: Vec<SimVm>,
}

pub struct Vcsim {
    child: Child,
    pub ca: TestCa,
    pub port: u16,
    pub vms: Vec<SimVm>,
    datastores: std::collections::HashMap<String, String>,
    /// The password, mode 0600, for `credentials=`.
    pub password_file: PathBuf,
}

impl Vcsim {
    /// Disks of `disk_mib` MiB each; `extra` goes to the simulator
    /// (e.g. `-idle-timeout 3s`).
    pub fn start(disk_mib: u64, extra: &[&str]) -> Vcsim {
        require_tool("vmexportfs-vcsim");
        let ca = TestCa::new();
        let port = free_port();
        let mut child = Command::new("vmexportfs-vcsim")
            .arg("-listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("-cert")
            .arg(ca.leaf_cert())
            .arg("-key")
            .arg(ca.leaf_key())
            .args(["-user", USER, "-password", PASSWORD])
            .args(["-disk-mib", &disk_mib.to_string()])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting vmexportfs-vcsim");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let startup: Startup = serde_json::from_str(&line)
            .unwrap_or_else(|err| panic!("vmexportfs-vcsim did not start ({err}): {line:?}"));
        assert!(startup.url.contains(&port.to_string()), "{}", startup.url);
        let password_file = ca.dir().join("password");
        std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
        std::fs::set_permissions(&password_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        Vcsim {
            child,
            ca,
            port,
            vms: startup.vms,
            datastores: startup.datastores,
            password_file,
        }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `vsphere://administrator%40vsphere.local@127.0.0.1:PORT/DC`.
    pub fn source(&self, datacenter: &str) -> String {
        format!(
            "vsphere://{}@{}/{datacenter}",
            USER.replace('@', "%40"),
            self.host()
        )
    }

    /// cafile= and credentials=, then `extra`.
    pub fn options(&self, extra: &str) -> String {
        super::with_options(
            format!(
                "cafile={},credentials={}",
                self.ca.ca_file().display(),
                self.password_file.display()
            ),
            extra,
        )
    }

    /// Where a `[datastore] path` lives on this machine.
    pub fn local_path(&self, datastore_path: &str) -> PathBuf {
        let rest = datastore_path.strip_prefix('[').unwrap();
        let (datastore, path) = rest.split_once("] ").unwrap();
        Path::new(&self.datastores[datastore]).join(path)
    }

    /// Writes a monolithic-flat VMDK for the disk at `descriptor`: its text
    /// descriptor and `NAME-flat.vmdk` holding `image` (whole sectors).
    /// Returns the descriptor text.
    pub fn write_disk(&self, descriptor: &str, image: &[u8]) -> String {
        assert_eq!(image.len() % 512, 0);
        let path = self.local_path(descriptor);
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        let flat = format!("{stem}-flat.vmdk");
        let text = format!(
            "# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID=fffffffe\nparentCID=ffffffff\n\
             createType=\"vmfs\"\n\n# Extent description\nRW {} VMFS \"{flat}\"\n\n\
             # The Disk Data Base\n#DDB\n\nddb.adapterType = \"lsilogic\"\nddb.virtualHWVersion = \"13\"\n",
            image.len() / 512
        );
        std::fs::write(&path, &text).unwrap();
        std::fs::write(path.with_file_name(flat), image).unwrap();
        text
    }

    /// Puts a random image into every VM disk (each its own seed), as big
    /// as the disk's capacity; returns (vm, descriptor text, image).
    pub fn fill_all_disks(&self) -> Vec<(SimVm, String, Vec<u8>)> {
        let mut filled = Vec::new();
        for (index, vm) in self.vms.iter().enumerate() {
            for disk in &vm.disks {
                let image = random_bytes(disk.capacity as usize, 100 + index as u64);
                let text = self.write_disk(&disk.file, &image);
                filled.push((vm.clone(), text, image));
            }
        }
        filled
    }

    pub fn api(&self) -> SimApi {
        SimApi::connect(self)
    }

    /// Ends every session there is, through SessionManager.TerminateSession
    /// as an administrator (or vCenter's idle timer) would; returns how many.
    pub fn terminate_sessions(&self) -> usize {
        let pem = std::fs::read(self.ca.ca_file()).unwrap();
        let url = format!("https://{}/vcsim/terminate-sessions", self.host());
        let text = super::block_on(async {
            let response = reqwest::Client::builder()
                .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
                .build()
                .unwrap()
                .post(url)
                .send()
                .await
                .unwrap();
            assert!(response.status().is_success(), "{response:?}");
            response.text().await.unwrap()
        });
        text.trim().parse().unwrap()
    }
}

impl Drop for Vcsim {
    fn drop(&mut self) {
        // SIGTERM lets it remove its datastore directories.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

vim_retrievable!(
    struct VmSnapshots: VirtualMachine {
        name = "name",
        snapshot = "snapshot"?,
    }
);

/// The vSphere API as an operator's script would use it.
pub struct SimApi {
    client: Arc<Client>,
    runtime: tokio::runtime::Runtime,
}

impl SimApi {
    fn connect(sim: &Vcsim) -> SimApi {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let pem = std::fs::read(sim.ca.ca_file()).unwrap();
        let http = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
            .cookie_store(true)
            .build()
            .unwrap();
        let host = sim.host();
        let client = runtime
            .block_on(
                ClientBuilder::new(&host, http)
                    .basic_authn(USER, PASSWORD)
                    .transport(TransportMode::Soap)
                    .build(),
            )
            .expect("API login");
        SimApi { client, runtime }
    }

    /// (VM name, snapshot name) for every snapshot in the inventory.
    pub fn snapshots(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = self
            .snapshot_details()
            .into_iter()
            .map(|(vm, name, _)| (vm, name))
            .collect();
        out.sort();
        out
    }

    /// (VM name, snapshot name, description) for every snapshot.
    pub fn snapshot_details(&self) -> Vec<(String, String, String)> {
        fn walk(
            vm: &str,
            trees: &[VirtualMachineSnapshotTree],
            out: &mut Vec<(String, String, String)>,
        ) {
            for tree in trees {
                out.push((vm.to_string(), tree.name.clone(), tree.description.clone()));
                walk(vm, tree.child_snapshot_list.as_deref().unwrap_or(&[]), out);
            }
        }
        let mut out = Vec::new();
        for vm in self.vms() {
            if let Some(info) = &vm.snapshot {
                walk(&vm.name, &info.root_snapshot_list, &mut out);
            }
        }
        out.sort();
        out
    }

    fn vms(&self) -> Vec<VmSnapshots> {
        let client = self.client.clone();
        self.runtime.block_on(async {
            ObjectRetriever::new(client.clone())
                .unwrap()
                .retrieve_objects_from_container(&client.service_content().root_folder)
                .await
                .unwrap()
        })
    }

    /// Takes a snapshot of the (only) VM called `vm`, as an operator or a
    /// dead daemon would have.
    pub fn create_snapshot(&self, vm: &str, name: &str, description: &str) {
        let found: Vec<VmSnapshots> = self.vms().into_iter().filter(|v| v.name == vm).collect();
        assert_eq!(found.len(), 1, "one VM named {vm}");
        let client = self.client.clone();
        let id = found[0].id.value.clone();
        self.runtime.block_on(async {
            let task = VirtualMachine::new(client.clone(), &id)
                .create_snapshot_task(name, Some(description), false, false)
                .await
                .expect("CreateSnapshot_Task");
            let tasks = TaskTracker::new(client.clone());
            let _: ManagedObjectReference = tasks.wait(task).await.expect("the snapshot task");
            tasks.shutdown().await;
        });
    }
}

impl Drop for SimApi {
    fn drop(&mut self) {
        let client = self.client.clone();
        let _ = self.runtime.block_on(client.close());
    }
}
