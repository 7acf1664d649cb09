-- trusted sources: `version` answers only tokens matching the site's list; any other
-- token is refused before anything is copied.

local PRIVS = {"VM.Allocate", "Sys.Incoming", "Datastore.AllocateSpace"}

return {
  ["a trusted token gets the version"] = function(t)
    local tun = t:open{}
    t:eq(tun.authid, "root@pam!spec")
    t:eq(tun:send{cmd = "version"}, {success = true, api = 2, age = 0})
  end,

  ["another token is refused, naming itself and the node"] = function(t)
    local tun = t:open{privs = PRIVS}
    t:eq(tun:send{cmd = "version"}, {success = false, msg = "failed to handle 'version' command - " ..
      "site policy: token 'spec@pve!t0' may not migrate VMs to node 'target' " ..
      "(ask its admin to add the token to version.lua)"})
  end,

  ["the source gives up after the refusal: nothing is left behind"] = function(t)
    local tun = t:open{privs = PRIVS}
    t:ok(tun:send{cmd = "version"}.success == false)
    t:succeeds(tun:send{cmd = "quit", cleanup = 1})
    t:eq(tun:close(), "OK")
    t:eq(t:config(100), nil, "the reserved config is gone")
    t:eq(t:volumes(), {})
  end,
}
