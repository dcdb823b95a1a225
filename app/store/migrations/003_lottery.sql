-- Lottery draws, drained from each campaign's ledger stream (entries with k=draw).
-- One row per draw, prize or not: a player's rows number 1..n without gaps, so the ledger
-- answers both "who won what" and "how many draws did each player use".
CREATE TABLE draws (
    campaign_id  text NOT NULL REFERENCES campaigns (id),
    openid       text NOT NULL,
    draw_no      integer NOT NULL CHECK (draw_no > 0),
    tier         smallint CHECK (tier >= 0),
    value_fen    bigint NOT NULL DEFAULT 0 CHECK (value_fen >= 0),
    day          date NOT NULL,
    drawn_at     timestamptz NOT NULL,
    stream_id    text NOT NULL,
    PRIMARY KEY (campaign_id, openid, draw_no)
);

CREATE INDEX draws_prizes ON draws (campaign_id, tier) WHERE tier IS NOT NULL;
