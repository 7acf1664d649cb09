-- config (cookbook recipe "refuse by policy"): the built-in config handler
-- (pve.builtin), preceded by a site policy: VMs with a REFUSED_TAGS tag, more than
-- MAX_MEMORY_MIB of memory or more than MAX_DISK_BYTES of disks in total are refused with
-- a message naming the rule. `config` is the first command that carries the VM's config
-- (the disks were copied before it); refusing here writes nothing, and the source's abort
-- frees the volumes.

local base = pve.builtin("config")

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

return {
  description = base.description,
  params = base.params,
  lock = base.lock,
  run = function(ctx, p)
    check_policy(ctx, pve.config.parse(p.conf).options)
    return base.run(ctx, p)
  end,
}
