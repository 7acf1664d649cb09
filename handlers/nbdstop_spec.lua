-- nbdstop: stop the NBD server once the disks are mirrored.

local function start(tun)
  local r = tun:send{cmd = "config", conf = "cores: 1\n"}
  if not r.success then
    return r
  end
  return tun:send{cmd = "start", start_params = {statefile = "unix"},
                  migrate_opts = {migratedfrom = "source", type = "websocket"}}
end

return {
  ["stops the NBD server of the running VM"] = function(t)
    local tun = t:open{}
    t:succeeds(start(tun))
    t:eq(tun:send{cmd = "nbdstop"}, {success = true})
    t:eq(backend.calls["hypervisor.nbd_stop"], 1)
  end,

  ["a VM that does not run"] = function(t)
    local tun = t:open{}
    t:eq(tun:send{cmd = "nbdstop"}, {success = false, msg = "failed to handle 'nbdstop' command - VM 100 not running"})
  end,

  ["a failing QMP call reaches the reply"] = function(t)
    local tun = t:open{backend = {hypervisor = {
      nbd_stop = function(vmid)
        backend.sleep(10)
        backend.fail("VM " .. vmid .. " qmp command 'nbd-server-stop' failed - got timeout")
      end,
    }}}
    t:succeeds(start(tun))
    t:eq(tun:send{cmd = "nbdstop"}.msg,
      "failed to handle 'nbdstop' command - VM 100 qmp command 'nbd-server-stop' failed - got timeout")
  end,

  ["parameters are ignored"] = function(t)
    local tun = t:open{}
    t:succeeds(start(tun))
    t:succeeds(tun:send{cmd = "nbdstop", force = 1})
  end,
}
