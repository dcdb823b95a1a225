-- The payout outbox: one row per grant of cash, the transfer bill that pays it through
-- WeChat Pay. Written by triggers on grabs and draws, inside the statement that records
-- the grant: a grant and its payout row commit together or not at all, whoever writes
-- the grant (a drainer, a redelivery, a rebuild), so the drainers' exactly-once carries
-- over to payouts.

-- out_bill_no: WeChat's 5-32 letters and digits, unique per merchant, derived from the
-- grant alone (campaign, kind, player, envelope or draw number), so it is the same
-- whoever computes it and never changes. A retry after a definite FAIL or CANCELLED (an
-- operator's payout-retry, never after an unclear answer) appends R<n>.
CREATE FUNCTION payout_bill_no(campaign_id text, kind text, openid text, grant_no integer)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT 'P' || substr(encode(sha256(convert_to(
        campaign_id || '/' || kind || '/' || openid || '/' || grant_no::text, 'UTF8')), 'hex'),
        1, 28)
$$;

-- States only move forward: a late or replayed answer or notification never undoes one.
CREATE FUNCTION payout_rank(state text) RETURNS integer LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE state
        WHEN 'NEW' THEN 0 WHEN 'ACCEPTED' THEN 1 WHEN 'PROCESSING' THEN 2
        WHEN 'WAIT_USER_CONFIRM' THEN 3 WHEN 'TRANSFERING' THEN 4 WHEN 'CANCELING' THEN 4
        ELSE 9 END
$$;

CREATE TABLE payouts (
    out_bill_no       text PRIMARY KEY CHECK (out_bill_no ~ '^[A-Za-z0-9]{5,32}$'),
    base_bill_no      text NOT NULL,
    campaign_id       text NOT NULL,
    openid            text NOT NULL,
    grant_kind        text NOT NULL CHECK (grant_kind IN ('grab', 'draw')),
    grant_no          integer NOT NULL,
    amount_fen        bigint NOT NULL CHECK (amount_fen > 0),
    state             text NOT NULL DEFAULT 'NEW' CHECK (state IN (
                          'NEW', 'ACCEPTED', 'PROCESSING', 'WAIT_USER_CONFIRM', 'TRANSFERING',
                          'SUCCESS', 'FAIL', 'CANCELING', 'CANCELLED')),
    -- A create request may have reached WeChat: resolve by querying, never by guessing.
    sent              boolean NOT NULL DEFAULT false,
    transfer_bill_no  text,
    package_info      text,
    fail_reason       text,
    attempts          integer NOT NULL DEFAULT 0,
    retry_no          integer NOT NULL DEFAULT 0,
    -- Bill numbers of earlier attempts, each FAIL or CANCELLED at WeChat.
    previous_bills    text[] NOT NULL DEFAULT '{}',
    next_at           timestamptz NOT NULL DEFAULT now(),
    lease_until       timestamptz,
    waiting_since     timestamptz,
    -- Order of creation at WeChat Pay (the queue position players see).
    queue_no          bigserial,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    -- One bill per grant; also the index of a player's and a campaign's bills.
    UNIQUE (campaign_id, openid, grant_kind, grant_no)
);

-- Few indexes: every grant the drainers record writes one row here, in their statement.
CREATE INDEX payouts_due ON payouts (next_at)
    WHERE state NOT IN ('SUCCESS', 'FAIL', 'CANCELLED');
CREATE INDEX payouts_queue ON payouts (queue_no) WHERE state = 'NEW';

CREATE FUNCTION payouts_for_grabs() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO payouts (out_bill_no, base_bill_no, campaign_id, openid, grant_kind, grant_no,
                         amount_fen)
    SELECT n.bill, n.bill, n.campaign_id, n.openid, 'grab', n.seq, n.amount_fen
    FROM (SELECT payout_bill_no(g.campaign_id, 'grab', g.openid, g.seq) AS bill, g.*
          FROM granted g) n
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END $$;

CREATE FUNCTION payouts_for_draws() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO payouts (out_bill_no, base_bill_no, campaign_id, openid, grant_kind, grant_no,
                         amount_fen)
    SELECT n.bill, n.bill, n.campaign_id, n.openid, 'draw', n.draw_no, n.value_fen
    FROM (SELECT payout_bill_no(d.campaign_id, 'draw', d.openid, d.draw_no) AS bill, d.*
          FROM granted d WHERE d.value_fen > 0) n
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END $$;

CREATE TRIGGER grabs_payouts AFTER INSERT ON grabs REFERENCING NEW TABLE AS granted
    FOR EACH STATEMENT EXECUTE FUNCTION payouts_for_grabs();
CREATE TRIGGER draws_payouts AFTER INSERT ON draws REFERENCING NEW TABLE AS granted
    FOR EACH STATEMENT EXECUTE FUNCTION payouts_for_draws();
