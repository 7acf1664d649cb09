-- pve.tunnel.now(): the node's clock in UTC, split into fields. The scripted backend's
-- hypervisor.now fixes it, so time-dependent handlers can be specced exactly.

local CLOCK = [[
return {
  description = "Reply with pve.tunnel.now().",
  params = false,
  lock = false,
  run = function(ctx, p) return { now = pve.tunnel.now() } end,
}
]]

local function clock_at(unix)
  return {hypervisor = {now = function() return unix end}}
end

return {
  ["fields of a fixed time"] = function(t)
    local tun = t:open{handlers = {clock = CLOCK}, backend = clock_at(1717407005)}
    t:eq(tun:send{cmd = "clock"}, {success = true, now = {
      unix = 1717407005, year = 2024, month = 6, day = 3, hour = 9, min = 30, sec = 5,
      wday = 1, iso = "2024-06-03T09:30:05Z"}})
    t:eq(backend.calls["hypervisor.now"], 1)
  end,

  ["weekdays run 1 (Monday) to 7 (Sunday)"] = function(t)
    local tun = t:open{handlers = {clock = CLOCK}, backend = {hypervisor = {
      now = function() backend.state.n = (backend.state.n or 0) + 1; return 1717243200 + backend.state.n * 86400 end,
    }}}
    local sunday = tun:send{cmd = "clock"}.now
    t:eq({sunday.iso, sunday.wday}, {"2024-06-02T12:00:00Z", 7})
    t:eq(tun:send{cmd = "clock"}.now.wday, 1)
    t:eq(tun:send{cmd = "clock"}.now.wday, 2)
    local before = t:open{vmid = 101}
    backend.state.n = -1
    t:eq(before:send{cmd = "clock"}.now, {unix = 1717243200, year = 2024, month = 6, day = 1,
      hour = 12, min = 0, sec = 0, wday = 6, iso = "2024-06-01T12:00:00Z"})
  end,

  ["before 1970"] = function(t)
    local tun = t:open{handlers = {clock = CLOCK}, backend = clock_at(-1)}
    t:eq(tun:send{cmd = "clock"}.now, {unix = -1, year = 1969, month = 12, day = 31,
      hour = 23, min = 59, sec = 59, wday = 3, iso = "1969-12-31T23:59:59Z"})
  end,

  ["the real clock without an override"] = function(t)
    local tun = t:open{handlers = {clock = CLOCK}}
    local now = t:succeeds(tun:send{cmd = "clock"}).now
    t:ok(math.type(now.unix) == "integer" and now.unix > 1700000000, "seconds since 1970")
    t:match(now.iso, "^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%dZ$")
  end,

  ["an override may fall back to the default clock"] = function(t)
    local tun = t:open{handlers = {clock = CLOCK}, backend = {hypervisor = {
      now = function() return backend.default.hypervisor.now() - 86400 end,
    }}}
    local now = t:succeeds(tun:send{cmd = "clock"}).now
    t:ok(now.unix > 1700000000, "a day ago is still after 2023")
  end,

  ["a backend clock that is not an integer"] = function(t)
    local tun = t:open{handlers = {clock = CLOCK}, backend = clock_at("noon")}
    t:eq(tun:send{cmd = "clock"}, {success = false, msg = "failed to handle 'clock' command - " ..
      "reading the clock: hypervisor.now must return an integer (seconds since 1970), got string"})
  end,
}
