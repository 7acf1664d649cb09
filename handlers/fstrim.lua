-- fstrim: ask the guest agent to trim file systems after a disk mirror. Failures
-- are only logged; the command always succeeds.
return {
  description = "Trim the guest's file systems via the guest agent (best effort).",
  params = false,
  lock = false,
  run = function(ctx, p)
    local ok, err = pcall(pve.qemu.fstrim)
    if not ok then
      pve.log.warn("fstrim failed: " .. tostring(err))
    end
    return {}
  end,
}
