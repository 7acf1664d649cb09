-- migration note: the written config's description ends with when, by which token and
-- onto which node the VM was migrated. The scripted backend fixes the clock. In the
-- file the description is percent-encoded as PVE writes it (`:` is `%3A`); PVE's UI
-- shows the decoded text.

local AT = {hypervisor = {now = function() return 1717407005 end}} -- 2024-06-03T09:30:05Z

return {
  ["a VM without a description gets the note as its description"] = function(t)
    local tun = t:open{backend = AT}
    t:eq(tun:send{cmd = "config", conf = "cores: 2\n"}, {success = true})
    t:eq(tun:config(),
      "#Migrated to node 'target' on 2024-06-03T09%3A30%3A05Z by token 'root@pam!spec'.\n" ..
      "cores: 2\nlock: migrate\n")
  end,

  ["the note goes below the source's description"] = function(t)
    local tun = t:open{backend = AT}
    t:succeeds(tun:send{cmd = "config", conf = "#web server\n#owner: ops\ncores: 2\n"})
    t:eq(tun:config(),
      "#web server\n#owner%3A ops\n#\n" ..
      "#Migrated to node 'target' on 2024-06-03T09%3A30%3A05Z by token 'root@pam!spec'.\n" ..
      "cores: 2\nlock: migrate\n")
  end,

  ["the token that opened the tunnel is named"] = function(t)
    local tun = t:open{backend = AT, privs = {"VM.Allocate", "Sys.Incoming", "Datastore.AllocateSpace"}}
    t:succeeds(tun:send{cmd = "config", conf = "cores: 2\n"})
    t:eq(tun:config(),
      "#Migrated to node 'target' on 2024-06-03T09%3A30%3A05Z by token 'spec@pve!t0'.\n" ..
      "cores: 2\nlock: migrate\n")
  end,

  ["a refused config gets no note"] = function(t)
    local tun = t:open{backend = AT}
    t:eq(tun:send{cmd = "config", conf = "#notes\nnet0: virtio=BC:24:11:00:00:01,bridge=vmbr7\n"}.msg,
      "failed to handle 'config' command - net0: bridge 'vmbr7' does not exist")
    t:eq(tun:config(), "lock: create\n")
  end,
}
