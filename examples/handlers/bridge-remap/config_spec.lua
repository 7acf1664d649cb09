-- bridge and VLAN remap: NICs on vmbr1 move to VLAN 30 of vmbr0, NICs on vmbr9 to
-- vmbr0 with their tag, VLAN 100 becomes 200; everything else is written as sent.

local NODE = {bridges = {"vmbr0", "vmbr1", "vmbr9"}}

local function written(t, net)
  local tun = t:open(NODE)
  t:succeeds(tun:send{cmd = "config", conf = "cores: 1\nnet0: " .. net .. "\n"})
  return tun:config()
end

return {
  ["vmbr1 becomes VLAN 30 of vmbr0"] = function(t)
    local tun = t:open(NODE)
    t:eq(tun:send{cmd = "config",
                  conf = "net0: virtio=BC:24:11:00:00:01,bridge=vmbr1,firewall=1\n"},
      {success = true})
    t:eq(tun:config(), "lock: migrate\nnet0: virtio=BC:24:11:00:00:01,bridge=vmbr0,firewall=1,tag=30\n")
    t:ok(tun:log()[#tun:log()] == "site policy: net0: " ..
      "'virtio=BC:24:11:00:00:01,bridge=vmbr1,firewall=1' -> " ..
      "'virtio=BC:24:11:00:00:01,bridge=vmbr0,firewall=1,tag=30'", "the task log shows the change")
  end,

  ["vmbr9 moves to vmbr0 and keeps its VLAN"] = function(t)
    t:eq(written(t, "e1000=BC:24:11:00:00:02,bridge=vmbr9,tag=5"),
      "cores: 1\nlock: migrate\nnet0: e1000=BC:24:11:00:00:02,bridge=vmbr0,tag=5\n")
  end,

  ["VLAN 100 is renumbered on any bridge"] = function(t)
    t:eq(written(t, "virtio=BC:24:11:00:00:03,bridge=vmbr0,tag=100,rate=10"),
      "cores: 1\nlock: migrate\nnet0: virtio=BC:24:11:00:00:03,bridge=vmbr0,tag=200,rate=10\n")
  end,

  ["VLAN 100 is renumbered when its bridge moves too"] = function(t)
    t:eq(written(t, "virtio=BC:24:11:00:00:03,bridge=vmbr9,tag=100"),
      "cores: 1\nlock: migrate\nnet0: virtio=BC:24:11:00:00:03,bridge=vmbr0,tag=200\n")
  end,

  ["other NICs are written as sent"] = function(t)
    t:eq(written(t, "virtio=BC:24:11:00:00:04,bridge=vmbr0,tag=101"),
      "cores: 1\nlock: migrate\nnet0: virtio=BC:24:11:00:00:04,bridge=vmbr0,tag=101\n")
  end,

  ["a tagged NIC on vmbr1 is refused: its VLAN would be lost"] = function(t)
    local tun = t:open(NODE)
    t:eq(tun:send{cmd = "config", conf = "net0: virtio=BC:24:11:00:00:05,bridge=vmbr1,tag=7\n"},
      {success = false, msg = "failed to handle 'config' command - " ..
        "net0: bridge 'vmbr1' maps to VLAN 30 of 'vmbr0', but the NIC already has VLAN tag 7"})
    t:eq(tun:config(), "lock: create\n", "nothing is written")
  end,

  ["the mapped bridge must exist here"] = function(t)
    local tun = t:open{bridges = {"vmbr1"}}
    t:eq(tun:send{cmd = "config", conf = "net0: virtio=BC:24:11:00:00:06,bridge=vmbr1\n"}.msg,
      "failed to handle 'config' command - net0: bridge 'vmbr0' does not exist")
    t:eq(tun:config(), "lock: create\n", "nothing is written")
  end,
}
