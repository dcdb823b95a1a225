-- WeChat nicknames of players who logged in with scope snsapi_userinfo (GET /sns/userinfo),
-- kept so a campaign's public results can show 手气最佳 and the winners by name; players
-- without one are shown under a masked openid. One row per player, the latest nickname.
CREATE TABLE player_names (
    openid      text PRIMARY KEY,
    nickname    text NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
