-- start: start the VM paused for the incoming migration on {run}/{vmid}.migrate, with
-- an NBD server on {run}/{vmid}_nbd.migrate exporting each drive `disk` allocated.
-- Only volumes `disk` allocated, with exactly its drive string, are exported.

local function disk(tun, index)
  return tun:send{cmd = "disk", format = "raw", storage = "local",
                  drive = {interface = "scsi", index = index or 0, size = 1024 * 1024, iothread = 1}}
end

-- A `start` request as a PVE source sends it.
local function start(tun, nbd, start_params, migrate_opts)
  local req = {
    cmd = "start",
    start_params = {statefile = "unix", forcemachine = "pc-q35-9.2+pve0", forcecpu = json.null, skiplock = 1},
    migrate_opts = {
      migratedfrom = "source", type = "websocket", remote_node = "target", spice_ticket = json.null,
      network = json.null, storagemap = {default = "local"}, nbd_proto_version = 1, nbd = nbd,
    },
  }
  for k, v in pairs(start_params or {}) do req.start_params[k] = v end
  for k, v in pairs(migrate_opts or {}) do req.migrate_opts[k] = v end
  return tun:send(req)
end

local function config(tun, drives)
  local conf = "cores: 1\n"
  for key, d in pairs(drives or {}) do
    conf = conf .. key .. ": " .. d.drivestr .. "\n"
  end
  return tun:send{cmd = "config", conf = conf}
end

return {
  ["without NBD: only the migration socket"] = function(t)
    local tun = t:open{}
    t:succeeds(config(tun))
    local run = t:run_dir()
    t:eq(start(tun), {
      success = true,
      migrate = {proto = "unix", addr = run .. "/100.migrate", uri = "unix:" .. run .. "/100.migrate"},
    })
  end,

  ["with NBD: unix_sockets and one drive entry per disk"] = function(t)
    local tun = t:open{}
    local d0 = t:succeeds(disk(tun, 0))
    local d1 = t:succeeds(disk(tun, 1))
    t:succeeds(config(tun, {scsi0 = d0, scsi1 = d1}))
    local run = t:run_dir()
    local nbd = run .. "/100_nbd.migrate"
    t:eq(start(tun, {scsi0 = d0, scsi1 = d1}), {
      success = true,
      migrate = {
        proto = "unix", addr = run .. "/100.migrate", uri = "unix:" .. run .. "/100.migrate",
        unix_sockets = {nbd},
      },
      drives = {
        scsi0 = {drivestr = d0.drivestr, volid = d0.volid, nbd_uri = "nbd:unix:" .. nbd .. ":exportname=drive-scsi0"},
        scsi1 = {drivestr = d1.drivestr, volid = d1.volid, nbd_uri = "nbd:unix:" .. nbd .. ":exportname=drive-scsi1"},
      },
    })
  end,

  ["the hypervisor gets machine, cpu and the NBD exports"] = function(t)
    local tun = t:open{backend = {hypervisor = {
      start_incoming = function(req)
        backend.state.req = req
        return backend.default.hypervisor.start_incoming(req)
      end,
    }}}
    local d0 = t:succeeds(disk(tun, 0))
    t:succeeds(config(tun, {scsi0 = d0}))
    t:succeeds(start(tun, {scsi0 = d0}, {forcecpu = "host,+aes"}))
    local req = backend.state.req
    t:eq(req.vmid, 100)
    t:eq(req.machine, "pc-q35-9.2+pve0")
    t:eq(req.cpu, "host,+aes")
    t:eq(req.nbd, {scsi0 = d0.volid})
    t:eq(req.config.options.lock, "migrate")
    t:eq(req.config.options.scsi0, d0.drivestr)
  end,

  ["multifd_channels (mtunnel's extension) reaches the hypervisor and the reply"] = function(t)
    local tun = t:open{backend = {hypervisor = {
      start_incoming = function(req)
        backend.state.req = req
        return backend.default.hypervisor.start_incoming(req)
      end,
    }}}
    t:succeeds(config(tun))
    local run = t:run_dir()
    t:eq(start(tun, nil, nil, {multifd_channels = 4}), {
      success = true,
      migrate = {proto = "unix", addr = run .. "/100.migrate", uri = "unix:" .. run .. "/100.migrate",
                 multifd_channels = 4},
    })
    t:eq(backend.state.req.multifd, 4)
  end,

  ["without multifd_channels (a PVE source) the hypervisor gets no multifd"] = function(t)
    local tun = t:open{backend = {hypervisor = {
      start_incoming = function(req)
        backend.state.req = req
        return backend.default.hypervisor.start_incoming(req)
      end,
    }}}
    t:succeeds(config(tun))
    t:succeeds(start(tun))
    t:eq(backend.state.req.multifd, nil)
  end,

  ["multifd_compression zstd reaches the hypervisor and the reply"] = function(t)
    local tun = t:open{backend = {hypervisor = {
      start_incoming = function(req)
        backend.state.req = req
        return backend.default.hypervisor.start_incoming(req)
      end,
    }}}
    t:succeeds(config(tun))
    local run = t:run_dir()
    t:eq(start(tun, nil, nil, {multifd_channels = 2, multifd_compression = "zstd"}), {
      success = true,
      migrate = {proto = "unix", addr = run .. "/100.migrate", uri = "unix:" .. run .. "/100.migrate",
                 multifd_channels = 2, multifd_compression = "zstd"},
    })
    t:eq(backend.state.req.compression, "zstd")
    t:eq(backend.state.req.postcopy, false)
  end,

  ["postcopy reaches the hypervisor and the reply"] = function(t)
    local tun = t:open{backend = {hypervisor = {
      start_incoming = function(req)
        backend.state.req = req
        return backend.default.hypervisor.start_incoming(req)
      end,
    }}}
    t:succeeds(config(tun))
    local run = t:run_dir()
    t:eq(start(tun, nil, nil, {postcopy = true}), {
      success = true,
      migrate = {proto = "unix", addr = run .. "/100.migrate", uri = "unix:" .. run .. "/100.migrate",
                 postcopy = true},
    })
    t:eq(backend.state.req.postcopy, true)
    t:eq(backend.state.req.multifd, nil)
  end,

  ["compression without multifd, postcopy with multifd and unknown compressions are refused"] = function(t)
    local tun = t:open{}
    t:succeeds(config(tun))
    t:eq(start(tun, nil, nil, {multifd_compression = "zstd"}), {
      success = false,
      msg = "failed to handle 'start' command - compression needs multifd channels",
    })
    t:eq(start(tun, nil, nil, {multifd_channels = 2, postcopy = true}), {
      success = false,
      msg = "failed to handle 'start' command - postcopy cannot be combined with multifd channels (QEMU 10.0 refuses it)",
    })
    local r = start(tun, nil, nil, {multifd_channels = 2, multifd_compression = "zlib"})
    t:eq(r.success, false)
    t:eq(backend.calls["hypervisor.start_incoming"], nil, "nothing was started")
  end,

  ["multifd_channels out of range is refused"] = function(t)
    local tun = t:open{}
    t:succeeds(config(tun))
    local r = start(tun, nil, nil, {multifd_channels = 1})
    t:eq(r.success, false)
    t:eq(backend.calls["hypervisor.start_incoming"], nil)
  end,

  ["refused before the config arrived"] = function(t)
    local tun = t:open{}
    t:eq(start(tun), {
      success = false,
      msg = "failed to handle 'start' command - VM config not received yet: send 'config' before 'start'",
    })
    t:eq(backend.calls["hypervisor.start_incoming"], nil)
  end,

  ["Unknown NBD volume"] = function(t)
    local tun = t:open{}
    t:succeeds(config(tun))
    t:eq(start(tun, {scsi0 = {volid = "local:100/vm-100-disk-7.raw", drivestr = "local:100/vm-100-disk-7.raw,size=1M", success = true}}), {
      success = false,
      msg = "failed to handle 'start' command - Unknown NBD volume 'scsi0:local:100/vm-100-disk-7.raw'",
    })
    t:eq(backend.calls["hypervisor.start_incoming"], nil, "nothing was started")
  end,

  ["NBD mismatch: a drive string other than the one disk returned"] = function(t)
    local tun = t:open{}
    local d0 = t:succeeds(disk(tun, 0))
    t:succeeds(config(tun, {scsi0 = d0}))
    t:eq(start(tun, {scsi0 = {volid = d0.volid, drivestr = d0.drivestr .. ",cache=unsafe"}}).msg,
      "failed to handle 'start' command - NBD mismatch for 'scsi0': '" .. d0.drivestr ..
      ",cache=unsafe' vs' " .. d0.drivestr)
  end,

  ["NBD entries need volid and drivestr and nothing else"] = function(t)
    local tun = t:open{}
    local d0 = t:succeeds(disk(tun, 0))
    t:succeeds(config(tun, {scsi0 = d0}))
    t:eq(start(tun, {scsi0 = {drivestr = d0.drivestr}}).msg,
      "failed to handle 'start' command - No volid set for NBD volume 'scsi0'")
    t:eq(start(tun, {scsi0 = {volid = d0.volid}}).msg,
      "failed to handle 'start' command - No drivestr set for NBD volume 'scsi0:" .. d0.volid .. "'")
    t:eq(start(tun, {scsi0 = {volid = d0.volid, drivestr = d0.drivestr, size = 5}}).msg,
      "failed to handle 'start' command - Unknown NBD volume key for 'scsi0:" .. d0.volid .. "': 'size'")
  end,

  ["a volume exported under another drive key than it was allocated for"] = function(t)
    local tun = t:open{}
    local d0 = t:succeeds(disk(tun, 0))
    t:succeeds(config(tun, {scsi0 = d0}))
    t:eq(start(tun, {virtio0 = d0}).msg,
      "failed to handle 'start' command - NBD volume '" .. d0.volid .. "' was allocated for 'scsi0', not for 'virtio0'")
  end,

  ["statefile must be unix and the transport websocket"] = function(t)
    local tun = t:open{}
    t:eq(start(tun, nil, {statefile = "/var/lib/vz/dump/state.raw"}).msg,
      "failed to handle 'start' command - 400 Parameter verification failed.\n" ..
      "start_params.statefile: value '/var/lib/vz/dump/state.raw' does not have a value in the enumeration 'unix'\n")
    t:eq(start(tun, nil, nil, {type = "secure"}).msg,
      "failed to handle 'start' command - 400 Parameter verification failed.\n" ..
      "migrate_opts.type: value 'secure' does not have a value in the enumeration 'websocket'\n")
  end,

  ["unknown keys in start_params and migrate_opts are rejected"] = function(t)
    local tun = t:open{}
    t:eq(start(tun, nil, {timeout = 30}).msg,
      "failed to handle 'start' command - 400 Parameter verification failed.\n" ..
      "start_params.timeout: property is not defined in schema and the schema does not allow additional properties\n")
    t:eq(start(tun, nil, nil, {migration_type = "insecure"}).msg,
      "failed to handle 'start' command - 400 Parameter verification failed.\n" ..
      "migrate_opts.migration_type: property is not defined in schema and the schema does not allow additional properties\n")
  end,

  ["a failing start reaches the reply"] = function(t)
    local tun = t:open{backend = {hypervisor = {
      start_incoming = function() backend.fail("kvm: -cpu host: CPU model 'host' requires KVM") end,
    }}}
    t:succeeds(config(tun))
    t:eq(start(tun).msg, "failed to handle 'start' command - kvm: -cpu host: CPU model 'host' requires KVM")
  end,

  ["a VM that already runs"] = function(t)
    local tun = t:open{}
    t:succeeds(config(tun))
    t:succeeds(start(tun))
    t:eq(start(tun).msg, "failed to handle 'start' command - VM 100 already running")
  end,

  ["a lost connection stops the started VM"] = function(t)
    local tun = t:open{}
    local d0 = t:succeeds(disk(tun, 0))
    t:succeeds(config(tun, {scsi0 = d0}))
    t:succeeds(start(tun, {scsi0 = d0}))
    t:ok(backend.default.hypervisor.is_running(100))
    t:eq(tun:close(), "mtunnel exited unexpectedly")
    t:eq(backend.calls["hypervisor.stop"], 1)
    t:ok(not backend.default.hypervisor.is_running(100), "the VM is stopped")
    t:eq(t:volumes(), {})
    t:eq(t:config(100), nil)
  end,
}
