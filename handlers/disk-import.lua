-- disk-import: receive one offline volume as a `raw+size` or `qcow2+size` stream on
-- {run}/{vmid}.storage. The reply names the socket (the source forwards to it and
-- gets a ticket for it) and the chosen stream format; `query-disk-import` reports
-- progress and the final volid. One import at a time.
return {
  description = "Import one volume from a stream on the tunnel's storage socket.",
  params = {
    volname = { type = "string", description = "preferred volume name, e.g. vm-100-disk-0.qcow2" },
    format = { type = "string", enum = { "raw", "qcow2", "subvol", "vmdk" } },
    export_formats = { type = "string", pattern = "[a-z0-9+]+(,[a-z0-9+]+)*",
                       description = "stream formats the source can send, preferred first" },
    storage = { type = "string", format = "pve-storage-id" },
    snapshot = { type = "string", optional = true, pattern = [[[a-z0-9_\-]{1,40}]] },
    migration_snapshot = { type = "boolean", optional = true },
    with_snapshots = { type = "boolean", optional = true, default = false },
    allow_rename = { type = "boolean", optional = true, default = false },
  },
  run = function(ctx, p)
    pve.storage.check(p.storage)
    local started = pve.storage.import_start {
      storage = p.storage,
      volname = p.volname,
      format = p.format,
      export_formats = p.export_formats,
      allow_rename = p.allow_rename,
    }
    return { socket = started.socket, format = started.format }
  end,
}
