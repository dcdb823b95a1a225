"""Who the player is: signed sessions, WeChat web-authorization login, the WeChat OAuth client."""
