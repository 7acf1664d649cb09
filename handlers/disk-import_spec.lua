-- disk-import: listen on {run}/{vmid}.storage for one `raw+size`/`qcow2+size`
-- stream; reply with the socket and the chosen stream format. One import at a time.

local function import(tun, overrides)
  local req = {
    cmd = "disk-import", volname = "vm-100-disk-0.raw", format = "raw",
    export_formats = "raw+size", storage = "local",
    with_snapshots = 0, allow_rename = 1,
  }
  for k, v in pairs(overrides or {}) do
    req[k] = v
  end
  return tun:send(req)
end

return {
  ["replies with the storage socket and the stream format"] = function(t)
    local tun = t:open{}
    t:eq(import(tun), {success = true, socket = t:run_dir() .. "/100.storage", format = "raw+size"})
  end,

  ["picks the first export format the storage can import"] = function(t)
    local tun = t:open{}
    t:eq(import(tun, {format = "qcow2", volname = "vm-100-disk-0.qcow2",
                      export_formats = "zfs,qcow2+size,raw+size", with_snapshots = 1}).format,
      "qcow2+size")
  end,

  ["no common stream format"] = function(t)
    local tun = t:open{}
    t:eq(import(tun, {export_formats = "zfs"}), {
      success = false,
      msg = "failed to handle 'disk-import' command - no matching import/export format found for storage 'local'",
    })
  end,

  ["an image format the storage cannot hold"] = function(t)
    local tun = t:open{}
    t:eq(import(tun, {format = "subvol"}).msg,
      "failed to handle 'disk-import' command - unsupported format 'subvol' for storage type dir")
  end,

  ["a second import while one runs"] = function(t)
    local tun = t:open{}
    t:succeeds(import(tun))
    t:eq(import(tun, {volname = "vm-100-disk-1.raw"}), {
      success = false,
      msg = "failed to handle 'disk-import' command - disk import already running",
    })
  end,

  ["the storage socket is ticket-able while the import runs"] = function(t)
    local tun = t:open{}
    local r = t:succeeds(import(tun))
    t:match(t:succeeds(tun:send{cmd = "ticket", path = r.socket}).ticket, "^PVETUNNEL:")
  end,

  ["booleans in the encodings a PVE source really sends"] = function(t)
    local tun = t:open{}
    -- observed in the wild (PegaProx #84): mixed numbers and strings
    t:succeeds(import(tun, {migration_snapshot = 0, allow_rename = "1", with_snapshots = 1,
                            format = "qcow2", volname = "vm-100-disk-0.qcow2",
                            export_formats = "qcow2+size"}))
  end,

  ["an empty string is not a boolean"] = function(t)
    local tun = t:open{}
    t:eq(import(tun, {migration_snapshot = ""}).msg,
      "failed to handle 'disk-import' command - 400 Parameter verification failed.\n" ..
      "migration_snapshot: type check ('boolean') failed - got ''\n")
  end,

  ["required parameters"] = function(t)
    local tun = t:open{}
    t:eq(tun:send{cmd = "disk-import", storage = "local"}.msg,
      "failed to handle 'disk-import' command - 400 Parameter verification failed.\n" ..
      "export_formats: property is missing and it is not optional\n" ..
      "format: property is missing and it is not optional\n" ..
      "volname: property is missing and it is not optional\n")
  end,

  ["bad volume names are refused before anything is created"] = function(t)
    local tun = t:open{}
    local prefix = "failed to handle 'disk-import' command - illegal name "
    local chars = " not allowed (use letters, digits, '-', '_' and '.')"
    for _, case in ipairs{
      {"../../etc/passwd", "'../../etc/passwd' - path components are not allowed"},
      {"/etc/passwd", "'/etc/passwd' - path components are not allowed"},
      {"100/vm-100-disk-0.raw", "'100/vm-100-disk-0.raw' - path components are not allowed"},
      {"vm-100-disk-0\0.raw", "'vm-100-disk-0\\0.raw' - character '\\0'" .. chars},
      {"vm-100-disk 0.raw", "'vm-100-disk 0.raw' - character ' '" .. chars},
      {"vm-100-" .. string.rep("a", 293),
       "'vm-100-" .. string.rep("a", 57) .. "...' - longer than 200 characters"},
      {"vm-100-a..b.raw", "'vm-100-a..b.raw' - '..' is not allowed"},
      {"vm-999-disk-0.raw", "'vm-999-disk-0.raw' - should be 'vm-100-*'"},
      {"vm-1000-disk-0.raw", "'vm-1000-disk-0.raw' - should be 'vm-100-*'"},
      {"vm-100-.raw", "'vm-100-' - should be 'vm-100-*'"},
      {"", "'' - should be 'vm-100-*'"},
    } do
      t:eq(import(tun, {volname = case[1]}), {success = false, msg = prefix .. case[2]}, case[1])
    end
    -- No socket, no pending import: the next import starts normally.
    t:fail_contains(tun:send{cmd = "ticket", path = t:run_dir() .. "/100.storage"}, "unknown socket")
    t:fail_contains(tun:send{cmd = "query-disk-import"}, "no disk import running")
    t:succeeds(import(tun))
    t:eq(t:volumes(), {})
  end,

  ["unknown storage"] = function(t)
    local tun = t:open{}
    t:eq(import(tun, {storage = "nope"}).msg,
      "failed to handle 'disk-import' command - storage 'nope' does not exist")
  end,

  ["a storage the token may not allocate on"] = function(t)
    local tun = t:open{privs = {"VM.Allocate", "Sys.Incoming"}}
    t:eq(import(tun).msg,
      "failed to handle 'disk-import' command - Permission check failed (/storage/local, Datastore.AllocateSpace)")
  end,
}
