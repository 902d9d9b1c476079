-- Argo CD health check for sluice.dev/RateLimitPolicy.
-- Healthy: Accepted=True (and Converged=True when the operator reports it) for the current
-- generation. Degraded: Accepted=False (e.g. PolicyInvalid, target not found). Progressing:
-- anything else (no status yet, generation not observed, pods still picking the policy up).
local hs = {}

local function condition(conditions, ctype)
  if conditions == nil then
    return nil
  end
  for _, c in ipairs(conditions) do
    if c.type == ctype then
      return c
    end
  end
  return nil
end

local function describe(c, fallback)
  if c.message ~= nil and c.message ~= "" then
    if c.reason ~= nil and c.reason ~= "" then
      return c.reason .. ": " .. c.message
    end
    return c.message
  end
  if c.reason ~= nil and c.reason ~= "" then
    return c.reason
  end
  return fallback
end

if obj.status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the sluice operator to report status"
  return hs
end

local generation = obj.metadata.generation
local observed = obj.status.observedGeneration
if observed == nil or (generation ~= nil and observed < generation) then
  hs.status = "Progressing"
  if generation ~= nil then
    hs.message = "Waiting for the sluice operator to observe generation " .. tostring(math.floor(generation))
  else
    hs.message = "Waiting for the sluice operator to observe the RateLimitPolicy"
  end
  return hs
end

local conditions = obj.status.conditions
local accepted = condition(conditions, "Accepted")
local converged = condition(conditions, "Converged")

if accepted ~= nil and accepted.status == "False" then
  hs.status = "Degraded"
  hs.message = describe(accepted, "Not accepted")
  return hs
end

if accepted ~= nil and accepted.status == "True" then
  if converged == nil or converged.status == "True" then
    hs.status = "Healthy"
    if converged ~= nil then
      hs.message = describe(converged, "Accepted and applied")
    else
      hs.message = describe(accepted, "Accepted")
    end
    return hs
  end
  hs.status = "Progressing"
  hs.message = describe(converged, "Waiting for the policy to reach every pod")
  return hs
end

hs.status = "Progressing"
hs.message = "Waiting for the policy to be accepted"
return hs
