-- replica-export: only a replica's working copies are exported.
return {
  ["refused before replica-prepare"] = function(t)
    local tun = t:open{}
    t:fail_contains(tun:send{cmd = "replica-export"},
      "VM 100 is no replica yet: send 'replica-prepare' first")
  end,
}
