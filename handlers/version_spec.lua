-- version: the protocol version of this end. A PVE source accepts api >= 2 and
-- api - age <= 2; parameters are ignored (upstream has no schema for it).
return {
  ["replies api 2, age 0"] = function(t)
    local tun = t:open{}
    t:eq(tun:send{cmd = "version"}, {api = 2, age = 0, success = true})
  end,

  ["ignores any parameters"] = function(t)
    local tun = t:open{}
    t:eq(tun:send{cmd = "version", api = 3, extra = {1, 2}}, {api = 2, age = 0, success = true})
  end,

  ["a source speaking version 2 accepts the reply"] = function(t)
    local tun = t:open{}
    local r = t:succeeds(tun:send{cmd = "version"})
    t:ok(r.api >= 2, "api must be at least 2")
    t:ok(r.api - r.age <= 2, "api - age must not exceed 2")
  end,

  ["replies in exit mode with the exit-mode error"] = function(t)
    local tun = t:open{}
    t:succeeds(tun:send{cmd = "quit"})
    t:eq(tun:send{cmd = "version"}, {
      success = false,
      msg = "tunnel is in exit-mode, processing 'version' cmd not possible",
    })
  end,
}
