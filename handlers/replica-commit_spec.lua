-- replica-commit: a point is made only at the end of a run that was started.
return {
  ["refused before replica-prepare"] = function(t)
    local tun = t:open{}
    t:fail_contains(tun:send{cmd = "replica-commit"},
      "VM 100 is no replica yet: send 'replica-prepare' first")
  end,

  ["refused without a run under way, and nothing is committed"] = function(t)
    local tun = t:open{}
    t:succeeds(tun:send{cmd = "replica-prepare", source_node = "src1", source_vmid = 100,
                        conf = "scsi0: local:100/vm-100-disk-0.raw,size=1M\n",
                        disks = {scsi0 = {storage = "local", size = 1024 * 1024}}})
    t:fail_contains(tun:send{cmd = "replica-commit", keep = 2},
      "no replica run of VM 100 is under way (send 'replica-export' first)")
    tun:close()
    t:eq(t:config(100), nil)
  end,
}
