-- disk: allocate an empty volume that a live-migrated disk is mirrored into over
-- NBD. The pair (volid, drive string) is remembered: `start` only exports volumes
-- that were allocated here, with exactly this drive string.
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
