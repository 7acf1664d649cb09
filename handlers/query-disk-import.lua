-- query-disk-import: state of the running import: pending (with progress),
-- complete (with the new volid) or error (with the reason).
return {
  description = "Report the state of the running disk import.",
  params = {}, -- empty schema: extra keys are rejected
  run = function(ctx, p)
    return pve.storage.import_status()
  end,
}
