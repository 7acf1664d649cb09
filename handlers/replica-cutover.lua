-- replica-cutover: a migration takes over the replica of its VM (mtunnel's extension,
-- offered as `cutover` by `mtunnel-features`; docs/replicas.md, "Cut over"). On a
-- reopened replica (lock `replica`) of this very source VM whose last run completed:
-- the source's current config is written with its drives on the working copies (the
-- lock stays `replica` until `unlock`), the migration is recorded as the replica's
-- unfinished run (a failed migration leaves it `interrupted`, every point intact), and
-- the working copies are remembered as `disk` does, so `start` exports them over NBD
-- for the last delta. Nothing is allocated. `unlock` then drops the points and the
-- record, and the VM is an ordinary one.
local function same_disks(known, asked)
  for key, d in pairs(asked) do
    local k = known[key]
    if k == nil then
      return key .. " is new"
    elseif type(d) ~= "table" or k.size ~= d.size then
      return string.format("%s changed size (%d -> %s bytes)", key, k.size, tostring(d.size))
    end
  end
  for key in pairs(known) do
    if asked[key] == nil then return key .. " is gone" end
  end
  return nil
end

-- The source's config with each replicated drive on its working copy; the drive strings
-- `start` may export, by volid.
local function cutover_config(text, disks)
  local conf = pve.config.parse(text)
  local options = conf.options
  options.lock, options.digest, options.parent = nil, nil, nil
  local drives = {}
  for key, value in pairs(options) do
    if pve.config.is_drive_key(key) then
      local drive = pve.config.parse_drive(value)
      local file = drive.file
      if disks[key] ~= nil then
        drive.file, drive.volume = disks[key].volid, nil
        drive.format = disks[key].format
        options[key] = pve.config.print_drive(drive)
        drives[key] = { volid = disks[key].volid, drivestr = options[key] }
      elseif file ~= nil and file ~= "none" and file ~= "cdrom" and drive.media ~= "cdrom" then
        pve.fail(key .. ": volume '" .. file .. "' has no working copy in the replica")
      end
    elseif key:match("^net%d+$") then
      local net = pve.config.parse_property_string(value, "model")
      if net.bridge ~= nil and not pve.tunnel.bridge_exists(net.bridge) then
        pve.fail(string.format("%s: bridge '%s' does not exist", key, net.bridge))
      end
    end
  end
  pve.qemu.check_config(options)
  options.lock = "replica"
  local special = conf.special or {}
  special.fleecing = nil
  return { description = conf.description, options = options, special = special }, drives
end

return {
  description = "Take over the VM's replica for the migration (cutover).",
  params = {
    source_node = { type = "string", format = "pve-node" },
    source_vmid = { type = "integer", minimum = 1 },
    conf = { type = "string", description = "the source's config file text (bridges mapped)" },
    disks = { type = "object", additionalProperties = true,
              description = "drive key -> {size in bytes}" },
    ["firewall-config"] = { type = "string", optional = true,
                            description = "the source's VM firewall file" },
  },
  run = function(ctx, p)
    if ctx.conf.options.lock ~= "replica" then
      pve.fail(string.format("VM %d is no replica on this node (lock '%s'): nothing to cut over to",
        ctx.vmid, tostring(ctx.conf.options.lock)))
    end
    local record = pve.replica.get()
    if record == nil then
      pve.fail(string.format("VM %d is locked 'replica' but has no replica record", ctx.vmid))
    end
    if record.source.node ~= p.source_node or record.source.vmid ~= p.source_vmid then
      pve.fail(string.format("VM %d here is the replica of VM %d on '%s', not of VM %d on '%s'",
        ctx.vmid, record.source.vmid, record.source.node, p.source_vmid, p.source_node))
    end
    local changed = same_disks(record.disks, p.disks)
    if changed ~= nil then
      pve.fail(string.format("the disks of VM %d changed since its replica was made (%s): "
        .. "migrate with --no-replica after dropping the replica ('mtunnel replica drop %d' "
        .. "on this node)", ctx.vmid, changed, ctx.vmid))
    end
    local conf, drives = cutover_config(p.conf, record.disks)
    -- checked and recorded before the config changes: a replica that is not current
    -- (no point, or a run that did not complete) is refused untouched
    pve.replica.begin_cutover()
    if p["firewall-config"] ~= nil then
      pve.firewall.write(p["firewall-config"])
    end
    pve.config.write(conf)
    ctx.state.nbd = ctx.state.nbd or {}
    for key, d in pairs(drives) do
      ctx.state.nbd[d.volid] = { drivestr = d.drivestr, key = key }
    end
    ctx.state.cutover = true
    return { id = record.id, drives = drives }
  end,
}
