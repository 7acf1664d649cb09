-- mtunnel-features: the extensions an mtunnel source may use; PVE targets do not
-- know the command, which keeps such a source to upstream's flow.
return {
  ["replies the multifd channels, their compression and postcopy start accepts"] = function(t)
    local tun = t:open{}
    t:eq(tun:send{cmd = "mtunnel-features"},
         {multifd = 16, compression = {"zstd"}, postcopy = true, replica = 1, replica_hashes = 1,
          replica_hash_runs = 1, cutover = 1, success = true})
  end,

  ["does not disturb version behind or before it"] = function(t)
    local tun = t:open{}
    t:eq(tun:send{cmd = "version"}, {api = 2, age = 0, success = true})
    t:succeeds(tun:send{cmd = "mtunnel-features"})
    t:eq(tun:send{cmd = "version"}, {api = 2, age = 0, success = true})
  end,
}
