-- replica-prepare: the first command of a replica run (mtunnel's extension, offered as
-- `replica` by `mtunnel-features`; docs/replicas.md). On a VMID this tunnel reserved
-- (lock `create`): allocate one working copy per disk, write the source's config with
-- its drives pointing at them and `lock: replica`, and make the replica's record. On an
-- existing replica (lock `replica`): check that the source's disks are still the
-- replica's, then write the source's current config the same way (the replica's config
-- follows the source's while its volumes and lock stay). Replies what the source needs
-- to choose a full or an incremental run.
local function contains(list, value)
  for _, v in ipairs(list) do
    if v == value then return true end
  end
  return false
end

-- Allocates the working copy of drive `key` and returns its record entry.
local function alloc_disk(key, d)
  pve.storage.check(d.storage)
  if d.size % 1024 ~= 0 then
    pve.fail(string.format("%s: size %d is not a multiple of 1 KiB", key, d.size))
  end
  local formats = pve.storage.formats(d.storage)
  local format = d.format
  if format == nil or not contains(formats.valid, format) then
    format = formats.default
  end
  local volid = pve.storage.alloc(d.storage, format, d.size // 1024)
  return { volid = volid, format = format, size = d.size }
end

-- The source's config with each replicated drive on its working copy, locked `replica`.
-- `unusedN` volumes are not replicated (nor named: they are the source's).
local function replica_config(text, disks)
  local conf = pve.config.parse(text)
  local options = conf.options
  options.lock, options.digest, options.parent = nil, nil, nil
  for key in pairs(conf.options) do
    if key:match("^unused%d+$") then options[key] = nil end
  end
  for key, value in pairs(options) do
    if pve.config.is_drive_key(key) then
      local drive = pve.config.parse_drive(value)
      local file = drive.file
      if disks[key] ~= nil then
        drive.file, drive.volume = disks[key].volid, nil
        drive.format = disks[key].format
        options[key] = pve.config.print_drive(drive)
      elseif file ~= nil and file ~= "none" and file ~= "cdrom" and drive.media ~= "cdrom" then
        pve.fail(key .. ": volume '" .. file .. "' is not replicated (not in 'disks')")
      end
    end
  end
  options.lock = "replica"
  return { description = conf.description, options = options }
end

local function same_disks(known, asked)
  for key, d in pairs(asked) do
    local k = known[key]
    if k == nil then
      return key .. " is new"
    elseif k.size ~= d.size then
      return string.format("%s changed size (%d -> %d bytes)", key, k.size, d.size)
    end
  end
  for key in pairs(known) do
    if asked[key] == nil then return key .. " is gone" end
  end
  return nil
end

-- A working copy stays where it was made: a run asking for another storage is refused
-- (it would silently write to the old one).
local function check_storages(vmid, known, asked)
  for key, d in pairs(asked) do
    local storage = known[key].volid:match("^([^:]+):")
    if storage ~= d.storage then
      pve.fail(string.format("%s: the replica's working copy '%s' is on storage '%s', not on "
        .. "the requested '%s' (--target-storage): replicate with --target-storage %s, or "
        .. "drop the replica ('mtunnel replica drop %d' on this node) and replicate again",
        key, known[key].volid, tostring(storage), d.storage, tostring(storage), vmid))
    end
  end
end

return {
  description = "Prepare a replica run: create the replica or check the existing one.",
  params = {
    source_node = { type = "string", format = "pve-node" },
    source_vmid = { type = "integer", minimum = 1 },
    conf = { type = "string", description = "the source's config file text" },
    disks = { type = "object", additionalProperties = true,
              description = "drive key -> {storage, format, size in bytes}" },
  },
  run = function(ctx, p)
    local lock = ctx.conf.options.lock
    local first = lock == "create"
    if not first and lock ~= "replica" then
      pve.fail(string.format("VM %d is locked '%s', not a replica", ctx.vmid, tostring(lock)))
    end
    for key, d in pairs(p.disks) do
      if not pve.config.is_drive_key(key) or type(d) ~= "table"
          or type(d.size) ~= "number" or d.size < 1 or type(d.storage) ~= "string" then
        pve.fail("invalid disk '" .. tostring(key) .. "' (needs storage and size)")
      end
    end
    local record
    if first then
      -- the config is checked before anything is allocated (placeholders stand in)
      local planned = {}
      for key, d in pairs(p.disks) do
        planned[key] = { volid = d.storage .. ":" .. ctx.vmid .. "/planned", format = "raw" }
      end
      replica_config(p.conf, planned)
      local disks = {}
      for key, d in pairs(p.disks) do
        disks[key] = alloc_disk(key, d)
      end
      pve.config.write(replica_config(p.conf, disks))
      pve.tunnel.expect_lock("replica")
      record = pve.replica.create { source_node = p.source_node, source_vmid = p.source_vmid,
                                    disks = disks }
    else
      record = pve.replica.get()
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
          .. "drop the replica ('mtunnel replica drop %d' on this node) and replicate again",
          ctx.vmid, changed, ctx.vmid))
      end
      check_storages(ctx.vmid, record.disks, p.disks)
      -- the replica's config follows the source's (memory, CPU, NICs, description...);
      -- its drives stay on the working copies, its lock `replica`
      pve.config.write(replica_config(p.conf, record.disks))
    end
    local names = {}
    for _, point in ipairs(record.points) do
      names[#names + 1] = point.name
    end
    return {
      id = record.id,
      first = first,
      -- an unfinished run (`run` set) may have left the working copies half written
      incremental_ok = (record.run == nil or record.run == pve.json.null) and #record.points > 0,
      points = pve.json.array(names),
      disks = record.disks,
    }
  end,
}
