-- The schema language of handler `params` (src/script/schema.rs), on the wire: every
-- keyword and every error text documented in handlers/README.md ("Parameters: the schema
-- language"), through small probe handlers that echo what `run` received.

-- A handler file whose `run` replies `{got = params}`.
local function probe(params)
  return "return { description = 'probe', lock = false, params = " .. params
    .. ", run = function(ctx, p) return { got = p } end }"
end

-- Opens a tunnel whose `probe` command has these params.
local function open(t, params)
  return t:open { handlers = { probe = probe(params) } }
end

local function send(tun, fields)
  local request = { cmd = "probe" }
  for k, v in pairs(fields) do
    request[k] = v
  end
  return tun:send(request)
end

-- The reply `msg` for one failing property.
local function bad(path, reason)
  return "failed to handle 'probe' command - 400 Parameter verification failed.\n"
    .. path .. ": " .. reason .. "\n"
end

return {
  ["types are checked and normalized with PVE's leniency"] = function(t)
    local tun = open(t, [[{
      s = { type = "string", optional = true }, i = { type = "integer", optional = true },
      n = { type = "number", optional = true }, b = { type = "boolean", optional = true },
      a = { type = "any", optional = true } }]])
    t:eq(send(tun, { s = 5, i = "42", n = "1.5", b = "off", a = { x = 1 } }),
      { success = true, got = { s = "5", i = 42, n = "1.5", b = false, a = { x = 1 } } })
    t:eq(send(tun, { i = 3.0, b = 1 }), { success = true, got = { i = 3, b = true } })
    t:eq(send(tun, { s = true }).msg, bad("s", "type check ('string') failed - got 'true'"))
    t:eq(send(tun, { i = "abc" }).msg, bad("i", "type check ('integer') failed - got 'abc'"))
    t:eq(send(tun, { n = "x" }).msg, bad("n", "type check ('number') failed - got 'x'"))
    t:eq(send(tun, { b = "" }).msg, bad("b", "type check ('boolean') failed - got ''"))
  end,

  ["optional, default, null and extra keys"] = function(t)
    local tun = open(t, [[{
      need = { type = "string" },
      mode = { type = "string", optional = true, default = "migration" } }]])
    t:eq(send(tun, { need = "x" }), { success = true, got = { need = "x", mode = "migration" } })
    t:eq(send(tun, { need = "x", mode = json.null }),
      { success = true, got = { need = "x", mode = "migration" } })
    t:eq(send(tun, {}).msg, bad("need", "property is missing and it is not optional"))
    t:eq(send(tun, { need = json.null }).msg, bad("need", "property is missing and it is not optional"))
    -- every failing top-level property, sorted by name
    t:eq(send(tun, { extra = 1, mode = 5 }).msg,
      "failed to handle 'probe' command - 400 Parameter verification failed.\n"
        .. "extra: property is not defined in schema and the schema does not allow additional properties\n"
        .. "need: property is missing and it is not optional\n")
  end,

  ["params = false ignores parameters, params = {} rejects them"] = function(t)
    local tun = t:open { handlers = {
      loose = "return { description = 'd', lock = false, params = false, run = function(ctx, p) return { n = #pve.json.encode(p) } end }",
      strict = probe("{}"),
    } }
    t:eq(tun:send { cmd = "loose", anything = 1 }, { success = true, n = 2 })
    t:fail_contains(tun:send { cmd = "strict", anything = 1 },
      "anything: property is not defined in schema and the schema does not allow additional properties")
  end,

  ["strings: enum, minLength, maxLength, pattern, in that order"] = function(t)
    local tun = open(t, [==[{
      e = { type = "string", optional = true, enum = { "raw", "qcow2" } },
      len = { type = "string", optional = true, minLength = 2, maxLength = 4 },
      p = { type = "string", optional = true, pattern = [[[a-z]+\d]], maxLength = 3 } }]==])
    t:eq(send(tun, { e = "raw", len = "ab", p = "ab1" }),
      { success = true, got = { e = "raw", len = "ab", p = "ab1" } })
    t:eq(send(tun, { e = "vmdk" }).msg,
      bad("e", "value 'vmdk' does not have a value in the enumeration 'raw, qcow2'"))
    t:eq(send(tun, { len = "a" }).msg, bad("len", "value must be at least 2 characters long"))
    t:eq(send(tun, { len = "abcde" }).msg, bad("len", "value may only be 4 characters long"))
    t:eq(send(tun, { p = "1a" }).msg, bad("p", "value does not match the regex pattern"))
    t:eq(send(tun, { p = "a1x" }).msg, bad("p", "value does not match the regex pattern"),
      "the pattern is anchored to the whole value")
    t:eq(send(tun, { p = "abcd1" }).msg, bad("p", "value may only be 3 characters long"))
  end,

  ["every format"] = function(t)
    local tun = open(t, [[{
      storage = { type = "string", optional = true, format = "pve-storage-id" },
      node = { type = "string", optional = true, format = "pve-node" },
      vmid = { type = "string", optional = true, format = "pve-vmid" },
      volid = { type = "string", optional = true, format = "pve-volume-id" },
      key = { type = "string", optional = true, format = "pve-configid" },
      path = { type = "string", optional = true, format = "safe-path" } }]])
    local good = { storage = "local-lvm", node = "node-1", vmid = "100",
                   volid = "local:100/vm-100-disk-0.raw", key = "scsi0", path = "a/b_c.d-e" }
    t:eq(send(tun, good), { success = true, got = good })
    t:eq(send(tun, { storage = "l" }).msg, bad("storage", "invalid format - storage ID"))
    t:eq(send(tun, { node = "-x" }).msg, bad("node", "invalid format - node name"))
    t:eq(send(tun, { vmid = "0100" }).msg, bad("vmid", "invalid format - VM ID"))
    t:eq(send(tun, { volid = "local:" }).msg, bad("volid", "invalid format - unable to parse volume ID"))
    t:eq(send(tun, { key = "0scsi" }).msg, bad("key", "invalid format - invalid configuration ID"))
    t:eq(send(tun, { path = "a b" }).msg, bad("path", "invalid format"))
  end,

  ["integer and number ranges"] = function(t)
    local tun = open(t, [[{
      i = { type = "integer", optional = true, minimum = 0, maximum = 10 },
      n = { type = "number", optional = true, minimum = 0.5, maximum = 1.5 } }]])
    t:eq(send(tun, { i = "10", n = 1.5 }), { success = true, got = { i = 10, n = 1.5 } })
    t:eq(send(tun, { i = -1 }).msg, bad("i", "value must have a minimum value of 0"))
    t:eq(send(tun, { i = 11 }).msg, bad("i", "value must have a maximum value of 10"))
    t:eq(send(tun, { n = 0.25 }).msg, bad("n", "value out of range"))
    t:eq(send(tun, { n = "2" }).msg, bad("n", "value out of range"))
  end,

  ["arrays: items, maxItems, members"] = function(t)
    local tun = open(t, [[{
      l = { type = "array", optional = true, maxItems = 2, items = { type = "integer", minimum = 1 } },
      m = { type = "array", optional = true, members = { type = "string" } } }]])
    t:eq(send(tun, { l = { "1", 2 } }), { success = true, got = { l = { 1, 2 } } })
    t:eq(send(tun, { l = { 1, 0 } }).msg, bad("l[1]", "value must have a minimum value of 1"))
    t:eq(send(tun, { l = { 1, 2, 3 } }).msg, bad("l", "array may contain at most 2 items, got 3"))
    t:eq(send(tun, { l = { x = 1 } }).msg, bad("l", "type check ('array') failed - got '{\"x\":1}'"))
    t:eq(send(tun, { m = { json.null, 5 } }), { success = true, got = { m = { json.null, 5 } } },
      "members is not checked")
  end,

  ["objects: properties, nested paths, additionalProperties"] = function(t)
    local tun = open(t, [[{
      drive = { type = "object", optional = true, additionalProperties = true, properties = {
        interface = { type = "string", enum = { "scsi", "ide" } },
        size = { type = "integer", minimum = 1 } } },
      strict = { type = "object", optional = true, properties = { a = { type = "integer", optional = true } } } }]])
    t:eq(send(tun, { drive = { interface = "scsi", size = "5", ssd = 1 } }),
      { success = true, got = { drive = { interface = "scsi", size = 5, ssd = 1 } } })
    t:eq(send(tun, { drive = { interface = "sata", size = "abc" } }).msg,
      bad("drive.interface", "value 'sata' does not have a value in the enumeration 'scsi, ide'"),
      "only the first failing nested property is reported")
    t:eq(send(tun, { drive = { interface = "ide" } }).msg,
      bad("drive.size", "property is missing and it is not optional"))
    t:eq(send(tun, { strict = { b = 1 } }).msg,
      bad("strict.b", "property is not defined in schema and the schema does not allow additional properties"))
    t:eq(send(tun, { strict = 5 }).msg, bad("strict", "type check ('object') failed - got '5'"))
  end,

  ["a handler with a broken schema is refused with the documented text"] = function(t)
    local broken = {
      ["type-missing"] = { "{ x = { optional = true } }", "schema of 'x': 'type' missing" },
      ["unknown-type"] = { [[{ x = { type = "float" } }]], "schema of 'x': unknown type 'float'" },
      ["unknown-key"] = { [[{ x = { type = "string", minlen = 1 } }]], "schema of 'x': unknown schema key 'minlen'" },
      ["unknown-format"] = { [[{ x = { type = "string", format = "pve-vm" } }]], "schema of 'x': unknown format 'pve-vm'" },
      ["bad-pattern"] = { [[{ x = { type = "string", pattern = "(" } }]], "schema of 'x': bad pattern: " },
      ["bad-default"] = { [[{ x = { type = "integer", minimum = 1, default = 0 } }]],
        "schema of 'x': bad default: value must have a minimum value of 1" },
      ["key-not-string"] = { [[{ x = { type = "string", [1] = "a" } }]], "schema of 'x': keys must be strings" },
      ["enum-not-list"] = { [[{ x = { type = "string", enum = "raw" } }]], "schema of 'x': 'enum' must be a list" },
      ["enum-not-strings"] = { [[{ x = { type = "string", enum = { {} } } }]], "schema of 'x': 'enum' must list strings" },
      ["pattern-not-string"] = { [[{ x = { type = "string", pattern = 5 } }]], "schema of 'x': 'pattern' must be a string" },
      ["minimum-not-number"] = { [[{ x = { type = "integer", minimum = "1" } }]], "schema of 'x': 'minimum' must be a number" },
      ["optional-not-boolean"] = { [[{ x = { type = "string", optional = "yes" } }]], "schema of 'x': 'optional' must be a boolean" },
      ["default-not-scalar"] = { [[{ x = { type = "string", default = {} } }]], "schema of 'x': 'default' must be a scalar" },
      ["properties-not-table"] = { [[{ x = { type = "object", properties = true } }]], "schema of 'x': 'properties' must be a table" },
      ["items-not-table"] = { [[{ x = { type = "array", items = "string" } }]], "schema of 'x': 'items' must be a table" },
      ["additional-not-boolean"] = { [[{ x = { type = "object", additionalProperties = "yes" } }]],
        "schema of 'x': 'additionalProperties' must be a boolean" },
      ["max-items-negative"] = { [[{ x = { type = "array", maxItems = -1 } }]], "schema of 'x': 'maxItems' must be a whole number >= 0" },
      ["min-length-fraction"] = { [[{ x = { type = "string", minLength = 0.5 } }]], "schema of 'x': 'minLength' must be a whole number >= 0" },
      ["property-not-table"] = { [[{ x = "string" }]], "schema of '': bad property: " },
      ["nested"] = { [[{ o = { type = "object", properties = { y = { type = "nope" } } } }]], "schema of 'o.y': unknown type 'nope'" },
    }
    local handlers = {}
    for cmd, case in pairs(broken) do
      handlers[cmd] = "return { description = 'd', params = " .. case[1] .. ", run = function() end }"
    end
    local tun = t:open { handlers = handlers }
    for cmd, case in pairs(broken) do
      local msg = t:fail_contains(tun:send { cmd = cmd }, "failed to handle '" .. cmd .. "' command - handler not loaded: ", cmd)
      t:ok(msg:find(cmd .. ".lua: " .. case[2], 1, true), cmd .. ": " .. msg)
    end
    -- the task log names each refused handler
    local refused = 0
    for _, line in ipairs(tun:log()) do
      if line:find("WARN: handler '", 1, true) and line:find("' refused: ", 1, true) then
        refused = refused + 1
      end
    end
    local want = 0
    for _ in pairs(broken) do
      want = want + 1
    end
    t:eq(refused, want, "refused handlers in the task log")
  end,
}
