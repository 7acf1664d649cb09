-- resume: continue the migrated VM; from then on the migration is committed and a
-- lost connection no longer destroys anything.

local function start(tun, t)
  t:succeeds(tun:send{cmd = "config", conf = "cores: 1\n"})
  t:succeeds(tun:send{cmd = "start", start_params = {statefile = "unix"},
                      migrate_opts = {migratedfrom = "source", type = "websocket"}})
end

return {
  ["a VM that does not run"] = function(t)
    local tun = t:open{}
    t:eq(tun:send{cmd = "resume"}, {success = false, msg = "failed to handle 'resume' command - VM 100 not running"})
    t:eq(backend.calls["hypervisor.resume"], nil)
  end,

  ["resumes the started VM"] = function(t)
    local tun = t:open{}
    start(tun, t)
    t:eq(tun:send{cmd = "resume"}, {success = true})
    t:eq(backend.calls["hypervisor.resume"], 1)
  end,

  ["parameters are ignored"] = function(t)
    local tun = t:open{}
    start(tun, t)
    t:succeeds(tun:send{cmd = "resume", nocheck = 1})
  end,

  ["a failing resume reaches the reply"] = function(t)
    local tun = t:open{backend = {hypervisor = {
      resume = function(vmid) backend.fail("QMP command 'cont' failed - got timeout") end,
    }}}
    start(tun, t)
    t:eq(tun:send{cmd = "resume"}.msg, "failed to handle 'resume' command - QMP command 'cont' failed - got timeout")
  end,

  ["after resume a lost connection keeps the VM"] = function(t)
    local tun = t:open{}
    local d = t:succeeds(tun:send{cmd = "disk", format = "raw", storage = "local",
                                  drive = {interface = "scsi", index = 0, size = 1024}})
    start(tun, t)
    t:succeeds(tun:send{cmd = "resume"})
    t:eq(tun:close(), "mtunnel exited unexpectedly")
    t:eq(backend.calls["hypervisor.stop"], nil, "the VM was not stopped")
    t:eq(t:volumes(), {d.volid})
    t:eq(t:config(100), "cores: 1\nlock: migrate\n")
  end,
}
