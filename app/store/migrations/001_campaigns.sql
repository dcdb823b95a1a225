-- Campaign definitions and their pre-split envelopes: PostgreSQL is the source of
-- truth for both, so a campaign's Redis state can always be rebuilt from here.
CREATE TABLE campaigns (
    id           text PRIMARY KEY,
    kind         text NOT NULL CHECK (kind IN ('red_packet', 'lottery')),
    name         text NOT NULL,
    total_fen    bigint CHECK (total_fen > 0),
    count        integer CHECK (count > 0),
    min_fen      bigint CHECK (min_fen > 0),
    max_fen      bigint,
    starts_at    timestamptz,
    ends_at      timestamptz,
    config       jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- No foreign key to campaigns: a per-row FK check would dominate the COPY of millions
-- of envelopes; both are written in one transaction, campaign first.
CREATE TABLE envelopes (
    campaign_id  text NOT NULL,
    seq          integer NOT NULL CHECK (seq >= 0),
    amount_fen   bigint NOT NULL CHECK (amount_fen > 0),
    PRIMARY KEY (campaign_id, seq)
);
