-- ticket: a tunnel ticket for one of this tunnel's sockets (migration, NBD, the
-- running disk import) - never for anything else, not even the control socket.

local function start_with_nbd(tun, t)
  local d = t:succeeds(tun:send{cmd = "disk", format = "raw", storage = "local",
                                drive = {interface = "scsi", index = 0, size = 1024}})
  t:succeeds(tun:send{cmd = "config", conf = "scsi0: " .. d.drivestr .. "\n"})
  return t:succeeds(tun:send{
    cmd = "start",
    start_params = {statefile = "unix"},
    migrate_opts = {migratedfrom = "source", type = "websocket", nbd = {scsi0 = d}},
  })
end

return {
  ["an unknown socket is refused"] = function(t)
    local tun = t:open{}
    t:eq(tun:send{cmd = "ticket", path = "/run/qemu-server/100.migrate"}, {
      success = false,
      msg = "failed to handle 'ticket' command - Not allowed to generate ticket for unknown socket '/run/qemu-server/100.migrate'",
    })
  end,

  ["the control socket itself is not ticket-able"] = function(t)
    local tun = t:open{}
    t:fail_contains(tun:send{cmd = "ticket", path = tun.socket},
      "Not allowed to generate ticket for unknown socket '" .. tun.socket .. "'")
  end,

  ["migration and NBD sockets after start"] = function(t)
    local tun = t:open{}
    local r = start_with_nbd(tun, t)
    local a = t:succeeds(tun:send{cmd = "ticket", path = r.migrate.addr})
    t:match(a.ticket, "^PVETUNNEL:%x+::[%w+/=]+$")
    local b = t:succeeds(tun:send{cmd = "ticket", path = r.migrate.unix_sockets[1]})
    t:match(b.ticket, "^PVETUNNEL:")
    t:ok(a.ticket ~= b.ticket, "tickets are bound to their socket path")
  end,

  ["a path that only looks like a registered one"] = function(t)
    local tun = t:open{}
    local r = start_with_nbd(tun, t)
    t:fail_contains(tun:send{cmd = "ticket", path = r.migrate.addr .. "/../100.migrate"},
      "Not allowed to generate ticket for unknown socket")
  end,

  ["path is required"] = function(t)
    local tun = t:open{}
    t:eq(tun:send{cmd = "ticket"}.msg,
      "failed to handle 'ticket' command - 400 Parameter verification failed.\n" ..
      "path: property is missing and it is not optional\n")
  end,
}
