-- storage by size: disks of 64 GiB or more land on `bulk`, smaller ones where the
-- source asked.

local GIB = 1024 * 1024 * 1024
local NODE = {storages = {["local"] = {}, bulk = {}}}

local function disk(tun, size)
  return tun:send{cmd = "disk", format = "raw", storage = "local",
                  drive = {interface = "scsi", index = 0, size = size}}
end

return {
  ["a small disk stays on the storage the source asked for"] = function(t)
    local tun = t:open(NODE)
    t:eq(disk(tun, 64 * GIB - 1024), {success = true, volid = "local:100/vm-100-disk-0.raw",
      drivestr = "local:100/vm-100-disk-0.raw,format=raw,size=67108863K"})
  end,

  ["a disk of 64 GiB goes to bulk"] = function(t)
    local tun = t:open(NODE)
    t:eq(disk(tun, 64 * GIB), {success = true, volid = "bulk:100/vm-100-disk-0.raw",
      drivestr = "bulk:100/vm-100-disk-0.raw,format=raw,size=64G"})
    t:ok(t:volumes()[1] == "bulk:100/vm-100-disk-0.raw")
    local found = false
    for _, line in ipairs(tun:log()) do
      if line == "site policy: scsi0 (64G) goes to storage 'bulk' instead of 'local'" then
        found = true
      end
    end
    t:ok(found, "the task log names the decision")
  end,

  ["start accepts the moved volume"] = function(t)
    local tun = t:open(NODE)
    local d = t:succeeds(disk(tun, 100 * GIB))
    t:succeeds(tun:send{cmd = "config", conf = "cores: 1\nscsi0: " .. d.drivestr .. "\n"})
    local r = t:succeeds(tun:send{cmd = "start", start_params = {statefile = "unix"},
      migrate_opts = {migratedfrom = "source", type = "websocket",
                      nbd = {scsi0 = {volid = d.volid, drivestr = d.drivestr}}}})
    t:eq(r.drives.scsi0.volid, "bulk:100/vm-100-disk-0.raw")
  end,

  ["no bulk storage on this node: a clear error, nothing allocated"] = function(t)
    local tun = t:open{}
    t:eq(disk(tun, 64 * GIB), {success = false,
      msg = "failed to handle 'disk' command - storage 'bulk' does not exist"})
    t:eq(t:volumes(), {})
  end,

  ["a token without space on bulk is refused"] = function(t)
    local tun = t:open{storages = NODE.storages, privs = {
      ["/"] = {"VM.Allocate", "Sys.Incoming"},
      ["/storage/local"] = {"Datastore.AllocateSpace"},
    }}
    t:eq(disk(tun, 64 * GIB).msg,
      "failed to handle 'disk' command - Permission check failed (/storage/bulk, Datastore.AllocateSpace)")
    t:eq(t:volumes(), {})
  end,
}
