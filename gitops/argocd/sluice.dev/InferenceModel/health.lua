-- Argo CD health check for sluice.dev/InferenceModel.
-- Healthy: Ready=True for the current generation. Progressing: no status yet, the operator has
-- not observed the current generation, or Progressing=True (rollout, canary analysis).
-- Degraded: Degraded=True (e.g. CanaryRolledBack), or Ready=False for a reason that needs a person.
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

-- Ready=False reasons that only resolve with time; every other reason is a failure.
local transient = {
  Pending = true,
  Progressing = true,
  Reconciling = true,
  RollingOut = true,
  Scaling = true,
  ScaledToZero = true,
  Loading = true,
  ModelLoading = true,
  WaitingForPods = true,
  PodsNotReady = true,
  Initializing = true,
}

local function failed(reason)
  if reason == nil or reason == "" then
    return false
  end
  return transient[reason] == nil
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
    hs.message = "Waiting for the sluice operator to observe the InferenceModel"
  end
  return hs
end

local conditions = obj.status.conditions
local degraded = condition(conditions, "Degraded")
local ready = condition(conditions, "Ready")
local progressing = condition(conditions, "Progressing")

if degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(degraded, "Degraded")
  return hs
end

if ready ~= nil and ready.status == "False" and failed(ready.reason) then
  hs.status = "Degraded"
  hs.message = describe(ready, "Not ready")
  return hs
end

if progressing ~= nil and progressing.status == "True" then
  hs.status = "Progressing"
  hs.message = describe(progressing, "Progressing")
  return hs
end

if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  if obj.status.endpoint ~= nil and obj.status.endpoint ~= "" then
    hs.message = "Serving at " .. obj.status.endpoint
  else
    hs.message = describe(ready, "Ready")
  end
  return hs
end

hs.status = "Progressing"
if ready ~= nil then
  hs.message = describe(ready, "Waiting for the model to become ready")
else
  hs.message = "Waiting for the model to become ready"
end
return hs
