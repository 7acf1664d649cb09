-- stop: hard-stop the target VM (the source uses it when a migration fails).
return {
  description = "Hard-stop the target VM.",
  params = false,
  lock = false,
  run = function(ctx, p)
    pve.qemu.stop()
    return {}
  end,
}
