-- start: start the target VM paused, waiting for the RAM migration on
-- {run}/{vmid}.migrate, with an NBD server on {run}/{vmid}_nbd.migrate exporting
-- each live-migrated drive as drive-<key>. Only volumes allocated by `disk`, with
-- exactly the drive string `disk` returned, may be exported.
return {
  description = "Start the VM for an incoming live migration.",
  params = {
    start_params = { type = "object", properties = {
      statefile = { type = "string", enum = { "unix" } },
      forcemachine = { type = "string", optional = true, pattern = [[[a-z0-9._+-]+]] },
      forcecpu = { type = "string", optional = true },
      skiplock = { type = "boolean", optional = true },
      ["nets-host-mtu"] = { type = "string", optional = true, pattern = [[net\d+=\d+(,net\d+=\d+)*]] },
    } },
    migrate_opts = { type = "object", properties = {
      migratedfrom = { type = "string", format = "pve-node" },
      spice_ticket = { type = "string", optional = true },
      type = { type = "string", enum = { "websocket" } },
      remote_node = { type = "string", format = "pve-node", optional = true },
      network = { type = "string", optional = true },
      storagemap = { type = "object", optional = true, additionalProperties = true },
      nbd_proto_version = { type = "integer", minimum = 1, optional = true },
      nbd = { type = "object", optional = true, additionalProperties = true },
      -- mtunnel's extension (announced by `mtunnel-features`): RAM over this many multifd
      -- channels, each its own connection to the migration socket. PVE never sends it.
      multifd_channels = { type = "integer", minimum = 2, maximum = 16, optional = true },
      -- mtunnel's extensions as well: the multifd channels' compression (needs
      -- multifd_channels), and postcopy allowed (not with multifd_channels).
      multifd_compression = { type = "string", enum = { "zstd" }, optional = true },
      postcopy = { type = "boolean", optional = true },
    } },
  },
  run = function(ctx, p)
    -- a cutover (`replica-cutover`) starts the VM on the replica's working copies, whose
    -- config keeps the lock `replica` until `unlock`
    local cutover = ctx.state.cutover and ctx.conf.options.lock == "replica"
    if ctx.conf.options.lock ~= "migrate" and not cutover then
      pve.fail("VM config not received yet: send 'config' before 'start'")
    end
    local exports, drivestrs = {}, {}
    for key, d in pairs(p.migrate_opts.nbd or {}) do
      if type(d) ~= "table" then
        pve.fail("NBD entry for '" .. key .. "' is not an object")
      end
      d.success = nil -- not removed by the source: our `disk` reply carried it
      local volid, drivestr = d.volid, d.drivestr
      if type(volid) ~= "string" or volid == "" then
        pve.fail("No volid set for NBD volume '" .. key .. "'")
      end
      if type(drivestr) ~= "string" or drivestr == "" then
        pve.fail("No drivestr set for NBD volume '" .. key .. ":" .. volid .. "'")
      end
      for k in pairs(d) do
        if k ~= "volid" and k ~= "drivestr" then
          pve.fail("Unknown NBD volume key for '" .. key .. ":" .. volid .. "': '" .. k .. "'")
        end
      end
      local known = ctx.state.nbd and ctx.state.nbd[volid]
      if known == nil then
        pve.fail("Unknown NBD volume '" .. key .. ":" .. volid .. "'")
      end
      if drivestr ~= known.drivestr then
        -- upstream's wording, stray quote included
        pve.fail("NBD mismatch for '" .. key .. "': '" .. drivestr .. "' vs' " .. known.drivestr)
      end
      if known.key ~= key then
        pve.fail("NBD volume '" .. volid .. "' was allocated for '" .. known.key .. "', not for '" .. key .. "'")
      end
      exports[key] = d.volid
      drivestrs[key] = d.drivestr
    end

    local started = pve.qemu.start_incoming {
      machine = p.start_params.forcemachine,
      cpu = p.start_params.forcecpu,
      nbd = exports,
      multifd = p.migrate_opts.multifd_channels,
      compression = p.migrate_opts.multifd_compression,
      postcopy = p.migrate_opts.postcopy,
    }
    local reply = {
      migrate = {
        proto = "unix",
        addr = started.migrate_socket,
        uri = "unix:" .. started.migrate_socket,
      },
    }
    if started.multifd ~= nil then
      reply.migrate.multifd_channels = started.multifd
    end
    if started.compression ~= nil then
      reply.migrate.multifd_compression = started.compression
    end
    if started.postcopy then
      reply.migrate.postcopy = true
    end
    if started.nbd_socket ~= nil then
      reply.migrate.unix_sockets = pve.json.array { started.nbd_socket }
      reply.drives = {}
      for key, uri in pairs(started.nbd_uris) do
        reply.drives[key] = { drivestr = drivestrs[key], volid = exports[key], nbd_uri = uri }
      end
    end
    return reply
  end,
}
