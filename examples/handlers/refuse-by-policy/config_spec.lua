-- refuse by policy: tags, memory and total disk size decide at `config`; a refused VM
-- gets a message naming the rule and nothing is written.

local function refused(t, conf, msg)
  local tun = t:open{}
  t:eq(tun:send{cmd = "config", conf = conf},
    {success = false, msg = "failed to handle 'config' command - " .. msg})
  t:eq(tun:config(), "lock: create\n", "the reserved config is untouched")
end

return {
  ["a VM within the policy is written as usual"] = function(t)
    local tun = t:open{}
    local d = t:succeeds(tun:send{cmd = "disk", format = "raw", storage = "local",
                                  drive = {interface = "scsi", index = 0, size = 1024 * 1024}})
    t:eq(tun:send{cmd = "config",
                  conf = "memory: 65536\ntags: prod;web\nscsi0: " .. d.drivestr .. "\n"},
      {success = true})
    t:eq(tun:config(), "lock: migrate\nmemory: 65536\nscsi0: " .. d.drivestr .. "\ntags: prod;web\n")
  end,

  ["a refused tag"] = function(t)
    refused(t, "memory: 1024\ntags: prod;pinned\n",
      "site policy: VM 100 is tagged 'pinned' and may not be migrated to this node")
  end,

  ["tags separated by commas and spaces count too"] = function(t)
    refused(t, "tags: web, no-migrate\n",
      "site policy: VM 100 is tagged 'no-migrate' and may not be migrated to this node")
  end,

  ["a tag that only contains a refused one is fine"] = function(t)
    local tun = t:open{}
    t:succeeds(tun:send{cmd = "config", conf = "tags: unpinned\n"})
  end,

  ["too much memory"] = function(t)
    refused(t, "memory: 65537\n",
      "site policy: VM 100 has 65537 MiB of memory, this node takes at most 65536 MiB")
  end,

  ["memory that is not a number"] = function(t)
    refused(t, "memory: lots\n",
      "site policy: VM 100 has lots MiB of memory, this node takes at most 65536 MiB")
  end,

  ["too much disk in total, CD-ROMs not counted"] = function(t)
    refused(t, "scsi0: local:100/vm-100-disk-0.raw,size=1T\n" ..
               "scsi1: local:100/vm-100-disk-1.raw,size=1025G\n" ..
               "ide2: local:iso/big.iso,media=cdrom,size=4T\n",
      "site policy: VM 100 has 2049G of disks, this node takes at most 2T")
  end,

  ["exactly at the limits passes the policy"] = function(t)
    -- the policy lets it through; the built-in volume check then refuses the foreign volume
    refused(t, "memory: 65536\nscsi0: local:100/vm-100-disk-0.raw,size=2T\n",
      "scsi0: volume 'local:100/vm-100-disk-0.raw' was not created by this migration")
  end,
}
