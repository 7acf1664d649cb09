-- stop: hard-stop the target VM (the source's failure path).

return {
  ["stops the started VM"] = function(t)
    local tun = t:open{}
    t:succeeds(tun:send{cmd = "config", conf = "cores: 1\n"})
    t:succeeds(tun:send{cmd = "start", start_params = {statefile = "unix"},
                        migrate_opts = {migratedfrom = "source", type = "websocket"}})
    t:eq(tun:send{cmd = "stop"}, {success = true})
    t:ok(not backend.default.hypervisor.is_running(100), "the VM is stopped")
    t:eq(tun:send{cmd = "resume"}.msg, "failed to handle 'resume' command - VM 100 not running")
  end,

  ["stopping a VM that does not run is fine"] = function(t)
    local tun = t:open{}
    t:eq(tun:send{cmd = "stop"}, {success = true})
    t:eq(backend.calls["hypervisor.stop"], 1)
  end,

  ["parameters are ignored"] = function(t)
    local tun = t:open{}
    t:eq(tun:send{cmd = "stop", timeout = 10}, {success = true})
  end,

  ["a failing stop reaches the reply"] = function(t)
    local tun = t:open{backend = {hypervisor = {
      stop = function() backend.fail("unable to kill QEMU process 4242") end,
    }}}
    t:eq(tun:send{cmd = "stop"}, {success = false, msg = "failed to handle 'stop' command - unable to kill QEMU process 4242"})
  end,
}
