-- replica-export: start a replica run (docs/replicas.md): the run is recorded as
-- unfinished, and each working copy is exported over NBD as drive-<key> on its own
-- socket in the run dir (registered for `ticket`, so the source can forward to it).
-- Until `replica-commit` the replica's newest point stays as it was. Commits the tunnel:
-- a first run cut after this keeps its working copies (no point yet) to continue.
return {
  description = "Export the replica's working copies over NBD for a run.",
  params = false,
  run = function(ctx, p)
    if ctx.conf.options.lock ~= "replica" then
      pve.fail("VM " .. ctx.vmid .. " is no replica yet: send 'replica-prepare' first")
    end
    local exports = pve.replica.export()
    -- From here what the run writes is kept, also on a first run: a cut run leaves the
    -- replica `interrupted`, and the next run's hash sync sends only what still differs.
    pve.tunnel.commit()
    local drives = {}
    for key, e in pairs(exports) do
      drives[key] = { socket = e.socket, export = e.export, size = e.size }
    end
    return { drives = drives }
  end,
}
