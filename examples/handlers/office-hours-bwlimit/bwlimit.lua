-- bwlimit: the effective bandwidth limit (KiB/s) for an operation on the listed
-- target storages, or null for "no limit here". The source only ever uses it to
-- lower its own limit.
--
-- Cookbook recipe "office-hours bandwidth limit" (a copy of the built-in bwlimit.lua;
-- changes are marked SITE): on working days between FROM_HOUR and TO_HOUR the limit is
-- at most OFFICE_LIMIT_KIB, whatever the storages and the user's override allow. The
-- source asks before each disk and before the RAM, and keeps the answer for that
-- transfer: a migration started at 17:55 keeps its office-hours limit after 18:00.

-- SITE: the window and the limit. pve.tunnel.now() is UTC; UTC_OFFSET_HOURS shifts it
-- to the site's time (no daylight-saving rules: adjust it twice a year if you need to).
local OFFICE_LIMIT_KIB = 50 * 1024 -- 50 MiB/s
local FROM_HOUR, TO_HOUR = 8, 18   -- 08:00 to 17:59
local LAST_WORKDAY = 5             -- Monday (1) to Friday (5)
local UTC_OFFSET_HOURS = 0

local function office_hours()
  local t = pve.tunnel.now().unix + UTC_OFFSET_HOURS * 3600
  local hour = t // 3600 % 24
  local wday = (t // 86400 + 3) % 7 + 1 -- 1970-01-01 was a Thursday (4)
  return wday <= LAST_WORKDAY and hour >= FROM_HOUR and hour < TO_HOUR
end
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
    -- SITE: cap it during office hours
    if (limit == nil or limit > OFFICE_LIMIT_KIB) and office_hours() then
      limit = OFFICE_LIMIT_KIB
    end
    if limit == nil then
      limit = pve.json.null
    end
    return { bwlimit = limit }
  end,
}
