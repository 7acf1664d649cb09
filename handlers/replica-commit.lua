-- replica-commit: complete a replica run (docs/replicas.md): the NBD servers end, every
-- working copy gets the new restore point, the oldest points beyond `keep` go. The
-- replica is then committed: no later failure of this tunnel frees any of it.
return {
  description = "Complete a replica run: make a restore point, prune to keep.",
  params = {
    keep = { type = "integer", minimum = 1, optional = true },
    bytes = { type = "integer", minimum = 0, optional = true,
              description = "bytes the source's jobs copied (recorded with the point)" },
    incremental = { type = "boolean", optional = true, default = false },
  },
  run = function(ctx, p)
    if ctx.conf.options.lock ~= "replica" then
      pve.fail("VM " .. ctx.vmid .. " is no replica yet: send 'replica-prepare' first")
    end
    local done = pve.replica.complete { keep = p.keep, bytes = p.bytes, incremental = p.incremental }
    pve.tunnel.commit()
    return { point = done.point, pruned = pve.json.array(done.pruned),
             points = pve.json.array(done.points) }
  end,
}
