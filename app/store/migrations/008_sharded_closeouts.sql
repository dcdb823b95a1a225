-- A sharded red packet closes out each of its sub-pools (its own stream, its own
-- leftovers): one close-out per (campaign, shard); every other campaign's is shard 0.
ALTER TABLE closeouts ADD COLUMN shard integer NOT NULL DEFAULT 0 CHECK (shard >= 0);
ALTER TABLE closeouts DROP CONSTRAINT closeouts_pkey;
ALTER TABLE closeouts ADD PRIMARY KEY (campaign_id, shard);
