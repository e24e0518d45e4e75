-- keywarden: per-key IP allowlists (PostgreSQL). Each entry is a network in CIDR notation as
-- keywarden writes it (`10.0.0.0/8`, `2001:db8::/32`); empty: the key may be used from
-- anywhere. The change feed and audit triggers compare whole rows, so they cover the column.
ALTER TABLE keywarden_keys ADD COLUMN IF NOT EXISTS allowed_ips TEXT[] NOT NULL DEFAULT '{}';
