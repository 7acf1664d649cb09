-- query-disk-import: the state of the running import: pending (progress), complete
-- (the new volid, remembered for cleanup) or error (the reason).

local function import(tun, overrides)
  local req = {
    cmd = "disk-import", volname = "vm-100-disk-0.raw", format = "raw",
    export_formats = "raw+size", storage = "local", allow_rename = 1,
  }
  for k, v in pairs(overrides or {}) do
    req[k] = v
  end
  return tun:send(req)
end

-- Sends a `*+size` stream: the 8-byte little-endian size header, then the payload.
local function stream(tun, socket, size, payload)
  local conn = tun:connect(socket)
  conn:write(string.pack("<I8", size) .. payload)
  conn:close()
end

return {
  ["no import running"] = function(t)
    local tun = t:open{}
    t:eq(tun:send{cmd = "query-disk-import"}, {
      success = false,
      msg = "failed to handle 'query-disk-import' command - no disk import running",
    })
  end,

  ["parameters are rejected (empty schema)"] = function(t)
    local tun = t:open{}
    t:eq(tun:send{cmd = "query-disk-import", volname = "x"}.msg,
      "failed to handle 'query-disk-import' command - 400 Parameter verification failed.\n" ..
      "volname: property is not defined in schema and the schema does not allow additional properties\n")
  end,

  ["pending while the stream is still open"] = function(t)
    local tun = t:open{}
    local r = t:succeeds(import(tun))
    local conn = tun:connect(r.socket)
    conn:write(string.pack("<I8", 4096) .. string.rep("\0", 1000))
    -- The import reads the size header and the payload separately, so a query may see
    -- 0 or 8 bytes first; wait (bounded) until all 1008 written bytes have arrived.
    local reply
    for _ = 1, 200 do
      reply = tun:send{cmd = "query-disk-import"}
      if reply.msg == "received 1008 bytes" then break end
      t:sleep(10)
    end
    t:eq(reply, {success = true, status = "pending", msg = "received 1008 bytes"})
    conn:write(string.rep("\0", 3096))
    conn:close()
    t:eq(tun:wait_import(), {success = true, status = "complete", volid = "local:100/vm-100-disk-0.raw"})
  end,

  ["complete: the volume exists and belongs to this migration"] = function(t)
    local tun = t:open{}
    local r = t:succeeds(import(tun))
    stream(tun, r.socket, 4096, string.rep("x", 4096))
    t:eq(tun:wait_import(), {success = true, status = "complete", volid = "local:100/vm-100-disk-0.raw"})
    t:eq(t:volumes(), {"local:100/vm-100-disk-0.raw"})
    t:fail_contains(tun:send{cmd = "query-disk-import"}, "no disk import running")
    t:fail_contains(tun:send{cmd = "ticket", path = r.socket}, "unknown socket",
      "the socket is not ticket-able after the import")
    t:succeeds(tun:send{cmd = "config", conf = "scsi0: local:100/vm-100-disk-0.raw,size=4K\n"})
  end,

  ["the next import can start once the first completed"] = function(t)
    local tun = t:open{}
    local r = t:succeeds(import(tun))
    stream(tun, r.socket, 512, string.rep("a", 512))
    t:eq(tun:wait_import().status, "complete")
    r = t:succeeds(import(tun, {volname = "vm-100-disk-1.qcow2", format = "qcow2", export_formats = "qcow2+size"}))
    stream(tun, r.socket, 1 << 30, "QFI\xfb qcow2 file bytes")
    t:eq(tun:wait_import().volid, "local:100/vm-100-disk-1.qcow2")
  end,

  ["allow_rename picks the next free name"] = function(t)
    t:node{}
    t:alloc{vmid = 100, name = "vm-100-disk-0.raw"} -- a leftover image of the same VMID
    local tun = t:open{}
    local r = t:succeeds(import(tun, {allow_rename = 1}))
    stream(tun, r.socket, 8, "12345678")
    t:eq(tun:wait_import().volid, "local:100/vm-100-disk-1.raw")
  end,

  ["without allow_rename an existing name is an error"] = function(t)
    t:node{}
    t:alloc{vmid = 100, name = "vm-100-disk-0.raw"}
    local tun = t:open{}
    local r = t:succeeds(import(tun, {allow_rename = 0}))
    stream(tun, r.socket, 8, "12345678")
    local reply = tun:wait_import()
    t:eq(reply.status, "error")
    t:match(reply.msg, "^disk image '.*/images/100/vm%-100%-disk%-0%.raw' already exists$")
  end,

  ["a truncated raw stream is an error"] = function(t)
    local tun = t:open{}
    local r = t:succeeds(import(tun))
    stream(tun, r.socket, 4096, string.rep("x", 100))
    local reply = tun:wait_import()
    t:eq(reply.status, "error")
    t:match(reply.msg, "^import stream for '.*/images/100/vm%-100%-disk%-0%.raw' ended early: got 100 of 4096 bytes$")
    t:eq(t:volumes(), {}, "nothing is left behind")
  end,

  ["a stream without its size header is an error"] = function(t)
    local tun = t:open{}
    local r = t:succeeds(import(tun))
    local conn = tun:connect(r.socket)
    conn:write("abc")
    conn:close()
    t:eq(tun:wait_import(), {success = true, status = "error",
                             msg = "import stream ended before its 8-byte size header"})
  end,

  ["a failing storage backend: the error text is the status message"] = function(t)
    local tun = t:open{backend = {storage = {
      import = function(req, data)
        if req.received < req.size then
          backend.fail(string.format("stream truncated after %d of %d bytes", req.received, req.size))
        end
        return backend.default.storage.import(req, data)
      end,
    }}}
    local r = t:succeeds(import(tun))
    stream(tun, r.socket, 1024, string.rep("z", 10))
    t:eq(tun:wait_import(), {success = true, status = "error",
                             msg = "stream truncated after 10 of 1024 bytes"})
    t:eq(t:volumes(), {})
    t:fail_contains(tun:send{cmd = "ticket", path = r.socket}, "unknown socket",
      "a failed import's socket is not ticket-able")
  end,

  ["the backend sees the request and the payload"] = function(t)
    local tun = t:open{backend = {storage = {
      import = function(req, data)
        backend.state.req, backend.state.data = req, data
        return "local:100/vm-100-disk-7.raw"
      end,
      check_untrusted = function(volid) end,
    }}}
    local r = t:succeeds(import(tun, {allow_rename = 0}))
    stream(tun, r.socket, 5, "hello")
    t:eq(tun:wait_import().volid, "local:100/vm-100-disk-7.raw")
    t:eq(backend.state.req, {
      storage = "local", vmid = 100, volname = "vm-100-disk-0.raw", format = "raw",
      stream_format = "raw+size", allow_rename = false, size = 5, received = 5, truncated = false,
    })
    t:eq(backend.state.data, "hello")
  end,

  ["an imported image that fails the untrusted check is an error and is freed"] = function(t)
    local tun = t:open{backend = {storage = {
      check_untrusted = function(volid)
        backend.fail("backing file in image '" .. volid .. "' is not allowed")
      end,
    }}}
    local r = t:succeeds(import(tun))
    stream(tun, r.socket, 4, "abcd")
    local done = tun:wait_import()
    t:eq(done.status, "error")
    t:match(done.msg, "backing file in image 'local:100/vm%-100%-disk%-0%.raw' is not allowed")
    t:eq(t:volumes(), {})
  end,

  ["a slow import stays pending until it finishes"] = function(t)
    local tun = t:open{backend = {storage = {
      import = function(req, data)
        backend.sleep(800)
        return backend.default.storage.import(req, data)
      end,
    }}}
    local r = t:succeeds(import(tun))
    stream(tun, r.socket, 4, "abcd")
    t:sleep(50)
    t:eq(tun:send{cmd = "query-disk-import"}.status, "pending")
    -- other backend calls are not blocked while the import sleeps
    t:succeeds(tun:send{cmd = "disk", format = "raw", storage = "local",
                        drive = {interface = "scsi", index = 1, size = 1024}})
    t:eq(tun:send{cmd = "query-disk-import"}.status, "pending")
    t:eq(tun:wait_import(2000).status, "complete")
  end,
}
