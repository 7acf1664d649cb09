-- bwlimit: the effective bandwidth limit (KiB/s) for an operation on the listed
-- target storages, or null for "no limit here". The source only ever uses it to
-- lower its own limit.
return {
  description = "Effective bandwidth limit in KiB/s for an operation on target storages.",
  params = {
    -- declared with `members` as upstream: elements are not checked (the source
    -- sends [null] for the memory migration). A node has a few dozen storages at
    -- most; the bound keeps one command from costing seconds of privilege checks.
    storages = { type = "array", optional = true, maxItems = 1024,
                 members = { type = "string" } },
    bwlimit = { type = "integer", minimum = 0, optional = true,
                description = "the user's override in KiB/s" },
    operation = { type = "string", optional = true, default = "migration",
                  enum = { "clone", "migration", "move", "restore" } },
  },
  lock = false,
  run = function(ctx, p)
    local limit = pve.storage.bwlimit(p.operation, p.storages or pve.json.array(), p.bwlimit)
    if limit == nil then
      limit = pve.json.null
    end
    return { bwlimit = limit }
  end,
}
