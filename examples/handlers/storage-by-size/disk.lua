-- disk: allocate an empty volume that a live-migrated disk is mirrored into over
-- NBD. The pair (volid, drive string) is remembered: `start` only exports volumes
-- that were allocated here, with exactly this drive string.
--
-- Cookbook recipe "storage by size" (a copy of the built-in disk.lua; changes are
-- marked SITE): disks of BIG_BYTES or more go to BIG_STORAGE, whatever storage the
-- source asked for; smaller disks stay where the source put them. The reply's volid
-- and drivestr name the storage chosen here, and the source writes them into the
-- config it sends, so `config` and `start` accept the volume as usual.

-- SITE: the threshold and the storage for big disks
local BIG_BYTES = 64 * 1024 * 1024 * 1024 -- 64 GiB
local BIG_STORAGE = "bulk"
local function contains(list, value)
  for _, v in ipairs(list) do
    if v == value then return true end
  end
  return false
end

return {
  description = "Allocate an empty volume for a live (NBD) storage migration.",
  params = {
    format = { type = "string", optional = true,
               enum = { "raw", "qcow", "qed", "qcow2", "vmdk", "cloop" } },
    storage = { type = "string", format = "pve-storage-id" },
    drive = { type = "object", additionalProperties = true,
              description = "the source's drive without file/format; size in bytes",
              properties = {
                interface = { type = "string", enum = { "ide", "sata", "scsi", "virtio", "efidisk", "tpmstate" } },
                index = { type = "integer", minimum = 0 },
                size = { type = "integer", minimum = 1 },
              } },
  },
  run = function(ctx, p)
    -- SITE: pick the storage by size (checked like the source's choice would be)
    if p.drive.size >= BIG_BYTES and p.storage ~= BIG_STORAGE then
      pve.log.info(string.format("site policy: %s%d (%s) goes to storage '%s' instead of '%s'",
        p.drive.interface, p.drive.index, pve.config.format_size(p.drive.size),
        BIG_STORAGE, p.storage))
      p.storage = BIG_STORAGE
    end
    pve.storage.check(p.storage)
    local drive = p.drive
    drive.file, drive.volume, drive.format = nil, nil, nil
    local key = drive.interface .. drive.index
    if not pve.config.is_drive_key(key) then
      pve.fail("invalid drive '" .. key .. "'")
    end
    drive.interface, drive.index = nil, nil

    local formats = pve.storage.formats(p.storage)
    local format = p.format
    if format == nil or not contains(formats.valid, format) then
      format = formats.default
    end
    local size_kib = (drive.size + 1023) // 1024
    drive.format = format
    drive.size = pve.config.format_size(drive.size)
    -- a key or value that cannot be printed is refused before anything is allocated
    pve.config.print_drive(drive)
    local volid = pve.storage.alloc(p.storage, format, size_kib)

    drive.file = volid
    local drivestr = pve.config.print_drive(drive)

    ctx.state.nbd = ctx.state.nbd or {}
    ctx.state.nbd[volid] = { drivestr = drivestr, key = key }
    return { drivestr = drivestr, volid = volid }
  end,
}
