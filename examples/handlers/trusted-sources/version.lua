-- version: which protocol this end speaks. A source accepts us when
-- api >= 2 and api - age <= 2 (it speaks version 2).
--
-- Cookbook recipe "trusted sources" (a copy of the built-in version.lua; changes are
-- marked SITE): only API tokens matching TRUSTED may migrate VMs here. `version` is the
-- first command of every migration, so a refused source stops before anything is
-- copied; the source shows the message and removes its side. (Privileges still decide
-- what an accepted token may do; this narrows who may start at all.)

-- SITE: Lua patterns of token ids (user@realm!token) allowed to migrate to this node
local TRUSTED = { "^root@pam!", "^migrate@pve!dc%-" }

local function trusted(authid)
  for _, pattern in ipairs(TRUSTED) do
    if authid:match(pattern) then return true end
  end
  return false
end

return {
  description = "Protocol version of this end (api 2, age 0); trusted tokens only.",
  params = false, -- upstream has no schema: any parameters are ignored
  lock = false,
  run = function(ctx, params)
    -- SITE: refuse untrusted sources with a message naming the token
    if not trusted(ctx.authid) then
      pve.fail(string.format("site policy: token '%s' may not migrate VMs to node '%s' " ..
                             "(ask its admin to add the token to version.lua)",
                             ctx.authid, ctx.node))
    end
    return { api = 2, age = 0 }
  end,
}
