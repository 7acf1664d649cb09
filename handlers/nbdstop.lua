-- nbdstop: stop the NBD server once the disks are mirrored.
return {
  description = "Stop the VM's NBD server.",
  params = false,
  lock = false,
  run = function(ctx, p)
    pve.qemu.nbd_stop()
    return {}
  end,
}
