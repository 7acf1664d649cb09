-- mtunnel-features: what this end offers beyond upstream's protocol. An mtunnel
-- source asks right behind `version`; a PVE target answers "unknown command" and
-- so keeps the source to upstream's flow, and a PVE source never asks.
-- `multifd`: the most multifd channels `start` accepts in
-- `migrate_opts.multifd_channels` (RAM in parallel streams, one WebSocket each);
-- the node's `multifd_channels_max`, 1 when it offers none.
return {
  description = "mtunnel's extensions of the protocol (multifd channels for start).",
  params = false,
  lock = false,
  run = function(ctx, p)
    return { multifd = pve.qemu.multifd_max(), replica = 1 } -- replica: docs/replicas.md
  end,
}
