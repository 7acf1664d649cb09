-- ticket: a short-lived ticket for one of this tunnel's sockets (migration, NBD,
-- disk import), for the source's next forwarded WebSocket connection.
return {
  description = "Mint a tunnel ticket for one of this tunnel's sockets.",
  params = {
    path = { type = "string", description = "socket path" },
  },
  lock = false,
  run = function(ctx, p)
    return { ticket = pve.tunnel.ticket(p.path) }
  end,
}
