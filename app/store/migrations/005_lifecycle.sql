-- A campaign's lifecycle, recorded from the ledger stream by the drainers (Redis decides
-- first; PostgreSQL follows, so a pause during a PostgreSQL outage still pauses).
-- paused_entry is the stream id of the pause or resume applied last: an older entry
-- delivered late (a claim after a stall) never overwrites a newer one.
ALTER TABLE campaigns
    ADD COLUMN paused        boolean NOT NULL DEFAULT false,
    ADD COLUMN paused_entry  text,
    ADD COLUMN ended_at      timestamptz;

-- One close-out per campaign, once it has ended: what it did not give out. A red packet's
-- unclaimed envelopes and fen (returned to the budget); a lottery's leftovers per tier,
-- [{"unreleased": n, "unwon": m}, ...] in tier order (its counts are then 0).
CREATE TABLE closeouts (
    campaign_id     text PRIMARY KEY REFERENCES campaigns (id),
    refunded_count  integer NOT NULL CHECK (refunded_count >= 0),
    refunded_fen    bigint NOT NULL CHECK (refunded_fen >= 0),
    tiers           jsonb,
    ended_at        timestamptz NOT NULL,
    closed_at       timestamptz NOT NULL,
    stream_id       text NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now()
);
