-- CheckAndReserve's decision, as a function: reserve.lua runs it once,
-- reserve_all.lua once per item of an all_or_nothing batch, quote.lua once as
-- a dry run (Quote). It reads its arguments with next_arg() (all of them
-- before any return) and returns the encoded reply.
--
-- The whole decision in one atomic step.
--
-- Order: replay of a known reservation_id; time-zone agreement; lazy expiry
-- of this account's lots and holds; entitlement; the concurrency cap; one
-- free unit of every limit of the product when all enforced limits have
-- room (a metered product: its estimated cost in credits of every limit, the
-- included usage, when all enforced limits have room for all of it); else the
-- full cost in credits (within the monthly spend cap), soonest-expiring lots
-- first; else a denial. A job is funded wholly by one or the other. Limits in shadow mode are evaluated and reported but never
-- refuse anything. Denials are not recorded: they hold nothing, so a retry
-- decides again.
--
-- The reservation record (res hash): s = state ("held", "committed",
-- "released", "expired"), p = product, fp = request fingerprint, f = funding
-- ("free" or "credits"), fw = free units taken ("h<field>" / "z<member>"),
-- fu = the included usage each of them counts (metered products only; absent = 1 unit;
-- Commit sets it to the actual usage and fh to the estimate held),
-- c = credits held, l = flat {lot_id, credits, lot_expires_ms} triples the
-- credits came from, m = spend month, pv = plans version, cr = created_ms,
-- e = expires_ms, ttl = ttl_ms, pl = the account's plan, rc = the reserved
-- job's cost (a commit's actual job may not exceed it), ch = credits charged, rf = credits returned
-- at commit, rj = credits given back by RefundJob (set once), r =
-- resolved_ms, d = the decision to replay (its JSON reply, as a string; only while held: resolve() drops it).
--
-- Times are in milliseconds; credits are integers.
-- swept: lazy expiry already ran for this call (reserve_all.lua runs it once for the batch).
-- dry_run: Quote. The same decision and the same reply, but nothing of its own is written: no
-- hold, record, outbox entry, usage event or note. Only lazy expiry writes (settle_if_due and
-- sweep, as for CheckAndReserve): it records what time already decided, and the answer is then
-- CheckAndReserve's by construction instead of by a second model of what settling changes.
local function reserve_one(swept, dry_run)
  local rid           = next_arg()
  local product       = next_arg()
  local fingerprint   = next_arg()
  local ttl_ms        = tonumber(next_arg())
  local default_plan  = next_arg()
  local expected_tz   = next_arg()
  local warn_percent  = tonumber(next_arg())
  -- Blocks of {label, start_ms, end_ms}: read in place (see skip_block).
  local days_at, weeks_at, months_at = skip_block(3), skip_block(3), skip_block(3)
  -- Segments: the plans in force from from_ms on (a change scheduled near now
  -- gives two). Each: from_ms, the job's cost, the plans version, whether the product is
  -- metered (1: its limits count included usage, the job's cost of each; 0: one unit per job), then rows
  -- {plan, entitled 0|1, credits_low, max_concurrent, concurrency shadow 0|1, limits JSON}.
  -- The last segment begun by Redis' now decides, so every sidecar switches at once.
  local cost_credits, plans_version, rows_at, metered = nil, nil, nil, nil
  for _ = 1, tonumber(next_arg()) do
    local from_ms, cost, version, is_metered = tonumber(next_arg()), tonumber(next_arg()), next_arg(), next_arg()
    local at = skip_block(6)
    if from_ms <= now_ms then cost_credits, plans_version, rows_at, metered = cost, version, at, is_metered == '1' end
  end
  local packs_at      = skip_block(4)  -- {pack_id, credits, price minor units, currency}
  -- The job's cameos as this sidecar's registry knows them: {cameo_id, owner, fee, active 0|1}
  -- (an unknown cameo is sent inactive). Their fees are stamped on the hold.
  local cameos_at     = skip_block(4)
  -- A usage event (and its note) of this decision; a quote's decision tells no one.
  local function notify(note, kind, fields)
    if not dry_run then emit_once(note, kind, fields) end
  end

  local existing = load_record(rid)
  if existing then
    if existing.fp ~= fingerprint then return fail('RESERVATION_PARAMS_MISMATCH') end
    -- A replay tells the truth about the reservation now: only a live hold replays as
    -- allowed. A retried job under a resolved id must not run: nothing funds it any more.
    settle_if_due(rid, existing)
    local refusal = RESOLVED_REFUSALS[existing.s]
    if refusal then return fail(refusal, {resolved_ms = existing.r}) end
    local d = cjson.decode(existing.d)
    d.replayed, d.expires_ms = 1, existing.e  -- an extension moved the expiry since
    return reply(d)
  end

  -- Everything the decision reads of the account, read (and checked) before anything is
  -- written: Redis keeps a script's writes when it fails midway.
  local acct = redis.call('HMGET', K_ACCT, 'plan', 'tz', 'ovr|' .. product, 'cap', 'at_on', 'at_thr', 'at_pack',
                          'debt')
  local plan, tz, override = acct[1] or default_plan, acct[2] or 'UTC', acct[3]
  local cap, topup_on, topup_threshold, topup_pack = tonumber(acct[4] or '0'), acct[5] == '1', tonumber(acct[6]), acct[7]
  -- The sidecar computed windows for the zone it believed; it retries with ours.
  if tz ~= expected_tz then return fail('TZ_MISMATCH', {tz = tz, plan = plan}) end

  local row = find_row(rows_at, 6, plan)  -- {plan, entitled, credits_low, max_concurrent, shadow, limits}
  if row == nil then return fail('UNKNOWN_PLAN', {plan = plan}) end
  local entitled, credits_low = ARGV[row + 1] == '1', tonumber(ARGV[row + 2])
  local label, window_end_ms = window_at(days_at)
  local week_label, week_end_ms = window_at(weeks_at)
  local month = window_at(months_at)
  if label == nil or week_label == nil or month == nil then return fail('CLOCK_SKEW', {now_ms = now_ms}) end

  -- An account's own override (an enterprise contract) replaces the plan's limits.
  local limits, max_concurrent = cjson.decode(ARGV[row + 5]), tonumber(ARGV[row + 3])
  local concurrency_shadow = ARGV[row + 4] == '1'
  if override then
    local o = cjson.decode(override)
    limits, max_concurrent, concurrency_shadow = o.limits, o.max_concurrent, false
  end

  -- Open debt is paid first from what the lots hold (a release returned credits, say), for a
  -- quote too: like lazy expiry, it settles what is already due, so a quote answers as the
  -- reservation would. reserve_all.lua settles both once, for real, before its items.
  local debt = tonumber(acct[8] or '0')
  if not swept then
    sweep()
    debt = repay_debt(debt)
  end

  -- What a free job takes of each limit: 1 unit, or a metered job's whole estimated cost.
  local usage = metered and cost_credits or nil
  local amount = usage or 1
  -- Every limit's state; the most constrained enforced one is the headline.
  local statuses, room, shadow_hits = {}, true, {}
  local headline = nil
  for i, limit in ipairs(limits) do
    local used, resets_ms, key = limit_state(product, limit, {label, window_end_ms}, {week_label, week_end_ms})
    local st = {id = limit.id, kind = limit.kind, hours = limit.hours, used = used, limit = limit.free,
                resets_ms = resets_ms, shadow = limit.shadow, key = key}
    statuses[i] = st
    if used + amount > limit.free then
      if limit.shadow == 1 then shadow_hits[#shadow_hits + 1] = limit.id else room = false end
    end
    if limit.shadow ~= 1 and (headline == nil or limit.free - used < headline.limit - headline.used) then
      headline = st
    end
  end
  headline = headline or {used = 0, limit = 0, resets_ms = window_end_ms}

  local lots, balance = live_lots()
  local inflight = tonumber(redis.call('HGET', K_INFLIGHT, product) or '0')
  local decision = {
    allowed = 0, plan = plan, tz = tz, cost = cost_credits, free_used = headline.used,
    free_limit = headline.limit, resets_ms = headline.resets_ms, balance = balance,
    held = 0, expires_ms = 0, now_ms = now_ms, replayed = 0, pv = plans_version,
  }

  local function report_limits(taken)
    local out = {}
    for i, st in ipairs(statuses) do
      out[i] = {st.id, st.kind, st.hours, st.used + (taken and amount or 0), st.limit, st.resets_ms, st.shadow}
    end
    decision.limits = out
    if taken then decision.free_used = headline.used + (headline.limit > 0 and amount or 0) end
    if #shadow_hits > 0 then decision.shadow = shadow_hits end
  end

  if not entitled then
    report_limits(false)
    decision.denial = 'NOT_ENTITLED'
    return reply(decision)
  end
  -- Cameo fees: each active cameo's fee, per use; an inactive or unknown one refuses the job.
  local fees, royalties = 0, {}
  for i = 1, tonumber(ARGV[cameos_at]) do
    local c = cameos_at + 1 + (i - 1) * 4
    if ARGV[c + 3] ~= '1' then
      report_limits(false)
      decision.denial = 'NOT_ENTITLED'
      decision.cameo = ARGV[c]
      return reply(decision)
    end
    local fee = tonumber(ARGV[c + 2])
    if fee > 0 then
      fees = fees + fee
      royalties[#royalties + 1] = ARGV[c] .. '|' .. ARGV[c + 1] .. '|' .. fee
    end
  end
  if fees > 0 then decision.fees = fees end
  -- Open debt (what the lots could not pay) refuses every new job, free ones included,
  -- until credits come in: the shortfall is the debt plus what the job itself would take
  -- from credits (its cost, or a free job's cameo fees), less what the lots hold.
  if debt > 0 then
    report_limits(false)
    local cost = room and fees or (cost_credits + fees)
    decision.debt = debt
    decision.short = math.max(debt, debt + cost - balance)
    decision.denial = 'PURCHASE_REQUIRED'
    return reply(decision)
  end
  -- The account-wide bound on open holds (what one account may make Redis keep) is never in shadow.
  local open_holds = redis.call('ZCARD', K_HOLDS)
  if open_holds >= MAX_HOLDS then
    report_limits(false)
    decision.denial = 'CONCURRENCY_LIMIT'
    decision.in_flight, decision.max_concurrent = open_holds, MAX_HOLDS
    return reply(decision)
  end
  if max_concurrent > 0 and inflight >= max_concurrent then
    if not concurrency_shadow then
      report_limits(false)
      decision.denial = 'CONCURRENCY_LIMIT'
      decision.in_flight, decision.max_concurrent = inflight, max_concurrent
      return reply(decision)
    end
    shadow_hits[#shadow_hits + 1] = 'concurrency'
  end

  local function offers_json(short)
    local offers = {}
    for i = 1, tonumber(ARGV[packs_at]) do
      local p = packs_at + 1 + (i - 1) * 4
      local credits = tonumber(ARGV[p + 1])
      local quantity = math.ceil(short / credits)
      offers[#offers + 1] = {pack_id = ARGV[p], credits = credits, quantity = quantity,
                             total_minor = quantity * tonumber(ARGV[p + 2]), currency = ARGV[p + 3]}
    end
    return cjson.encode(offers)
  end

  local rec = {s = 'held', p = product, fp = fingerprint, c = 0, l = {}, fw = {}, m = '', pv = plans_version,
               cr = now_ms, e = now_ms + ttl_ms, ttl = ttl_ms, pl = plan, rc = cost_credits}
  if fees > 0 then rec.cf, rec.cm = fees, table.concat(royalties, ',') end
  -- What credits pay: the whole cost, or only the cameo fees when the free allowance pays the generation.
  local credits_cost = cost_credits + fees
  decision.cost = credits_cost

  -- The reply first (what a quote answers), then the writes that make it true.
  local function hold_free()
    rec.f, rec.fu = 'free', usage
    report_limits(true)
    if dry_run then return '[]' end
    -- The oldest candidate of each block is its first row.
    if headline.used == 0 then prune_old_windows(ARGV[days_at + 1], ARGV[weeks_at + 1], ARGV[months_at + 1]) end
    local units = {}
    for i, st in ipairs(statuses) do
      rec.fw[i] = take_free_unit(st.key, rid, usage)
      units[i] = {k = rec.fw[i], u = st.used + amount, l = st.limit, s = st.shadow}
    end
    local scope = product .. '|' .. label
    local usage = {'product', product, 'window', label, 'used', decision.free_used, 'limit', headline.limit}
    if headline.limit > 0 and decision.free_used * 100 >= warn_percent * headline.limit then
      notify('free_warning|' .. scope, 'free_warning', usage)
    end
    if headline.limit > 0 and decision.free_used == headline.limit then
      notify('free_exhausted|' .. scope, 'free_exhausted', usage)
    end
    return cjson.encode(units)
  end

  -- Soonest expiry (then promo before purchase) first, as live_lots orders them.
  local function hold_credits(amount)
    if rec.f == nil then rec.f = 'credits' end
    rec.c, rec.m = amount, month
    decision.held = amount
    decision.balance = balance - amount
    if rec.f == 'credits' then report_limits(false) end
    if dry_run then return end
    local need = amount
    for i = 1, #lots, 3 do
      if need == 0 then break end
      local lot_id, left = lots[i], lots[i + 1]
      local take = math.min(left, need)
      redis.call('HINCRBY', K_LOTREM, lot_id, -take)
      if take == left then redis.call('ZREM', K_LOTEXP, lot_id) end
      local taken = rec.l
      taken[#taken + 1] = lot_id
      taken[#taken + 1] = take
      taken[#taken + 1] = lots[i + 2]
      need = need - take
    end
    hold_lots(rec.l)
    redis.call('HINCRBY', K_SPEND, month, amount)
    incr('credits_held', amount)
  end

  local function after_balance_drop(new_balance)
    if credits_low > 0 and new_balance < credits_low then
      notify('credits_low', 'credits_low', {'balance', new_balance, 'threshold', credits_low, 'plan', plan})
    end
    if topup_on and new_balance < topup_threshold then
      notify('auto_topup', 'auto_topup_requested', {'balance', new_balance, 'threshold', topup_threshold,
                                                    'pack_id', topup_pack})
    end
  end

  -- A free job's cameo fees still come from credits (the rights-holder is paid): the
  -- generation from the free allowance, the fees from credits, in one hold.
  local paid = room and fees or credits_cost
  local free_units = '[]'
  if room and fees == 0 then
    free_units = hold_free()
  elseif balance >= paid then
    -- Checked before hold_credits writes anything: the values are used only on this path.
    if cap == nil or (topup_on and topup_threshold == nil) then return fail('ACCOUNT_CORRUPT', {plan = plan}) end
    local month_spend = tonumber(redis.call('HGET', K_SPEND, month) or '0')
    if cap > 0 and month_spend + paid > cap then
      report_limits(false)
      decision.month_spend, decision.cap = month_spend, cap
      decision.denial = 'BUDGET_EXCEEDED'
      notify('budget_reached|' .. month, 'budget_reached', {'month', month, 'cap', cap, 'spend', month_spend})
      return reply(decision)
    end
    if room then free_units = hold_free() end
    hold_credits(paid)
    if cap > 0 and month_spend + paid == cap then
      notify('budget_reached|' .. month, 'budget_reached', {'month', month, 'cap', cap, 'spend', cap})
    end
    after_balance_drop(decision.balance)
  else
    report_limits(false)
    decision.short = paid - balance
    decision.denial = 'PURCHASE_REQUIRED'
    notify('purchase_required|' .. product .. '|' .. label, 'purchase_required',
           {'product', product, 'window', label, 'credits_short', decision.short, 'cost', paid,
            'offers', offers_json(decision.short)})
    return reply(decision)
  end

  decision.allowed = 1
  decision.funding = rec.f
  decision.expires_ms = rec.e
  if dry_run then return reply(decision) end
  -- Encoded once: the reply, and what a replay answers (a string in the record, so
  -- commits and releases do not decode and re-encode it).
  local answer = reply(decision)
  rec.d = answer
  save_record(rid, rec)
  redis.call('ZADD', K_HOLDS, rec.e, rid)
  redis.call('HINCRBY', K_INFLIGHT, product, 1)
  local free = rec.f == 'free'
  local fields = {'credits', rec.c, 'free', free and 1 or 0, 'window', label, 'free_units', free_units,
                  'month', rec.m, 'lots', lots_text(rec.l), 'cost', cost_credits}
  if rec.cf then
    for _, v in ipairs({'fees', rec.cf, 'roy', rec.cm}) do fields[#fields + 1] = v end
  end
  if free and usage then
    fields[#fields + 1] = 'usage'
    fields[#fields + 1] = usage
  end
  ledger('hold', {f = free and amount or 0, h = rec.c}, hold_fields(rid, rec, fields))
  return answer
end
