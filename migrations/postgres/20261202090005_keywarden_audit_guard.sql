-- keywarden: the plain-SQL audit trigger function, guarded (it runs as its owner, SECURITY
-- DEFINER): it acts only as the trigger of keywarden's own keywarden_keys (same owner, not a
-- temporary table), and no other role may attach it anywhere (EXECUTE revoked from PUBLIC;
-- PostgreSQL checks it when a trigger is created, so the existing trigger keeps working).
CREATE OR REPLACE FUNCTION keywarden_audit_sql_change() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    hidden  text[] := ARRAY['id', 'digest', 'secret_id', 'encrypted_key', 'last_used_at',
                            'use_count', 'updated_at', 'display_start'];
    old_row jsonb := CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) - hidden END;
    new_row jsonb := CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) - hidden END;
    target  jsonb := CASE WHEN TG_OP = 'DELETE' THEN to_jsonb(OLD) ELSE to_jsonb(NEW) END;
    changes jsonb := '{}'::jsonb;
    credential boolean := false;
    audited boolean;
    action  text;
    field   text;
BEGIN
    -- Only for a keywarden_keys table owned by this function's owner: a trigger some other
    -- role attached to a table of its own (a temporary one, say) must not run the statements
    -- below, with this owner's rights, against tables it chose.
    IF TG_TABLE_NAME <> 'keywarden_keys'
       OR TG_TABLE_SCHEMA LIKE 'pg\_temp%' OR TG_TABLE_SCHEMA LIKE 'pg\_toast%'
       OR (SELECT c.relowner FROM pg_class AS c WHERE c.oid = TG_RELID)
          IS DISTINCT FROM (SELECT r.oid FROM pg_roles AS r WHERE r.rolname = current_user)
    THEN
        RAISE EXCEPTION 'keywarden_audit_sql_change may only be the trigger of keywarden''s own keywarden_keys';
    END IF;
    EXECUTE format('SELECT EXISTS (SELECT 1 FROM %I.keywarden_audit_tx WHERE txid = $1)',
                   TG_TABLE_SCHEMA)
        INTO audited USING txid_current();
    IF audited THEN
        RETURN NULL;
    END IF;
    IF TG_OP = 'UPDATE' THEN
        credential := OLD.digest IS DISTINCT FROM NEW.digest
                      OR OLD.secret_id IS DISTINCT FROM NEW.secret_id;
        IF old_row = new_row AND NOT credential THEN
            RETURN NULL;
        END IF;
    END IF;
    IF TG_OP = 'INSERT' THEN
        action := 'key.created';
    ELSIF TG_OP = 'DELETE' THEN
        action := 'key.deleted';
    ELSIF OLD.revoked_at IS NULL AND NEW.revoked_at IS NOT NULL THEN
        action := 'key.revoked';
    ELSIF OLD.disabled AND NOT NEW.disabled THEN
        action := 'key.enabled';
    ELSIF NOT OLD.disabled AND NEW.disabled THEN
        action := 'key.disabled';
    ELSE
        action := 'key.updated';
    END IF;
    IF TG_OP <> 'DELETE' THEN
        FOR field IN SELECT jsonb_object_keys(new_row) LOOP
            IF (old_row -> field) IS DISTINCT FROM (new_row -> field) THEN
                changes := changes || jsonb_build_object(field, jsonb_build_object(
                    'from', coalesce(old_row -> field, 'null'::jsonb),
                    'to', new_row -> field));
            END IF;
        END LOOP;
    END IF;
    IF credential THEN
        changes := changes || '{"credential": "changed"}'::jsonb;
    END IF;
    EXECUTE format('INSERT INTO %I.keywarden_audit_pending '
                   '(action, key_id, collection, subject, changes, db_role) '
                   'VALUES ($1, $2, $3, $4, $5, $6)',
                   TG_TABLE_SCHEMA)
        USING action, (target ->> 'id')::uuid, target ->> 'collection', target ->> 'subject',
              changes, session_user::text;
    RETURN NULL;
END
$$;

REVOKE EXECUTE ON FUNCTION keywarden_audit_sql_change() FROM PUBLIC;
REVOKE ALL ON keywarden_audit_tx, keywarden_audit_pending, keywarden_audit,
    keywarden_audit_checkpoint FROM PUBLIC;
