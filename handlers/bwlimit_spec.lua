-- bwlimit: the effective limit (KiB/s) for an operation on target storages, or
-- null for "no limit here". Per-storage limits come from the node's storage config;
-- a token may exceed them only with Datastore.Allocate on the storage (as in PVE).

-- A token that may migrate onto `local` but not change its limits.
local LIMITED = {"VM.Allocate", "Sys.Incoming", "Datastore.AllocateSpace", "Sys.Modify"}

local LIMITED_STORAGE = {["local"] = {bwlimit = {migration = 100, default = 300}}}

return {
  ["no limits configured: null"] = function(t)
    local tun = t:open{}
    t:eq(tun:send{cmd = "bwlimit", operation = "migration", storages = {"local"}, bwlimit = json.null},
      {bwlimit = json.null, success = true})
  end,

  ["storages [null] as the source sends for the RAM phase"] = function(t)
    local tun = t:open{storages = LIMITED_STORAGE}
    t:eq(tun:send{cmd = "bwlimit", operation = "migration", storages = {json.null}, bwlimit = json.null},
      {bwlimit = json.null, success = true})
  end,

  ["no parameters at all"] = function(t)
    local tun = t:open{}
    t:eq(tun:send{cmd = "bwlimit"}, {bwlimit = json.null, success = true})
  end,

  ["the override alone is the limit"] = function(t)
    local tun = t:open{}
    t:eq(tun:send{cmd = "bwlimit", storages = {json.null}, bwlimit = 1000},
      {bwlimit = 1000, success = true})
  end,

  ["per-storage limit from the storage config"] = function(t)
    local tun = t:open{storages = LIMITED_STORAGE}
    t:eq(tun:send{cmd = "bwlimit", operation = "migration", storages = {"local"}},
      {bwlimit = 100, success = true})
  end,

  ["operation without its own limit uses the storage's default"] = function(t)
    local tun = t:open{storages = LIMITED_STORAGE}
    t:eq(tun:send{cmd = "bwlimit", operation = "restore", storages = {"local"}}.bwlimit, 300)
  end,

  ["the smallest limit of several storages wins"] = function(t)
    local tun = t:open{storages = {
      ["local"] = {bwlimit = {migration = 100}},
      fast = {bwlimit = {migration = 70}},
      open = {},
    }}
    t:eq(tun:send{cmd = "bwlimit", storages = {"local", "fast", "open"}}.bwlimit, 70)
  end,

  ["a smaller override wins over the storage limit"] = function(t)
    local tun = t:open{storages = LIMITED_STORAGE, privs = LIMITED}
    t:eq(tun:send{cmd = "bwlimit", storages = {"local"}, bwlimit = 50}.bwlimit, 50)
  end,

  ["without Datastore.Allocate the override cannot exceed the storage limit"] = function(t)
    -- Sys.Modify on / lifts only datacenter defaults in PVE, not storage limits
    local tun = t:open{storages = LIMITED_STORAGE, privs = LIMITED}
    t:eq(tun:send{cmd = "bwlimit", storages = {"local"}, bwlimit = 500}.bwlimit, 100)
  end,

  ["with Datastore.Allocate on the storage the override may exceed it"] = function(t)
    local tun = t:open{storages = LIMITED_STORAGE}
    t:eq(tun:send{cmd = "bwlimit", storages = {"local"}, bwlimit = 500}.bwlimit, 500)
    t:eq(tun:send{cmd = "bwlimit", storages = {"local"}, bwlimit = 0}.bwlimit, json.null,
      "an override of 0 means unlimited")
  end,

  ["numeric strings are integers"] = function(t)
    local tun = t:open{}
    t:eq(tun:send{cmd = "bwlimit", bwlimit = "250"}.bwlimit, 250)
  end,

  ["unknown operation"] = function(t)
    local tun = t:open{}
    t:eq(tun:send{cmd = "bwlimit", operation = "backup"}.msg,
      "failed to handle 'bwlimit' command - 400 Parameter verification failed.\n" ..
      "operation: value 'backup' does not have a value in the enumeration 'clone, migration, move, restore'\n")
  end,

  ["negative and non-numeric overrides"] = function(t)
    local tun = t:open{}
    t:eq(tun:send{cmd = "bwlimit", bwlimit = -1}.msg,
      "failed to handle 'bwlimit' command - 400 Parameter verification failed.\n" ..
      "bwlimit: value must have a minimum value of 0\n")
    t:eq(tun:send{cmd = "bwlimit", bwlimit = "fast"}.msg,
      "failed to handle 'bwlimit' command - 400 Parameter verification failed.\n" ..
      "bwlimit: type check ('integer') failed - got 'fast'\n")
  end,

  ["at most 1024 storages"] = function(t)
    local tun = t:open{}
    local many = {}
    for i = 1, 1024 do many[i] = "local" end
    t:eq(tun:send{cmd = "bwlimit", storages = many}, {bwlimit = json.null, success = true})
    many[1025] = "local"
    t:eq(tun:send{cmd = "bwlimit", storages = many}.msg,
      "failed to handle 'bwlimit' command - 400 Parameter verification failed.\n" ..
      "storages: array may contain at most 1024 items, got 1025\n")
  end,

  ["extra parameters are rejected"] = function(t)
    local tun = t:open{}
    t:eq(tun:send{cmd = "bwlimit", storage = "local"}.msg,
      "failed to handle 'bwlimit' command - 400 Parameter verification failed.\n" ..
      "storage: property is not defined in schema and the schema does not allow additional properties\n")
  end,

  ["a scripted backend decides the storage limit"] = function(t)
    local tun = t:open{backend = {storage = {
      bwlimit = function(operation, storages, override)
        backend.state.seen = {operation, storages, override}
        return 42
      end,
    }}}
    t:eq(tun:send{cmd = "bwlimit", operation = "move", storages = {"local", json.null}}.bwlimit, 42)
    t:eq(backend.state.seen, {"move", {"local"}}, "null entries are not passed on")
    t:eq(backend.calls["storage.bwlimit"], 1)
  end,
}
