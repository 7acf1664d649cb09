-- quit: end the tunnel. With cleanup=1 first destroy exactly what this tunnel
-- created (VM stopped, volumes, firewall file, config) and nothing else. Afterwards
-- every command gets the exit-mode error until the source closes the connection.
-- A connection lost without quit (before the migration committed) cleans up too.

local function has_line(lines, text)
  for _, line in ipairs(lines) do
    if line:find(text, 1, true) then
      return true
    end
  end
  return false
end

-- disk + config (with a firewall file) + start: everything a tunnel can create.
local function migrate(tun, t)
  local d = t:succeeds(tun:send{cmd = "disk", format = "raw", storage = "local",
                                drive = {interface = "scsi", index = 0, size = 1024 * 1024}})
  t:succeeds(tun:send{cmd = "config", conf = "scsi0: " .. d.drivestr .. "\n",
                      ["firewall-config"] = "[OPTIONS]\nenable: 1\n"})
  t:succeeds(tun:send{cmd = "start", start_params = {statefile = "unix"},
                      migrate_opts = {migratedfrom = "source", type = "websocket",
                                      nbd = {scsi0 = {volid = d.volid, drivestr = d.drivestr}}}})
  return d
end

return {
  ["quit without cleanup: exit mode, nothing destroyed, task OK"] = function(t)
    local tun = t:open{}
    local d = migrate(tun, t)
    t:succeeds(tun:send{cmd = "unlock"})
    t:eq(tun:send{cmd = "quit", cleanup = 0}, {success = true})
    t:eq(tun:close(), "OK")
    t:eq(t:volumes(), {d.volid})
    t:eq(t:config(100), "scsi0: " .. d.drivestr .. "\n")
    t:eq(backend.calls["hypervisor.stop"], nil)
  end,

  ["after quit every command gets the exit-mode error"] = function(t)
    local tun = t:open{}
    t:succeeds(tun:send{cmd = "quit"})
    for _, cmd in ipairs({"version", "disk", "quit"}) do
      t:eq(tun:send{cmd = cmd}, {
        success = false,
        msg = "tunnel is in exit-mode, processing '" .. cmd .. "' cmd not possible",
      })
    end
    t:eq(tun:send{cmd = "no-such-command"}.msg,
      "tunnel is in exit-mode, processing 'no-such-command' cmd not possible")
  end,

  ["cleanup=1 frees exactly what the tunnel created"] = function(t)
    t:node{}
    local other_vm = t:alloc{vmid = 200}
    local leftover = t:alloc{vmid = 100, name = "vm-100-disk-5.raw"}
    local tun = t:open{}
    local d = migrate(tun, t)
    t:eq(t:volumes(), {d.volid, leftover, other_vm})
    t:eq(tun:send{cmd = "quit", cleanup = 1}, {success = true})
    t:eq(t:volumes(), {leftover, other_vm}, "only the tunnel's own volume is gone")
    t:eq(t:config(100), nil, "the VM config is removed")
    t:eq(tun:firewall(), nil, "the firewall file is removed")
    t:ok(not backend.default.hypervisor.is_running(100), "the VM is stopped")
    t:eq(tun:close(), "OK")
  end,

  ["cleanup also frees completed imports"] = function(t)
    local tun = t:open{}
    local r = t:succeeds(tun:send{cmd = "disk-import", volname = "vm-100-disk-0.raw", format = "raw",
                                  export_formats = "raw+size", storage = "local"})
    local conn = tun:connect(r.socket)
    conn:write(string.pack("<I8", 4) .. "data")
    conn:close()
    t:eq(tun:wait_import().volid, "local:100/vm-100-disk-0.raw")
    t:succeeds(tun:send{cmd = "quit", cleanup = "1"})
    t:eq(t:volumes(), {})
  end,

  ["cleanup aborts a running import"] = function(t)
    local tun = t:open{}
    local r = t:succeeds(tun:send{cmd = "disk-import", volname = "vm-100-disk-0.raw", format = "raw",
                                  export_formats = "raw+size", storage = "local"})
    local conn = tun:connect(r.socket)
    conn:write(string.pack("<I8", 4096))
    t:succeeds(tun:send{cmd = "quit", cleanup = true})
    t:ok(has_line(tun:log(), "cleanup: aborted the running import of 'vm-100-disk-0.raw' and removed its partial volume"))
    t:fail_contains(tun:send{cmd = "ticket", path = r.socket}, "exit-mode")
    conn:close()
    t:eq(t:volumes(), {})
  end,

  ["a failure while freeing is a warning and keeps the VMID reserved"] = function(t)
    local tun = t:open{backend = {storage = {
      free = function(volid) backend.fail("volume is busy") end,
    }}}
    local d = migrate(tun, t)
    t:eq(tun:send{cmd = "quit", cleanup = 1}, {success = true})
    t:ok(has_line(tun:log(), "WARN: cleanup: freeing volume '" .. d.volid .. "' failed: volume is busy"))
    t:ok(has_line(tun:log(), "WARN: cleanup: leaving the config of VM 100 in place until its volumes are freed"))
    t:ok(t:config(100) ~= nil, "the config keeps the VMID reserved for a retry")
    -- 3 warnings from quit's cleanup, 3 more from the retry when the tunnel ends.
    t:eq(tun:close(), "WARNINGS: 6")
  end,

  ["a lost connection without quit cleans up"] = function(t)
    t:node{}
    local other_vm = t:alloc{vmid = 200}
    local tun = t:open{}
    migrate(tun, t)
    t:eq(tun:close(), "mtunnel exited unexpectedly")
    t:eq(t:volumes(), {other_vm})
    t:eq(t:config(100), nil)
    t:eq(t:firewall(100), nil)
    t:ok(not backend.default.hypervisor.is_running(100))
    t:ok(has_line(tun:log(), "control connection lost before the migration finished: cleaning up"))
  end,

  ["a lost connection frees an import that finished but was not queried yet"] = function(t)
    local tun = t:open{}
    local r = t:succeeds(tun:send{cmd = "disk-import", volname = "vm-100-disk-0.raw", format = "raw",
                                  export_formats = "raw+size", storage = "local"})
    local conn = tun:connect(r.socket)
    conn:write(string.pack("<I8", 3) .. "abc")
    conn:close()
    for _ = 1, 100 do
      if #t:volumes() > 0 then break end
      t:sleep(10)
    end
    t:eq(t:volumes(), {"local:100/vm-100-disk-0.raw"}, "the import finished")
    t:eq(tun:close(), "mtunnel exited unexpectedly")
    t:eq(t:volumes(), {})
  end,

  ["cleanup leaves a VM alone that someone else locked meanwhile"] = function(t)
    local tun = t:open{}
    local d = migrate(tun, t)
    t:write_config(100, "lock: backup\nscsi0: " .. d.drivestr .. "\n")
    t:eq(tun:send{cmd = "quit", cleanup = 1}, {success = true})
    t:ok(has_line(tun:log(), "WARN: cleanup: config of VM 100 is locked 'backup', not 'migrate' - " ..
                             "leaving the VM, its volumes and its config in place"))
    t:eq(t:config(100), "lock: backup\nscsi0: " .. d.drivestr .. "\n")
    t:eq(t:volumes(), {d.volid})
    t:ok(backend.default.hypervisor.is_running(100), "the VM was not stopped")
  end,

  ["a lost connection leaves a VM alone whose lock was removed meanwhile"] = function(t)
    local tun = t:open{}
    local d = migrate(tun, t)
    t:write_config(100, "scsi0: " .. d.drivestr .. "\n")
    t:eq(tun:close(), "mtunnel exited unexpectedly")
    t:ok(has_line(tun:log(), "WARN: cleanup: config of VM 100 has no lock, not 'migrate'"))
    t:eq(t:config(100), "scsi0: " .. d.drivestr .. "\n")
    t:eq(t:volumes(), {d.volid})
  end,

  ["a lost connection right after opening removes the reserved config"] = function(t)
    local tun = t:open{}
    t:eq(tun:close(), "mtunnel exited unexpectedly")
    t:eq(t:config(100), nil)
  end,

  ["cleanup must be a boolean"] = function(t)
    local tun = t:open{}
    t:eq(tun:send{cmd = "quit", cleanup = "maybe"}.msg,
      "failed to handle 'quit' command - 400 Parameter verification failed.\n" ..
      "cleanup: type check ('boolean') failed - got 'maybe'\n")
    t:succeeds(tun:send{cmd = "version"}, "not in exit mode after a failed quit")
  end,
}
