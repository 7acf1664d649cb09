-- resume: continue the migrated VM. From here on the target VM is the live one, so
-- nothing destroys it any more (pve.qemu.resume commits the tunnel by itself; the
-- explicit commit below is kept for handlers copied from here).
return {
  description = "Resume the migrated VM.",
  params = false,
  lock = false,
  run = function(ctx, p)
    if not pve.qemu.is_running() then
      pve.fail("VM " .. ctx.vmid .. " not running")
    end
    pve.qemu.resume()
    pve.tunnel.commit()
    return {}
  end,
}
