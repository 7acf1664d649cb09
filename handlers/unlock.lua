-- unlock: remove the `migrate` lock; the migrated VM is now a normal VM of this
-- node, and no later command expects a lock. The `create` lock is the tunnel's
-- reservation of an empty config, not a migrated VM: unlocking it would commit
-- nothing but an empty config and wedge the VMID, so it is refused (upstream's
-- remove_lock wording) and the reservation stays for cleanup. The `replica` lock is a
-- replica's (docs/replicas.md): unlocking it would make a working copy that may be half
-- written startable and strand its restore points, so it is refused too - unless this
-- tunnel cut over to it (`replica-cutover`): then the replica becomes the migrated VM.
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
    if conf.options.lock == "replica" and ctx.state.cutover then
      -- a cutover committed (`resume`, or a VM migrated stopped): the replica becomes
      -- the VM; its points and record go (a point that cannot be deleted is a warning)
      conf.options.lock = nil
      pve.config.write(conf)
      pve.tunnel.expect_lock(nil)
      pve.tunnel.commit()
      -- committed: a replica left behind is the operator's to drop, not a failed unlock
      local ok, err = pcall(pve.replica.take_over)
      if not ok then
        pve.log.warn(string.format("VM %d is migrated, but the replica's record or restore "
          .. "points were not removed: %s - remove them by hand (docs/replicas.md, 'Cut over')",
          ctx.vmid, tostring(err)))
      end
      return {}
    end
    if conf.options.lock == "replica" then
      pve.fail(string.format("VM %d is a replica (lock 'replica'): it is not unlocked by a "
               .. "tunnel; promote one of its restore points on the target "
               .. "('mtunnel replica promote %d')", ctx.vmid, ctx.vmid))
    end
    conf.options.lock = nil
    pve.config.write(conf)
    pve.tunnel.expect_lock(nil)
    pve.tunnel.commit()
    return {}
  end,
}
