-- The append script: stores a batch of a workflow's events atomically (all or none),
-- publishes them, and advances the workflow's progress hash, under a compare-and-set.
-- Loaded once by server/append_script.py, which substitutes PUBLISH_BYTES; its arguments
-- are built in one place, append_script.append_args().
--
-- KEYS (redis_keys.workflow_keys): 1 stream, 2 trimmed, 3 idem, 4 progress, 5 idem order.
-- ARGV:
--   1 channel            the workflow's live channel
--   2 maxlen             events the stream keeps (MAXLEN, exact)
--   3 ttl                seconds every key lives after this append
--   4 publish            PUBLISH, or SPUBLISH on Redis Cluster
--   5 expected ver       the progress hash's `ver` the caller folded from
--   6 E                  how many events
--   7 S                  progress-hash fields to set
--   8 D                  progress-hash fields to delete
--   9 expected last      the hash's `last` the caller folded from ('' = not checked)
--  10 strict             '1': an idempotency key already known counts as a conflict
--  11 R                  fields to read back on a conflict (-1: the whole hash)
--  12 deadline           Redis time (ms) after which the script refuses to run; 0: none
--  13 keep               idempotency keys to keep (the newest; older ones are forgotten)
--  14 lengths            4 numbers per event, separated by spaces: the byte lengths of its
--                        idempotency key ('' for none) and event_type, terminal 0|1, and
--                        the byte length of its JSON
--  15 blob               the events' bytes concatenated (key, event_type, JSON each)
--  16 sets               the S field/value pairs as one flat JSON array of strings
--  17 deletes            the D field names as one JSON array
--  18 publish parts      '1': publish the S pairs (they are all that changed)
--  19 delta              JSON of a fold of node events' changes to the meta part
--                        (progress/parts.py, Delta), or '': see "Merging" below
--  20.. read             the R field names (when R >= 0)
--
-- Returns {ids, added, last, meta, ver}: `ids` in input order (a known idempotency key
-- returns its first id), `last` the newest id added, `meta` false unless merged (below),
-- `ver` the hash's version now. When the caller's view is stale (`ver` or `last`
-- moved since, or, if strict, a key is known) nothing is written and it returns
-- {{}, -1, parts, known}: the R fields of the progress hash (all of it, flat, when R = -1)
-- and per event the id its idempotency key was stored under (false if none), so the
-- caller can fold again without another round trip. Past its deadline: {{}, -2}.
--
-- Merging: with a delta, a stale `ver` or `last` is no conflict when the fold's outcome
-- cannot have changed: the stored meta part has the fold's `plan_known` and
-- `definition_id`, every node its
-- events name has the part the fold started from, and (strict or not) none of its
-- idempotency keys is known. The script then writes the fold's node parts and, instead of
-- the fold's meta part, the stored one advanced by the delta, which is what folding the
-- events after the stored state gives, and returns it as `meta`. Two processes appending
-- node events to one workflow then rarely fold twice.
--
-- The events are published as their SSE frames, ready to send, several to a message:
-- `#<first id> <last id> <count> <terminal 0|1>` and a line break, then `id: <id>`,
-- `event: <event_type>`, `data: <json>` and a blank line per event, up to PUBLISH_BYTES a
-- message (a bigger event goes alone); a terminal event ends its message, so only a
-- message's last event can be terminal. Stored JSON holds no CR or LF (the serializer
-- escapes them), so it is one `data:` line. Every process reading the channel then pays
-- per message, not per event (server/fanout/upstream.py parse_block): the hub's cost per
-- event is what a second worker adds. Then, when asked and small enough, what the append
-- wrote to the progress hash:
-- `=<ver before> <last before or -> <ver> <last> <the S pairs>`, so that other processes
-- keep their cached fold state current (ProgressCache.follow) instead of losing their next
-- compare-and-set to this append.
local stream, trimmed, idem, progress, idem_order = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local channel, maxlen, ttl, publish = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local expected_ver, n, nset, ndel = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]),
  tonumber(ARGV[8])
local expected_last, strict, nread = ARGV[9], ARGV[10] == '1', tonumber(ARGV[11])
local deadline, keep = tonumber(ARGV[12]), tonumber(ARGV[13])
local lengths, blob, sets_json, dels_json = ARGV[14], ARGV[15], ARGV[16], ARGV[17]
local publish_parts, delta_json = ARGV[18] == '1', ARGV[19]
local READ = 20  -- the first of the R field names

-- JSON of the meta part's numbers as integers: cjson writes 14 significant digits, and a
-- timestamp in microseconds has 16.
local function int(x)
  if x == nil or x == cjson.null then return 'null' end
  return string.format('%d', x)
end
local function list(a, each)
  local o = {}
  for i = 1, #a do o[i] = each(a[i]) end
  return '[' .. table.concat(o, ',') .. ']'
end
local function text(x)
  if x == nil or x == cjson.null then return 'null' end
  return cjson.encode(x)
end

-- The stored meta part (decoded) advanced by a fold's delta (see "Merging"), as JSON.
local function merged(m, d)
  local t, c, x = m.t, m.c, m.x
  if d.s ~= cjson.null then m.s, t[2] = d.s, cjson.null end  -- a non-terminal state
  if d.first ~= cjson.null and (t[1] == cjson.null or d.first < t[1]) then t[1] = d.first end
  t[3] = d.last
  -- The running-count integrals over the events' timestamps, as fold._advance_clock.
  local clock, busy, active, peak = t[4], x[2], x[3], x[4]
  local base = #m.r
  local n = base
  local steps = d.steps
  for i = 1, #steps, 2 do
    local ts = steps[i]
    if clock == cjson.null then
      clock = ts
    elseif ts > clock then
      busy = busy + n * (ts - clock)
      if n > 0 then active = active + ts - clock end
      clock = ts
    end
    n = base + steps[i + 1]
    if n > peak then peak = n end
  end
  t[4] = clock
  for i = 1, #c do c[i] = c[i] + d.c[i] end
  local gone = {}
  for _, node in ipairs(d.gone) do gone[node] = true end
  local running = {}
  for _, node in ipairs(m.r) do
    if not gone[node] then running[#running + 1] = node end
  end
  for _, node in ipairs(d.new) do running[#running + 1] = node end
  return '{"v":1,"pk":' .. tostring(m.pk) .. ',"pv":' .. int(m.pv) .. ',"hd":'
    .. tostring(m.hd) .. ',"d":' .. text(m.d) .. ',"mc":' .. int(m.mc) .. ',"s":' .. text(m.s)
    .. ',"t":' .. list(t, int) .. ',"c":' .. list(c, int) .. ',"tot":' .. int(m.tot + d.tot)
    .. ',"r":' .. list(running, text) .. ',"q":' .. int(m.q + d.q) .. ',"x":'
    .. list({x[1] + d.f, busy, active, peak}, int) .. '}'
end

if deadline > 0 then
  local t = redis.call('TIME')
  if tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) > deadline then
    return {{}, -2}
  end
end
local cur = redis.call('HMGET', progress, 'ver', 'last')
local ver = tonumber(cur[1] or '0')
-- One argument for all the events, not four each: redis-py packs each argument on its own
-- (copying what it packed so far), which cost more than the rest of an append.
local lens = {}
for v in string.gmatch(lengths, '%d+') do lens[#lens + 1] = tonumber(v) end
local iks, ts, xs, ds = {}, {}, {}, {}
local pos = 1
for i = 1, n do
  local kl, tl, dl = lens[i * 4 - 3], lens[i * 4 - 2], lens[i * 4]
  iks[i] = string.sub(blob, pos, pos + kl - 1)
  ts[i] = string.sub(blob, pos + kl, pos + kl + tl - 1)
  xs[i] = lens[i * 4 - 1] == 1 and '1' or '0'
  pos = pos + kl + tl
  ds[i] = string.sub(blob, pos, pos + dl - 1)
  pos = pos + dl
end
local stale = ver ~= expected_ver or (expected_last ~= '' and cur[2] ~= expected_last)
local meta = false  -- the merged meta part, when merging
if stale and delta_json ~= '' then
  local d = cjson.decode(delta_json)
  local stored = redis.call('HGET', progress, 'meta')
  local m = stored and cjson.decode(stored)
  local fits = m and m.pk == d.pk and m.d == d.d
  local nodes = d.parts
  for i = 1, #nodes, 2 do
    if not fits then break end
    local part = redis.call('HGET', progress, nodes[i])
    if nodes[i + 1] == cjson.null then fits = not part else fits = part == nodes[i + 1] end
  end
  if fits then
    meta, stale, strict = merged(m, d), false, true
  end
end
if not stale and strict then
  for i = 1, n do
    if iks[i] ~= '' and redis.call('HEXISTS', idem, iks[i]) == 1 then
      stale, meta = true, false
      break
    end
  end
end
if stale then
  local parts
  if nread < 0 then
    parts = redis.call('HGETALL', progress)
  else
    parts = redis.call('HMGET', progress, unpack(ARGV, READ, READ + nread - 1))
  end
  local known = {}
  for i = 1, n do
    if iks[i] ~= '' then known[i] = redis.call('HGET', idem, iks[i]) else known[i] = false end
  end
  return {{}, -1, parts, known}
end
local ids = {}
local added = 0
local last = false
local out, outn = {}, 0
local first, prev = false, false  -- the first and the last id of the message being built
local limit = PUBLISH_BYTES
local function send(terminal)
  redis.call(publish, channel, '#' .. first .. ' ' .. prev .. ' ' .. #out .. ' ' .. terminal
    .. '\n' .. table.concat(out))
  out, outn, first = {}, 0, false
end
for i = 1, n do
  local ik = iks[i]
  local known = false
  if ik ~= '' then known = redis.call('HGET', idem, ik) end
  if known then
    ids[#ids + 1] = known
  else
    local t, x, d = ts[i], xs[i], ds[i]
    local id = redis.call('XADD', stream, '*', 't', t, 'x', x, 'd', d)
    if ik ~= '' then
      redis.call('HSET', idem, ik, id)
      redis.call('RPUSH', idem_order, ik)
    end
    local frame = 'id: ' .. id .. '\nevent: ' .. t .. '\ndata: ' .. d .. '\n\n'
    if outn > 0 and outn + #frame > limit then send('0') end
    out[#out + 1] = frame
    outn = outn + #frame
    first, prev = first or id, id
    if x == '1' then send('1') end
    ids[#ids + 1] = id
    added = added + 1
    last = id
  end
end
if outn > 0 then send('0') end
if added > 0 then
  local len = redis.call('XLEN', stream)
  if len > maxlen then
    local gone = redis.call('XRANGE', stream, '-', '+', 'COUNT', len - maxlen)
    redis.call('SET', trimmed, gone[#gone][1])
    redis.call('XTRIM', stream, 'MAXLEN', maxlen)
  end
  redis.call('HSET', progress, 'ver', ver + added, 'last', last)
  -- A plan's 10,000 nodes as 20,000 arguments cost redis-py 15-25 ms of packing on the
  -- client's event loop; as one JSON argument, one C call. Written 1,000 values a command
  -- (unpack() has a limit near 8,000).
  local sets, dels = cjson.decode(sets_json), cjson.decode(dels_json)
  if meta then  -- sets begin with the fold's meta part (parts.fold_parts)
    sets[2] = meta
    sets_json = cjson.encode(sets)
  end
  for k = 1, 2 * nset, 1000 do
    redis.call('HSET', progress, unpack(sets, k, math.min(k + 999, 2 * nset)))
  end
  for k = 1, ndel, 1000 do
    redis.call('HDEL', progress, unpack(dels, k, math.min(k + 999, ndel)))
  end
  if publish_parts and #sets_json <= limit then
    redis.call(publish, channel, '=' .. ver .. ' ' .. (cur[2] or '-') .. ' ' .. (ver + added)
      .. ' ' .. last .. ' ' .. sets_json)
  end
  -- Idempotency keys are forgotten oldest first beyond the newest `keep` (a retry comes
  -- within seconds; without a bound the hash grows with every keyed event for a day).
  local over = redis.call('LLEN', idem_order) - keep
  if over > 0 then
    local old = redis.call('LPOP', idem_order, math.min(over, 1000))
    redis.call('HDEL', idem, unpack(old))
  end
  for k = 1, 5 do
    if redis.call('EXISTS', KEYS[k]) == 1 then redis.call('EXPIRE', KEYS[k], ttl) end
  end
end
return {ids, added, last, meta, ver + added}
