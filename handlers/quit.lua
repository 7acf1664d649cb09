-- quit: end the tunnel. With cleanup=1, first destroy what this tunnel created
-- (volumes, firewall file, a started VM, the config) and nothing else. Afterwards
-- every command gets the exit-mode error until the source closes the connection.
return {
  description = "End the tunnel, optionally destroying what it created.",
  params = {
    cleanup = { type = "boolean", optional = true, default = false },
  },
  lock = false,
  run = function(ctx, p)
    if p.cleanup then
      pve.tunnel.cleanup()
    end
    ctx:exit()
    return {}
  end,
}
