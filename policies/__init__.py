"""Pure decision rules: rate-limit algorithms (`policies.ratelimit`) and shed ladders
(`policies.ladder`). Standard library only; time is always passed in as `now`."""
