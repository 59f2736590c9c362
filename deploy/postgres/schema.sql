-- Arbiter reference identity schema for a customer-IAM product, with the
-- change log Arbiter follows. Load it with:
--   psql -v ON_ERROR_STOP=1 -d <database> -f deploy/postgres/schema.sql
--
-- Three parts:
--   1. the identity tables (tenants, users, groups with nesting, roles,
--      memberships, role assignments);
--   2. `arbiter_entities`, the default mapping from rows to Cedar entities
--      (entity_type, entity_id, attrs jsonb, parents jsonb), in the types of
--      the example schema in policies/schema.cedarschema;
--   3. the change log: triggers append the uid of every entity a row change
--      affects to `arbiter_change_log` and NOTIFY `arbiter_changes`.
--
-- Commit order: `arbiter_log_change` takes a transaction-level advisory lock
-- before it draws a sequence number, so transactions that change identity
-- data hand out change-log positions one after the other and commit in that
-- order: when a reader sees position N, every position below N that will
-- ever commit has already committed. Arbiter can then resume from "the last
-- position applied" without skipping a change that commits late. The cost is
-- that writers of identity data are serialised from their first change to
-- their commit; keep those transactions short.

CREATE TABLE tenants (
    id         text PRIMARY KEY,
    name       text NOT NULL,
    plan       text NOT NULL DEFAULT 'free',
    suspended  boolean NOT NULL DEFAULT false
);

CREATE TABLE users (
    id          text PRIMARY KEY,
    tenant_id   text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    email       text NOT NULL,
    status      text NOT NULL DEFAULT 'active',
    -- Free-form attributes, merged into the Cedar entity's attributes.
    attributes  jsonb NOT NULL DEFAULT '{}'
);

CREATE TABLE groups (
    id         text PRIMARY KEY,
    tenant_id  text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name       text NOT NULL,
    -- Nesting: the group this group is in.
    parent_id  text REFERENCES groups (id) ON DELETE SET NULL
);

CREATE TABLE roles (
    id         text PRIMARY KEY,
    -- NULL for the global base roles.
    tenant_id  text REFERENCES tenants (id) ON DELETE CASCADE,
    name       text NOT NULL,
    -- Role hierarchy: a tenant role is in a base role ("acme/editor" in "editor").
    parent_id  text REFERENCES roles (id) ON DELETE SET NULL
);

CREATE TABLE memberships (
    user_id   text NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    group_id  text NOT NULL REFERENCES groups (id) ON DELETE CASCADE,
    PRIMARY KEY (user_id, group_id)
);
CREATE INDEX memberships_group ON memberships (group_id);

CREATE TABLE role_assignments (
    user_id  text NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role_id  text NOT NULL REFERENCES roles (id) ON DELETE CASCADE,
    PRIMARY KEY (user_id, role_id)
);
CREATE INDEX role_assignments_role ON role_assignments (role_id);

-- The default mapping. Arbiter reads it whole at start and on
-- reconciliation, and one entity at a time (WHERE entity_type = $1 AND
-- entity_id = $2) for each change. Columns: entity_type text, entity_id
-- text, attrs jsonb (a Cedar attribute object; entity references as
-- {"__entity": {"type": ..., "id": ...}}), parents jsonb (an array of
-- {"type": ..., "id": ...}).
CREATE FUNCTION arbiter_ref(entity_type text, entity_id text) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN entity_id IS NULL THEN NULL
        ELSE jsonb_build_object('__entity', jsonb_build_object('type', entity_type, 'id', entity_id)) END
$$;

CREATE FUNCTION arbiter_uids(entity_type text, ids text[]) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_object('type', entity_type, 'id', id) ORDER BY id), '[]'::jsonb)
    FROM unnest(ids) AS id WHERE id IS NOT NULL
$$;

CREATE VIEW arbiter_entities AS
SELECT 'Saas::Tenant'::text AS entity_type, t.id AS entity_id,
       jsonb_build_object('name', t.name, 'plan', t.plan, 'suspended', t.suspended) AS attrs,
       '[]'::jsonb AS parents
FROM tenants t
UNION ALL
SELECT 'Saas::Role', r.id,
       jsonb_strip_nulls(jsonb_build_object('name', r.name, 'tenant', arbiter_ref('Saas::Tenant', r.tenant_id))),
       arbiter_uids('Saas::Role', ARRAY[r.parent_id])
FROM roles r
UNION ALL
SELECT 'Saas::Group', g.id,
       jsonb_build_object('name', g.name, 'tenant', arbiter_ref('Saas::Tenant', g.tenant_id)),
       arbiter_uids('Saas::Group', ARRAY[g.parent_id])
FROM groups g
UNION ALL
SELECT 'Saas::User', u.id,
       u.attributes || jsonb_build_object(
           'tenant', arbiter_ref('Saas::Tenant', u.tenant_id),
           'email', u.email,
           'status', u.status),
       arbiter_uids('Saas::Group', ARRAY(SELECT m.group_id FROM memberships m WHERE m.user_id = u.id))
       || arbiter_uids('Saas::Role', ARRAY(SELECT a.role_id FROM role_assignments a WHERE a.user_id = u.id))
FROM users u;

-- The change log: one row per affected entity per change, in commit order.
CREATE TABLE arbiter_change_log (
    seq          bigserial PRIMARY KEY,
    entity_type  text NOT NULL,
    entity_id    text NOT NULL,
    changed_at   timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Records that the entity `entity_type`/`entity_id` changed. Every writer
-- of the change log must go through this function (it takes the lock that
-- keeps positions in commit order).
CREATE FUNCTION arbiter_log_change(entity_type text, entity_id text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF entity_id IS NULL THEN
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock(74201);
    INSERT INTO arbiter_change_log (entity_type, entity_id) VALUES (entity_type, entity_id);
    PERFORM pg_notify('arbiter_changes', '');
END
$$;

-- The change-log position of this session's last identity write: pass it
-- as `min_data_revision` to get decisions that see the write.
CREATE FUNCTION arbiter_write_position() RETURNS bigint
LANGUAGE sql AS $$
    SELECT currval(pg_get_serial_sequence('arbiter_change_log', 'seq'))
$$;

-- Row trigger: TG_ARGV[0] is the Cedar entity type, TG_ARGV[1] the column
-- holding the entity id. Logs the old and the new id.
CREATE FUNCTION arbiter_track() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    old_id text;
    new_id text;
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        old_id := to_jsonb(OLD) ->> TG_ARGV[1];
        PERFORM arbiter_log_change(TG_ARGV[0], old_id);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        new_id := to_jsonb(NEW) ->> TG_ARGV[1];
        IF old_id IS DISTINCT FROM new_id THEN
            PERFORM arbiter_log_change(TG_ARGV[0], new_id);
        END IF;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER arbiter_track AFTER INSERT OR UPDATE OR DELETE ON tenants
    FOR EACH ROW EXECUTE FUNCTION arbiter_track('Saas::Tenant', 'id');
CREATE TRIGGER arbiter_track AFTER INSERT OR UPDATE OR DELETE ON users
    FOR EACH ROW EXECUTE FUNCTION arbiter_track('Saas::User', 'id');
CREATE TRIGGER arbiter_track AFTER INSERT OR UPDATE OR DELETE ON groups
    FOR EACH ROW EXECUTE FUNCTION arbiter_track('Saas::Group', 'id');
CREATE TRIGGER arbiter_track AFTER INSERT OR UPDATE OR DELETE ON roles
    FOR EACH ROW EXECUTE FUNCTION arbiter_track('Saas::Role', 'id');
CREATE TRIGGER arbiter_track AFTER INSERT OR UPDATE OR DELETE ON memberships
    FOR EACH ROW EXECUTE FUNCTION arbiter_track('Saas::User', 'user_id');
CREATE TRIGGER arbiter_track AFTER INSERT OR UPDATE OR DELETE ON role_assignments
    FOR EACH ROW EXECUTE FUNCTION arbiter_track('Saas::User', 'user_id');
