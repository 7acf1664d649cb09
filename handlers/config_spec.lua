-- config: write the VM's final config as the source sends it. Only volumes this
-- tunnel created and bridges this node has are accepted; lock, digest, parent,
-- [PENDING], snapshots and [special:fleecing] are dropped; the config ends up
-- locked 'migrate' and later commands expect that lock.

local function disk(tun, index)
  return tun:send{cmd = "disk", format = "raw", storage = "local",
                  drive = {interface = "scsi", index = index or 0, size = 1024 * 1024}}
end

return {
  ["writes the config locked 'migrate'"] = function(t)
    local tun = t:open{}
    local d = t:succeeds(disk(tun))
    t:eq(tun:send{cmd = "config", conf = "boot: order=scsi0\ncores: 2\nscsi0: " .. d.drivestr ..
                  "\nnet0: virtio=BC:24:11:00:00:01,bridge=vmbr0\n", ["firewall-config"] = json.null},
      {success = true})
    t:eq(tun:config(),
      "boot: order=scsi0\ncores: 2\nlock: migrate\nnet0: virtio=BC:24:11:00:00:01,bridge=vmbr0\n" ..
      "scsi0: local:100/vm-100-disk-0.raw,format=raw,size=1M\n")
  end,

  ["a second config is refused and changes nothing"] = function(t)
    local tun = t:open{}
    t:succeeds(tun:send{cmd = "config", conf = "cores: 2\n"})
    t:fail_contains(tun:send{cmd = "config", conf = "cores: 8\n"},
      "failed to handle 'config' command - found lock 'migrate' trying to remove 'create' lock")
    t:eq(tun:config(), "cores: 2\nlock: migrate\n")
  end,

  -- (the digest is computed when parsing; a source never sends a `digest:` line)
  ["drops lock, parent, pending changes and snapshots"] = function(t)
    local tun = t:open{}
    t:succeeds(tun:send{cmd = "config", conf = table.concat({
      "cores: 2",
      "lock: migrate",
      "parent: before",
      "",
      "[PENDING]",
      "cores: 4",
      "",
      "[before]",
      "cores: 1",
      "snaptime: 1700000000",
      "",
    }, "\n")})
    t:eq(tun:config(), "cores: 2\nlock: migrate\n")
  end,

  ["keeps vmgenid, meta, the description and [special:cloudinit]; drops [special:fleecing]"] = function(t)
    local tun = t:open{}
    t:succeeds(tun:send{cmd = "config", conf = table.concat({
      "#migrated VM",
      "cores: 2",
      "meta: creation-qemu=9.2.0,ctime=1700000000",
      "vmgenid: 6a0b2bb4-2ad3-4f0a-9b5e-4f7c5f0e4a11",
      "",
      "[special:cloudinit]",
      "ipconfig0: ip=dhcp",
      "",
      "[special:fleecing]",
      "fleecing-images: local:100/vm-100-fleece-0.raw",
      "",
    }, "\n")})
    t:eq(tun:config(), table.concat({
      "#migrated VM",
      "cores: 2",
      "lock: migrate",
      "meta: creation-qemu=9.2.0,ctime=1700000000",
      "vmgenid: 6a0b2bb4-2ad3-4f0a-9b5e-4f7c5f0e4a11",
      "",
      "[special:cloudinit]",
      "ipconfig0: ip=dhcp",
      "",
    }, "\n"))
  end,

  ["a drive without a volume is rejected"] = function(t)
    local tun = t:open{}
    t:eq(tun:send{cmd = "config", conf = "cores: 2\nunused0: ,,,\n"}, {
      success = false,
      msg = "failed to handle 'config' command - line 2: invalid value ',,,' for 'unused0' - the drive names no volume",
    })
    t:eq(tun:config(), "lock: create\n", "the reserved config is untouched")
  end,

  ["[special:cloudinit] naming a host path is rejected"] = function(t)
    local tun = t:open{}
    t:eq(tun:send{cmd = "config", conf = "cores: 2\n\n[special:cloudinit]\ncicustom: user=/etc/shadow\n"}, {
      success = false,
      msg = "failed to handle 'config' command - line 4: invalid value 'user=/etc/shadow' for 'cicustom' - user: '/etc/shadow' is not a volume ID (<storage>:<volume>); cicustom names snippets by volume ID, never by host path",
    })
    t:eq(tun:send{cmd = "config", conf = "cores: 2\n\n[special:cloudinit]\nide2: /dev/sda,media=cdrom\n"}, {
      success = false,
      msg = "failed to handle 'config' command - line 4: invalid value '/dev/sda,media=cdrom' for 'ide2' - a drive in [special:cloudinit] (it records cloud-init options, not drives)",
    })
    t:eq(tun:config(), "lock: create\n", "the reserved config is untouched")
  end,

  ["a volume this tunnel did not create is rejected"] = function(t)
    local tun = t:open{}
    t:eq(tun:send{cmd = "config", conf = "scsi0: local:100/vm-100-disk-3.raw,size=1G\n"}, {
      success = false,
      msg = "failed to handle 'config' command - scsi0: volume 'local:100/vm-100-disk-3.raw' was not created by this migration",
    })
    t:eq(tun:config(), "lock: create\n", "the reserved config is untouched")
  end,

  ["an existing volume of another VM is rejected"] = function(t)
    t:node{}
    local other = t:alloc{vmid = 200}
    local tun = t:open{}
    t:fail_contains(tun:send{cmd = "config", conf = "virtio1: " .. other .. ",size=1M\n"},
      "virtio1: volume 'local:200/vm-200-disk-0.raw' was not created by this migration")
  end,

  ["an empty CD-ROM drive is fine"] = function(t)
    local tun = t:open{}
    t:succeeds(tun:send{cmd = "config", conf = "ide2: none,media=cdrom\n"})
  end,

  ["a physical CD-ROM drive is refused, as start would refuse it"] = function(t)
    local tun = t:open{}
    t:eq(tun:send{cmd = "config", conf = "ide0: cdrom,media=cdrom\n"}.msg,
      "failed to handle 'config' command - config option 'ide0' is not supported by mtunnel's " ..
      "QEMU layer (host CD-ROM passthrough); remove it from the VM config before migrating")
    t:eq(tun:config(), "lock: create\n")
  end,

  -- `volume=` is PVE's alias of `file=`: the owned-volume check must see it
  ["a volume given as volume= is checked like file="] = function(t)
    local tun = t:open{}
    t:eq(tun:send{cmd = "config", conf = "scsi0: volume=/some/path,size=1G\n"}.msg,
      "failed to handle 'config' command - scsi0: volume '/some/path' was not created by this migration")
    local d = t:succeeds(disk(tun))
    t:fail_contains(tun:send{cmd = "config", conf = "scsi0: volume=" .. d.volid .. ",file=/some/path\n"},
      "duplicate key 'file' ('volume' is an alias of 'file')")
    t:succeeds(tun:send{cmd = "config", conf = "scsi0: volume=" .. d.volid .. ",format=raw,size=1M\n"})
  end,

  -- the quote-aware parser reads `serial="a,file=..."` as one value; start checks the serial
  ["a quoted drive serial with a comma is refused with start's message"] = function(t)
    local tun = t:open{}
    local d = t:succeeds(disk(tun))
    t:eq(tun:send{cmd = "config", conf = "scsi0: " .. d.drivestr .. ',serial="a,file=/etc/shadow"\n'}.msg,
      "failed to handle 'config' command - config option 'scsi0': invalid value " ..
      "'a,file=/etc/shadow': serial: up to 20 of [A-Za-z0-9_- ]")
    t:eq(tun:config(), "lock: create\n")
  end,

  ["control characters in a value are refused and never written"] = function(t)
    local tun = t:open{}
    t:eq(tun:send{cmd = "config", conf = "cores: 1\nname: web\rfile=x\n"}.msg,
      "failed to handle 'config' command - line 2: invalid value 'web\\rfile=x' for 'name' - " ..
      "contains the control character U+000D; values must be printable text")
    t:eq(tun:send{cmd = "config", conf = "name: a\0b\n"}.msg,
      "failed to handle 'config' command - line 1: invalid value 'a\\0b' for 'name' - " ..
      "contains the control character U+0000; values must be printable text")
    t:eq(tun:config(), "lock: create\n")
    -- a CR before the line break is trailing whitespace, as upstream
    t:succeeds(tun:send{cmd = "config", conf = "cores: 1\r\nname: web\r\n"})
    t:eq(tun:config(), "cores: 1\nlock: migrate\nname: web\n")
  end,

  ["options start would refuse are refused at once, with start's message"] = function(t)
    local unsupported = "is not supported by mtunnel's QEMU layer"
    local hint = "; remove it from the VM config before migrating"
    local tun = t:open{}
    for line, msg in pairs({
      ["args: -device foo"] = "config option 'args' " .. unsupported .. " (raw QEMU arguments)" .. hint,
      ["hostpci0: 0000:01:00.0"] = "config option 'hostpci0' " .. unsupported .. " (PCI passthrough)" .. hint,
      ["usb0: host=1234:5678"] = "config option 'usb0' " .. unsupported .. " (USB passthrough)" .. hint,
      ["serial0: /dev/ttyS0"] = "config option 'serial0' " .. unsupported ..
        " (serial device '/dev/ttyS0' (only 'socket'))" .. hint,
      ["memory: 99999999"] = "config option 'memory': invalid value '99999999': want an integer 1..67108864",
      ["net0: virtio=01:00:00:00:00:01,bridge=vmbr0"] =
        "config option 'net0': invalid value 'virtio=01:00:00:00:00:01,bridge=vmbr0': " ..
        "'01:00:00:00:00:01' is not a unicast MAC address",
    }) do
      -- a refusal changes nothing, so the same tunnel takes the next config
      t:eq(tun:send{cmd = "config", conf = "cores: 1\n" .. line .. "\n"}.msg,
        "failed to handle 'config' command - " .. msg, line)
      t:eq(tun:config(), "lock: create\n", line)
    end
  end,

  ["a bridge this node does not have is rejected"] = function(t)
    local tun = t:open{}
    t:eq(tun:send{cmd = "config", conf = "net0: virtio=BC:24:11:00:00:01,bridge=vmbr77\n"}.msg,
      "failed to handle 'config' command - net0: bridge 'vmbr77' does not exist")
    t:eq(tun:config(), "lock: create\n")
  end,

  ["bridges configured on the node are accepted"] = function(t)
    local tun = t:open{bridges = {"vmbr0", "vmbr42"}}
    t:succeeds(tun:send{cmd = "config", conf = "net1: e1000=BC:24:11:00:00:02,bridge=vmbr42,tag=5\n"})
  end,

  ["the firewall config is written, and removed again by cleanup"] = function(t)
    local tun = t:open{}
    local fw = "[OPTIONS]\nenable: 1\n\n[RULES]\nIN ACCEPT -p tcp -dport 22\n"
    t:succeeds(tun:send{cmd = "config", conf = "cores: 1\n", ["firewall-config"] = fw})
    t:eq(tun:firewall(), fw)
    t:succeeds(tun:send{cmd = "quit", cleanup = 1})
    t:eq(tun:firewall(), nil)
  end,

  ["a config that does not parse"] = function(t)
    local tun = t:open{}
    t:eq(tun:send{cmd = "config", conf = "cores: 2\nbogus line\n"}.msg,
      "failed to handle 'config' command - line 2: unable to parse config line 'bogus line'")
  end,

  ["conf is required"] = function(t)
    local tun = t:open{}
    t:eq(tun:send{cmd = "config"}.msg,
      "failed to handle 'config' command - 400 Parameter verification failed.\n" ..
      "conf: property is missing and it is not optional\n")
  end,

  ["later commands expect lock 'migrate'"] = function(t)
    local tun = t:open{}
    t:succeeds(tun:send{cmd = "config", conf = "cores: 1\n"})
    t:write_config(100, "cores: 1\nlock: create\n")
    t:eq(disk(tun).msg,
      "failed to handle 'disk' command - Encountered wrong lock - aborting mtunnel command handling.")
  end,
}
