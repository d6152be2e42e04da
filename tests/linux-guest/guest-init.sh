#!/bin/sh
# Runs as PID 1 inside the throw-away Linux guest (scripts/linux-guest-test.sh): logs in to
# every controller's portal with the stock open-iscsi initiator, checks that dm-multipath
# builds one map with one path per controller (ALUA), makes an ext4 file system, writes and
# verifies data with fio while the host kills one controller, then logs out. Every line the
# host acts on starts with "RAINIO-".
set -u
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /run /tmp /mnt/t
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
fail() { echo "RAINIO-RESULT: FAIL $*"; sync; echo o > /proc/sysrq-trigger; sleep 60; }
arg() { tr ' ' '\n' < /proc/cmdline | sed -n "s/^$1=//p"; }
PORTALS=$(arg rainio.portals | tr ',' ' ')
IQN=$(arg rainio.iqn)
echo "RAINIO-BOOTED portals=$PORTALS iqn=$IQN"
echo 1 > /proc/sys/kernel/sysrq

# Network: qemu's user-mode network; the host's loopback is 10.0.2.2.
ip link set lo up
IF=$(ls /sys/class/net | grep -v '^lo$' | head -1)
ip link set "$IF" up
ip addr add 10.0.2.15/24 dev "$IF"
ip route add default via 10.0.2.2

for m in iscsi_tcp dm_multipath dm_round_robin scsi_dh_alua; do modprobe "$m" || fail "modprobe $m"; done
mkdir -p /etc/iscsi /run/lock /var/lib/iscsi
echo "InitiatorName=iqn.2026-11.io.rainio:linux-guest" > /etc/iscsi/initiatorname.iscsi
cat > /etc/multipath.conf <<CONF
defaults {
    user_friendly_names yes
    find_multipaths no
}
devices {
    device {
        vendor "RAINIO"
        product ".*"
        path_grouping_policy group_by_prio
        prio alua
        hardware_handler "1 alua"
        path_checker tur
        failback immediate
        no_path_retry 60
    }
}
CONF
# udev names the devices and gives multipath their WWIDs.
/lib/systemd/systemd-udevd --daemon || fail "udevd"
udevadm trigger --action=add
udevadm settle
/sbin/iscsid || fail "iscsid"
/sbin/multipathd || fail "multipathd"
sleep 2
for p in $PORTALS; do
    iscsiadm -m node -T "$IQN" -p "$p" -o new >/dev/null || fail "node $p"
    iscsiadm -m node -T "$IQN" -p "$p" -o update -n node.session.timeo.replacement_timeout -v 15
    iscsiadm -m node -T "$IQN" -p "$p" --login || fail "login $p"
done
# One map, one path per controller.
n=0
for i in $(seq 60); do
    udevadm settle
    multipath -r >/dev/null 2>&1
    n=$(multipath -ll 2>/dev/null | grep -c 'active ready running')
    [ "$n" -ge 3 ] && break
    sleep 1
done
multipath -ll
maps=$(multipath -ll 2>/dev/null | grep -c 'RAINIO')
echo "RAINIO-PATHS maps=$maps paths=$n"
[ "$maps" -eq 1 ] && [ "$n" -eq 3 ] || fail "expected one map with 3 paths, got $maps maps and $n paths"
DEV=/dev/mapper/$(multipath -ll | sed -n '1s/ .*//p')
mkfs.ext4 -q -F "$DEV" || fail "mkfs"
mount "$DEV" /mnt/t || fail "mount"
# Write with verification data; the host kills a controller while this runs.
fio --name=verify --directory=/mnt/t --size=256M --bs=64k --rw=write --ioengine=psync \
    --direct=1 --verify=crc32c --do_verify=0 --verify_state_save=0 > /tmp/fio-write.log 2>&1 &
FIO=$!
sleep 3
echo "RAINIO-KILL-NOW"
# The kill must land while fio is still writing.
sleep 3
kill -0 $FIO 2>/dev/null || fail "fio finished before the controller was killed; write more"
wait $FIO || { cat /tmp/fio-write.log; fail "fio write"; }
grep -E 'err=|WRITE:' /tmp/fio-write.log
failed=$(multipath -ll 2>/dev/null | grep -c 'failed')
echo "RAINIO-WRITTEN failed-paths=$failed"
[ "$failed" -ge 1 ] || fail "no path failed after the controller was killed"
sync
echo 3 > /proc/sys/vm/drop_caches
fio --name=verify --directory=/mnt/t --size=256M --bs=64k --rw=write --ioengine=psync \
    --direct=1 --verify=crc32c --verify_only --verify_state_save=0 > /tmp/fio-verify.log 2>&1 \
    || { cat /tmp/fio-verify.log; fail "fio verify"; }
grep -E 'err=|READ:' /tmp/fio-verify.log
multipath -ll
umount /mnt/t || fail "umount"
multipath -F
iscsiadm -m node -T "$IQN" --logout || fail "logout"
echo "RAINIO-RESULT: PASS"
sync
echo o > /proc/sysrq-trigger
sleep 60
