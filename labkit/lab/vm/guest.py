"""The guest's side of labkit's small VM: two busybox shell scripts.

There is no systemd in this guest, nor any distribution: the kernel unpacks labkit's
initramfs and runs ``/init`` as PID 1 (Documentation/filesystems/ramfs-rootfs-initramfs.rst).
That script does by hand what an init system does: mount /proc, /sys and /dev, load the
drivers, and maybe switch to a bigger root. Then ``agent`` mounts the cgroup hierarchies
and serves commands from the host.

Kernel parameters the kernel does not know (and that have no dot) reach init as
environment variables (Documentation/admin-guide/kernel-parameters.rst), which is how the
host passes ``labkit_cgroup=v2`` and ``labkit_hostroot=1``.

The wire protocol on the virtio-serial port ``labkit.ctl`` (one line each way, output raw):

    guest -> host   @@labkit-ready <guest uptime in seconds>
    host  -> guest  <id> <the shell script, base64>
    guest -> host   <the command's output, stdout and stderr together>
                    \\n@@labkit-done <id> <exit code>

Layer: lab. Built into the initramfs by ``labkit.lab.vm.initramfs``.
"""

from __future__ import annotations

from labkit.runtime.spec import DEFAULT_PATH

PORT_NAME = "labkit.ctl"  # the virtserialport's name=, found in /sys/class/virtio-ports/*/name
HOST_ROOT_TAG = "hostroot"  # the 9p mount_tag of the host's / share
READY = b"@@labkit-ready "
DONE = b"\n@@labkit-done "

# /init: PID 1 inside the initramfs. Any failure here ends PID 1, the kernel panics,
# and with panic=-1 and -no-reboot qemu exits: the host sees that and shows the console.
INIT = r"""#!/bin/busybox sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# drivers in dependency order (the host worked it out from modules.dep)
while read -r ko; do
    insmod "/lib/modules/$ko" || echo "labkit-init: insmod $ko failed"
done < /lib/modules/order

if [ "$labkit_hostroot" = 1 ]; then
    # the host's / arrives read-only over virtio-9p; a tmpfs on top takes the writes
    mkdir -p /lower /rw /newroot
    mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 hostroot /lower \
        || { echo "labkit-init: cannot mount the host root over 9p"; exit 1; }
    mount -t tmpfs -o mode=0755 rw /rw
    mkdir /rw/upper /rw/work
    mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \
        || { echo "labkit-init: overlay on the host root failed"; exit 1; }
    mkdir -p /newroot/.labkit
    cp /.labkit/busybox /.labkit/agent /newroot/.labkit/
    for d in proc sys dev; do mount --move "/$d" "/newroot/$d"; done
    # empties the initramfs, makes /newroot the root and runs the agent there as PID 1
    exec switch_root /newroot /.labkit/busybox sh /.labkit/agent
fi
exec /.labkit/busybox sh /.labkit/agent
"""

# /.labkit/agent: PID 1 from here on, in the initramfs or on the host's root.
AGENT = r"""BB=/.labkit/busybox
export PATH=@DEFAULT_PATH@ HOME=/root TERM=dumb
# /run is a fresh tmpfs. Temporary files and labkit's state go there, not to /tmp: with the
# host's root, / is an overlay, and an overlay's upper dir cannot sit on another overlay;
# /tmp stays the host's (read-only below, writable above), where a checkout may live.
$BB mount -t tmpfs -o mode=0755 run /run
$BB mkdir -m 1777 /run/tmp
export TMPDIR=/run/tmp LABKIT_ROOT=/run/labkit
$BB mkdir -p /dev/pts /dev/shm
$BB mount -t devpts devpts /dev/pts
$BB mount -t tmpfs -o mode=1777 shm /dev/shm
$BB hostname labkit-vm
$BB ip link set lo up  # 127.0.0.1, as every machine has it (the guest has no other link)

if [ "$labkit_cgroup" = v2 ]; then
    # one unified hierarchy; cgroup_no_v1=all on the command line keeps every
    # controller free for it. Enable them all for the root's children, as systemd would.
    $BB mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup
    for c in $($BB cat /sys/fs/cgroup/cgroup.controllers); do
        echo "+$c" > /sys/fs/cgroup/cgroup.subtree_control || echo "labkit-agent: cannot enable $c"
    done
else
    # v1: one hierarchy per controller, plus an empty unified one (a "hybrid" host)
    $BB mount -t tmpfs -o mode=0755 cgroup /sys/fs/cgroup
    for c in $($BB awk '!/^#/ && $4 == 1 { print $1 }' /proc/cgroups); do
        $BB mkdir "/sys/fs/cgroup/$c"
        $BB mount -t cgroup -o "$c" cgroup "/sys/fs/cgroup/$c"
    done
    $BB mkdir /sys/fs/cgroup/unified
    $BB mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified
fi

port=
for f in /sys/class/virtio-ports/*/name; do
    [ "$($BB cat "$f")" = labkit.ctl ] && port=/dev/$($BB basename "$($BB dirname "$f")")
done
[ -n "$port" ] || { echo "labkit-agent: no virtio port named labkit.ctl"; $BB poweroff -f; }
exec 3<>"$port"
echo "@@labkit-ready $($BB cut -d' ' -f1 /proc/uptime)" >&3
while read -r id script <&3; do
    echo "$script" | $BB base64 -d > /run/labkit-command
    /bin/sh /run/labkit-command < /dev/null >&3 2>&1 3>&-
    printf '\n@@labkit-done %s %d\n' "$id" $? >&3
done
# the host closed the channel: power off (qemu exits)
$BB sync
$BB poweroff -f
""".replace("@DEFAULT_PATH@", DEFAULT_PATH)
