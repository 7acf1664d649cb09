-- version: which protocol this end speaks. A source accepts us when
-- api >= 2 and api - age <= 2 (it speaks version 2).
return {
  description = "Protocol version of this end (api 2, age 0).",
  params = false, -- upstream has no schema: any parameters are ignored
  lock = false,
  run = function(ctx, params)
    return { api = 2, age = 0 }
  end,
}
