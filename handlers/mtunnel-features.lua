-- mtunnel-features: what this end offers beyond upstream's protocol. An mtunnel
-- source asks right behind `version`; a PVE target answers "unknown command" and
-- so keeps the source to upstream's flow, and a PVE source never asks.
-- `multifd`: the most multifd channels `start` accepts in
-- `migrate_opts.multifd_channels` (RAM in parallel streams, one WebSocket each);
-- the node's `multifd_channels_max`, 1 when it offers none.
-- `compression`: what `start` accepts in `migrate_opts.multifd_compression` (pages
-- compressed on the multifd channels); only with multifd.
-- `replica`: the `replica-*` commands are here (docs/replicas.md).
-- `replica_hashes`: `replica-hashes` is here too (a source may do a hash sync; one
-- talking to a target without it copies everything instead).
-- `replica_hash_runs`: `replica-hashes` takes `runs` (repeated hashes, e.g. of zero
-- blocks, as a count; a source talking to a target without it asks for every hash).
-- `cutover`: a migration may take over its VM's replica (`replica-cutover`; a tunnel
-- opened with `replica=1`).
-- `postcopy`: `start` accepts `migrate_opts.postcopy` (the source may switch the RAM
-- migration to postcopy; `resume` before the switch arms the target to run the guest).
return {
  description = "mtunnel's extensions of the protocol (multifd channels, their compression and postcopy for start; replicas and the cutover to one).",
  params = false,
  lock = false,
  run = function(ctx, p)
    local multifd = pve.qemu.multifd_max()
    local features = { multifd = multifd, postcopy = true, replica = 1, replica_hashes = 1,
                       replica_hash_runs = 1, cutover = 1 }
    if multifd > 1 then
      features.compression = pve.json.array { "zstd" }
    end
    return features
  end,
}
