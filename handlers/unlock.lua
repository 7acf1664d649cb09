-- unlock: remove the `migrate` lock; the migrated VM is now a normal VM of this
-- node, and no later command expects a lock. The `create` lock is the tunnel's
-- reservation of an empty config, not a migrated VM: unlocking it would commit
-- nothing but an empty config and wedge the VMID, so it is refused (upstream's
-- remove_lock wording) and the reservation stays for cleanup.
return {
  description = "Remove the migration lock from the VM config.",
  params = false,
  run = function(ctx, p)
    local conf = ctx.conf
    if conf.options.lock == nil then
      pve.fail("no lock found trying to remove any lock")
    end
    if conf.options.lock == "create" then
      pve.fail("found lock 'create' trying to remove 'migrate' lock - "
               .. "the VM config was not sent yet ('config' comes first)")
    end
    conf.options.lock = nil
    pve.config.write(conf)
    pve.tunnel.expect_lock(nil)
    pve.tunnel.commit()
    return {}
  end,
}
