-- bwlimit (cookbook recipe "office-hours bandwidth limit"): the built-in bwlimit handler
-- (pve.builtin), capped on working days between FROM_HOUR and TO_HOUR at
-- OFFICE_LIMIT_KIB, whatever the storages and the user's override allow (a lower limit
-- from them still wins). The source asks before each disk and before the RAM, and keeps
-- the answer for that transfer: a migration started at 17:55 keeps its office-hours limit
-- after 18:00.

local base = pve.builtin("bwlimit")

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
  description = base.description,
  params = base.params,
  lock = base.lock,
  run = function(ctx, p)
    local reply = base.run(ctx, p)
    local limit = reply.bwlimit -- KiB/s, or pve.json.null for "no limit here"
    if (limit == pve.json.null or limit > OFFICE_LIMIT_KIB) and office_hours() then
      reply.bwlimit = OFFICE_LIMIT_KIB
    end
    return reply
  end,
}
