-- replica-hashes: block hashes of a replica's working copy; bad input is refused and
-- changes nothing. (The hashes themselves read a real image through qemu-nbd: see
-- tests/replica.rs, whose hash syncs use this command.)
local CONF = "scsi0: local:100/vm-100-disk-0.qcow2,size=1M\n"
local DISKS = { scsi0 = { storage = "local", format = "qcow2", size = 1024 * 1024 } }

local function prepared(t)
  local tun = t:open{}
  t:succeeds(tun:send{cmd = "replica-prepare", source_node = "src1", source_vmid = 100,
                      conf = CONF, disks = DISKS})
  return tun
end

return {
  ["refused before replica-prepare"] = function(t)
    local tun = t:open{}
    t:fail_contains(tun:send{cmd = "replica-hashes", disk = "scsi0", offset = 0, length = 65536},
      "VM 100 is no replica yet: send 'replica-prepare' first")
  end,

  ["a disk the replica does not have, or a bad range, is refused"] = function(t)
    local tun = prepared(t)
    t:fail_contains(tun:send{cmd = "replica-hashes", disk = "scsi1", offset = 0, length = 65536},
      "replica 100 has no disk 'scsi1' (disks: scsi0)")
    t:fail_contains(tun:send{cmd = "replica-hashes", disk = "scsi0", offset = 4096, length = 65536},
      "scsi0: bad range: offset 4096 is not a multiple of the block (65536)")
    t:fail_contains(tun:send{cmd = "replica-hashes", disk = "scsi0", offset = 0, length = 2097152},
      "scsi0: bad range: 0+2097152 is beyond the end of the disk (1048576 bytes)")
    t:fail_contains(tun:send{cmd = "replica-hashes", disk = "scsi0", offset = 0,
                             length = 65536, block = 5000},
      "block must be a multiple of 4096 bytes")
  end,

  ["runs must be a boolean"] = function(t)
    -- (What `runs` does needs a real image: tests/replica.rs, a hash sync of a sparse
    -- 4 GiB disk, receives its hashes as runs.)
    local tun = prepared(t)
    t:fail_contains(tun:send{cmd = "replica-hashes", disk = "scsi0", offset = 0,
                             length = 65536, runs = "maybe"},
      "runs: type check ('boolean') failed - got 'maybe'")
  end,
}
