// vcsim-front: the govmomi vCenter simulator (Debian ships its library but
// not its command) served over TLS with a given certificate, with what the
// integration tests need from a real vCenter that the library leaves out:
//   - the datastore endpoint /folder answers 401 without a live API session
//     (the library serves it to anyone);
//   - sessions that expire when idle, on a short clock, and
//     POST /vcsim/terminate-sessions, which ends every session through the
//     API as an administrator would (the simulator's sessionList is more
//     than vim_rs can parse);
//   - disks of a given capacity, and a second VM under another folder with a
//     name that is already taken, as happens in real inventories.
// On startup it prints one JSON line: the URL, the datastores' directories
// and every VM with its inventory path and disks.
package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/vmware/govmomi"
	"github.com/vmware/govmomi/find"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/session"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

type diskInfo struct {
	File     string `json:"file"`
	Capacity int64  `json:"capacity"`
}

type vmInfo struct {
	Name  string     `json:"name"`
	Path  string     `json:"path"`
	Disks []diskInfo `json:"disks"`
}

type startup struct {
	URL        string            `json:"url"`
	Datastores map[string]string `json:"datastores"`
	VMs        []vmInfo          `json:"vms"`
}

// A CurrentTime call needs a session, so its answer tells whether the
// cookie the request carries belongs to a live one.
const sessionProbe = `<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body>
<CurrentTime xmlns="urn:vim25"><_this type="ServiceInstance">ServiceInstance</_this></CurrentTime>
</soapenv:Body></soapenv:Envelope>`

func liveSession(sdk http.Handler, r *http.Request) bool {
	cookie, err := r.Cookie(soap.SessionCookieName)
	if err != nil {
		return false
	}
	probe := httptest.NewRequest(http.MethodPost, "/sdk", bytes.NewBufferString(sessionProbe))
	probe.Header.Set("Content-Type", "text/xml")
	probe.Header.Set("SOAPAction", "urn:vim25/6.5")
	probe.AddCookie(cookie)
	answer := httptest.NewRecorder()
	sdk.ServeHTTP(answer, probe)
	return answer.Code == http.StatusOK && !strings.Contains(answer.Body.String(), "NotAuthenticated")
}

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to serve on")
	certFile := flag.String("cert", "", "PEM certificate (leaf first)")
	keyFile := flag.String("key", "", "PEM key")
	user := flag.String("user", "administrator@vsphere.local", "the one user that may log in")
	password := flag.String("password", "", "its password")
	diskMiB := flag.Int64("disk-mib", 0, "capacity of every VM disk (0: the model's)")
	collide := flag.Bool("collide", true, "add folder team-b with a second VM named DC0_H0_VM0")
	idle := flag.Duration("idle-timeout", 0, "end sessions idle this long, as vCenter does after 30m (0: never)")
	flag.Parse()
	simulator.SessionIdleTimeout = *idle
	if *certFile == "" || *keyFile == "" || *password == "" {
		log.Fatal("-cert, -key and -password are required")
	}

	model := simulator.VPX()
	if err := model.Create(); err != nil {
		log.Fatal(err)
	}
	defer model.Remove()

	if *diskMiB > 0 {
		for _, obj := range simulator.Map.All("VirtualMachine") {
			vm := obj.(*simulator.VirtualMachine)
			for _, device := range vm.Config.Hardware.Device {
				if disk, ok := device.(*types.VirtualDisk); ok {
					disk.CapacityInKB = *diskMiB * 1024
					disk.CapacityInBytes = *diskMiB << 20
				}
			}
		}
	}

	cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
	if err != nil {
		log.Fatal(err)
	}
	model.Service.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	model.Service.Listen = &url.URL{Host: *listen, User: url.UserPassword(*user, *password)}
	server := model.Service.NewServer()
	defer server.Close()

	ctx := context.Background()
	login := *server.URL
	login.User = url.UserPassword(*user, *password)

	sdk := server.Config.Handler
	server.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/vcsim/terminate-sessions" && r.Method == http.MethodPost {
			ended, err := terminateSessions(ctx, &login)
			if err != nil {
				http.Error(w, err.Error(), http.StatusInternalServerError)
				return
			}
			fmt.Fprintln(w, ended)
			return
		}
		if strings.HasPrefix(r.URL.Path, "/folder/") && !liveSession(sdk, r) {
			w.Header().Set("WWW-Authenticate", `Basic realm="VMware HTTP server"`)
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		sdk.ServeHTTP(w, r)
	})

	client, err := govmomi.NewClient(ctx, &login, true)
	if err != nil {
		log.Fatal(err)
	}
	finder := find.NewFinder(client.Client, true)
	dc, err := finder.Datacenter(ctx, "DC0")
	if err != nil {
		log.Fatal(err)
	}
	finder.SetDatacenter(dc)

	if *collide {
		if err := addCollidingVM(ctx, finder, dc, *diskMiB); err != nil {
			log.Fatal(err)
		}
	}

	public := *server.URL
	public.User = nil
	out := startup{URL: public.String(), Datastores: map[string]string{}}
	for _, obj := range simulator.Map.All("Datastore") {
		ds := obj.(*simulator.Datastore)
		out.Datastores[ds.Name] = ds.Info.GetDatastoreInfo().Url
	}
	vms, err := finder.VirtualMachineList(ctx, "*")
	if err != nil {
		log.Fatal(err)
	}
	for _, vm := range vms {
		devices, err := vm.Device(ctx)
		if err != nil {
			log.Fatal(err)
		}
		info := vmInfo{Name: vm.Name(), Path: vm.InventoryPath, Disks: []diskInfo{}}
		for _, device := range devices.SelectByType((*types.VirtualDisk)(nil)) {
			disk := device.(*types.VirtualDisk)
			backing := disk.Backing.(types.BaseVirtualDeviceFileBackingInfo).GetVirtualDeviceFileBackingInfo()
			info.Disks = append(info.Disks, diskInfo{File: backing.FileName, Capacity: disk.CapacityInKB * 1024})
		}
		out.VMs = append(out.VMs, info)
	}
	_ = client.Logout(ctx)
	line, _ := json.Marshal(out)
	fmt.Println(string(line))

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	<-stop
}

// addCollidingVM creates folder team-b holding a second, powered-on VM
// named DC0_H0_VM0; like vCenter, it gives the VM's files a directory of
// their own (DC0_H0_VM0_1).
func addCollidingVM(ctx context.Context, finder *find.Finder, dc *object.Datacenter, diskMiB int64) error {
	folders, err := dc.Folders(ctx)
	if err != nil {
		return err
	}
	teamB, err := folders.VmFolder.CreateFolder(ctx, "team-b")
	if err != nil {
		return err
	}
	host, err := finder.HostSystem(ctx, "DC0_H0")
	if err != nil {
		return err
	}
	pool, err := host.ResourcePool(ctx)
	if err != nil {
		return err
	}
	const dir = "[LocalDS_0] DC0_H0_VM0_1"
	config := types.VirtualMachineConfigSpec{
		Name:    "DC0_H0_VM0",
		GuestId: string(types.VirtualMachineGuestOsIdentifierOtherGuest),
		Files:   &types.VirtualMachineFileInfo{VmPathName: dir},
	}
	var devices object.VirtualDeviceList
	scsi, _ := devices.CreateSCSIController("pvscsi")
	disk := devices.CreateDisk(scsi.(types.BaseVirtualController), types.ManagedObjectReference{}, dir+"/disk1.vmdk")
	disk.CapacityInKB = 1024
	if diskMiB > 0 {
		disk.CapacityInKB = diskMiB * 1024
	}
	devices = append(devices, scsi, disk)
	config.DeviceChange, _ = devices.ConfigSpec(types.VirtualDeviceConfigSpecOperationAdd)
	task, err := teamB.CreateVM(ctx, config, pool, host)
	if err != nil {
		return err
	}
	info, err := task.WaitForResult(ctx, nil)
	if err != nil {
		return err
	}
	vm := object.NewVirtualMachine(teamB.Client(), info.Result.(types.ManagedObjectReference))
	power, err := vm.PowerOn(ctx)
	if err != nil {
		return err
	}
	return power.Wait(ctx)
}

// terminateSessions logs in, ends every other session through
// SessionManager.TerminateSession, logs out, and says how many it ended.
func terminateSessions(ctx context.Context, login *url.URL) (int, error) {
	client, err := govmomi.NewClient(ctx, login, true)
	if err != nil {
		return 0, err
	}
	defer func() { _ = client.Logout(ctx) }()
	var manager mo.SessionManager
	err = client.RetrieveOne(ctx, *client.ServiceContent.SessionManager, []string{"sessionList", "currentSession"}, &manager)
	if err != nil {
		return 0, err
	}
	var others []string
	for _, s := range manager.SessionList {
		if manager.CurrentSession == nil || s.Key != manager.CurrentSession.Key {
			others = append(others, s.Key)
		}
	}
	if len(others) == 0 {
		return 0, nil
	}
	return len(others), session.NewManager(client.Client).TerminateSession(ctx, others)
}
