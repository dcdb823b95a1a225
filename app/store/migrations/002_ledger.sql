-- The durable ledger: one row per envelope granted, copied from the campaign's Redis
-- stream by the drainers. A player wins at most once per campaign, an envelope goes
-- to at most one player, and every grab names a real envelope of its campaign.
CREATE TABLE grabs (
    campaign_id  text NOT NULL,
    openid       text NOT NULL,
    seq          integer NOT NULL,
    amount_fen   bigint NOT NULL CHECK (amount_fen > 0),
    granted_at   timestamptz NOT NULL,
    stream_id    text NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (campaign_id, openid),
    UNIQUE (campaign_id, seq),
    FOREIGN KEY (campaign_id, seq) REFERENCES envelopes (campaign_id, seq)
);

-- Stream entries the drainers could not record as they are: a grant that contradicts
-- one already recorded (possible only after Redis lost acknowledged writes), an entry
-- of an unknown kind, or a malformed one. They are kept here rather than dropped, and
-- `reconcile` reports every one of them as a mismatch.
CREATE TABLE ledger_rejects (
    campaign_id  text NOT NULL,
    stream_id    text NOT NULL,
    kind         text NOT NULL,
    fields       jsonb NOT NULL,
    reason       text NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (campaign_id, stream_id)
);
