-- config (cookbook recipe "bridge and VLAN remap"): the built-in config handler
-- (pve.builtin), with NICs on a bridge of BRIDGES moved to the bridge (and VLAN) given
-- there and VLAN tags of VLANS renumbered in the config text before the built-in checks
-- the bridges and writes it. The bridges the source names must still exist here (opening
-- the tunnel checks them); this maps them onto the network as this site runs it.

local base = pve.builtin("config")

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

return {
  description = base.description,
  params = base.params,
  lock = base.lock,
  run = function(ctx, p)
    local new = pve.config.parse(p.conf)
    for key, value in pairs(new.options) do
      if key:match("^net%d+$") then
        new.options[key] = remap_net(key, value)
      end
    end
    p.conf = pve.config.format(new)
    return base.run(ctx, p)
  end,
}
