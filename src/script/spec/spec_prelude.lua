-- The `t` object handed to every case of a `*_spec.lua` file, and the Lua side of the
-- tunnel object `t:open` returns. The Rust runner (src/script/spec/) passes a table of
-- native functions that return `true, result...` or `false, message`; the wrappers here
-- raise the message at the spec's own line so a failure points at the spec, not at us.

local native = ...

local function check(ok, ...)
  if ok then
    return ...
  end
  error((...), 3)
end

-- Rendering values for failure messages: JSON-like, keys sorted, cycles and depth bounded.
local function quote(s)
  return '"' .. s:gsub('[%c"\\]', function(c)
    local named = { ['"'] = '\\"', ['\\'] = '\\\\', ['\n'] = '\\n', ['\r'] = '\\r', ['\t'] = '\\t' }
    return named[c] or string.format("\\u%04x", c:byte())
  end) .. '"'
end

local function sorted_keys(tbl)
  local keys = {}
  for k in pairs(tbl) do
    keys[#keys + 1] = k
  end
  table.sort(keys, function(a, b)
    if type(a) == type(b) and (type(a) == "number" or type(a) == "string") then
      return a < b
    end
    return type(a) < type(b)
  end)
  return keys
end

local function is_list(tbl)
  local n = 0
  for _ in pairs(tbl) do
    n = n + 1
  end
  for i = 1, n do
    if rawget(tbl, i) == nil then
      return false
    end
  end
  return true, n
end

local function show(v, depth, seen)
  depth, seen = depth or 0, seen or {}
  if v == json.null then
    return "null"
  elseif type(v) == "string" then
    return quote(v)
  elseif type(v) ~= "table" then
    return tostring(v)
  elseif seen[v] then
    return "<cycle>"
  elseif depth > 8 then
    return "{...}"
  end
  seen[v] = true
  local parts = {}
  local list, n = is_list(v)
  if list and n > 0 then
    for i = 1, n do
      parts[i] = show(v[i], depth + 1, seen)
    end
    seen[v] = nil
    return "[" .. table.concat(parts, ",") .. "]"
  end
  for _, k in ipairs(sorted_keys(v)) do
    local key = type(k) == "string" and quote(k) or "[" .. tostring(k) .. "]"
    parts[#parts + 1] = key .. ":" .. show(v[k], depth + 1, seen)
  end
  seen[v] = nil
  return "{" .. table.concat(parts, ",") .. "}"
end

local function key_path(path, k)
  if type(k) == "string" and k:match("^[%a_][%w_]*$") then
    return path .. "." .. k
  end
  return path .. "[" .. show(k) .. "]"
end

-- The first difference between `actual` and `expected`, as (path, actual, expected).
local function diff(actual, expected, path)
  if actual == expected then
    return nil
  end
  if type(actual) == "table" and type(expected) == "table" then
    for _, k in ipairs(sorted_keys(expected)) do
      local p, a, e = diff(actual[k], expected[k], key_path(path, k))
      if p then
        return p, a, e
      end
    end
    for _, k in ipairs(sorted_keys(actual)) do
      if expected[k] == nil then
        return key_path(path, k), actual[k], nil
      end
    end
    return nil
  end
  return path, actual, expected
end

local function prefix(msg)
  return msg and (tostring(msg) .. ": ") or ""
end

local T = {}
T.__index = T

-- Assertions made through each `t` (weak keys: a finished case's `t` is collected). The
-- runner fails a case that made none: a case that checks nothing proves nothing.
local assertions = setmetatable({}, { __mode = "k" })

local function counted(t)
  assertions[t] = (assertions[t] or 0) + 1
end

--- t:eq(actual, expected, msg): deep equality (tables compared key by key).
function T:eq(actual, expected, msg)
  counted(self)
  local p, a, e = diff(actual, expected, "")
  if p then
    local where = p ~= "" and (" at " .. p:gsub("^%.", "")) or ""
    local text = prefix(msg) .. "values differ" .. where .. ": expected " .. show(e) .. ", got " .. show(a)
    if p ~= "" then
      text = text .. "\n  expected: " .. show(expected) .. "\n  actual:   " .. show(actual)
    end
    error(text, 2)
  end
end

--- t:ok(cond, msg): cond must be truthy.
function T:ok(cond, msg)
  counted(self)
  if not cond then
    error("assertion failed" .. (msg and (": " .. tostring(msg)) or ""), 2)
  end
  return cond
end

--- t:match(str, pattern, msg): str must be a string matching the Lua pattern.
function T:match(str, pattern, msg)
  counted(self)
  if type(str) ~= "string" or not str:match(pattern) then
    error(prefix(msg) .. show(str) .. " does not match pattern " .. quote(pattern), 2)
  end
  return str
end

--- t:fail_contains(reply, text): reply must be {success=false, msg=...} with text in msg.
function T:fail_contains(reply, text, msg)
  counted(self)
  if type(reply) ~= "table" or reply.success ~= false then
    error(prefix(msg) .. "expected a failed reply containing " .. quote(text) .. ", got " .. show(reply), 2)
  end
  if type(reply.msg) ~= "string" or not reply.msg:find(text, 1, true) then
    error(prefix(msg) .. "reply message " .. show(reply.msg) .. " does not contain " .. quote(text), 2)
  end
  return reply.msg
end

--- t:succeeds(reply): reply must have success=true; returns it.
function T:succeeds(reply, msg)
  counted(self)
  if type(reply) ~= "table" or reply.success ~= true then
    error(prefix(msg) .. "expected a successful reply, got " .. show(reply), 2)
  end
  return reply
end

--- t:raises(fn, text): calling fn must raise an error whose message contains text.
function T:raises(fn, text, msg)
  counted(self)
  local ok, err = pcall(fn)
  if ok then
    error(prefix(msg) .. "expected an error containing " .. quote(text) .. ", but none was raised", 2)
  end
  err = tostring(err)
  if text and not err:find(text, 1, true) then
    error(prefix(msg) .. "error " .. quote(err) .. " does not contain " .. quote(text), 2)
  end
  return err
end

function T:show(v)
  return show(v)
end

local Tunnel = {}
Tunnel.__index = Tunnel

local Conn = {}
Conn.__index = Conn

local function wrap_tunnel(u)
  return setmetatable({ u = u, vmid = u.vmid, upid = u.upid, socket = u.socket, authid = u.authid }, Tunnel)
end

function T:node(opts)
  check(native.node(opts or {}))
end

function T:open(opts)
  return wrap_tunnel(check(native.open(opts or {})))
end

function T:sleep(ms)
  check(native.sleep(ms))
end

function T:config(vmid)
  return check(native.config(vmid))
end

function T:write_config(vmid, text)
  check(native.write_config(vmid, text))
end

function T:firewall(vmid)
  return check(native.firewall(vmid))
end

function T:volumes()
  return check(native.volumes())
end

function T:alloc(opts)
  return check(native.alloc(opts))
end

function T:run_dir()
  return check(native.run_dir())
end

function Tunnel:send(request)
  return check(self.u:send(request))
end

function Tunnel:send_raw(line)
  return check(self.u:send_raw(line))
end

function Tunnel:close()
  return check(self.u:close())
end

function Tunnel:config()
  return check(native.config(self.vmid))
end

function Tunnel:firewall()
  return check(native.firewall(self.vmid))
end

function Tunnel:volumes()
  return check(native.volumes())
end

function Tunnel:log()
  return check(self.u:log())
end

function Tunnel:connect(path)
  return setmetatable({ u = check(self.u:connect(path)) }, Conn)
end

--- Polls `query-disk-import` until the status is no longer "pending" (at most ms).
function Tunnel:wait_import(ms)
  local deadline = ms or 5000
  local waited = 0
  while true do
    local reply = self:send { cmd = "query-disk-import" }
    if reply.success ~= true or reply.status ~= "pending" or waited >= deadline then
      return reply
    end
    check(native.sleep(20))
    waited = waited + 20
  end
end

function Conn:write(data)
  check(self.u:write(data))
end

function Conn:close()
  check(self.u:close())
end

-- The runner's two entry points: a fresh `t` per case, and how many assertions it made.
return function()
  return setmetatable({}, T)
end, function(t)
  return assertions[t] or 0
end
