-- replica-cutover: only a current replica of this very source VM is taken over; a refusal
-- changes nothing.
local CONF = "cores: 2\nscsi0: local:100/vm-100-disk-0.qcow2,size=1M\n"
local DISKS = { scsi0 = { storage = "local", format = "qcow2", size = 1024 * 1024 } }
local REPLICA_CONF = "cores: 2\nlock: replica\n"
  .. "scsi0: local:100/vm-100-disk-0.qcow2,format=qcow2,size=1M\n"

local function cutover(tun, node, disks)
  return tun:send{cmd = "replica-cutover", source_node = node or "src1", source_vmid = 100,
                  conf = "cores: 4\n" .. "scsi0: local:100/vm-100-disk-0.qcow2,size=1M\n",
                  disks = disks or { scsi0 = { size = 1024 * 1024 } }}
end

local function replica(t)
  local tun = t:open{}
  t:succeeds(tun:send{cmd = "replica-prepare", source_node = "src1", source_vmid = 100,
                      conf = CONF, disks = DISKS})
  return tun
end

return {
  ["refused on a VMID that is no replica"] = function(t)
    local tun = t:open{}
    t:fail_contains(cutover(tun),
      "VM 100 is no replica on this node (lock 'create'): nothing to cut over to")
    t:eq(tun:config(), "lock: create\n")
  end,

  ["refused for another source VM, and nothing changes"] = function(t)
    local tun = replica(t)
    t:fail_contains(cutover(tun, "src2"),
      "VM 100 here is the replica of VM 100 on 'src1', not of VM 100 on 'src2'")
    t:eq(tun:config(), REPLICA_CONF)
  end,

  ["refused when the disks changed"] = function(t)
    local tun = replica(t)
    t:fail_contains(cutover(tun, "src1", { scsi0 = { size = 2 * 1024 * 1024 } }),
      "the disks of VM 100 changed since its replica was made (scsi0 changed size")
    t:eq(tun:config(), REPLICA_CONF)
  end,

  ["refused while the replica has no completed run, and nothing changes"] = function(t)
    local tun = replica(t)
    t:fail_contains(cutover(tun),
      "the replica of VM 100 is not current (status 'empty'): run 'mtunnel replicate' to it "
      .. "first, or migrate with --no-replica after 'mtunnel replica drop 100'")
    t:eq(tun:config(), REPLICA_CONF)
  end,
}
