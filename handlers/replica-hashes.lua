-- replica-hashes: the block hashes of one range of a replica's working copy, for a
-- hash sync (docs/replicas.md): the source compares them with its disk's and sends
-- only the blocks that differ. Read before `replica-export` (refused while a run's
-- NBD servers export the working copies); changes no working copy. The first call of
-- a tunnel records its run as begun (the source adds its fresh bitmap after it: a run
-- that dies before its point must not leave the replica looking current).
return {
  description = "Block hashes of a range of a replica's working copy (hash sync).",
  params = {
    disk = { type = "string", description = "drive key, e.g. scsi0" },
    offset = { type = "integer", minimum = 0, description = "bytes, a multiple of block" },
    length = { type = "integer", minimum = 1,
               description = "bytes, at most 16384 blocks; whole blocks or up to the disk's end" },
    block = { type = "integer", minimum = 4096, optional = true, default = 65536,
              description = "block size in bytes, a multiple of 4096" },
  },
  run = function(ctx, p)
    if ctx.conf.options.lock ~= "replica" then
      pve.fail("VM " .. ctx.vmid .. " is no replica yet: send 'replica-prepare' first")
    end
    if not pve.config.is_drive_key(p.disk) then
      pve.fail("invalid disk '" .. p.disk .. "'")
    end
    local hashes = pve.replica.hashes { disk = p.disk, offset = p.offset,
                                        length = p.length, block = p.block }
    return { hashes = pve.json.array(hashes), block = p.block }
  end,
}
