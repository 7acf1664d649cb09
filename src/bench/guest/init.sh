#!/bin/busybox sh
# PID 1 of the test and bench guest (src/bench/guest.rs): loads the virtio-scsi disk driver, then
# talks on the first serial port. It writes a heartbeat `hb COUNTER UPTIME` about every
# 100 ms and answers one-line commands read from the same port:
#   mark TEXT  writes "MTUNNEL-MARK TEXT" to sector 2048 of /dev/sda (fsync), says "marked TEXT"
#   errors     prints the raw kernel log (`<PRIORITY>[time] text`) between errors-begin / errors-end
# With `mt.dirty=MBPS,MIB` on the kernel command line it starts /bin/dirty MBPS MIB, which
# rewrites a MIB working set at MBPS MB/s for as long as the guest runs.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do
  insmod "/lib/modules/$m.ko" || echo "guest: insmod $m failed" >/dev/ttyS0
done
exec </dev/ttyS0 >/dev/ttyS0 2>&1
stty -echo 2>/dev/null
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    mt.dirty=*) v=${arg#mt.dirty=}; /bin/dirty "${v%,*}" "${v#*,}" & ;;
  esac
done
echo "guest: ready"
n=0
while :; do
  n=$((n+1))
  read up _ </proc/uptime
  echo "hb $n $up"
  if read -t 0.1 cmd arg; then
    case "$cmd" in
      mark)
        i=0
        while [ ! -b /dev/sda ] && [ $i -lt 50 ]; do i=$((i+1)); sleep 0.1; done
        if printf 'MTUNNEL-MARK %s\n' "$arg" | dd of=/dev/sda bs=512 seek=2048 conv=fsync 2>/dev/null
        then echo "marked $arg"; else echo "mark failed"; fi ;;
      errors)
        echo "errors-begin"; dmesg -r; echo "errors-end" ;;
    esac
  fi
done
