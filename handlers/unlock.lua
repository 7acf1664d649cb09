-- unlock: remove the `migrate` lock; the migrated VM is now a normal VM of this
-- node, and no later command expects a lock.
return {
  description = "Remove the migration lock from the VM config.",
  params = false,
  run = function(ctx, p)
    local conf = ctx.conf
    if conf.options.lock == nil then
      pve.fail("no lock found trying to remove any lock")
    end
    conf.options.lock = nil
    pve.config.write(conf)
    pve.tunnel.expect_lock(nil)
    pve.tunnel.commit()
    return {}
  end,
}
