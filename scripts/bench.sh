#!/bin/bash
# Benchmark: every ratio below is measured in this one run, on this machine.
#
#   unthrottled sequential read through the mount vs curl from the same nginx,
#     curl's bytes going to a reader (curl | dd bs=1M, as LAB-NOTES measured
#     the peers) and, for reference, curl discarding them (-o /dev/null)
#   the same vs `rclone mount` of the same URL (when rclone is installed)
#   demo:// through the mount
#   fetched/served from the mount's own counters: sequential dd, 1000 random
#     4 KiB reads, qemu-img convert of a sparse qcow2, debugfs dumping one
#     file from an ext4 image; a 4 KiB read's latency after a seek at
#     rate=20M; CPU-s/GiB of the daemon beside curl's; peak RSS with 16
#     readers at once (http, and gs:// where requests are 16 MiB)
#   achieved/target rate at rate=20M and rate=200M (http), rate=50M (s3 and
#     ebs, moto), and fetched/written bytes of a sparse EBS snapshot copied
#     with cp --sparse=always
#   bandwidth control (http): `vmexportfs rate` 20M -> 60M on a running copy,
#     priority 3:1 under contention at rate=40M, and two mounts (two
#     processes) sharing fleet_rate=40M through Redis: achieved/target each
#   gs:// (fake-gcs-server), az:// (Azurite) and vsphere:// (the govmomi
#     simulator over TLS, tests/vcsim): unthrottled read through the mount vs
#     curl straight from the stand-in (into a reader), and achieved/target at
#     rate=50M
#   metadata at scale (demo:// with parameters): ls -l of 10k and 100k disks
#     in one directory, mount and find over 1,000,000 disks, memory per disk
#     (and a dir:// tree of as many files, listed one directory at a time)
#   a soak: minutes of mixed readers through injected faults, every byte
#     verified, peak RSS against cache=
#
# Each throughput is the median of RUNS reads (default 3) of a 1 GiB file,
# each through a fresh mount. Needs root (FUSE), nginx, curl; run
# scripts/install-test-deps.sh first. Usage: scripts/bench.sh [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-3}
SIZE_MIB=1024
[ "${1:-}" = --quick ] && { RUNS=1; SIZE_MIB=256; }

cargo build --release --quiet
BIN=$PWD/target/release/vmexportfs
WORK=$(mktemp -d /tmp/vmx-bench-XXXXXX)
NGINX_PID=
cleanup() {
    for m in "$WORK"/mnt*; do
        mountpoint -q "$m" 2>/dev/null && { umount "$m" 2>/dev/null || umount -l "$m"; }
    done
    [ -n "$NGINX_PID" ] && kill "$NGINX_PID" 2>/dev/null
    # stand-ins still running after a failure
    jobs -p | xargs -r kill 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# --- nginx serving a random 1 GiB disk and its manifest -------------------
mkdir -p "$WORK/www" "$WORK/nginx"
head -c $((SIZE_MIB << 20)) /dev/urandom > "$WORK/www/disk.raw"
echo '{"vms":[{"name":"vm","disks":[{"name":"disk.raw","url":"disk.raw"},{"name":"disk2.raw","url":"disk.raw"}]}]}' > "$WORK/www/manifest.json"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
N=$WORK/nginx
cat > "$N/nginx.conf" <<CONF
daemon off; master_process off; user root; worker_processes 1;
pid $N/nginx.pid; error_log $N/error.log;
events { worker_connections 1024; }
http { access_log off; sendfile on; tcp_nopush on; keepalive_requests 100000;
  client_body_temp_path $N/b; proxy_temp_path $N/p; fastcgi_temp_path $N/f;
  uwsgi_temp_path $N/u; scgi_temp_path $N/s;
  server { listen 127.0.0.1:$PORT; root $WORK/www; autoindex on; } }
CONF
nginx -c "$N/nginx.conf" -p "$N" &
NGINX_PID=$!
for _ in $(seq 100); do curl -sf -o /dev/null "http://127.0.0.1:$PORT/manifest.json" && break; sleep 0.05; done
URL=http://127.0.0.1:$PORT

median() { sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
# bytes/s of reading $1 with dd bs=1M (count $2 MiB when given)
dd_rate() {
    local count=${2:+count=$2}
    dd if="$1" of=/dev/null bs=1M $count 2>&1 | awk '/copied/ {print $1 / $(NF-3)}'
}
mount_vmx() { # SOURCE OPTIONS -> prints mountpoint
    local m
    m=$(mktemp -d "$WORK/mnt.XXXX")
    "$BIN" mount "$1" "$m" -o "${2:+$2,}log=$WORK/mount.log" 2>/dev/null
    echo "$m"
}
unmount() { umount "$1" 2>/dev/null || umount -l "$1"; }

cat "$WORK/www/disk.raw" > /dev/null # the server's page cache is warm for everyone

# curl's throughput when its bytes reach a reading process, as the mount's
# do: dd reads them from a pipe in 1 MiB blocks.
curl_to_reader() {
    curl -s "$URL/disk.raw" | dd of=/dev/null bs=1M iflag=fullblock 2>&1 | awk '/copied/ {print $1 / $(NF-3)}'
}

curl_rates=() curl_null_rates=() mount_rates=()
for _ in $(seq "$RUNS"); do
    curl_rates+=("$(curl_to_reader)")
    curl_null_rates+=("$(curl -s -o /dev/null -w '%{speed_download}' "$URL/disk.raw")")
    m=$(mount_vmx "$URL/manifest.json" "")
    mount_rates+=("$(dd_rate "$m/vm/disk.raw")")
    unmount "$m"
done
CURL=$(printf '%s\n' "${curl_rates[@]}" | median)
CURL_NULL=$(printf '%s\n' "${curl_null_rates[@]}" | median)
MOUNT=$(printf '%s\n' "${mount_rates[@]}" | median)

RCLONE=
if command -v rclone >/dev/null; then
    rclone_rates=()
    for _ in $(seq "$RUNS"); do
        m=$(mktemp -d "$WORK/mnt.rclone.XXXX")
        rclone mount --read-only --http-url "$URL" :http: "$m" --daemon --config /dev/null 2>/dev/null
        for _ in $(seq 100); do [ -e "$m/disk.raw" ] && break; sleep 0.1; done
        rclone_rates+=("$(dd_rate "$m/disk.raw")")
        fusermount3 -u "$m" 2>/dev/null || fusermount -u "$m" 2>/dev/null || umount -l "$m"
    done
    RCLONE=$(printf '%s\n' "${rclone_rates[@]}" | median)
fi

demo_rates=()
for _ in $(seq "$RUNS"); do
    m=$(mount_vmx demo:// "")
    demo_rates+=("$(dd_rate "$m/web-01/web-01-disk1.vmdk" "$SIZE_MIB")")
    unmount "$m"
done
DEMO=$(printf '%s\n' "${demo_rates[@]}" | median)

# Throttle: ~10 s copies, so the initial burst (rate/10) is ~1% of the bytes.
m=$(mount_vmx "$URL/manifest.json" rate=20M)
R20=$(dd_rate "$m/vm/disk.raw" $((SIZE_MIB < 200 ? SIZE_MIB : 200)))
unmount "$m"
# The disk twice in one stream: ~10 s at 200 MiB/s (demo disks have holes,
# which cost no tokens, so they cannot measure the limit).
m=$(mount_vmx "$URL/manifest.json" rate=200M)
R200=$(cat "$m/vm/disk.raw" "$m/vm/disk.raw" | dd of=/dev/null bs=1M iflag=fullblock 2>&1 | awk '/copied/ {print $1 / $(NF-3)}')
unmount "$m"

# --- fetched / served: what readers cost the link ----------------------------
# "FETCHED SERVED" of mount $1, from its status
totals() { "$BIN" status "$1" --json | python3 -c '
import json, sys; t = json.load(sys.stdin)["totals"]; print(t["bytes_fetched"], t["bytes_served"])'; }
ratio_of() { echo "$1" | awk '{printf "%.4f", ($2 > 0 ? $1 / $2 : 0)}'; }
# the daemon serving mountpoint $1, and its CPU seconds so far
daemon_pid() { pgrep -f "vmexportfs mount .* $1( |$)" | head -1; }
cpu_of() { awk '{print ($14 + $15) / 100}' "/proc/$1/stat"; }

# Sequential dd of the whole disk; CPU-s/GiB of the daemon beside curl's.
m=$(mount_vmx "$URL/manifest.json" "")
pid=$(daemon_pid "$m")
cpu0=$(cpu_of "$pid")
dd if="$m/vm/disk.raw" of=/dev/null bs=1M 2>/dev/null
CPU_MOUNT=$(awk -v a="$cpu0" -v b="$(cpu_of "$pid")" -v s="$SIZE_MIB" 'BEGIN {print (b - a) * 1024 / s}')
OF_DD=$(ratio_of "$(totals "$m")")
unmount "$m"
CPU_CURL=$(python3 - "$URL/disk.raw" "$SIZE_MIB" <<'PY'
import resource, subprocess, sys
subprocess.run(["curl", "-s", "-o", "/dev/null", sys.argv[1]], check=True)
r = resource.getrusage(resource.RUSAGE_CHILDREN)
print((r.ru_utime + r.ru_stime) * 1024 / int(sys.argv[2]))
PY
)

# 1000 random 4 KiB reads over the disk (a file-level restore, a guest
# inspection): each isolated read should cost its own page, not a block.
m=$(mount_vmx "$URL/manifest.json" "")
python3 - "$m/vm/disk.raw" <<'PY'
import os, random, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
pages = os.fstat(fd).st_size // 4096
rng = random.Random(7)
for _ in range(1000):
    assert len(os.pread(fd, 4096, rng.randrange(pages) * 4096)) == 4096
PY
OF_RANDOM=$(ratio_of "$(totals "$m")")
unmount "$m"

# qemu-img convert of a sparse qcow2 (32 MiB of data in 1 GiB) off the mount,
# and debugfs pulling one 10 MiB file out of an ext4 image on it.
truncate -s 1G "$WORK/sparse.raw"
for i in $(seq 0 15); do
    dd if=/dev/urandom of="$WORK/sparse.raw" bs=1M count=2 seek=$((i * 64)) conv=notrunc 2>/dev/null
done
qemu-img convert -f raw -O qcow2 "$WORK/sparse.raw" "$WORK/www/sparse.qcow2"
head -c 10M /dev/urandom > "$WORK/f10"
truncate -s 256M "$WORK/www/fs.img"
mkfs.ext4 -q -F "$WORK/www/fs.img"
debugfs -w -R "write $WORK/f10 f" "$WORK/www/fs.img" >/dev/null 2>&1
echo '{"vms":[{"name":"vm","disks":[{"name":"sparse.qcow2","url":"sparse.qcow2"},{"name":"fs.img","url":"fs.img"}]}]}' > "$WORK/www/images.json"
m=$(mount_vmx "$URL/images.json" "")
qemu-img convert -f qcow2 -O raw "$m/vm/sparse.qcow2" "$WORK/sparse.out"
cmp -s "$WORK/sparse.raw" "$WORK/sparse.out" && QEMU_SAME=identical || QEMU_SAME=DIFFERENT
OF_QEMU=$(ratio_of "$(totals "$m")")
QCOW_BYTES=$(stat -c %s "$WORK/www/sparse.qcow2")
unmount "$m"
rm -f "$WORK/sparse.out" "$WORK/sparse.raw"
m=$(mount_vmx "$URL/images.json" "")
debugfs -R "dump /f $WORK/f10.out" "$m/vm/fs.img" >/dev/null 2>&1
cmp -s "$WORK/f10" "$WORK/f10.out" && DEBUGFS_SAME=identical || DEBUGFS_SAME=DIFFERENT
DEBUGFS_FETCHED=$(totals "$m" | awk '{print $1}')
unmount "$m"

# A demand read after a seek at rate=20M, while the reader's read-ahead runs:
# the worst of 5, beside a 4 KiB ranged GET straight from nginx.
m=$(mount_vmx "$URL/manifest.json" rate=20M)
SEEK_LAT=$(python3 - "$m/vm/disk.raw" <<'PY'
import os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
size = os.fstat(fd).st_size
worst = 0
for i in range(5):
    at = i * (size // 5)
    until = time.monotonic() + 1.5
    while time.monotonic() < until:
        os.pread(fd, 1 << 20, at)
        at += 1 << 20
    far = (at + size // 2) % (size - 4096) // 4096 * 4096
    start = time.monotonic()
    os.pread(fd, 4096, far)
    worst = max(worst, time.monotonic() - start)
print(worst)
PY
)
unmount "$m"
RANGE_GET=$(for _ in 1 2 3; do curl -s -o /dev/null -r 4096-8191 -w '%{time_total}\n' "$URL/disk.raw"; done | sort -g | tail -1)

# Peak RSS of a mount with cache=64M while 16 readers each copy a stripe of
# the disk at once: mount SOURCE $1, options $2, file $3.
rss16() {
    local m pid readers=()
    m=$(mount_vmx "$1" "cache=64M${2:+,$2}")
    pid=$(daemon_pid "$m")
    for i in $(seq 0 15); do
        dd if="$m/$3" of=/dev/null bs=1M skip=$((i * SIZE_MIB / 16)) count=$((SIZE_MIB / 16)) 2>/dev/null &
        readers+=($!)
    done
    wait "${readers[@]}"
    awk '/VmHWM/ {print $2 * 1024}' "/proc/$pid/status"
    unmount "$m"
}
RSS16_HTTP=$(rss16 "$URL/manifest.json" "" vm/disk.raw)

# S3 through moto (when installed): achieved/target at rate=50M (bytes
# fetched) over 32 passes of a 16 MiB object. moto copies the whole object for every ranged
# GET, so a larger object measures moto's copying, not the limit.
R50S3= R50EBS= EBS_FETCHED= EBS_WRITTEN= EBS_ALLOCATED=
if command -v moto_server >/dev/null; then
    MOTO_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    moto_server -H 127.0.0.1 -p "$MOTO_PORT" >/dev/null 2>&1 &
    MOTO_PID=$!
    for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$MOTO_PORT" && break; sleep 0.1; done
    export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_REGION=us-east-1
    python3 - "$MOTO_PORT" "$WORK/www/disk.raw" <<'PY'
import sys, boto3
s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{sys.argv[1]}", region_name="us-east-1")
s3.create_bucket(Bucket="bench")
with open(sys.argv[2], "rb") as f:
    s3.put_object(Bucket="bench", Key="disk.raw", Body=f.read(16 << 20))
PY
    m=$(mount_vmx s3://bench "endpoint=http://127.0.0.1:$MOTO_PORT,rate=50M")
    # Bytes fetched per second, not served: what the extents still hold
    # from one pass is served free to the next.
    t0=$(date +%s.%N)
    for _ in $(seq 32); do cat "$m/disk.raw"; done > /dev/null
    R50S3=$(awk -v f="$(totals "$m" | awk '{print $1}')" -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {print f / (b - a)}')
    unmount "$m"

    # ebs:// through the same moto: a 1 GiB snapshot whose first 400 MiB
    # are written whole, and every 4th 512 KiB block of the rest. The rate
    # is bytes fetched over the time of reading the dense part at rate=50M
    # (reading holes takes time and fetches nothing); fetched/written, for
    # a copy of the whole file, says whether a hole cost a fetch.
    EBS_SNAP=$(python3 - "$MOTO_PORT" <<'PY'
import base64, hashlib, os, sys
import boto3
ebs = boto3.client("ebs", endpoint_url=f"http://127.0.0.1:{sys.argv[1]}", region_name="us-east-1")
snap = ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
blocks = list(range(800)) + list(range(800, 2048, 4))
for index in blocks:
    data = os.urandom(512 << 10)
    ebs.put_snapshot_block(SnapshotId=snap, BlockIndex=index, BlockData=data, DataLength=len(data),
                           Checksum=base64.b64encode(hashlib.sha256(data).digest()).decode(),
                           ChecksumAlgorithm="SHA256")
ebs.complete_snapshot(SnapshotId=snap, ChangedBlocksCount=len(blocks))
print(snap, len(blocks))
PY
)
    EBS_WRITTEN=$(( ${EBS_SNAP#* } * 512 * 1024 ))
    EBS_SNAP=${EBS_SNAP% *}
    m=$(mount_vmx "ebs://us-east-1/$EBS_SNAP" "endpoint=http://127.0.0.1:$MOTO_PORT,rate=50M")
    # Opened first: the open lists the snapshot's blocks, which is not
    # throttled traffic.
    exec 3<"$m/$EBS_SNAP.img"
    t0=$(date +%s.%N)
    dd of=/dev/null bs=1M count=400 <&3 2>/dev/null
    t1=$(date +%s.%N)
    exec 3<&-
    R50EBS=$(awk -v f="$(totals "$m" | awk '{print $1}')" -v a="$t0" -v b="$t1" 'BEGIN {print f / (b - a)}')
    unmount "$m"
    m=$(mount_vmx "ebs://us-east-1/$EBS_SNAP" "endpoint=http://127.0.0.1:$MOTO_PORT")
    cp --sparse=always "$m/$EBS_SNAP.img" "$WORK/ebs.img"
    EBS_FETCHED=$(totals "$m" | awk '{print $1}')
    EBS_ALLOCATED=$(( $(stat -c %b "$WORK/ebs.img") * 512 ))
    unmount "$m"
    rm -f "$WORK/ebs.img"
    kill "$MOTO_PID"
fi

# --- bandwidth control ------------------------------------------------------
# "TIME BYTES": when mount $1 answered, and the bytes it has served (all
# files, or only the open file $2); each rate below divides by the times
# the answers came, not by the sleep between them.
served_at() { "$BIN" status "$1" --json | python3 -c '
import json, sys, time
status = json.load(sys.stdin)
files = [f["bytes_read"] for f in status["files"] if f["path"] == sys.argv[1]]
print(time.time(), sum(files) if sys.argv[1] else status["totals"]["bytes_served"])' "${2:-}"; }
# bytes/s between two "TIME BYTES" samples
rate_between() { echo "$1 $2" | awk '{print ($4 - $2) / ($3 - $1)}'; }

m=$(mount_vmx "$URL/manifest.json" rate=20M)
cat "$m/vm/disk.raw" "$m/vm/disk.raw" > /dev/null & READER=$!
sleep 2
s0=$(served_at "$m"); sleep 4; s1=$(served_at "$m")
LIVE_BEFORE=$(rate_between "$s0" "$s1")
"$BIN" rate "$m" 60M > /dev/null
sleep 1
s0=$(served_at "$m"); sleep 4; s1=$(served_at "$m")
LIVE_AFTER=$(rate_between "$s0" "$s1")
kill $READER 2>/dev/null; wait $READER 2>/dev/null || true
unmount "$m"

m=$(mount_vmx "$URL/manifest.json" "rate=40M,priority=vm/disk.raw:3")
cat "$m/vm/disk.raw" > /dev/null & HEAVY=$!
cat "$m/vm/disk2.raw" > /dev/null & LIGHT=$!
sleep 2
h0=$(served_at "$m" /vm/disk.raw); l0=$(served_at "$m" /vm/disk2.raw)
sleep 5
h1=$(served_at "$m" /vm/disk.raw); l1=$(served_at "$m" /vm/disk2.raw)
kill $HEAVY $LIGHT 2>/dev/null; wait $HEAVY $LIGHT 2>/dev/null || true
unmount "$m"
WEIGHT_HEAVY=$(rate_between "$h0" "$h1")
WEIGHT_LIGHT=$(rate_between "$l0" "$l1")

FLEET_A= FLEET_B=
if command -v redis-server >/dev/null; then
    REDIS_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no >/dev/null 2>&1 &
    REDIS_PID=$!
    for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$REDIS_PORT") 2>/dev/null && break; sleep 0.05; done
    fleet="fleet=redis://127.0.0.1:$REDIS_PORT/0,fleet_key=bench,fleet_rate=40M"
    ma=$(mount_vmx "$URL/manifest.json" "$fleet")
    mb=$(mount_vmx "$URL/manifest.json" "$fleet")
    cat "$ma/vm/disk.raw" > /dev/null & FA=$!
    cat "$mb/vm/disk.raw" > /dev/null & FB=$!
    sleep 2
    a0=$(served_at "$ma"); b0=$(served_at "$mb")
    sleep 5
    a1=$(served_at "$ma"); b1=$(served_at "$mb")
    kill $FA $FB 2>/dev/null; wait $FA $FB 2>/dev/null || true
    unmount "$ma"; unmount "$mb"
    kill "$REDIS_PID"
    FLEET_A=$(rate_between "$a0" "$a1")
    FLEET_B=$(rate_between "$b0" "$b1")
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# bytes/s of curl fetching $1 into a reader
curl_url_to_reader() {
    curl -s "$1" | dd of=/dev/null bs=1M iflag=fullblock 2>&1 | awk '/copied/ {print $1 / $(NF-3)}'
}
# ~10 s at 50 MiB/s (the whole disk when it is smaller)
THROTTLE_MIB=$((SIZE_MIB < 500 ? SIZE_MIB : 500))

# GCS through fake-gcs-server (when installed).
GS_CURL= GS_MOUNT= R50GS= RSS16_GS=
if command -v fake-gcs-server >/dev/null; then
    GCS_PORT=$(free_port)
    mkdir -p "$WORK/gcs"
    fake-gcs-server -scheme http -host 127.0.0.1 -port "$GCS_PORT" -backend filesystem \
        -filesystem-root "$WORK/gcs" -external-url "http://127.0.0.1:$GCS_PORT" -log-level error >/dev/null 2>&1 &
    GCS_PID=$!
    GCS=http://127.0.0.1:$GCS_PORT
    for _ in $(seq 100); do curl -s -o /dev/null "$GCS/storage/v1/b" && break; sleep 0.1; done
    curl -sf -X POST -H 'content-type: application/json' -d '{"name":"bench"}' "$GCS/storage/v1/b" >/dev/null
    curl -sf -X POST -H 'content-type: application/octet-stream' -T "$WORK/www/disk.raw" \
        "$GCS/upload/storage/v1/b/bench/o?uploadType=media&name=disk.raw" >/dev/null
    gs_curl=() gs_mount=()
    for _ in $(seq "$RUNS"); do
        gs_curl+=("$(curl_url_to_reader "$GCS/storage/v1/b/bench/o/disk.raw?alt=media")")
        m=$(mount_vmx gs://bench "endpoint=$GCS,anonymous")
        gs_mount+=("$(dd_rate "$m/disk.raw")")
        unmount "$m"
    done
    GS_CURL=$(printf '%s\n' "${gs_curl[@]}" | median)
    GS_MOUNT=$(printf '%s\n' "${gs_mount[@]}" | median)
    m=$(mount_vmx gs://bench "endpoint=$GCS,anonymous,rate=50M")
    R50GS=$(dd_rate "$m/disk.raw" "$THROTTLE_MIB")
    unmount "$m"
    RSS16_GS=$(rss16 gs://bench "endpoint=$GCS,anonymous" disk.raw)
    kill "$GCS_PID"
fi

# Azure through Azurite (when installed), with an account SAS signed by the
# emulator's published well-known key.
AZ_CURL= AZ_MOUNT= R50AZ=
if command -v azurite-blob >/dev/null; then
    AZ_PORT=$(free_port)
    mkdir -p "$WORK/azurite"
    azurite-blob --blobHost 127.0.0.1 --blobPort "$AZ_PORT" --location "$WORK/azurite" \
        --loose --skipApiVersionCheck --disableTelemetry --silent >/dev/null 2>&1 &
    AZ_PID=$!
    AZ=http://127.0.0.1:$AZ_PORT/devstoreaccount1
    for _ in $(seq 100); do curl -s -o /dev/null "$AZ" && break; sleep 0.1; done
    SAS=$(python3 - <<'PY'
import base64, hashlib, hmac, urllib.parse
key = base64.b64decode("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==")
v, se, sp = "2020-12-06", "2099-01-01T00:00:00Z", "rwlac"
text = "\n".join(["devstoreaccount1", sp, "b", "sco", "", se, "", "", v, "", ""])
sig = base64.b64encode(hmac.new(key, text.encode(), hashlib.sha256).digest()).decode()
print(urllib.parse.urlencode({"sv": v, "ss": "b", "srt": "sco", "sp": sp, "se": se, "sig": sig}))
PY
)
    curl -sf -X PUT "$AZ/bench?restype=container&$SAS" >/dev/null
    curl -sf -X PUT -H 'x-ms-blob-type: BlockBlob' -T "$WORK/www/disk.raw" "$AZ/bench/disk.raw?$SAS" >/dev/null
    printf '%s\n' "$SAS" > "$WORK/sas"
    chmod 600 "$WORK/sas"
    az_curl=() az_mount=()
    for _ in $(seq "$RUNS"); do
        az_curl+=("$(curl_url_to_reader "$AZ/bench/disk.raw?$SAS")")
        m=$(mount_vmx az://devstoreaccount1/bench "endpoint=$AZ,credentials=$WORK/sas")
        az_mount+=("$(dd_rate "$m/disk.raw")")
        unmount "$m"
    done
    AZ_CURL=$(printf '%s\n' "${az_curl[@]}" | median)
    AZ_MOUNT=$(printf '%s\n' "${az_mount[@]}" | median)
    m=$(mount_vmx az://devstoreaccount1/bench "endpoint=$AZ,credentials=$WORK/sas,rate=50M")
    R50AZ=$(dd_rate "$m/disk.raw" "$THROTTLE_MIB")
    unmount "$m"
    kill "$AZ_PID"
fi

# vSphere through the govmomi simulator (vmexportfs-vcsim, built by
# scripts/install-test-deps.sh) over TLS with a private CA; curl signs in
# over SOAP for the session cookie the datastore endpoint wants.
VS_CURL= VS_MOUNT= R50VS=
if command -v vmexportfs-vcsim >/dev/null && command -v openssl >/dev/null; then
    V=$WORK/vcsim
    mkdir -p "$V"
    (cd "$V" &&
        openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj '/CN=bench CA' -keyout ca.key -out ca.pem 2>/dev/null &&
        openssl req -newkey rsa:2048 -nodes -subj '/CN=127.0.0.1' -keyout leaf.key -out leaf.csr 2>/dev/null &&
        printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > ext &&
        openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 -extfile ext -out leaf.pem 2>/dev/null)
    VS_PORT=$(free_port)
    vmexportfs-vcsim -listen "127.0.0.1:$VS_PORT" -cert "$V/leaf.pem" -key "$V/leaf.key" \
        -user bench -password bench-pass -disk-mib "$SIZE_MIB" > "$V/startup.json" 2>/dev/null &
    VS_PID=$!
    for _ in $(seq 100); do [ -s "$V/startup.json" ] && break; sleep 0.1; done
    DS=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["datastores"]["LocalDS_0"])' "$V/startup.json")
    printf '# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="vmfs"\nRW %d VMFS "disk1-flat.vmdk"\n' \
        $((SIZE_MIB * 2048)) > "$DS/DC0_H0_VM1/disk1.vmdk"
    cp "$WORK/www/disk.raw" "$DS/DC0_H0_VM1/disk1-flat.vmdk"
    printf 'bench-pass\n' > "$V/pass"
    chmod 600 "$V/pass"
    VS=https://127.0.0.1:$VS_PORT
    curl -sf --cacert "$V/ca.pem" -c "$V/cookies" -H 'Content-Type: text/xml' -H 'SOAPAction: urn:vim25/6.5' \
        -d '<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body><Login xmlns="urn:vim25"><_this type="SessionManager">SessionManager</_this><userName>bench</userName><password>bench-pass</password></Login></soapenv:Body></soapenv:Envelope>' \
        "$VS/sdk" >/dev/null
    vs_curl=() vs_mount=()
    for _ in $(seq "$RUNS"); do
        vs_curl+=("$(curl -s --cacert "$V/ca.pem" -b "$V/cookies" "$VS/folder/DC0_H0_VM1/disk1-flat.vmdk?dcPath=DC0&dsName=LocalDS_0" |
            dd of=/dev/null bs=1M iflag=fullblock 2>&1 | awk '/copied/ {print $1 / $(NF-3)}')")
        m=$(mount_vmx "vsphere://bench@127.0.0.1:$VS_PORT/DC0" "cafile=$V/ca.pem,credentials=$V/pass")
        vs_mount+=("$(dd_rate "$m/DC0_H0_VM1/disk1-flat.vmdk")")
        unmount "$m"
    done
    VS_CURL=$(printf '%s\n' "${vs_curl[@]}" | median)
    VS_MOUNT=$(printf '%s\n' "${vs_mount[@]}" | median)
    m=$(mount_vmx "vsphere://bench@127.0.0.1:$VS_PORT/DC0" "cafile=$V/ca.pem,credentials=$V/pass,rate=50M")
    R50VS=$(dd_rate "$m/DC0_H0_VM1/disk1-flat.vmdk" "$THROTTLE_MIB")
    unmount "$m"
    kill "$VS_PID"
fi

# --- metadata at scale (demo:// with parameters) ----------------------------
# seconds taken by a shell command
since() { awk -v t0="$1" -v t1="$(date +%s.%N)" 'BEGIN {print t1 - t0}'; }
seconds_of() { local t0; t0=$(date +%s.%N); sh -c "$1" > /dev/null; since "$t0"; }
rss_of() { awk '/^VmRSS/ {print $2 * 1024}' "/proc/$1/status"; }
# `ls -l` of one directory of N disks, on a fresh mount (nothing cached)
ls_l_seconds() {
    local m t
    m=$(mount_vmx "demo://?vms=1&disks=$1&size=1G" "")
    t=$(seconds_of "ls -l $m/vm-0")
    unmount "$m"
    echo "$t"
}
LS_10K=$(ls_l_seconds 10000)
LS_100K=$(ls_l_seconds 100000)
# One million disks in 1,000 directories: how long `mount` takes, memory per
# disk beside a mount of the 5 built-in disks, and `find` over all of them.
m=$(mount_vmx "demo://" "")
RSS_SMALL=$(rss_of "$(daemon_pid "$m")")
unmount "$m"
t0=$(date +%s.%N)
m=$(mount_vmx "demo://?vms=1000&disks=1000&size=1G" "")
MOUNT_1M=$(since "$t0")
RSS_1M=$(rss_of "$(daemon_pid "$m")")
FIND_1M=$(seconds_of "find $m -type f | wc -l")
FOUND_1M=$(find "$m" -type f | wc -l)
unmount "$m"

# A source listed one level at a time: dir:// over 1,000,000 files in 1,000
# directories. The mount lists the root only; find lists each directory at
# its first use. (No S3 row: moto takes hours to hold a million objects.)
LAZY_ROOT="$WORK/million"
mkdir -p "$LAZY_ROOT"
python3 - "$LAZY_ROOT" <<'PY'
import os, sys
root = sys.argv[1]
for d in range(1000):
    path = f"{root}/vm-{d:04}"
    os.mkdir(path)
    for f in range(1000):
        os.close(os.open(f"{path}/disk-{f:04}.raw", os.O_CREAT | os.O_WRONLY, 0o644))
PY
t0=$(date +%s.%N)
m=$(mount_vmx "dir://$LAZY_ROOT" "")
MOUNT_LAZY=$(since "$t0")
FIND_LAZY=$(seconds_of "find $m -type f | wc -l")
FOUND_LAZY=$(find "$m" -type f | wc -l)
unmount "$m"
rm -rf "$LAZY_ROOT"

# Soak: mixed sequential and random readers through a proxy injecting every
# kind of transient fault (tests/soak.rs), every byte checked against the
# source; peak RSS against cache=64M. SOAK_SECS sets its length.
SOAK_SECS=${SOAK_SECS:-$([ "${1:-}" = --quick ] && echo 30 || echo 180)}
SOAK=$(SOAK_SECS=$SOAK_SECS cargo test --release --quiet --test soak -- --ignored --nocapture 2>&1 | grep '^SOAK ' || echo "SOAK failed")
soak_field() { echo "$SOAK" | tr ' ' '\n' | awk -F= -v k="$1" '$1 == k {print $2}'; }
SOAK_BYTES=$(soak_field verified_bytes) SOAK_READS=$(soak_field reads) SOAK_FAULTS=$(soak_field faults)
SOAK_RSS=$(soak_field peak_rss) SOAK_CACHE=$(soak_field cache)

awk -v curl="$CURL" -v curlnull="$CURL_NULL" -v mnt="$MOUNT" -v rclone="$RCLONE" -v demo="$DEMO" \
    -v soaksecs="$SOAK_SECS" -v soakbytes="$SOAK_BYTES" -v soakreads="$SOAK_READS" \
    -v soakfaults="$SOAK_FAULTS" -v soakrss="$SOAK_RSS" -v soakcache="$SOAK_CACHE" \
    -v ofdd="$OF_DD" -v ofrandom="$OF_RANDOM" -v ofqemu="$OF_QEMU" -v qemusame="$QEMU_SAME" \
    -v qcowbytes="$QCOW_BYTES" -v debugfsfetched="$DEBUGFS_FETCHED" -v debugfssame="$DEBUGFS_SAME" \
    -v seeklat="$SEEK_LAT" -v rangeget="$RANGE_GET" -v cpumount="$CPU_MOUNT" -v cpucurl="$CPU_CURL" \
    -v rss16http="$RSS16_HTTP" -v rss16gs="$RSS16_GS" \
    -v r20="$R20" -v r200="$R200" -v r50s3="$R50S3" -v runs="$RUNS" -v size="$SIZE_MIB" \
    -v r50ebs="$R50EBS" -v ebsfetched="$EBS_FETCHED" -v ebswritten="$EBS_WRITTEN" -v ebsallocated="$EBS_ALLOCATED" \
    -v gscurl="$GS_CURL" -v gsmount="$GS_MOUNT" -v r50gs="$R50GS" \
    -v azcurl="$AZ_CURL" -v azmount="$AZ_MOUNT" -v r50az="$R50AZ" \
    -v vscurl="$VS_CURL" -v vsmount="$VS_MOUNT" -v r50vs="$R50VS" \
    -v livebefore="$LIVE_BEFORE" -v liveafter="$LIVE_AFTER" \
    -v ls10k="$LS_10K" -v ls100k="$LS_100K" -v rsssmall="$RSS_SMALL" -v mount1m="$MOUNT_1M" \
    -v rss1m="$RSS_1M" -v find1m="$FIND_1M" -v found1m="$FOUND_1M" \
    -v mountlazy="$MOUNT_LAZY" -v findlazy="$FIND_LAZY" -v foundlazy="$FOUND_LAZY" \
    -v heavy="$WEIGHT_HEAVY" -v light="$WEIGHT_LIGHT" -v fleeta="$FLEET_A" -v fleetb="$FLEET_B" '
function stand_in_rows(scheme, name, curl, mnt, r50,    t50) {
    if (mnt == "") {
        printf "| %s | %s not installed | | |\n", scheme, name
        return
    }
    t50 = 50 * 1048576
    printf "| curl from %s into a reader | %.0f MB/s | | |\n", name, curl / 1e6
    printf "| mount, %s, no limit | %.0f MB/s | | |\n", scheme, mnt / 1e6
    printf "| mount / curl, %s | %.2f | >= 0.80 | %s |\n", scheme, mnt / curl, (mnt / curl >= 0.8 ? "ok" : "MISS")
    printf "| %s rate=50M achieved/target | %.4f (%.0f B/s) | 0.98-1.02 | %s |\n", scheme, r50 / t50, r50, (r50 / t50 >= 0.98 && r50 / t50 <= 1.02 ? "ok" : "MISS")
}
BEGIN {
    mb = 1e6
    printf "vmexportfs benchmark: %d MiB file, median of %d runs, loopback nginx\n\n", size, runs
    printf "| measurement | result | target | verdict |\n|---|---|---|---|\n"
    printf "| curl from nginx into a reader (curl \\| dd bs=1M) | %.0f MB/s | | |\n", curl / mb
    printf "| mount, http://, no limit (dd bs=1M) | %.0f MB/s | | |\n", mnt / mb
    printf "| mount / curl into a reader | %.2f | >= 0.80 | %s |\n", mnt / curl, (mnt / curl >= 0.8 ? "ok" : "MISS")
    printf "| curl -o /dev/null (bytes reach no reader) | %.0f MB/s | | |\n", curlnull / mb
    printf "| mount / curl -o /dev/null | %.2f | >= 0.80 | %s |\n", mnt / curlnull, (mnt / curlnull >= 0.8 ? "ok" : "MISS")
    printf "| CPU-s/GiB: mount daemon / curl -o /dev/null | %.3f / %.3f | (reference) | |\n", cpumount, cpucurl
    if (rclone != "") {
        printf "| rclone mount, same URL | %.0f MB/s | | |\n", rclone / mb
        printf "| mount / rclone | %.2f | >= 2.00 | %s |\n", mnt / rclone, (mnt / rclone >= 2 ? "ok" : "MISS")
    } else {
        printf "| rclone mount | not installed | | |\n"
    }
    printf "| demo:// through the mount | %.0f MB/s | | |\n", demo / mb
    printf "| fetched/served: sequential dd of the disk | %.4f | <= 1.02 | %s |\n", ofdd, (ofdd <= 1.02 ? "ok" : "MISS")
    printf "| fetched/served: 1000 random 4 KiB reads | %.2f | <= 4 | %s |\n", ofrandom, (ofrandom <= 4 ? "ok" : "MISS")
    printf "| fetched/served: qemu-img convert, sparse qcow2 (%.0f MiB file, output %s) | %.4f | <= 1.1 | %s |\n", qcowbytes / 1048576, qemusame, ofqemu, (ofqemu <= 1.1 && qemusame == "identical" ? "ok" : "MISS")
    printf "| debugfs dump of a 10 MiB file from an ext4 image: fetched / file (%s) | %.2f | <= 3 | %s |\n", debugfssame, debugfsfetched / 10485760, (debugfsfetched <= 3 * 10485760 && debugfssame == "identical" ? "ok" : "MISS")
    seektarget = 1048576 / (20 * 1048576) + rangeget
    printf "| rate=20M: 4 KiB read after a seek, worst of 5 | %.0f ms | <= %.0f ms (1 MiB piece at 20M + a 4 KiB GET) | %s |\n", seeklat * 1000, seektarget * 1000, (seeklat <= seektarget ? "ok" : "MISS")
    printf "| 16 readers at once, cache=64M, http: peak RSS / (cache + 64 MiB) | %.2f (%.0f MiB) | <= 1.00 | %s |\n", rss16http / (128 * 1048576), rss16http / 1048576, (rss16http <= 128 * 1048576 ? "ok" : "MISS")
    if (rss16gs != "")
        printf "| 16 readers at once, cache=64M, gs:// (16 MiB requests): peak RSS / (cache + 64 MiB) | %.2f (%.0f MiB) | <= 1.00 | %s |\n", rss16gs / (128 * 1048576), rss16gs / 1048576, (rss16gs <= 128 * 1048576 ? "ok" : "MISS")
    t20 = 20 * 1048576; t200 = 200 * 1048576
    printf "| rate=20M achieved/target | %.4f (%.0f B/s) | 0.98-1.02 | %s |\n", r20 / t20, r20, (r20 / t20 >= 0.98 && r20 / t20 <= 1.02 ? "ok" : "MISS")
    printf "| rate=200M achieved/target | %.4f (%.0f B/s) | 0.98-1.02 | %s |\n", r200 / t200, r200, (r200 / t200 >= 0.98 && r200 / t200 <= 1.02 ? "ok" : "MISS")
    if (r50s3 != "") {
        t50 = 50 * 1048576
        printf "| s3:// (moto) rate=50M achieved/target | %.4f (%.0f B/s) | 0.98-1.02 | %s |\n", r50s3 / t50, r50s3, (r50s3 / t50 >= 0.98 && r50s3 / t50 <= 1.02 ? "ok" : "MISS")
    } else {
        printf "| s3:// rate=50M | moto not installed | | |\n"
    }
    if (r50ebs != "") {
        t50 = 50 * 1048576
        printf "| ebs:// (moto) rate=50M achieved/target | %.4f (%.0f B/s) | 0.98-1.02 | %s |\n", r50ebs / t50, r50ebs, (r50ebs / t50 >= 0.98 && r50ebs / t50 <= 1.02 ? "ok" : "MISS")
        printf "| ebs:// cp --sparse=always of a 1 GiB snapshot (%.0f MiB written): fetched/written | %.4f (copy allocates %.0f MiB) | 1.00 | %s |\n", ebswritten / 1048576, ebsfetched / ebswritten, ebsallocated / 1048576, (ebsfetched == ebswritten ? "ok" : "MISS")
    } else {
        printf "| ebs:// rate=50M | moto not installed | | |\n"
    }
    t = 20 * 1048576
    printf "| live: rate=20M before `vmexportfs rate 60M` | %.4f (%.0f B/s) | 0.95-1.05 | %s |\n", livebefore / t, livebefore, (livebefore / t >= 0.95 && livebefore / t <= 1.05 ? "ok" : "MISS")
    t = 60 * 1048576
    printf "| live: 60M from 1 s after the change | %.4f (%.0f B/s) | 0.95-1.05 | %s |\n", liveafter / t, liveafter, (liveafter / t >= 0.95 && liveafter / t <= 1.05 ? "ok" : "MISS")
    t = 40 * 1048576
    printf "| priority 3:1 at rate=40M: heavy/light | %.3f (%.0f / %.0f B/s) | 2.70-3.30 | %s |\n", heavy / light, heavy, light, (heavy / light >= 2.7 && heavy / light <= 3.3 ? "ok" : "MISS")
    printf "| priority 3:1: both together / rate | %.4f | 0.95-1.05 | %s |\n", (heavy + light) / t, ((heavy + light) / t >= 0.95 && (heavy + light) / t <= 1.05 ? "ok" : "MISS")
    if (fleeta != "") {
        printf "| fleet_rate=40M, two mounts: together / fleet rate | %.4f (%.0f B/s) | 0.95-1.05 | %s |\n", (fleeta + fleetb) / t, fleeta + fleetb, ((fleeta + fleetb) / t >= 0.95 && (fleeta + fleetb) / t <= 1.05 ? "ok" : "MISS")
        printf "| fleet: mount a / mount b | %.3f | 0.90-1.10 | %s |\n", fleeta / fleetb, (fleeta / fleetb >= 0.9 && fleeta / fleetb <= 1.1 ? "ok" : "MISS")
    } else {
        printf "| fleet | redis-server not installed | | |\n"
    }
    stand_in_rows("gs://", "fake-gcs-server", gscurl, gsmount, r50gs)
    stand_in_rows("az://", "Azurite", azcurl, azmount, r50az)
    stand_in_rows("vsphere://", "vcsim (TLS)", vscurl, vsmount, r50vs)
    printf "| ls -l, 10,000 disks in one directory | %.2f s | | |\n", ls10k
    printf "| ls -l, 100,000 disks in one directory | %.2f s | < 2 s | %s |\n", ls100k, (ls100k < 2 ? "ok" : "MISS")
    printf "| ls -l time, 100k / 10k (linear: 10) | %.1f | <= 15 | %s |\n", ls100k / ls10k, (ls100k / ls10k <= 15 ? "ok" : "MISS")
    printf "| mount of 1,000,000 disks in 1,000 directories | %.2f s | | |\n", mount1m
    printf "| find over them (%d files) | %.2f s | every disk | %s |\n", found1m, find1m, (found1m == 1000000 ? "ok" : "MISS")
    printf "| memory per disk: (RSS 1M disks - RSS 5 disks) / 1M | %.0f bytes (%.0f MiB) | < 300 | %s |\n", (rss1m - rsssmall) / 1e6, rss1m / 1048576, ((rss1m - rsssmall) / 1e6 < 300 ? "ok" : "MISS")
    printf "| mount of dir:// with 1,000,000 files in 1,000 directories (listed a level at a time) | %.2f s | < 2 s | %s |\n", mountlazy, (mountlazy < 2 ? "ok" : "MISS")
    printf "| find over them, each directory listed at first use (%d files) | %.2f s | every file | %s |\n", foundlazy, findlazy, (foundlazy == 1000000 ? "ok" : "MISS")
    if (soakbytes != "") {
        printf "| soak %d s, 2 sequential + 2 random readers, faults every 9th request: bytes verified | %.0f MiB in %d reads, %d faults, 0 mismatches | every byte | ok |\n", soaksecs, soakbytes / 1048576, soakreads, soakfaults
        printf "| soak: peak RSS / (cache + 64 MiB) | %.2f (%.0f MiB, cache=%.0f MiB) | <= 1.00 | %s |\n", soakrss / (soakcache + 64 * 1048576), soakrss / 1048576, soakcache / 1048576, (soakrss <= soakcache + 64 * 1048576 ? "ok" : "MISS")
    } else {
        printf "| soak | failed (a mismatch, an EIO or memory over bound: see cargo test --test soak -- --ignored) | | MISS |\n"
    }
}'
