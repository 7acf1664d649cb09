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
-- Cookbook recipe "migration note" (a copy of the built-in config.lua; changes are
-- marked SITE): a line saying when, by which API token and onto which node the VM was
-- migrated is appended to the VM's description (the Notes panel in PVE's UI). The token
-- is the best "source" this end knows: the protocol names the source node only in
-- `start`, and only for running VMs. Times are UTC (pve.tunnel.now).

-- SITE: the note, appended below the description the source sent
local function with_note(ctx, description)
  local note = string.format("Migrated to node '%s' on %s by token '%s'.",
                             ctx.node, pve.tunnel.now().iso, ctx.authid)
  if type(description) == "string" and description ~= "" then
    return description .. "\n\n" .. note
  end
  return note
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
    check_volumes(options)
    check_bridges(options)
    pve.qemu.check_config(options)

    if p["firewall-config"] ~= nil then
      pve.firewall.write(p["firewall-config"])
    end
    options.lock = "migrate"
    local description = with_note(ctx, new.description) -- SITE
    pve.config.write { description = description, options = options, special = special }
    pve.tunnel.expect_lock("migrate")
    return {}
  end,
}
