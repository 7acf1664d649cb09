-- config (cookbook recipe "migration note"): the built-in config handler
-- (pve.builtin), with a line saying when, by which API token and onto which node the VM
-- was migrated appended to the VM's description (the Notes panel in PVE's UI) in the
-- config text before the built-in writes it. The token is the best "source" this end
-- knows: the protocol names the source node only in `start`, and only for running VMs.
-- Times are UTC (pve.tunnel.now).

local base = pve.builtin("config")

-- SITE: the note, appended below the description the source sent
local function with_note(ctx, description)
  local note = string.format("Migrated to node '%s' on %s by token '%s'.",
                             ctx.node, pve.tunnel.now().iso, ctx.authid)
  if type(description) == "string" and description ~= "" then
    return description .. "\n\n" .. note
  end
  return note
end

return {
  description = base.description,
  params = base.params,
  lock = base.lock,
  run = function(ctx, p)
    local new = pve.config.parse(p.conf)
    new.description = with_note(ctx, new.description)
    p.conf = pve.config.format(new)
    return base.run(ctx, p)
  end,
}
