"""Sessions as data: the backend interface the servicer uses (backend.py), sessions in this
process (memory.py) or shared by replicas through Redis (redis_store.py over the leased,
versioned records of redis_records.py), the portable session record format (record.py),
and the prefix-state cache (prefix_cache.py)."""
