-- disk: allocate an empty volume for a live-migrated (NBD) disk; reply with the
-- volid and the drive string `start` must later be given back unchanged.

local MiB = 1024 * 1024

local function disk(tun, overrides)
  local req = {
    cmd = "disk", format = "raw", storage = "local",
    drive = {interface = "scsi", index = 0, size = 64 * MiB, discard = "on", iothread = 1},
  }
  for k, v in pairs(overrides or {}) do
    req[k] = v
  end
  return tun:send(req)
end

return {
  ["allocates a volume and returns its drive string"] = function(t)
    local tun = t:open{}
    t:eq(disk(tun), {
      success = true,
      volid = "local:100/vm-100-disk-0.raw",
      drivestr = "local:100/vm-100-disk-0.raw,discard=on,format=raw,iothread=1,size=64M",
    })
    t:eq(t:volumes(), {"local:100/vm-100-disk-0.raw"})
    t:eq(backend.calls["storage.alloc"], 1)
  end,

  ["the size is allocated in KiB, rounded up, and printed like PVE"] = function(t)
    local sizes = {}
    local tun = t:open{backend = {storage = {
      alloc = function(storage, vmid, format, name, size_kib)
        sizes[#sizes + 1] = size_kib
        return backend.default.storage.alloc(storage, vmid, format, name, size_kib)
      end,
    }}}
    t:eq(disk(tun, {drive = {interface = "scsi", index = 0, size = 32 * 1024 * MiB}}).drivestr,
      "local:100/vm-100-disk-0.raw,format=raw,size=32G")
    t:eq(disk(tun, {drive = {interface = "virtio", index = 1, size = 1000}}).drivestr,
      "local:100/vm-100-disk-1.raw,format=raw,size=1000")
    t:eq(sizes, {32 * MiB, 1})
  end,

  ["each disk gets the next free name"] = function(t)
    local tun = t:open{}
    t:eq(disk(tun).volid, "local:100/vm-100-disk-0.raw")
    t:eq(disk(tun, {drive = {interface = "scsi", index = 1, size = MiB}}).volid, "local:100/vm-100-disk-1.raw")
  end,

  ["qcow2 is kept on a storage that supports it"] = function(t)
    local tun = t:open{}
    t:eq(disk(tun, {format = "qcow2"}).drivestr,
      "local:100/vm-100-disk-0.qcow2,discard=on,format=qcow2,iothread=1,size=64M")
  end,

  ["an unsupported format falls back to the storage default"] = function(t)
    local tun = t:open{}
    t:eq(disk(tun, {format = "vmdk"}), {
      success = true,
      volid = "local:100/vm-100-disk-0.raw",
      drivestr = "local:100/vm-100-disk-0.raw,discard=on,format=raw,iothread=1,size=64M",
    })
  end,

  ["file, volume and format in the drive are ignored"] = function(t)
    local tun = t:open{}
    t:eq(disk(tun, {drive = {interface = "sata", index = 2, size = MiB, file = "other:1/x.raw",
                             volume = "x", format = "qcow2", cache = "none"}}).drivestr,
      "local:100/vm-100-disk-0.raw,cache=none,format=raw,size=1M")
  end,

  ["drive.size missing"] = function(t)
    local tun = t:open{}
    t:eq(disk(tun, {drive = {interface = "scsi", index = 0}}), {
      success = false,
      msg = "failed to handle 'disk' command - 400 Parameter verification failed.\n" ..
            "drive.size: property is missing and it is not optional\n",
    })
    t:eq(t:volumes(), {})
  end,

  ["drive missing"] = function(t)
    local tun = t:open{}
    t:eq(tun:send{cmd = "disk", format = "raw", storage = "local"}.msg,
      "failed to handle 'disk' command - 400 Parameter verification failed.\n" ..
      "drive: property is missing and it is not optional\n")
  end,

  ["unknown interface"] = function(t)
    local tun = t:open{}
    t:eq(disk(tun, {drive = {interface = "floppy", index = 0, size = 1}}).msg,
      "failed to handle 'disk' command - 400 Parameter verification failed.\n" ..
      "drive.interface: value 'floppy' does not have a value in the enumeration " ..
      "'ide, sata, scsi, virtio, efidisk, tpmstate'\n")
  end,

  ["a drive slot that does not exist"] = function(t)
    local tun = t:open{}
    t:eq(disk(tun, {drive = {interface = "ide", index = 9, size = 1}}).msg,
      "failed to handle 'disk' command - invalid drive 'ide9'")
    t:eq(backend.calls["storage.alloc"], nil, "nothing was allocated")
  end,

  ["unknown storage"] = function(t)
    local tun = t:open{}
    t:eq(disk(tun, {storage = "nope"}).msg,
      "failed to handle 'disk' command - storage 'nope' does not exist")
  end,

  ["a storage the token may not allocate on"] = function(t)
    local tun = t:open{privs = {
      ["/"] = {"VM.Allocate", "Sys.Incoming"},
      ["/storage/other"] = {"Datastore.AllocateSpace"},
    }, storages = {["local"] = {}, other = {}}}
    t:eq(disk(tun).msg,
      "failed to handle 'disk' command - Permission check failed (/storage/local, Datastore.AllocateSpace)")
    t:succeeds(disk(tun, {storage = "other"}))
    t:eq(t:volumes(), {"other:100/vm-100-disk-0.raw"})
  end,

  ["a storage without images content"] = function(t)
    local tun = t:open{storages = {["local"] = {}, iso = {content = {"iso"}}}}
    t:eq(disk(tun, {storage = "iso"}).msg,
      "failed to handle 'disk' command - storage 'iso' does not support vm images")
  end,

  ["a disabled storage"] = function(t)
    local tun = t:open{storages = {["local"] = {}, off = {disable = true}}}
    t:eq(disk(tun, {storage = "off"}).msg,
      "failed to handle 'disk' command - storage 'off' is disabled")
  end,

  ["an allocation error of the backend reaches the reply"] = function(t)
    local tun = t:open{backend = {storage = {
      alloc = function() backend.fail("no space left on device") end,
    }}}
    t:eq(disk(tun), {success = false, msg = "failed to handle 'disk' command - no space left on device"})
    t:eq(t:volumes(), {})
  end,

  ["only the second allocation fails"] = function(t)
    local tun = t:open{backend = {storage = {
      alloc = function(...)
        if backend.calls["storage.alloc"] == 2 then
          backend.fail("quota exceeded")
        end
        return backend.default.storage.alloc(...)
      end,
    }}}
    t:succeeds(disk(tun))
    t:eq(disk(tun, {drive = {interface = "scsi", index = 1, size = MiB}}).msg,
      "failed to handle 'disk' command - quota exceeded")
    t:succeeds(disk(tun, {drive = {interface = "scsi", index = 2, size = MiB}}))
    t:eq(t:volumes(), {"local:100/vm-100-disk-0.raw", "local:100/vm-100-disk-1.raw"})
  end,

  -- a key with `,` or `=` would smuggle properties into the drive string `start` exports
  ["a drive key that is not a plain name is refused before allocating"] = function(t)
    local tun = t:open{}
    t:eq(disk(tun, {drive = {interface = "scsi", index = 0, size = MiB, ["x,file"] = "/some/path"}}).msg,
      "failed to handle 'disk' command - invalid key 'x,file' - property keys are made of " ..
      "letters, digits, '_', '-' and '.'")
    t:eq(disk(tun, {drive = {interface = "scsi", index = 0, size = MiB, ["a=b"] = "1"}}).msg,
      "failed to handle 'disk' command - invalid key 'a=b' - property keys are made of " ..
      "letters, digits, '_', '-' and '.'")
    t:eq(backend.calls["storage.alloc"], nil, "nothing was allocated")
  end,

  ["a drive value that would not read back is refused, as PVE's print_property_string"] = function(t)
    local tun = t:open{}
    for value, msg in pairs({
      ["none,file=/etc/shadow"] = "illegal value with commas for cache",
      ['"quoted"'] = "illegal value for cache - a value must not start with '\"'",
      ["a\rb"] = "illegal value for cache - contains the control character U+000D; " ..
                 "values must be printable text",
      [""] = "illegal empty value for cache",
    }) do
      t:eq(disk(tun, {drive = {interface = "scsi", index = 0, size = MiB, cache = value}}).msg,
        "failed to handle 'disk' command - " .. msg, value)
    end
    t:eq(backend.calls["storage.alloc"], nil, "nothing was allocated")
  end,

  ["after config the lock is 'migrate' and disk still works"] = function(t)
    local tun = t:open{}
    t:succeeds(tun:send{cmd = "config", conf = "cores: 1\n"})
    t:succeeds(disk(tun))
  end,
}
