-- unlock: remove the expected lock ('migrate' after config) from the VM config; no
-- later command expects a lock, and the migration is committed: a lost connection no
-- longer cleans up.

local function migrate(tun, t)
  local d = t:succeeds(tun:send{cmd = "disk", format = "raw", storage = "local",
                                drive = {interface = "scsi", index = 0, size = 1024 * 1024}})
  t:succeeds(tun:send{cmd = "config", conf = "cores: 2\nscsi0: " .. d.drivestr .. "\n"})
  return d
end

return {
  ["removes the migrate lock"] = function(t)
    local tun = t:open{}
    local d = migrate(tun, t)
    t:eq(tun:send{cmd = "unlock"}, {success = true})
    t:eq(tun:config(), "cores: 2\nscsi0: " .. d.drivestr .. "\n")
  end,

  ["then no lock is expected any more"] = function(t)
    local tun = t:open{}
    migrate(tun, t)
    t:succeeds(tun:send{cmd = "unlock"})
    -- a locked command runs on the unlocked config (no wrong-lock error) ...
    t:succeeds(tun:send{cmd = "disk", format = "raw", storage = "local",
                        drive = {interface = "scsi", index = 1, size = 1024}})
    -- ... and a second unlock finds nothing to remove
    t:eq(tun:send{cmd = "unlock"}, {
      success = false,
      msg = "failed to handle 'unlock' command - no lock found trying to remove any lock",
    })
  end,

  ["before config the reservation stays and nothing is committed"] = function(t)
    local tun = t:open{}
    t:succeeds(tun:send{cmd = "disk", format = "raw", storage = "local",
                        drive = {interface = "scsi", index = 0, size = 1024 * 1024}})
    t:eq(tun:send{cmd = "unlock"}, {
      success = false,
      msg = "failed to handle 'unlock' command - found lock 'create' trying to remove 'migrate' lock - the VM config was not sent yet ('config' comes first)",
    })
    t:eq(tun:config(), "lock: create\n", "the reservation is untouched")
    -- not committed: a lost connection frees the volume and the reserved config
    t:eq(tun:close(), "mtunnel exited unexpectedly")
    t:eq(t:volumes(), {}, "the volume of 'disk' is freed")
    t:eq(t:config(100), nil, "the reserved config is gone")
  end,

  ["a config locked by someone else"] = function(t)
    local tun = t:open{}
    migrate(tun, t)
    t:write_config(100, "cores: 2\nlock: backup\n")
    t:eq(tun:send{cmd = "unlock"}, {
      success = false,
      msg = "failed to handle 'unlock' command - Encountered wrong lock - aborting mtunnel command handling.",
    })
    t:eq(tun:config(), "cores: 2\nlock: backup\n", "the other lock stays")
  end,

  ["a lost connection after unlock keeps everything"] = function(t)
    local tun = t:open{}
    local d = migrate(tun, t)
    t:succeeds(tun:send{cmd = "start", start_params = {statefile = "unix"},
                        migrate_opts = {migratedfrom = "source", type = "websocket"}})
    t:succeeds(tun:send{cmd = "unlock"})
    t:eq(tun:close(), "mtunnel exited unexpectedly")
    t:eq(t:volumes(), {d.volid})
    t:eq(t:config(100), "cores: 2\nscsi0: " .. d.drivestr .. "\n")
    t:eq(backend.calls["hypervisor.stop"], nil, "the VM keeps running")
  end,

  ["parameters are ignored"] = function(t)
    local tun = t:open{}
    migrate(tun, t)
    t:succeeds(tun:send{cmd = "unlock", lock = "migrate"})
  end,
}
