-- config: write the VM's final config as the source sends it (already rewritten to
-- our volids and bridges). Dropped: lock, digest, parent, [PENDING], snapshots and
-- the fleecing section; kept: vmgenid, meta, [special:cloudinit] (a VM config file
-- holds no vmid/node keys, so there is nothing to force). A real PVE source sends
-- [special:cloudinit] (the old values of changed cloud-init options); the strict
-- parse refuses only what would name a host file there (a drive, a cicustom path),
-- and any drive without a volume. Every volume the
-- config refers to must be one this tunnel allocated or imported, and every bridge
-- must exist here. As upstream's strict parsing, whatever `start` would refuse is
-- refused now, with start's message (pve.qemu.check_config), and nothing is written.
-- Afterwards the config carries `lock: migrate`.
--
-- Cookbook recipe "bridge and VLAN remap" (a copy of the built-in config.lua; changes
-- are marked SITE): NICs on a bridge of BRIDGES move to the bridge (and VLAN) given
-- there, and VLAN tags of VLANS are renumbered, before the bridges are checked and the
-- config is written. The bridges the source names must still exist here (opening the
-- tunnel checks them); this maps them onto the network as this site runs it.

-- SITE: source bridge -> bridge here, with the VLAN tag its NICs get (nil: keep theirs)
local BRIDGES = {
  vmbr1 = { bridge = "vmbr0", tag = 30 },
  vmbr9 = { bridge = "vmbr0" },
}
-- SITE: VLAN tag -> tag here, on every bridge
local VLANS = { [100] = 200 }

-- SITE: the NIC's property string with bridge and tag mapped (other parts unchanged)
local function remap_net(key, value)
  local parts, bridge, tag = {}, nil, nil
  for part in value:gmatch("[^,]+") do
    local k, v = part:match("^([^=]+)=(.*)$")
    if k == "bridge" then bridge = v elseif k == "tag" then tag = v end
    parts[#parts + 1] = { key = k, value = v, text = part }
  end
  local map = bridge and BRIDGES[bridge]
  local new_tag = tag and VLANS[tonumber(tag)] or nil
  if map and map.tag then
    if tag ~= nil then
      pve.fail(string.format("%s: bridge '%s' maps to VLAN %d of '%s', but the NIC already has VLAN tag %s",
                             key, bridge, map.tag, map.bridge, tag))
    end
    new_tag = map.tag
  end
  local out, tagged = {}, false
  for _, part in ipairs(parts) do
    if part.key == "bridge" and map then
      out[#out + 1] = "bridge=" .. map.bridge
    elseif part.key == "tag" and new_tag then
      out[#out + 1] = "tag=" .. new_tag
      tagged = true
    else
      out[#out + 1] = part.text
    end
  end
  if new_tag and not tagged then
    out[#out + 1] = "tag=" .. new_tag
  end
  local result = table.concat(out, ",")
  if result ~= value then
    pve.log.info(string.format("site policy: %s: '%s' -> '%s'", key, value, result))
  end
  return result
end

local function remap_networks(options)
  for key, value in pairs(options) do
    if key:match("^net%d+$") then
      options[key] = remap_net(key, value)
    end
  end
end
local function check_volumes(options)
  for key, value in pairs(options) do
    if pve.config.is_drive_key(key) then
      local drive = pve.config.parse_drive(value) -- `volume=` comes back as `file`
      local file = drive.file
      if file ~= nil and file ~= "none" and file ~= "cdrom" and not pve.storage.owned(file) then
        pve.fail(string.format("%s: volume '%s' was not created by this migration", key, file))
      end
    end
  end
end

local function check_bridges(options)
  for key, value in pairs(options) do
    if key:match("^net%d+$") then
      local net = pve.config.parse_property_string(value, "model")
      if net.bridge ~= nil and not pve.tunnel.bridge_exists(net.bridge) then
        pve.fail(string.format("%s: bridge '%s' does not exist", key, net.bridge))
      end
    end
  end
end

return {
  description = "Write the migrated VM's config; the VM is then locked 'migrate'.",
  params = {
    conf = { type = "string", description = "the full config file text" },
    ["firewall-config"] = { type = "string", optional = true,
                            description = "the source's VM firewall file" },
  },
  run = function(ctx, p)
    if ctx.conf.options.lock ~= "create" then
      -- as upstream, whose config handler removes the `create` lock
      pve.fail(string.format("found lock '%s' trying to remove 'create' lock",
                             tostring(ctx.conf.options.lock)))
    end
    local new = pve.config.parse(p.conf)
    local options = new.options
    options.lock, options.digest, options.parent = nil, nil, nil
    local special = new.special or {}
    special.fleecing = nil
    remap_networks(options) -- SITE
    check_volumes(options)
    check_bridges(options)
    pve.qemu.check_config(options)

    if p["firewall-config"] ~= nil then
      pve.firewall.write(p["firewall-config"])
    end
    options.lock = "migrate"
    pve.config.write { description = new.description, options = options, special = special }
    pve.tunnel.expect_lock("migrate")
    return {}
  end,
}
