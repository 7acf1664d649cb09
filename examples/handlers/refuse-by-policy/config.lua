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
-- Cookbook recipe "refuse by policy" (a copy of the built-in config.lua; changes are
-- marked SITE): VMs with a REFUSED_TAGS tag, more than MAX_MEMORY_MIB of memory or more
-- than MAX_DISK_BYTES of disks in total are refused with a message naming the rule.
-- `config` is the first command that carries the VM's config (the disks were copied
-- before it); refusing here writes nothing, and the source's abort frees the volumes.

-- SITE: the policy
local REFUSED_TAGS = { pinned = true, ["no-migrate"] = true }
local MAX_MEMORY_MIB = 64 * 1024
local MAX_DISK_BYTES = 2 * 1024 * 1024 * 1024 * 1024 -- 2 TiB

-- SITE: raises with the first rule the VM breaks
local function check_policy(ctx, options)
  for tag in (options.tags or ""):gmatch("[^;,%s]+") do
    if REFUSED_TAGS[tag] then
      pve.fail(string.format("site policy: VM %d is tagged '%s' and may not be migrated to this node",
                             ctx.vmid, tag))
    end
  end
  local memory = tonumber(options.memory or "512") -- PVE's default
  if memory == nil or memory > MAX_MEMORY_MIB then
    pve.fail(string.format("site policy: VM %d has %s MiB of memory, this node takes at most %d MiB",
                           ctx.vmid, tostring(options.memory), MAX_MEMORY_MIB))
  end
  local total = 0
  for key, value in pairs(options) do
    if pve.config.is_drive_key(key) then
      local drive = pve.config.parse_drive(value)
      if drive.size ~= nil and drive.media ~= "cdrom" then
        total = total + (pve.config.parse_size(drive.size) or 0)
      end
    end
  end
  if total > MAX_DISK_BYTES then
    pve.fail(string.format("site policy: VM %d has %s of disks, this node takes at most %s",
                           ctx.vmid, pve.config.format_size(total),
                           pve.config.format_size(MAX_DISK_BYTES)))
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
    check_policy(ctx, options) -- SITE
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
