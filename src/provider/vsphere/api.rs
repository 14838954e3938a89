//! The vSphere API (SOAP, through `vim_rs`) on a thread of its own.
//!
//! vim_rs's types reach across the whole vSphere type graph. Proving a
//! future that holds them `Send`, as the provider's async trait must, kept
//! rustc busy for over ten minutes per call site. Here the calls run on one
//! thread with a current-thread runtime, where nothing needs to be `Send`,
//! and the provider exchanges plain values with it over channels.

use std::rc::Rc;

use tokio::sync::{mpsc, oneshot};
use vim_rs::core::client::{Client, ClientBuilder, TransportMode};
use vim_rs::core::pc_helpers::BoxableError;
use vim_rs::core::pc_retrieve::Retrievable;
use vim_rs::core::tasks::TaskTracker;
use vim_rs::mo::{
    ContainerView, PropertyCollector, SessionManager, ViewManager, VirtualMachine,
    VirtualMachineSnapshot,
};
use vim_rs::types::enums::{MoTypesEnum, VirtualMachinePowerStateEnum};
use vim_rs::types::struct_enum::StructType;
use vim_rs::types::structs::{
    ManagedObjectReference, MethodFault, ObjectContent, ObjectSpec, PropertyFilterSpec,
    PropertySpec, RetrieveOptions, SelectionSpec, TraversalSpec, VirtualDisk,
    VirtualDiskFlatVer2BackingInfo, VirtualDiskRawDiskMappingVer1BackingInfo,
    VirtualDiskSeSparseBackingInfo, VirtualDiskSparseVer2BackingInfo, VirtualMachineSnapshotTree,
};
use vim_rs::vim_retrievable;

use super::super::ProviderError;

vim_retrievable!(
    struct DatacenterRow: Datacenter {
        name = "name",
        vm_folder = "vm_folder",
    }
);

vim_retrievable!(
    struct FolderRow: Folder {
        name = "name",
        parent = "parent"?,
    }
);

vim_retrievable!(
    struct VmRow: VirtualMachine {
        name = "name",
        parent = "parent"?,
        devices = "config.hardware.device"?,
        power_state = "runtime.power_state",
        tools = "guest.tools_running_status"?,
    }
);

vim_retrievable!(
    struct VmSnapshotsRow: VirtualMachine {
        name = "name",
        snapshot = "snapshot"?,
    }
);

/// One snapshot of a VM, as the inventory has it.
pub struct SnapshotInfo {
    pub vm_name: String,
    /// The snapshot's managed object id.
    pub id: String,
    pub name: String,
    pub description: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingKind {
    Flat,
    SeSparse,
    SparseVer2,
}

/// One file of a disk's backing chain, newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingLink {
    pub file_name: String,
    pub kind: BackingKind,
}

/// A virtual disk: its backing chain, or why it is not exported.
pub enum DiskBacking {
    Chain(Vec<BackingLink>),
    Skipped { label: String, why: &'static str },
}

pub struct FolderInfo {
    pub id: String,
    pub name: String,
    pub parent: Option<String>,
}

pub struct VmInfo {
    pub id: String,
    pub name: String,
    pub parent: Option<String>,
    pub powered_on: bool,
    pub tools_running: bool,
    pub disks: Vec<DiskBacking>,
}

pub struct Login {
    pub host: String,
    pub user: String,
    pub password: String,
    pub datacenter: String,
    /// With the mount's TLS settings and a cookie jar: SOAP sessions are a
    /// cookie.
    pub http: reqwest::Client,
}

type Reply<T> = oneshot::Sender<Result<T, ProviderError>>;

enum Call {
    Inventory(Reply<(Vec<FolderInfo>, Vec<VmInfo>)>),
    IsAlive(Reply<bool>),
    Login(Reply<()>),
    CreateSnapshot {
        vm: String,
        description: String,
        quiesce: bool,
        reply: Reply<String>,
    },
    RemoveSnapshot {
        snapshot: String,
        reply: Reply<()>,
    },
    Snapshots(Reply<Vec<SnapshotInfo>>),
    Close(oneshot::Sender<()>),
}

/// The handle the provider keeps; the thread ends when it is dropped.
pub struct Api {
    calls: mpsc::UnboundedSender<Call>,
    host: String,
}

impl Api {
    /// Logs in and finds the datacenter; their errors are the mount's.
    pub async fn connect(login: Login) -> Result<Api, ProviderError> {
        let host = login.host.clone();
        let (ready, connected) = oneshot::channel();
        let (calls, queue) = mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name("vsphere-api".into())
            .spawn(move || serve(login, ready, queue))
            .map_err(ProviderError::Io)?;
        connected
            .await
            .map_err(|_| ProviderError::Protocol(format!("{host}: the API thread ended")))??;
        Ok(Api { calls, host })
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Call) -> Result<T, ProviderError> {
        let (reply, answer) = oneshot::channel();
        let gone = || ProviderError::Protocol(format!("{}: the API thread ended", self.host));
        self.calls.send(make(reply)).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    /// Folders and VMs under the datacenter's VM folder.
    pub async fn inventory(&self) -> Result<(Vec<FolderInfo>, Vec<VmInfo>), ProviderError> {
        self.call(Call::Inventory).await
    }

    pub async fn is_alive(&self) -> Result<bool, ProviderError> {
        self.call(Call::IsAlive).await
    }

    pub async fn login(&self) -> Result<(), ProviderError> {
        self.call(Call::Login).await
    }

    /// The new snapshot's managed object id.
    pub async fn create_snapshot(
        &self,
        vm: &str,
        description: String,
        quiesce: bool,
    ) -> Result<String, ProviderError> {
        self.call(|reply| Call::CreateSnapshot {
            vm: vm.to_string(),
            description,
            quiesce,
            reply,
        })
        .await
    }

    pub async fn remove_snapshot(&self, snapshot: &str) -> Result<(), ProviderError> {
        self.call(|reply| Call::RemoveSnapshot {
            snapshot: snapshot.to_string(),
            reply,
        })
        .await
    }

    /// Every snapshot of every VM under the datacenter's VM folder.
    pub async fn snapshots(&self) -> Result<Vec<SnapshotInfo>, ProviderError> {
        self.call(Call::Snapshots).await
    }

    /// Logs out; later calls fail.
    pub async fn close(&self) {
        let (done, finished) = oneshot::channel();
        if self.calls.send(Call::Close(done)).is_ok() {
            let _ = finished.await;
        }
    }
}

pub const SNAPSHOT_NAME: &str = "vmexportfs";

struct Worker {
    client: std::sync::Arc<Client>,
    tasks: TaskTracker,
    vm_folder: ManagedObjectReference,
    host: String,
    user: String,
    password: String,
}

fn serve(
    login: Login,
    ready: oneshot::Sender<Result<(), ProviderError>>,
    mut queue: mpsc::UnboundedReceiver<Call>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            let _ = ready.send(Err(ProviderError::Io(err)));
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let worker = match Worker::connect(login).await {
            Ok(worker) => Rc::new(worker),
            Err(err) => {
                let _ = ready.send(Err(err));
                return;
            }
        };
        let _ = ready.send(Ok(()));
        while let Some(call) = queue.recv().await {
            if let Call::Close(done) = call {
                worker.close().await;
                let _ = done.send(());
                return;
            }
            let worker = worker.clone();
            tokio::task::spawn_local(async move { worker.handle(call).await });
        }
        // The provider went away without closing.
        worker.close().await;
    });
}

impl Worker {
    async fn connect(login: Login) -> Result<Worker, ProviderError> {
        let Login {
            host,
            user,
            password,
            datacenter,
            http,
        } = login;
        let client = ClientBuilder::new(&host, http)
            .basic_authn(&user, &password)
            .app_details("vmexportfs", env!("CARGO_PKG_VERSION"))
            .transport(TransportMode::Soap)
            .build()
            .await
            .map_err(|err| login_error(&host, &user, err))?;
        let found = async {
            let datacenters: Vec<DatacenterRow> = retrieve(
                &client,
                &host,
                "listing datacenters",
                &client.service_content().root_folder,
            )
            .await?;
            match datacenters.iter().find(|dc| dc.name == datacenter) {
                Some(dc) => Ok(dc.vm_folder.clone()),
                None => {
                    let mut known: Vec<&str> =
                        datacenters.iter().map(|dc| dc.name.as_str()).collect();
                    known.sort_unstable();
                    Err(ProviderError::NotFound(format!(
                        "datacenter '{datacenter}' on {host}: it has {}",
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    )))
                }
            }
        }
        .await;
        let vm_folder = match found {
            Ok(folder) => folder,
            Err(err) => {
                let _ = client.close().await;
                return Err(err);
            }
        };
        Ok(Worker {
            tasks: TaskTracker::new(client.clone()),
            client,
            vm_folder,
            host,
            user,
            password,
        })
    }

    async fn handle(&self, call: Call) {
        match call {
            Call::Inventory(reply) => {
                let _ = reply.send(self.inventory().await);
            }
            Call::IsAlive(reply) => {
                let _ = reply.send(self.is_alive().await);
            }
            Call::Login(reply) => {
                let _ = reply.send(self.login().await);
            }
            Call::CreateSnapshot {
                vm,
                description,
                quiesce,
                reply,
            } => {
                let _ = reply.send(self.create_snapshot(&vm, &description, quiesce).await);
            }
            Call::RemoveSnapshot { snapshot, reply } => {
                let _ = reply.send(self.remove_snapshot(&snapshot).await);
            }
            Call::Snapshots(reply) => {
                let _ = reply.send(self.snapshots().await);
            }
            Call::Close(done) => {
                self.close().await;
                let _ = done.send(());
            }
        }
    }

    fn session_manager(&self) -> Result<SessionManager, ProviderError> {
        let reference = self
            .client
            .service_content()
            .session_manager
            .as_ref()
            .ok_or_else(|| ProviderError::Protocol(format!("{}: no SessionManager", self.host)))?;
        Ok(SessionManager::new(self.client.clone(), &reference.value))
    }

    async fn is_alive(&self) -> Result<bool, ProviderError> {
        match self.session_manager()?.current_session().await {
            Ok(current) => Ok(current.is_some()),
            Err(err) if is_not_authenticated(&err) => Ok(false),
            Err(err) => Err(api_error(&self.host, "checking the session", err)),
        }
    }

    async fn login(&self) -> Result<(), ProviderError> {
        self.session_manager()?
            .login(&self.user, &self.password, None)
            .await
            .map(|_| ())
            .map_err(|err| login_error(&self.host, &self.user, err))
    }

    async fn inventory(&self) -> Result<(Vec<FolderInfo>, Vec<VmInfo>), ProviderError> {
        let host = &self.host;
        let folders: Vec<FolderRow> =
            retrieve(&self.client, host, "listing VM folders", &self.vm_folder).await?;
        let vms: Vec<VmRow> = retrieve(&self.client, host, "listing VMs", &self.vm_folder).await?;
        let folders = folders
            .into_iter()
            .map(|folder| FolderInfo {
                id: folder.id.value,
                name: folder.name,
                parent: folder.parent.map(|p| p.value),
            })
            .collect();
        let vms = vms
            .into_iter()
            .map(|vm| VmInfo {
                disks: vm
                    .devices
                    .iter()
                    .flatten()
                    .filter_map(|device| device.as_any_ref().downcast_ref::<VirtualDisk>())
                    .map(|disk| match backing_chain(disk) {
                        Ok(chain) => DiskBacking::Chain(chain),
                        Err(why) => DiskBacking::Skipped {
                            label: disk
                                .virtual_device_
                                .device_info
                                .as_ref()
                                .map(|info| info.get_description().label.clone())
                                .unwrap_or_else(|| format!("disk {}", disk.virtual_device_.key)),
                            why,
                        },
                    })
                    .collect(),
                id: vm.id.value,
                name: vm.name,
                parent: vm.parent.map(|p| p.value),
                powered_on: vm.power_state == VirtualMachinePowerStateEnum::PoweredOn,
                tools_running: vm.tools.as_deref() == Some("guestToolsRunning"),
            })
            .collect();
        Ok((folders, vms))
    }

    async fn create_snapshot(
        &self,
        vm: &str,
        description: &str,
        quiesce: bool,
    ) -> Result<String, ProviderError> {
        let what = "creating a snapshot";
        let task = VirtualMachine::new(self.client.clone(), vm)
            .create_snapshot_task(SNAPSHOT_NAME, Some(description), false, quiesce)
            .await
            .map_err(|err| api_error(&self.host, what, err))?;
        let snapshot: ManagedObjectReference = self
            .tasks
            .wait(task)
            .await
            .map_err(|err| task_error(&self.host, what, err))?;
        Ok(snapshot.value)
    }

    async fn remove_snapshot(&self, snapshot: &str) -> Result<(), ProviderError> {
        let what = "removing the snapshot";
        let task = VirtualMachineSnapshot::new(self.client.clone(), snapshot)
            .remove_snapshot_task(false, Some(true))
            .await
            .map_err(|err| api_error(&self.host, what, err))?;
        self.tasks
            .wait::<()>(task)
            .await
            .map_err(|err| task_error(&self.host, what, err))
    }

    async fn snapshots(&self) -> Result<Vec<SnapshotInfo>, ProviderError> {
        fn walk(vm: &str, trees: &[VirtualMachineSnapshotTree], out: &mut Vec<SnapshotInfo>) {
            for tree in trees {
                out.push(SnapshotInfo {
                    vm_name: vm.to_string(),
                    id: tree.snapshot.value.clone(),
                    name: tree.name.clone(),
                    description: tree.description.clone(),
                });
                walk(vm, tree.child_snapshot_list.as_deref().unwrap_or(&[]), out);
            }
        }
        let vms: Vec<VmSnapshotsRow> = retrieve(
            &self.client,
            &self.host,
            "listing VM snapshots",
            &self.vm_folder,
        )
        .await?;
        let mut out = Vec::new();
        for vm in vms {
            if let Some(info) = &vm.snapshot {
                walk(&vm.name, &info.root_snapshot_list, &mut out);
            }
        }
        Ok(out)
    }

    async fn close(&self) {
        self.tasks.shutdown().await;
        if let Err(err) = self.client.close().await {
            tracing::debug!(host = %self.host, "logout: {}", describe_error(&err));
        }
    }
}

/// Every object of type `T` under `container` (recursively), through a
/// container view that is destroyed afterwards.
///
/// vim_rs's own retriever fails on a container that holds no such object:
/// the simulator then answers `<returnval></returnval>`, which does not read
/// as a RetrieveResult (its `objects` is required), while vCenter leaves
/// `returnval` out. So the view itself is asked for too (with no
/// properties): every answer holds at least one object, nothing is
/// legitimately empty, and a reply that still does not parse stays an error.
async fn retrieve<T>(
    client: &std::sync::Arc<Client>,
    host: &str,
    what: &str,
    container: &ManagedObjectReference,
) -> Result<Vec<T>, ProviderError>
where
    T: Retrievable,
    <T as TryFrom<ObjectContent>>::Error: BoxableError,
{
    let content = client.service_content();
    let view_manager = content
        .view_manager
        .as_ref()
        .ok_or_else(|| ProviderError::Protocol(format!("{host}: {what}: no ViewManager")))?;
    let view = ViewManager::new(client.clone(), &view_manager.value)
        .create_container_view(container, Some(&[T::prop_spec().r#type]), true)
        .await
        .map_err(|err| api_error(host, what, err))?;
    let objects = retrieve_from_view::<T>(client, host, what, &view).await;
    if let Err(err) = ContainerView::new(client.clone(), &view.value)
        .destroy_view()
        .await
    {
        tracing::debug!(host = %host, view = %view.value, "destroying a container view: {}", describe_error(&err));
    }
    objects
}

async fn retrieve_from_view<T>(
    client: &std::sync::Arc<Client>,
    host: &str,
    what: &str,
    view: &ManagedObjectReference,
) -> Result<Vec<T>, ProviderError>
where
    T: Retrievable,
    <T as TryFrom<ObjectContent>>::Error: BoxableError,
{
    const VIEW_TYPE: &str = "ContainerView";
    let spec_set = vec![PropertyFilterSpec {
        object_set: vec![ObjectSpec {
            obj: view.clone(),
            // The view itself is in the answer: see `retrieve`.
            skip: Some(false),
            select_set: Some(vec![Box::new(TraversalSpec {
                selection_spec_: SelectionSpec {
                    name: Some("traverseEntities".to_string()),
                },
                r#type: VIEW_TYPE.to_string(),
                path: "view".to_string(),
                skip: Some(false),
                select_set: None,
            })]),
        }],
        prop_set: vec![
            T::prop_spec(),
            PropertySpec {
                r#type: VIEW_TYPE.to_string(),
                all: Some(false),
                path_set: None,
            },
        ],
        report_missing_objects_in_results: Some(true),
    }];
    let options = RetrieveOptions {
        max_objects: Some(100),
    };
    let collector = PropertyCollector::new(
        client.clone(),
        &client.service_content().property_collector.value,
    );
    let mut page = collector
        .retrieve_properties_ex(&spec_set, &options)
        .await
        .map_err(|err| api_error(host, what, err))?;
    let mut found = Vec::new();
    while let Some(result) = page {
        for object in result.objects {
            if object.obj.r#type == MoTypesEnum::ContainerView && object.obj.value == view.value {
                continue;
            }
            let id = object.obj.value.clone();
            found.push(T::try_from(object).map_err(|err| {
                ProviderError::Protocol(format!("{host}: {what}: object {id}: {err}"))
            })?);
        }
        page = match result.token {
            Some(token) => Some(
                collector
                    .continue_retrieve_properties_ex(&token)
                    .await
                    .map_err(|err| api_error(host, what, err))?,
            ),
            None => None,
        };
    }
    Ok(found)
}

/// The backing chain of a virtual disk, or why it is not exported.
fn backing_chain(disk: &VirtualDisk) -> Result<Vec<BackingLink>, &'static str> {
    let backing = disk
        .virtual_device_
        .backing
        .as_deref()
        .ok_or("the disk has no backing")?;
    let any = backing.as_any_ref();
    let mut chain = Vec::new();
    if let Some(mut flat) = any.downcast_ref::<VirtualDiskFlatVer2BackingInfo>() {
        loop {
            chain.push(BackingLink {
                file_name: flat.virtual_device_file_backing_info_.file_name.clone(),
                kind: BackingKind::Flat,
            });
            match flat.parent.as_deref() {
                Some(parent) => flat = parent,
                None => break,
            }
        }
    } else if let Some(mut sparse) = any.downcast_ref::<VirtualDiskSeSparseBackingInfo>() {
        loop {
            chain.push(BackingLink {
                file_name: sparse.virtual_device_file_backing_info_.file_name.clone(),
                kind: BackingKind::SeSparse,
            });
            match sparse.parent.as_deref() {
                Some(parent) => sparse = parent,
                None => break,
            }
        }
    } else if let Some(mut sparse) = any.downcast_ref::<VirtualDiskSparseVer2BackingInfo>() {
        loop {
            chain.push(BackingLink {
                file_name: sparse.virtual_device_file_backing_info_.file_name.clone(),
                kind: BackingKind::SparseVer2,
            });
            match sparse.parent.as_deref() {
                Some(parent) => sparse = parent,
                None => break,
            }
        }
    } else if any
        .downcast_ref::<VirtualDiskRawDiskMappingVer1BackingInfo>()
        .is_some()
    {
        return Err("a raw device mapping (RDM): its bytes live on a LUN, not in the datastore");
    } else {
        return Err("a backing type the datastore endpoint cannot serve");
    }
    Ok(chain)
}

fn is_not_authenticated(err: &vim_rs::core::client::Error) -> bool {
    matches!(err, vim_rs::core::client::Error::MethodFault(fault)
        if fault.type_ == Some(StructType::NotAuthenticated))
}

/// Names the fault type and its message instead of dumping the structure.
fn describe_fault(fault: &MethodFault) -> String {
    let kind = fault
        .type_
        .map_or_else(|| "MethodFault".to_string(), |t| t.as_str().to_string());
    let message = fault
        .fault_message
        .as_ref()
        .and_then(|messages| messages.first())
        .and_then(|m| m.message.as_deref())
        .unwrap_or("");
    if message.is_empty() {
        kind
    } else {
        format!("{kind}: {message}")
    }
}

fn describe_error(err: &vim_rs::core::client::Error) -> String {
    use vim_rs::core::client::Error;
    match err {
        Error::MethodFault(fault) => describe_fault(fault),
        Error::ReqwestError(err) => super::super::causes(err.as_ref()),
        other => other.to_string(),
    }
}

fn api_error(host: &str, what: &str, err: vim_rs::core::client::Error) -> ProviderError {
    if is_not_authenticated(&err) {
        return ProviderError::Unauthorized(format!("{host}: {what}: session not authenticated"));
    }
    if let vim_rs::core::client::Error::ReqwestError(inner) = &err {
        if inner.is_connect() || inner.is_timeout() {
            return ProviderError::Unreachable(format!("{host}: {what}: {}", describe_error(&err)));
        }
    }
    ProviderError::Protocol(format!("{host}: {what}: {}", describe_error(&err)))
}

/// Errors of the retriever and the task tracker, which wrap API errors.
fn task_error(host: &str, what: &str, err: vim_rs::core::error::Error) -> ProviderError {
    if let Some(client) = err.client_error() {
        return api_error(host, what, client.clone());
    }
    match err.task_fault() {
        Some(fault) => {
            ProviderError::Protocol(format!("{host}: {what}: {}", describe_fault(fault)))
        }
        None => ProviderError::Protocol(format!("{host}: {what}: {err}")),
    }
}

fn login_error(host: &str, user: &str, err: vim_rs::core::client::Error) -> ProviderError {
    use vim_rs::core::client::Error;
    match &err {
        Error::MethodFault(fault) if fault.type_ == Some(StructType::InvalidLogin) => {
            ProviderError::Denied(format!(
                "{host}: user '{user}' cannot log in: wrong user name or password"
            ))
        }
        Error::ReqwestError(inner)
            if inner.is_connect() || inner.is_timeout() || inner.is_request() =>
        {
            ProviderError::Unreachable(format!(
                "{host}: cannot reach the vSphere API: {}",
                describe_error(&err)
            ))
        }
        _ => ProviderError::Protocol(format!(
            "{host}: logging in as '{user}': {}",
            describe_error(&err)
        )),
    }
}
