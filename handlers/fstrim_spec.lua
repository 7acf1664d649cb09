-- fstrim: ask the guest agent to trim after the disk mirror; best effort, so the
-- command always succeeds and failures only show in the task log.

local function has_line(lines, text)
  for _, line in ipairs(lines) do
    if line:find(text, 1, true) then
      return true
    end
  end
  return false
end

return {
  ["trims a running VM"] = function(t)
    local tun = t:open{}
    t:succeeds(tun:send{cmd = "config", conf = "agent: 1\n"})
    t:succeeds(tun:send{cmd = "start", start_params = {statefile = "unix"},
                        migrate_opts = {migratedfrom = "source", type = "websocket"}})
    t:eq(tun:send{cmd = "fstrim"}, {success = true})
    t:eq(backend.calls["hypervisor.fstrim"], 1)
  end,

  ["succeeds even when the VM does not run"] = function(t)
    local tun = t:open{}
    t:eq(tun:send{cmd = "fstrim"}, {success = true})
    t:ok(has_line(tun:log(), "WARN: fstrim failed: VM 100 not running"), "the failure is logged")
  end,

  ["succeeds even when the backend fails"] = function(t)
    local tun = t:open{backend = {hypervisor = {
      fstrim = function() backend.fail("guest agent is not running") end,
    }}}
    t:eq(tun:send{cmd = "fstrim"}, {success = true})
    t:ok(has_line(tun:log(), "WARN: fstrim failed: guest agent is not running"), "the failure is logged")
  end,

  ["parameters are ignored"] = function(t)
    local tun = t:open{}
    t:eq(tun:send{cmd = "fstrim", disks = {"scsi0"}}, {success = true})
  end,
}
