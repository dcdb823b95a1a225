-- Named operators: each holds a bearer token of 256 random bits, of which only the
-- SHA-256 is kept. Revoked operators stay listed (the audit log names them); a name is
-- held by at most one live operator, so it can be given out again after a revocation.
CREATE TABLE operators (
    id            bigserial PRIMARY KEY,
    name          text NOT NULL CHECK (length(name) BETWEEN 1 AND 50),
    role          text NOT NULL CHECK (role IN ('admin', 'viewer')),
    token_sha256  bytea NOT NULL UNIQUE CHECK (length(token_sha256) = 32),
    created_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz
);
CREATE UNIQUE INDEX operators_live_name ON operators (name) WHERE revoked_at IS NULL;

-- One row per state-changing operator call (create, end, pause, resume, ...), written
-- once its answer is known: who (operator, role), what (method, path, campaign), the
-- status answered, from where (the client address HAProxy forwards) and the request id.
-- Read newest first by id (the primary key).
CREATE TABLE audit_log (
    id           bigserial PRIMARY KEY,
    at           timestamptz NOT NULL DEFAULT now(),
    operator     text NOT NULL,
    role         text NOT NULL,
    method       text NOT NULL,
    path         text NOT NULL,
    campaign_id  text,
    status       integer NOT NULL,
    remote       text,
    request_id   text
);

-- The operators' campaign list pages newest first by (created_at, id).
CREATE INDEX campaigns_newest ON campaigns (created_at DESC, id DESC);
