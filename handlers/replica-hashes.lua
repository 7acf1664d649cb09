-- replica-hashes: the block hashes of one range of a replica's working copy, for a
-- hash sync (docs/replicas.md): the source compares them with its disk's and sends
-- only the blocks that differ. Read before `replica-export` (refused while a run's
-- NBD servers export the working copies); changes no working copy. The first call of
-- a tunnel records its run as begun (the source adds its fresh bitmap after it: a run
-- that dies before its point must not leave the replica looking current).
-- With `runs` (a source that saw `replica_hash_runs` in `mtunnel-features`) a run of
-- equal hashes is sent as the hash and then the count of its repeats: the zero blocks of
-- a sparse disk cost a few bytes per run instead of 35 bytes each.

-- `hashes` with each run of equal ones as the hash then how many more follow.
local function runs(hashes)
  local out, last, more = {}, nil, 0
  for _, h in ipairs(hashes) do
    if h == last then
      more = more + 1
    else
      if more > 0 then out[#out + 1] = more end
      out[#out + 1], last, more = h, h, 0
    end
  end
  if more > 0 then out[#out + 1] = more end
  return out
end

return {
  description = "Block hashes of a range of a replica's working copy (hash sync).",
  params = {
    disk = { type = "string", description = "drive key, e.g. scsi0" },
    offset = { type = "integer", minimum = 0, description = "bytes, a multiple of block" },
    length = { type = "integer", minimum = 1,
               description = "bytes, at most 16384 blocks; whole blocks or up to the disk's end" },
    block = { type = "integer", minimum = 4096, optional = true, default = 65536,
              description = "block size in bytes, a multiple of 4096" },
    runs = { type = "boolean", optional = true, default = false,
             description = "a hash repeated is followed by its count of repeats" },
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
    if p.runs then
      return { hashes = pve.json.array(runs(hashes)), block = p.block, runs = true }
    end
    return { hashes = pve.json.array(hashes), block = p.block }
  end,
}
