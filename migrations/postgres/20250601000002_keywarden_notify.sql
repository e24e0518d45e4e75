-- keywarden: cross-instance invalidation. Every change that matters for verification
-- notifies `keywarden_invalidate` with "<schema> key <id>" (or "<schema> created" for a new
-- key), whoever made it: an instance, the CLI, or plain SQL. Usage updates (last_used_at,
-- use_count) do not notify, so write-behind flushes do not churn every instance's cache.
CREATE OR REPLACE FUNCTION keywarden_notify_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM pg_notify('keywarden_invalidate', TG_TABLE_SCHEMA || ' created');
        RETURN NULL;
    END IF;
    IF TG_OP = 'UPDATE'
       AND (to_jsonb(OLD) - 'last_used_at' - 'use_count' - 'updated_at')
           = (to_jsonb(NEW) - 'last_used_at' - 'use_count' - 'updated_at') THEN
        RETURN NULL;
    END IF;
    PERFORM pg_notify('keywarden_invalidate', TG_TABLE_SCHEMA || ' key ' || OLD.id::text);
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS keywarden_keys_notify ON keywarden_keys;
CREATE TRIGGER keywarden_keys_notify
    AFTER INSERT OR UPDATE OR DELETE ON keywarden_keys
    FOR EACH ROW EXECUTE FUNCTION keywarden_notify_change();
