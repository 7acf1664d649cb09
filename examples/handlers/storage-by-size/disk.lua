-- disk (cookbook recipe "storage by size"): the built-in disk handler (pve.builtin), but
-- disks of BIG_BYTES or more go to BIG_STORAGE, whatever storage the source asked for;
-- smaller disks stay where the source put them. The built-in checks the storage chosen
-- here as it would the source's, and its reply's volid and drivestr name it, so the
-- source writes them into the config it sends and `config` and `start` accept the volume
-- as usual.

local base = pve.builtin("disk")

-- SITE: the threshold and the storage for big disks
local BIG_BYTES = 64 * 1024 * 1024 * 1024 -- 64 GiB
local BIG_STORAGE = "bulk"

return {
  description = base.description,
  params = base.params,
  lock = base.lock,
  run = function(ctx, p)
    if p.drive.size >= BIG_BYTES and p.storage ~= BIG_STORAGE then
      pve.log.info(string.format("site policy: %s%d (%s) goes to storage '%s' instead of '%s'",
        p.drive.interface, p.drive.index, pve.config.format_size(p.drive.size),
        BIG_STORAGE, p.storage))
      p.storage = BIG_STORAGE
    end
    return base.run(ctx, p)
  end,
}
