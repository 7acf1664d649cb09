-- office-hours bandwidth limit: Monday to Friday, 08:00 to 17:59 UTC, at most 51200
-- KiB/s; otherwise the built-in answer. The scripted backend fixes the clock.

local MONDAY_0930 = 1717407005       -- 2024-06-03T09:30:05Z
local MONDAY_0800 = 1717401600       -- 2024-06-03T08:00:00Z
local MONDAY_1759 = 1717437599       -- 2024-06-03T17:59:59Z
local MONDAY_1800 = 1717437600       -- 2024-06-03T18:00:00Z
local FRIDAY_1200 = 1717761600       -- 2024-06-07T12:00:00Z
local SATURDAY_1200 = 1717243200     -- 2024-06-01T12:00:00Z

local function at(unix, node)
  node = node or {}
  node.backend = {hypervisor = {now = function() return unix end}}
  return node
end

local function limit(tun, req)
  req.cmd = "bwlimit"
  return tun:send(req)
end

return {
  ["office hours cap an unlimited migration"] = function(t)
    local tun = t:open(at(MONDAY_0930))
    t:eq(limit(tun, {operation = "migration", storages = {"local"}, bwlimit = json.null}),
      {success = true, bwlimit = 51200})
    t:eq(limit(tun, {storages = {json.null}}), {success = true, bwlimit = 51200}, "the RAM too")
  end,

  ["office hours cap a higher override"] = function(t)
    local tun = t:open(at(FRIDAY_1200))
    t:eq(limit(tun, {storages = {"local"}, bwlimit = 1000000}).bwlimit, 51200)
    t:eq(limit(tun, {storages = {"local"}, bwlimit = 0}).bwlimit, 51200, "0 (unlimited) too")
  end,

  ["a lower storage limit or override still wins"] = function(t)
    local tun = t:open(at(MONDAY_0930, {storages = {["local"] = {bwlimit = {migration = 100}}}}))
    t:eq(limit(tun, {storages = {"local"}}).bwlimit, 100)
    t:eq(limit(tun, {storages = {json.null}, bwlimit = 2000}).bwlimit, 2000)
  end,

  ["the window starts at 08:00 and ends before 18:00"] = function(t)
    t:eq(limit(t:open(at(MONDAY_0800)), {}).bwlimit, 51200)
    t:eq(limit(t:open{vmid = 101}, {}).bwlimit, 51200)
  end,

  ["the last second of the window"] = function(t)
    t:eq(limit(t:open(at(MONDAY_1759)), {}).bwlimit, 51200)
  end,

  ["after 18:00 the built-in answer"] = function(t)
    local tun = t:open(at(MONDAY_1800))
    t:eq(limit(tun, {storages = {"local"}}), {success = true, bwlimit = json.null})
    t:eq(limit(tun, {storages = {"local"}, bwlimit = 1000000}).bwlimit, 1000000)
  end,

  ["weekends are not limited"] = function(t)
    local tun = t:open(at(SATURDAY_1200))
    t:eq(limit(tun, {storages = {"local"}}), {success = true, bwlimit = json.null})
  end,

  ["the clock is read only when the limit would exceed the cap"] = function(t)
    local tun = t:open(at(MONDAY_0930, {storages = {["local"] = {bwlimit = {migration = 100}}}}))
    t:eq(limit(tun, {storages = {"local"}}).bwlimit, 100)
    t:eq(backend.calls["hypervisor.now"], nil)
  end,

  ["parameter errors are the built-in's"] = function(t)
    local tun = t:open(at(MONDAY_0930))
    t:eq(limit(tun, {operation = "backup"}).msg,
      "failed to handle 'bwlimit' command - 400 Parameter verification failed.\n" ..
      "operation: value 'backup' does not have a value in the enumeration 'clone, migration, move, restore'\n")
  end,
}
