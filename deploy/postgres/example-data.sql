-- Example identity data for deploy/postgres/schema.sql: two tenants, a
-- nested group (backend in eng), a role hierarchy (acme/editor in editor).
INSERT INTO tenants VALUES ('acme', 'Acme', 'enterprise', false), ('globex', 'Globex', 'free', false);
INSERT INTO roles VALUES ('editor', NULL, 'editor', NULL), ('acme/editor', 'acme', 'editor', 'editor');
INSERT INTO groups VALUES ('eng', 'acme', 'Engineering', NULL), ('backend', 'acme', 'Backend', 'eng');
INSERT INTO users VALUES
  ('bob', 'acme', 'bob@acme.test', 'active', '{"department": "eng", "clearance": 2}'),
  ('ann', 'acme', 'ann@acme.test', 'active', '{"department": "sales", "clearance": 0}'),
  ('gina', 'globex', 'gina@globex.test', 'active', '{}');
INSERT INTO memberships VALUES ('bob', 'backend');
