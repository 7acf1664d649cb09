-- The line protocol around every command (tunnel/worker.rs): one JSON object per
-- line, exactly one reply per line, in order; fixed texts for malformed lines.
return {
  ["a line that is not JSON"] = function(t)
    local tun = t:open{}
    t:eq(tun:send_raw("not json"), {
      success = false,
      msg = "failed to parse command - expected ident at line 1 column 2",
    })
  end,

  ["a JSON value that is not an object"] = function(t)
    local tun = t:open{}
    t:eq(tun:send_raw("[1,2]"), {success = false, msg = "failed to parse command - not a JSON object"})
  end,

  ["'cmd' missing"] = function(t)
    local tun = t:open{}
    t:eq(tun:send{storage = "local"}, {success = false, msg = "'cmd' missing"})
    t:eq(tun:send{cmd = 5}, {success = false, msg = "'cmd' missing"})
  end,

  ["unknown command"] = function(t)
    local tun = t:open{}
    t:eq(tun:send{cmd = "migrate"}, {success = false, msg = "unknown command 'migrate' given"})
  end,

  ["the connection survives errors: replies stay in order"] = function(t)
    local tun = t:open{}
    t:eq(tun:send_raw("{"), {success = false, msg = "failed to parse command - EOF while parsing an object at line 1 column 1"})
    t:eq(tun:send{cmd = "nope"}.msg, "unknown command 'nope' given")
    t:eq(tun:send{cmd = "version"}, {api = 2, age = 0, success = true})
  end,

  ["opening reserves the VMID with an empty config locked 'create'"] = function(t)
    local tun = t:open{vmid = 123}
    t:eq(tun:config(), "lock: create\n")
    t:eq(tun.vmid, 123)
    t:match(tun.socket, "/123%.mtunnel$")
  end,

  ["opening fails for a VMID that exists"] = function(t)
    t:node{}
    t:write_config(100, "cores: 1\n")
    t:raises(function() t:open{vmid = 100} end,
      "vmid: unable to create empty VM config - ")
  end,

  ["opening needs VM.Allocate and Sys.Incoming"] = function(t)
    t:raises(function() t:open{privs = {"VM.Allocate"}} end,
      "Permission check failed (/, Sys.Incoming)")
    t:raises(function() t:open{privs = {"Sys.Incoming"}} end,
      "Permission check failed (/vms/100, VM.Allocate)")
    t:eq(t:config(100), nil, "a refused open leaves no config behind")
  end,

  ["a config locked by someone else aborts locked commands"] = function(t)
    local tun = t:open{}
    t:write_config(100, "lock: backup\n")
    t:eq(tun:send{cmd = "disk", format = "raw", storage = "local",
                  drive = {interface = "scsi", index = 0, size = 1024}}, {
      success = false,
      msg = "failed to handle 'disk' command - Encountered wrong lock - aborting mtunnel command handling.",
    })
    t:eq(t:volumes(), {}, "nothing was allocated")
  end,

  ["a removed config aborts locked commands"] = function(t)
    local tun = t:open{}
    t:write_config(100, "cores: 1\n")
    t:fail_contains(tun:send{cmd = "query-disk-import"},
      "Encountered wrong lock - aborting mtunnel command handling.")
  end,
}
