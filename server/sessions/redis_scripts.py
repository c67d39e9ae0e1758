"""The Lua scripts behind redis_records.py: each check-then-act on a session's keys runs
atomically in Redis (a session is a hash {record, version, updated} and a lease key holding
its holder's token, both with millisecond expiries).

Return codes: -1 the session does not exist, -2 the lease is not the caller's (second
element 1: another holder has it, 0: it lapsed), -3 the version moved on (second element:
the current version).
"""

# KEYS[1]=session ARGV: record, ttl_ms, now_ms. Refuses an existing id.
CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'record', ARGV[1], 'version', 1, 'updated', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS[1]=session KEYS[2]=lease. Record, version and lease PTTL in one snapshot.
READ = """
local f = redis.call('HMGET', KEYS[1], 'record', 'version')
if not f[1] then return nil end
return {f[1], f[2], redis.call('PTTL', KEYS[2])}
"""

# KEYS[1]=session KEYS[2]=lease ARGV: holder, lease_ms, keep_ms.
LEASE = """
local f = redis.call('HMGET', KEYS[1], 'record', 'version')
if not f[1] then return {-1} end
local cur = redis.call('GET', KEYS[2])
if cur and cur ~= ARGV[1] then return {-2, redis.call('PTTL', KEYS[2])} end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, f[1], f[2]}
"""

# KEYS[1]=session KEYS[2]=lease ARGV: holder, lease_ms, keep_ms.
# A lease on a session that has meanwhile expired is dropped, not renewed.
RENEW = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
if redis.call('PEXPIRE', KEYS[1], ARGV[3]) == 0 then
  redis.call('DEL', KEYS[2])
  return 0
end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""

# KEYS[1]=session KEYS[2]=lease ARGV: holder, expected version, record, keep_ms, now_ms.
# HINCRBY keeps the version an exact integer (a Lua number would be formatted
# with %.14g when passed back to Redis).
WRITE = """
local v = redis.call('HGET', KEYS[1], 'version')
if not v then return {-1} end
local cur = redis.call('GET', KEYS[2])
if cur ~= ARGV[1] then
  if cur then return {-2, 1} end
  return {-2, 0}
end
if tonumber(v) ~= tonumber(ARGV[2]) then return {-3, tonumber(v)} end
local nv = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('HSET', KEYS[1], 'record', ARGV[3], 'updated', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {nv}
"""

# KEYS[1]=lease ARGV: holder.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""

# KEYS[1]=session KEYS[2]=lease ARGV: holder ('' = none; never a real holder).
DELETE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local cur = redis.call('GET', KEYS[2])
if cur and cur ~= ARGV[1] then return -2 end
redis.call('DEL', KEYS[1], KEYS[2])
return 1
"""
