-- replica-prepare: the first run of a replica allocates its working copies and writes
-- the config locked 'replica'; bad input is refused before anything is made.
local CONF = "cores: 2\nscsi0: local:100/vm-100-disk-0.qcow2,size=1M\n"
local DISKS = { scsi0 = { storage = "local", format = "qcow2", size = 1024 * 1024 } }

local function prepare(tun, conf, disks)
  return tun:send{cmd = "replica-prepare", source_node = "src1", source_vmid = 100,
                  conf = conf or CONF, disks = disks or DISKS}
end

return {
  ["creates the replica: working copies and a config locked replica"] = function(t)
    local tun = t:open{}
    local r = t:succeeds(prepare(tun))
    t:eq(r.first, true)
    t:eq(r.incremental_ok, false)
    t:eq(r.points, json.array{})
    t:eq(r.disks.scsi0, {volid = "local:100/vm-100-disk-0.qcow2", format = "qcow2",
                         size = 1024 * 1024})
    t:ok(#r.id == 16, "a 16-digit replica id")
    t:eq(tun:config(), "cores: 2\nlock: replica\n"
      .. "scsi0: local:100/vm-100-disk-0.qcow2,format=qcow2,size=1M\n")
  end,

  ["unlock refuses the replica lock and changes nothing"] = function(t)
    local tun = t:open{}
    t:succeeds(prepare(tun))
    t:eq(tun:send{cmd = "unlock"}.msg, "failed to handle 'unlock' command - VM 100 is a "
      .. "replica (lock 'replica'): it is not unlocked by a tunnel; promote one of its "
      .. "restore points on the target ('mtunnel replica promote 100')")
    t:eq(tun:config(), "cores: 2\nlock: replica\n"
      .. "scsi0: local:100/vm-100-disk-0.qcow2,format=qcow2,size=1M\n")
  end,

  ["a first run that ends before replica-export frees everything"] = function(t)
    local tun = t:open{}
    t:succeeds(prepare(tun))
    tun:close()
    t:eq(t:config(100), nil)
    t:eq(t:volumes(), {})
  end,

  ["a later run onto another target storage is refused and changes nothing"] = function(t)
    local tun = t:open{}
    t:succeeds(prepare(tun))
    local before = tun:config()
    local disks = { scsi0 = { storage = "other", format = "qcow2", size = 1024 * 1024 } }
    t:eq(prepare(tun, CONF, disks).msg, "failed to handle 'replica-prepare' command - scsi0: "
      .. "the replica's working copy 'local:100/vm-100-disk-0.qcow2' is on storage 'local', "
      .. "not on the requested 'other' (--target-storage): replicate with --target-storage "
      .. "local, or drop the replica ('mtunnel replica drop 100' on this node) and replicate "
      .. "again")
    t:eq(tun:config(), before)
    t:eq(t:volumes(), {"local:100/vm-100-disk-0.qcow2"})
  end,

  ["a later run writes the source's current config, on the working copies, locked replica"] = function(t)
    local tun = t:open{}
    t:succeeds(prepare(tun))
    local before = tun:config()
    -- refused (a disk changed size): the config stays as it was
    local bigger = { scsi0 = { storage = "local", format = "qcow2", size = 2 * 1024 * 1024 } }
    t:fail_contains(prepare(tun, "memory: 4096\n" .. CONF, bigger),
      "the disks of VM 100 changed since its replica was made (scsi0 changed size")
    t:eq(tun:config(), before)
    local conf = "cores: 4\ndescription: moved%20rack\nmemory: 2048\n"
      .. "scsi0: local:100/vm-100-disk-7.qcow2,cache=writeback,size=1M\n"
      .. "unused0: local:100/vm-100-disk-9.raw\n"
    local r = t:succeeds(prepare(tun, conf))
    t:eq(r.first, false)
    t:eq(tun:config(), "#moved rack\ncores: 4\nlock: replica\nmemory: 2048\n"
      .. "scsi0: local:100/vm-100-disk-0.qcow2,cache=writeback,format=qcow2,size=1M\n")
    t:eq(t:volumes(), {"local:100/vm-100-disk-0.qcow2"})
  end,

  ["a drive that is not replicated is refused before anything is made"] = function(t)
    local tun = t:open{}
    local conf = CONF .. "scsi1: local:100/vm-100-disk-1.raw,size=1M\n"
    t:fail_contains(prepare(tun, conf), "scsi1: volume 'local:100/vm-100-disk-1.raw' is not replicated")
    t:eq(t:volumes(), {})
    t:eq(tun:config(), "lock: create\n")
  end,

  ["a size that is no whole KiB is refused"] = function(t)
    local tun = t:open{}
    local disks = { scsi0 = { storage = "local", format = "qcow2", size = 1000 } }
    t:fail_contains(prepare(tun, CONF, disks), "scsi0: size 1000 is not a multiple of 1 KiB")
    t:eq(t:volumes(), {})
  end,
}
